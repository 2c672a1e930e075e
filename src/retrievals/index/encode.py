"""Corpus -> Parquet shards of vectors: the per-batch function every engine runs, and the local engine.

:class:`BatchEncoder` maps ``{"id": [...], "text": [...]}`` to ``{"id", "embedding"}`` with the model
(loaded once per process: the local loop, or one Ray actor). :func:`encode_to_shards` streams the
corpus through it: bounded memory (one shard's vectors at a time), resumable (finished shards are
checked and skipped, nothing is written twice), atomic shard writes, a progress bar with texts/s
and ETA. ``engine="ray"`` runs the same function in Ray Data actors (:mod:`.ray_engine`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
from tqdm.auto import tqdm

from .corpus import CorpusOptions, CorpusReader, check_unique_ids, fingerprint
from .manifest import VectorsManifest, model_fingerprint
from .shards import DTYPES, shard_ranges, to_stored, verify_shard, write_shard

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")


class BatchEncoder:
    """The per-batch function: ``{"id": [...], "text": [...]}`` -> ``{"id": [...], "embedding": float32 [n, d]}``.

    Texts are documents (the model's document instruction and max length apply). The model is loaded on
    the first call, once per process, unless one is given."""

    def __init__(self, model_name_or_path: str, batch_size: int = 32, precision: Optional[str] = None,
                 model: Any = None, **load_kwargs: Any) -> None:
        self.model_name_or_path, self.batch_size, self.precision = model_name_or_path, batch_size, precision
        self.load_kwargs, self._model = load_kwargs, model

    @property
    def model(self):
        if self._model is None:
            from ..models.embedding_model import AutoModelForEmbedding

            self._model = AutoModelForEmbedding.from_pretrained(self.model_name_or_path, **self.load_kwargs)
        return self._model

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        texts = [str(t) for t in batch["text"]]
        embeddings = self.model.encode(texts, batch_size=self.batch_size, precision=self.precision,
                                       show_progress_bar=False, convert_to_numpy=True)
        return {"id": np.asarray(batch["id"]), "embedding": np.asarray(embeddings, dtype=np.float32)}


@dataclass
class EncodeJob:
    """What to encode, where, and how (the flags of ``retrievals.pipelines.encode``)."""

    corpus: str
    output_dir: str
    model_name_or_path: str
    shard_size: int = 65_536
    chunk_rows: int = 1024
    batch_size: int = 32
    dtype: str = "float32"
    store_text: bool = False
    precision: Optional[str] = None
    corpus_options: CorpusOptions = field(default_factory=CorpusOptions)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"Unknown embedding dtype {self.dtype!r}; valid values are: {', '.join(DTYPES)}")
        if self.shard_size < 1 or self.chunk_rows < 1 or self.batch_size < 1:
            raise ValueError("shard_size, chunk_rows and batch_size must be >= 1")

    def options(self) -> Dict[str, Any]:
        """Settings a resumed job must share with the first run."""
        return {"store_text": self.store_text, "corpus_options": asdict(self.corpus_options)}


def prepare_manifest(job: EncodeJob, model, reader: CorpusReader) -> VectorsManifest:
    """Start a new manifest, or resume the one in ``output_dir`` after checking it is the same job;
    shards whose file does not match its checksum are dropped (and encoded again)."""
    fresh = VectorsManifest(
        model=os.path.abspath(job.model_name_or_path) if os.path.exists(job.model_name_or_path) else job.model_name_or_path,
        model_fingerprint=model_fingerprint(model), dimension=model.get_sentence_embedding_dimension(),
        normalized=model.embedding_config.normalize_embeddings,
        document_instruction=model.embedding_config.document_instruction, dtype=job.dtype, shard_size=job.shard_size,
        input=fingerprint(reader.files), options=job.options())
    os.makedirs(job.output_dir, exist_ok=True)
    try:
        manifest = VectorsManifest.load(job.output_dir)
    except FileNotFoundError:
        return fresh
    for name in ("model_fingerprint", "dtype", "shard_size", "input", "options"):
        if getattr(manifest, name) != getattr(fresh, name):
            raise ValueError(f"{job.output_dir} holds vectors of another job ({name} differs: "
                             f"{getattr(manifest, name)!r:.120} vs {getattr(fresh, name)!r:.120}); use a new --output_dir")
    kept = []
    for info in manifest.shards:
        problem = verify_shard(job.output_dir, info)
        if problem:
            logger.warning("%s: %s; encoding it again", info.name, problem)
        else:
            kept.append(info)
    manifest.shards, manifest.complete = kept, manifest.complete and len(kept) == len(manifest.shards)
    return manifest


def encode_to_shards(job: EncodeJob, engine: str = "local", encoder: Optional[BatchEncoder] = None,
                     show_progress: bool = True, **engine_kwargs: Any) -> VectorsManifest:
    """Encode ``job.corpus`` into ``job.output_dir``; returns the finished manifest."""
    if engine not in ENGINES:
        raise ValueError(f"Unknown engine {engine!r}; valid engines are: {', '.join(ENGINES)}")
    if engine == "ray":  # the install hint before any work
        from .ray_engine import import_ray

        import_ray()
    encoder = encoder or BatchEncoder(job.model_name_or_path, batch_size=job.batch_size, precision=job.precision)
    reader = CorpusReader(job.corpus, job.corpus_options)
    manifest = prepare_manifest(job, encoder.model, reader)
    if manifest.complete:
        logger.info("%s is complete (%d rows); nothing to encode", job.output_dir, manifest.count)
        return manifest
    manifest.total_rows = check_unique_ids(reader)  # duplicates are an error before any work
    manifest.save(job.output_dir)
    if engine == "ray":
        from .ray_engine import encode_with_ray

        return encode_with_ray(job, manifest, reader, **engine_kwargs)
    _encode_locally(job, manifest, reader, encoder, show_progress)
    return finish(job, manifest, reader)


def finish(job: EncodeJob, manifest: VectorsManifest, reader: CorpusReader) -> VectorsManifest:
    """Mark the manifest complete and write the skipped records (bad or empty) with their reasons."""
    manifest.skipped = len(reader.stats.skipped)
    with open(os.path.join(job.output_dir, "skipped.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in reader.stats.skipped)
    reader.stats.report(job.corpus)
    if manifest.count != manifest.total_rows:
        raise RuntimeError(f"{job.output_dir}: {manifest.count} rows encoded but the corpus has {manifest.total_rows}")
    manifest.complete = True
    manifest.save(job.output_dir)
    logger.info("%s: %d vectors in %d shards (%d records skipped)", job.output_dir, manifest.count,
                len(manifest.shards), manifest.skipped)
    return manifest


class _ShardBuffer:
    """The rows of the shard being filled; encodes them in chunks of ``chunk_rows``."""

    def __init__(self, index: int, first_row: int) -> None:
        self.index, self.first_row = index, first_row
        self.ids: List[str] = []
        self.texts: List[str] = []
        self.vectors: List[np.ndarray] = []
        self.pending = 0  # rows at the end of ids/texts not yet encoded

    def encode_pending(self, encoder: BatchEncoder) -> int:
        if not self.pending:
            return 0
        out = encoder({"id": self.ids[-self.pending:], "text": self.texts[-self.pending:]})
        self.vectors.append(out["embedding"])
        done, self.pending = self.pending, 0
        return done


def _encode_locally(job: EncodeJob, manifest: VectorsManifest, reader: CorpusReader, encoder: BatchEncoder,
                    show_progress: bool) -> None:
    ranges = shard_ranges(manifest.total_rows, job.shard_size)
    done = {info.first_row for info in manifest.shards}
    bar = tqdm(total=manifest.total_rows, initial=manifest.count, unit="texts", desc="Encoding corpus",
               disable=not show_progress, smoothing=0.1)
    buffer: Optional[_ShardBuffer] = None
    for row in reader:
        index = row.row // job.shard_size
        if ranges[index][0] in done:
            continue
        if buffer is None or buffer.index != index:
            buffer = _ShardBuffer(index, ranges[index][0])
        buffer.ids.append(row.id)
        buffer.texts.append(row.text)
        buffer.pending += 1
        if buffer.pending >= job.chunk_rows or row.row + 1 == ranges[index][1]:
            bar.update(buffer.encode_pending(encoder))
        if row.row + 1 == ranges[index][1]:
            _flush(job, manifest, buffer)
            buffer = None
    bar.close()


def _flush(job: EncodeJob, manifest: VectorsManifest, buffer: _ShardBuffer) -> None:
    vectors = np.concatenate(buffer.vectors)
    if manifest.dtype == "int8" and manifest.int8_ranges is None:  # fixed once, from the first shard written
        from ..evaluation.quantized_search import int8_ranges

        starts, steps = int8_ranges(vectors)
        manifest.int8_ranges = {"starts": starts.tolist(), "steps": steps.tolist()}
    info = write_shard(job.output_dir, buffer.index, buffer.first_row, buffer.ids, to_stored(vectors, manifest),
                       buffer.texts if job.store_text else None)
    manifest.shards.append(info)
    manifest.save(job.output_dir)
