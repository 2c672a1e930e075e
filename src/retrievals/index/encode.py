"""Corpus -> Parquet shards of vectors: the local engine, and the entry point of every engine.

:func:`encode_to_shards` streams the corpus through the per-batch function
(:class:`~retrievals.index.encode_job.BatchEncoder`): bounded memory (one shard's vectors at a time),
resumable (finished shards are checked and skipped, nothing is written twice), atomic shard writes, a
progress bar with texts/s and ETA. ``engine="ray"`` runs the same function in Ray Data actors
(:mod:`.ray_engine`); the job, the batch encoder and the manifest steps both engines share live below
both, in :mod:`.encode_job`.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional

import numpy as np
from tqdm.auto import tqdm

from ..data.corpus import CorpusReader, check_unique_ids
from .encode_job import BatchEncoder, EncodeJob, finish, prepare_manifest
from .manifest import VectorsManifest
from .shards import shard_ranges, to_stored, write_shard

__all__ = ["ENGINES", "BatchEncoder", "EncodeJob", "encode_to_shards"]

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")


def encode_to_shards(job: EncodeJob, engine: str = "local", encoder: Optional[BatchEncoder] = None,
                     show_progress: bool = True, **engine_kwargs: Any) -> VectorsManifest:
    """Encode ``job.corpus`` into ``job.output_dir``; returns the finished manifest."""
    if engine not in ENGINES:
        raise ValueError(f"Unknown engine {engine!r}; valid engines are: {', '.join(ENGINES)}")
    if engine == "ray":  # the install hint before any work
        from .ray_engine import import_ray

        import_ray()
    encoder = encoder or job.encoder()
    job.prepare_backend(encoder.model)
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
