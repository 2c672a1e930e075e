"""CoSENT and circle losses: order the pair scores as the labels order them."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .utils import check_pair, pos_neg_cosines


def _ordered_pair_loss(scores: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """``log(1 + sum_{(i, j): y_i > y_j} exp(scale * (s_j - s_i)))``."""
    diff = scale * (scores.unsqueeze(0) - scores.unsqueeze(1))  # [i, j] = scale * (s_j - s_i)
    should_rank_higher = labels.unsqueeze(1) > labels.unsqueeze(0)  # y_i > y_j
    diff = diff.masked_fill(~should_rank_higher, float("-inf"))
    zero = torch.zeros(1, dtype=diff.dtype, device=diff.device)
    return torch.logsumexp(torch.cat([zero, diff.flatten()]), dim=0)


class CoSENT(nn.Module):
    """CoSENT (Su, 2022): for every pair of pairs with ``label_i > label_j``, push
    ``cos_i`` above ``cos_j``. Inputs: ``query`` ``[B, D]``, ``positive`` (the other side of each
    pair) ``[B, D]``, ``labels`` ``[B]`` (any real scores, e.g. STS 0-5). Returns a scalar; with all
    labels equal it is ``log(1) = 0``.
    """

    def __init__(self, scale: float = 20.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, query: torch.Tensor, positive: torch.Tensor, negative: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        check_pair(query, positive)
        if labels is None:
            raise ValueError("CoSENT needs labels (one score per pair)")
        cos = nn.functional.cosine_similarity(query, positive, dim=-1)
        return _ordered_pair_loss(cos, labels.to(cos.dtype), self.scale)


class CircleLoss(nn.Module):
    """Circle loss (Sun et al., 2020) for one positive and ``n`` negatives per query.

    ``log(1 + sum_n exp(gamma * a_n (s_n - delta_n)) * exp(-gamma * a_p (s_p - delta_p)))`` with
    ``a_p = relu(1 + m - s_p)``, ``a_n = relu(s_n + m)``, ``delta_p = 1 - m``, ``delta_n = m``
    (weights detached as in the paper unless ``detach_weights=False``). Shapes as
    :class:`~retrievals.losses.TripletLoss`; scalar.
    """

    def __init__(self, margin: float = 0.25, gamma: float = 32.0, detach_weights: bool = True) -> None:
        super().__init__()
        self.margin = margin
        self.gamma = gamma
        self.detach_weights = detach_weights

    def forward(self, query: torch.Tensor, positive: torch.Tensor, negative: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        s_p, s_n = pos_neg_cosines(query, positive, negative)
        s_p = s_p.squeeze(1)
        m = self.margin
        a_p, a_n = torch.relu(1 + m - s_p), torch.relu(s_n + m)
        if self.detach_weights:
            a_p, a_n = a_p.detach(), a_n.detach()
        logit_p = -self.gamma * a_p * (s_p - (1 - m))
        logit_n = self.gamma * a_n * (s_n - m)
        return nn.functional.softplus(torch.logsumexp(logit_n, dim=1) + logit_p).mean()
