"""Stored document texts by row (vectors encoded with ``store_text=True``), one shard read at a time."""

from __future__ import annotations

import bisect
from typing import Dict, Iterable, Optional

from .manifest import ShardInfo, VectorsManifest
from .shards import verify_shard

_VERIFIED: set = set()  # (path, sha256) of shards already checked in this process


def stored_texts(vectors_dir: str, rows: Iterable[int], manifest: Optional[VectorsManifest] = None) -> Dict[int, str]:
    """``{row: text}`` for the given rows; reads only the shards that hold them (their text column).
    Raises a clear error when the vectors were encoded without ``--store_text``."""
    manifest = manifest or VectorsManifest.load(vectors_dir)
    if not manifest.options.get("store_text"):
        raise ValueError(f"{vectors_dir}: the corpus text was not kept (encode with --store_text to keep it, "
                         "or pass the corpus file)")
    shards = sorted(manifest.shards, key=lambda s: s.first_row)
    starts = [s.first_row for s in shards]
    wanted: Dict[int, list] = {}
    for row in set(int(r) for r in rows if r >= 0):
        at = bisect.bisect_right(starts, row) - 1
        if at < 0 or row >= shards[at].first_row + shards[at].rows:
            raise IndexError(f"row {row} is outside the {manifest.count} vectors of {vectors_dir}")
        wanted.setdefault(at, []).append(row)
    out: Dict[int, str] = {}
    for at, needed in wanted.items():
        out.update(_texts_of_shard(vectors_dir, shards[at], sorted(needed)))
    return out


def _texts_of_shard(vectors_dir: str, info: ShardInfo, rows: list) -> Dict[int, str]:
    """Read only the row groups holding ``rows``; the shard's checksum is checked once per process."""
    import os

    import pyarrow.parquet as pq

    path = os.path.join(vectors_dir, info.name)
    if (path, info.sha256) not in _VERIFIED:
        problem = verify_shard(vectors_dir, info)
        if problem:
            raise ValueError(f"{path}: {problem}; re-run the encode to rebuild it")
        _VERIFIED.add((path, info.sha256))
    parquet = pq.ParquetFile(path)
    bounds, start = [], 0
    for group in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        bounds.append((start, start + size))
        start += size
    out: Dict[int, str] = {}
    for group, (lo, hi) in enumerate(bounds):
        local = [r for r in rows if lo <= r - info.first_row < hi]
        if local:
            texts = parquet.read_row_group(group, columns=["text"]).column("text").to_pylist()
            out.update({r: texts[r - info.first_row - lo] for r in local})
    return out
