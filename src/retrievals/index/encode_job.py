"""The encode job and the per-batch function every engine runs (the local loop of :mod:`.encode` and
the Ray actors of :mod:`.ray_engine`), with the manifest steps both share: start or resume it, finish it.

:class:`BatchEncoder` maps ``{"id": [...], "text": [...]}`` to ``{"id", "embedding"}`` with the model
(loaded once per process: the local loop, or one Ray actor). :class:`EncodeJob` says what to encode,
where and how; :meth:`EncodeJob.resolved` gives its paths absolute, for workers whose working directory
is not the driver's.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Optional

import numpy as np

from ..data.corpus import CorpusOptions, CorpusReader, fingerprint
from ..data.jsonl import write_jsonl
from .manifest import VectorsManifest, model_fingerprint
from .shards import DTYPES, verify_shard

logger = logging.getLogger(__name__)


def resolve_model_path(model_name_or_path: str) -> str:
    """A model folder that exists here, made absolute; a hub name as given."""
    return os.path.abspath(model_name_or_path) if os.path.exists(model_name_or_path) else model_name_or_path


class BatchEncoder:
    """The per-batch function: ``{"id": [...], "text": [...]}`` -> ``{"id": [...], "embedding": float32 [n, d]}``.

    Texts are documents (the model's document instruction and max length apply). The model is loaded on
    the first call, once per process, unless one is given."""

    def __init__(self, model_name_or_path: str, batch_size: int = 32, precision: Optional[str] = None,
                 model: Any = None, **load_kwargs: Any) -> None:
        self.model_name_or_path, self.batch_size = model_name_or_path, batch_size
        # a model loaded here takes the precision (and backend) at load; a given one at each call
        self.precision = precision if model is not None else None
        self.load_kwargs, self._model = {**load_kwargs, "precision": precision} if model is None else load_kwargs, model

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
    backend: Optional[str] = None  # auto, torch, openvino (retrievals.backends)
    calibration_file: Optional[str] = None  # int8 on OpenVINO: calibrate on these documents (default: the corpus)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"Unknown embedding dtype {self.dtype!r}; valid values are: {', '.join(DTYPES)}")
        if self.shard_size < 1 or self.chunk_rows < 1 or self.batch_size < 1:
            raise ValueError("shard_size, chunk_rows and batch_size must be >= 1")

    def options(self) -> Dict[str, Any]:
        """Settings a resumed job must share with the first run."""
        return {"store_text": self.store_text, "corpus_options": asdict(self.corpus_options)}

    def encoder(self) -> BatchEncoder:
        """The per-batch function with this job's model settings (every engine's, and the driver's)."""
        from ..data.corpus import sample_texts

        kwargs = {}
        if str(self.precision or "").lower() == "int8" and self.backend not in (None, "torch"):  # calibrated on the corpus
            kwargs["backend_kwargs"] = {"calibration_texts": sample_texts(self.calibration_file or self.corpus)}
        return BatchEncoder(self.model_name_or_path, batch_size=self.batch_size, precision=self.precision,
                            backend=self.backend, **kwargs)

    def prepare_backend(self, model) -> None:
        """Int8 on OpenVINO is quantised here, once, on the job's calibration sample before any worker
        starts, and saved: every worker then loads the same int8 graph."""
        from ..models.accelerated import needs_calibration, prepare_backend

        if needs_calibration(model):
            prepare_backend(model)

    def resolved(self) -> EncodeJob:
        """This job with absolute paths (corpus, output_dir, a local model folder), resolved here: for workers
        whose working directory is not this process's (a Ray cluster's actors)."""
        return replace(self, corpus=os.path.abspath(self.corpus), output_dir=os.path.abspath(self.output_dir),
                       model_name_or_path=resolve_model_path(self.model_name_or_path),
                       calibration_file=os.path.abspath(self.calibration_file) if self.calibration_file else None)


def prepare_manifest(job: EncodeJob, model, reader: CorpusReader) -> VectorsManifest:
    """Start a new manifest, or resume the one in ``output_dir`` after checking it is the same job;
    shards whose file does not match its checksum are dropped (and encoded again)."""
    fresh = VectorsManifest(
        model=resolve_model_path(job.model_name_or_path),
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


def finish(job: EncodeJob, manifest: VectorsManifest, reader: CorpusReader) -> VectorsManifest:
    """Mark the manifest complete and write the skipped records (bad or empty) with their reasons."""
    manifest.skipped = len(reader.stats.skipped)
    write_jsonl(os.path.join(job.output_dir, "skipped.jsonl"), reader.stats.skipped)
    reader.stats.report(job.corpus)
    if manifest.count != manifest.total_rows:
        raise RuntimeError(f"{job.output_dir}: {manifest.count} rows encoded but the corpus has {manifest.total_rows}")
    manifest.complete = True
    manifest.save(job.output_dir)
    logger.info("%s: %d vectors in %d shards (%d records skipped)", job.output_dir, manifest.count,
                len(manifest.shards), manifest.skipped)
    return manifest
