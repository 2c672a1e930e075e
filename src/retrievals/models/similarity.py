"""Similarity between two sets of embeddings."""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

Array = Union[np.ndarray, torch.Tensor]

SIMILARITY_FUNCTIONS = ("cosine", "dot")


def similarity(a: Array, b: Array, metric: str = "cosine") -> Array:
    """Score matrix ``[len(a), len(b)]``; 1-D inputs are treated as a single row.

    ``cosine`` normalises both sides first; ``dot`` is the plain inner product. The result has
    the type of ``a`` (NumPy array or tensor).
    """
    if metric not in SIMILARITY_FUNCTIONS:
        raise ValueError(f"Unknown similarity metric {metric!r}; valid names are: {', '.join(SIMILARITY_FUNCTIONS)}")
    as_numpy = isinstance(a, np.ndarray)
    ta = torch.as_tensor(a, dtype=torch.float32)
    tb = torch.as_tensor(b, dtype=torch.float32, device=ta.device)
    ta = ta.unsqueeze(0) if ta.dim() == 1 else ta
    tb = tb.unsqueeze(0) if tb.dim() == 1 else tb
    if ta.shape[-1] != tb.shape[-1]:
        raise ValueError(f"Embedding sizes differ: {ta.shape[-1]} vs {tb.shape[-1]}")
    if metric == "cosine":
        ta = torch.nn.functional.normalize(ta, dim=-1)
        tb = torch.nn.functional.normalize(tb, dim=-1)
    scores = ta @ tb.T
    return scores.cpu().numpy() if as_numpy else scores
