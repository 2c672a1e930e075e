"""Exact search over a vectors folder, one shard in memory at a time: the reference that index builds
tune against and that ``Searcher.search(exact=True)`` answers with. It scores like the index does
(:func:`.shards.stored_vectors`: the model's inner product with the vectors as stored)."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from ..evaluation.search import exact_search
from .manifest import VectorsManifest
from .shards import iter_shards, stored_vectors


def exact_search_shards(vectors_dir: str, queries: np.ndarray, top_k: int,
                        manifest: Optional[VectorsManifest] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` over every shard: each shard's top-k merged, which equals
    :func:`~retrievals.evaluation.search.exact_search` over all vectors. Returns ``(scores, rows)`` with
    global row numbers."""
    manifest = manifest or VectorsManifest.load(vectors_dir)
    q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
    best_scores = torch.full((q.shape[0], 0), float("-inf"))
    best_rows = torch.empty((q.shape[0], 0), dtype=torch.long)
    for info, shard in iter_shards(vectors_dir, manifest, columns=("embedding",)):
        scores, rows = exact_search(q, torch.as_tensor(stored_vectors(shard["embedding"], manifest)), top_k=top_k)
        best_scores = torch.cat([best_scores, scores], dim=1)
        best_rows = torch.cat([best_rows, rows + info.first_row], dim=1)
        best_scores, order = best_scores.topk(min(top_k, best_scores.shape[1]), dim=1)
        best_rows = best_rows.gather(1, order)
    return best_scores.numpy(), best_rows.numpy()
