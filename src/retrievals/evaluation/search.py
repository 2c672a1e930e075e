"""Exact (brute-force) inner-product search in chunks."""

from __future__ import annotations

from typing import Tuple, Union

import numpy as np
import torch


def exact_search(
    queries: Union[np.ndarray, torch.Tensor],
    corpus: Union[np.ndarray, torch.Tensor],
    top_k: int = 100,
    chunk_size: int = 50_000,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` documents per query by inner product; returns ``(scores, indices)`` ``[nq, k]``."""
    q = torch.as_tensor(queries, dtype=torch.float32)
    c = torch.as_tensor(corpus, dtype=torch.float32)
    if q.dim() != 2 or c.dim() != 2 or q.shape[1] != c.shape[1]:
        raise ValueError(f"Expected [nq, d] and [nc, d] embeddings, got {tuple(q.shape)} and {tuple(c.shape)}")
    k = min(top_k, c.shape[0])
    best_scores = torch.full((q.shape[0], 0), float("-inf"))
    best_idx = torch.empty((q.shape[0], 0), dtype=torch.long)
    for start in range(0, c.shape[0], chunk_size):
        scores = q @ c[start:start + chunk_size].T
        s, i = scores.topk(min(k, scores.shape[1]), dim=1)
        best_scores = torch.cat([best_scores, s], dim=1)
        best_idx = torch.cat([best_idx, i + start], dim=1)
        best_scores, order = best_scores.topk(min(k, best_scores.shape[1]), dim=1)
        best_idx = best_idx.gather(1, order)
    return best_scores, best_idx
