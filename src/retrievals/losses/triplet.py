"""Triplet and pair-wise ranking losses over (query, positive, negative) similarities."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .utils import pos_neg_cosines


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
        pos, neg = pos_neg_cosines(query, positive, negative)
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
        pos, neg = pos_neg_cosines(query, positive, negative)
        return nn.functional.softplus((neg - pos) / self.temperature).mean()
