"""Stored document texts by row (vectors encoded with ``store_text=True``), one shard read at a time."""

from __future__ import annotations

import bisect
from typing import Dict, Iterable, Optional

from .manifest import VectorsManifest
from .shards import read_shard


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
        texts = read_shard(vectors_dir, shards[at], manifest, columns=("text",))["text"]
        out.update({row: texts[row - shards[at].first_row] for row in needed})
    return out
