"""Distillation from teacher scores: list-wise KL and MarginMSE."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .utils import check_pair, check_similarity, flatten_negatives, for_similarity


def _group_scores(query: torch.Tensor, positive: torch.Tensor, negative: Optional[torch.Tensor],
                  similarity: str = "dot") -> torch.Tensor:
    """Scores (``cosine`` or ``dot``) of each query with its own documents ``[B, 1 + n]`` (positive first)."""
    check_pair(query, positive)
    query, positive, negative = (for_similarity(t, similarity) for t in (query, positive, negative))
    docs = positive.unsqueeze(1)
    if negative is not None:
        negative = flatten_negatives(negative, query.shape[0]).reshape(query.shape[0], -1, query.shape[-1])
        docs = torch.cat([docs, negative], dim=1)
    return torch.einsum("bd,bnd->bn", query, docs)


class ListwiseKLLoss(nn.Module):
    """``KL(softmax(teacher / t_teacher) || softmax(student / t))`` per query, averaged over the batch.

    Inputs: ``query`` ``[B, D]``; ``positive`` ``[B, D]`` and ``negative`` ``[B, n, D]`` (the list's
    documents; the first is any document, not necessarily relevant); ``teacher_scores`` ``[B, 1+n]``.
    Returns a scalar (``batchmean`` reduction: a proper KL per list). Student scores are cosines
    (``similarity="cosine"``, as for :class:`InfoNCE`) or raw inner products (``"dot"``).
    """

    def __init__(self, temperature: float = 0.05, teacher_temperature: float = 1.0, similarity: str = "cosine") -> None:
        super().__init__()
        self.temperature = temperature
        self.teacher_temperature = teacher_temperature
        self.similarity = check_similarity(similarity)

    def forward(self, query: torch.Tensor, positive: torch.Tensor, negative: Optional[torch.Tensor] = None,
                teacher_scores: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        student = _group_scores(query, positive, negative, self.similarity) / self.temperature
        if teacher_scores is None or teacher_scores.shape != student.shape:
            got = None if teacher_scores is None else tuple(teacher_scores.shape)
            raise ValueError(f"teacher_scores must be [B, 1 + n] = {tuple(student.shape)}, got {got}")
        target = torch.log_softmax(teacher_scores.to(student.dtype) / self.teacher_temperature, dim=-1)
        return nn.functional.kl_div(torch.log_softmax(student, dim=-1), target, reduction="batchmean", log_target=True)


class MarginMSELoss(nn.Module):
    """MarginMSE (Hofstaetter et al.): ``mse(s(q,p) - s(q,n), t(q,p) - t(q,n))`` over all negatives.

    Inputs: ``query``/``positive`` ``[B, D]``, ``negative`` ``[B, n, D]``, ``teacher_scores``
    ``[B, 1 + n]`` (positive first). Returns a scalar. Student scores are raw inner products by
    default (``similarity="dot"``: margins on the teacher's own, unbounded scale); ``"cosine"`` bounds them.
    """

    def __init__(self, similarity: str = "dot") -> None:
        super().__init__()
        self.similarity = check_similarity(similarity)

    def forward(self, query: torch.Tensor, positive: torch.Tensor, negative: Optional[torch.Tensor] = None,
                teacher_scores: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        if negative is None:
            raise ValueError("MarginMSELoss needs negatives")
        student = _group_scores(query, positive, negative, self.similarity)
        if teacher_scores is None or teacher_scores.shape != student.shape:
            raise ValueError(f"teacher_scores must be [B, 1 + n] = {tuple(student.shape)}")
        teacher = teacher_scores.to(student.dtype)
        return nn.functional.mse_loss(student[:, :1] - student[:, 1:], teacher[:, :1] - teacher[:, 1:])
