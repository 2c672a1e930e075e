"""Triplet and pair-wise ranking losses over (query, positive, negative) similarities."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .utils import check_pair, flatten_negatives


def _pos_neg_scores(query, positive, negative):
    """Cosine ``s(q, p)`` ``[B, 1]`` and ``s(q, n)`` ``[B, n]`` for each query's own negatives."""
    check_pair(query, positive)
    if negative is None:
        raise ValueError("this loss needs negatives (query, positive, negative)")
    batch = query.shape[0]
    negative = flatten_negatives(negative, batch).reshape(batch, -1, query.shape[-1])
    q = nn.functional.normalize(query, dim=-1)
    pos = (q * nn.functional.normalize(positive, dim=-1)).sum(-1, keepdim=True)
    neg = torch.einsum("bd,bnd->bn", q, nn.functional.normalize(negative, dim=-1))
    return pos, neg


class TripletLoss(nn.Module):
    """Hinge ``max(0, s(q, n) - s(q, p) + margin)`` on cosine similarities, averaged.

    Shapes: ``query``/``positive`` ``[B, D]``, ``negative`` ``[B, n, D]`` or ``[B*n, D]``; scalar.
    The loss is exactly zero once every negative is ``margin`` below its positive.
    """

    def __init__(self, margin: float = 0.5) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, query: torch.Tensor, positive: torch.Tensor, negative: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        pos, neg = _pos_neg_scores(query, positive, negative)
        return torch.relu(neg - pos + self.margin).mean()


class PairwiseHingeLoss(TripletLoss):
    """The seed's pair-wise hinge loss; identical to :class:`TripletLoss` (margin 0.2 by default)."""

    def __init__(self, margin: float = 0.2) -> None:
        super().__init__(margin=margin)


class PairwiseLogisticLoss(nn.Module):
    """``log(1 + exp(-(s(q, p) - s(q, n)) / temperature))`` (RankNet / BPR on scores), averaged.

    Shapes as :class:`TripletLoss`; scalar.
    """

    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, query: torch.Tensor, positive: torch.Tensor, negative: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        pos, neg = _pos_neg_scores(query, positive, negative)
        return nn.functional.softplus((neg - pos) / self.temperature).mean()
