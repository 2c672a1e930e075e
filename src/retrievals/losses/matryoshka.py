"""Matryoshka representation learning: one loss applied at nested embedding sizes."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

__all__ = ["MatryoshkaLoss", "truncate_embeddings", "parse_dims"]


def truncate_embeddings(embeddings: Optional[torch.Tensor], dim: int, normalize: bool = True) -> Optional[torch.Tensor]:
    """The first ``dim`` features of the last axis, L2-normalised again (the vector a truncated model serves)."""
    if embeddings is None:
        return None
    if dim > embeddings.shape[-1]:
        raise ValueError(f"Matryoshka dimension {dim} exceeds the embedding size {embeddings.shape[-1]}")
    out = embeddings[..., :dim]
    return nn.functional.normalize(out, p=2, dim=-1) if normalize else out


def parse_dims(text: str) -> list:
    """``"384,256,128"`` -> ``[384, 256, 128]`` (positive, distinct integers)."""
    try:
        dims = [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"dimensions must be comma-separated integers, got {text!r}") from None
    if not dims or min(dims) < 1 or len(set(dims)) != len(dims):
        raise ValueError(f"dimensions must be distinct positive integers, got {text!r}")
    return dims


class MatryoshkaLoss(nn.Module):
    """``sum_d w_d * loss(embeddings[..., :d] re-normalised)`` over nested sizes ``dims``.

    Wraps any embedding loss of this package (InfoNCE, CoSENT, triplet, distillation, maxsim...):
    every embedding argument (``query``, ``positive``, ``negative``, ``[B, D]`` or ``[B, n, D]`` or
    token-level ``[B, L, D]``) is truncated to each size in turn; other arguments (labels, teacher
    scores, ids, masks) pass through. Weights default to 1 each and the weighted losses are summed,
    as in Kusupati et al. and sentence-transformers. Returns a scalar.
    """

    EMBEDDING_ARGS = ("query", "positive", "negative")

    def __init__(self, loss: nn.Module, dims: Sequence[int], weights: Optional[Sequence[float]] = None,
                 normalize: bool = True) -> None:
        super().__init__()
        dims = [int(d) for d in dims]
        if not dims or min(dims) < 1 or len(set(dims)) != len(dims):
            raise ValueError(f"dims must be distinct positive integers, got {list(dims)}")
        weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
        if len(weights) != len(dims):
            raise ValueError(f"{len(weights)} weights for {len(dims)} dims")
        self.loss, self.dims, self.weights, self.normalize = loss, dims, weights, normalize

    def forward(self, query: torch.Tensor, positive: Optional[torch.Tensor] = None,
                negative: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
        total = None
        for dim, weight in zip(self.dims, self.weights):
            truncated = {name: truncate_embeddings(value, dim, self.normalize)
                         for name, value in (("query", query), ("positive", positive), ("negative", negative))
                         if value is not None}
            value = weight * self.loss(**truncated, **kwargs)
            total = value if total is None else total + value
        return total

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            return getattr(super().__getattr__("loss"), name)  # e.g. `temperature` of the wrapped loss
