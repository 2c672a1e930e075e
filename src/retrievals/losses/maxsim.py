"""Late-interaction (ColBERT-style) scoring and its contrastive loss.

``maxsim(q, d)`` = for every real query token, the largest dot product with any real document
token, then the **mean** over the real query tokens (``normalize=True``, the default; ColBERT
itself uses the sum). The mean keeps scores on the cosine scale ``[-1, 1]`` for normalised token
vectors, so one temperature fits queries of every length; within one query it ranks documents
exactly as the sum does. Padding is excluded on both sides through the masks.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .utils import masked_cross_entropy

__all__ = ["maxsim_scores", "paired_maxsim_scores", "MaxSimLoss"]


def _mask_for(tokens: torch.Tensor, mask: Optional[torch.Tensor], name: str) -> torch.Tensor:
    if tokens.dim() != 3:
        raise ValueError(f"{name} must be [batch, tokens, dim], got shape {tuple(tokens.shape)}")
    if mask is None:
        return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    if tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ValueError(f"{name}_mask must be {tuple(tokens.shape[:2])} to match {name}, got {tuple(mask.shape)}")
    mask = mask.to(device=tokens.device).bool()
    empty = (~mask.any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"{name}_mask has no real token in row(s) {empty[:5].tolist()}")
    return mask


def _reduce_query(best: torch.Tensor, query_mask: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``best`` ``[Bq, X, Lq]`` (max over doc tokens) -> ``[Bq, X]`` over the real query tokens."""
    qm = query_mask.unsqueeze(1)
    total = torch.where(qm, best, torch.zeros_like(best)).sum(-1)
    if normalize:
        total = total / query_mask.sum(-1, keepdim=True).to(total.dtype)
    return total


def maxsim_scores(
    query: torch.Tensor,
    query_mask: Optional[torch.Tensor],
    docs: torch.Tensor,
    doc_mask: Optional[torch.Tensor],
    normalize: bool = True,
) -> torch.Tensor:
    """Late-interaction scores of every query against every document: ``[Bq, Bd]``.

    ``query`` ``[Bq, Lq, d]``, ``docs`` ``[Bd, Ld, d]``; masks ``[B, L]`` (1 = real token, ``None``
    = all real). ``score[i, j] = mean_{t real in q_i} max_{s real in d_j} q_i[t] . d_j[s]`` (the sum
    instead of the mean with ``normalize=False``). Every row of each mask needs a real token.
    """
    query_mask = _mask_for(query, query_mask, "query")
    doc_mask = _mask_for(docs, doc_mask, "docs")
    if query.shape[-1] != docs.shape[-1]:
        raise ValueError(f"query and docs token dims differ: {query.shape[-1]} vs {docs.shape[-1]}")
    sim = torch.einsum("qtd,bsd->qbts", query, docs)  # [Bq, Bd, Lq, Ld]
    sim = sim.masked_fill(~doc_mask[None, :, None, :], float("-inf"))
    return _reduce_query(sim.amax(dim=-1), query_mask, normalize)


def paired_maxsim_scores(
    query: torch.Tensor,
    query_mask: Optional[torch.Tensor],
    docs: torch.Tensor,
    doc_mask: Optional[torch.Tensor],
    normalize: bool = True,
) -> torch.Tensor:
    """Each query against its own documents only: ``docs`` ``[Bq, n, Ld, d]`` -> scores ``[Bq, n]``."""
    if docs.dim() != 4 or docs.shape[0] != query.shape[0]:
        raise ValueError(f"docs must be [Bq={query.shape[0]}, n, tokens, dim], got {tuple(docs.shape)}")
    query_mask = _mask_for(query, query_mask, "query")
    batch, n, length, dim = docs.shape
    flat_mask = None if doc_mask is None else doc_mask.reshape(batch * n, length)
    flat_mask = _mask_for(docs.reshape(batch * n, length, dim), flat_mask, "docs").reshape(batch, n, length)
    sim = torch.einsum("qtd,qbsd->qbts", query, docs)  # [Bq, n, Lq, Ld]
    sim = sim.masked_fill(~flat_mask[:, :, None, :], float("-inf"))
    return _reduce_query(sim.amax(dim=-1), query_mask, normalize)


def _upcast(tokens: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Half-precision token vectors to float32 (float64 stays, for gradcheck)."""
    if tokens is None or tokens.dtype in (torch.float32, torch.float64):
        return tokens
    return tokens.float()


def _mask_duplicates(scores: torch.Tensor, labels: torch.Tensor, positive_ids: Optional[torch.Tensor],
                     doc_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """-inf for every candidate that is the query's positive text but not its label column."""
    if positive_ids is None or doc_ids is None:
        return scores
    same = positive_ids.unsqueeze(1) == doc_ids.unsqueeze(0)
    same[torch.arange(scores.shape[0], device=scores.device), labels] = False
    return scores.masked_fill(same, float("-inf"))


def _flatten_token_negatives(negative: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                             batch: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Accept ``[B, n, L, d]`` or ``[B*n, L, d]`` negatives (mask ``[B, n, L]`` / ``[B*n, L]``)."""
    if negative is None:
        return None, None
    if negative.dim() == 4:
        negative = negative.reshape(-1, *negative.shape[2:])
        mask = None if mask is None else mask.reshape(-1, mask.shape[-1])
    if negative.dim() != 3 or negative.shape[0] % batch != 0:
        raise ValueError(f"negative must be [B, n, L, d] or [B*n, L, d] with B={batch}, got {tuple(negative.shape)}")
    return negative, mask


class MaxSimLoss(nn.Module):
    """Contrastive cross-entropy over late-interaction (maxsim) scores of token embeddings.

    Args:
        temperature: logits are ``maxsim / temperature`` (maxsim is the per-query-token mean, see
            :func:`maxsim_scores`, so the InfoNCE range 0.02-0.1 applies).
        use_inbatch_negative: the other queries' positives and all negatives in the batch are
            candidates too; off, each query sees only its own positive and its own negatives.
        criterion: classification loss over the score rows (default ``nn.CrossEntropyLoss()``).

    Shapes: ``query`` ``[B, Lq, d]``, ``positive`` ``[B, Lp, d]``, ``negative`` ``[B*n, Ln, d]`` or
    ``[B, n, Ln, d]``; each ``*_mask`` is ``[rows, L]`` (1 = real token), as ``RetrievalTrainer``
    passes for a model with ``returns_token_embeddings = True``. ``positive_ids`` / ``negative_ids``
    mask in-batch candidates that are the query's positive text (as in :class:`InfoNCE`).
    Scores are computed in float32 outside autocast. Not gathered across devices.
    """

    def __init__(self, temperature: float = 0.05, use_inbatch_negative: bool = True,
                 criterion: Optional[nn.Module] = None) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.use_inbatch_negative = use_inbatch_negative
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()

    def forward(
        self,
        query: torch.Tensor,
        positive: torch.Tensor,
        negative: Optional[torch.Tensor] = None,
        query_mask: Optional[torch.Tensor] = None,
        positive_mask: Optional[torch.Tensor] = None,
        negative_mask: Optional[torch.Tensor] = None,
        positive_ids: Optional[torch.Tensor] = None,
        negative_ids: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> torch.Tensor:
        if query.dim() != 3 or positive.dim() != 3 or positive.shape[0] != query.shape[0]:
            raise ValueError("query and positive must be token embeddings [B, L, d] with the same B, got "
                             f"{tuple(query.shape)} and {tuple(positive.shape)}")
        batch = query.shape[0]
        negative, negative_mask = _flatten_token_negatives(negative, negative_mask, batch)
        with torch.autocast(device_type=query.device.type, enabled=False):
            query, positive, negative = _upcast(query), _upcast(positive), _upcast(negative)
            if not self.use_inbatch_negative:
                return self._own_candidates_loss(query, positive, negative, query_mask, positive_mask,
                                                 negative_mask, positive_ids, negative_ids)
            parts = [maxsim_scores(query, query_mask, positive, positive_mask)]
            if negative is not None:
                parts.append(maxsim_scores(query, query_mask, negative, negative_mask))
            scores = torch.cat(parts, dim=1) / self.temperature
            labels = torch.arange(batch, device=query.device)
            doc_ids = None
            if positive_ids is not None and (negative is None or negative_ids is not None):
                doc_ids = positive_ids if negative is None else torch.cat([positive_ids, negative_ids])
            scores = _mask_duplicates(scores, labels, positive_ids, doc_ids)
            return masked_cross_entropy(scores, labels, self.criterion)

    def _own_candidates_loss(self, query, positive, negative, query_mask, positive_mask, negative_mask,
                             positive_ids, negative_ids) -> torch.Tensor:
        if negative is None:
            raise ValueError("use_inbatch_negative=False needs hard negatives: with only the positive "
                             "to choose from, the loss is constant")
        batch = query.shape[0]
        pos = paired_maxsim_scores(query, query_mask, positive.unsqueeze(1),
                                   None if positive_mask is None else positive_mask.unsqueeze(1))
        negative = negative.reshape(batch, -1, *negative.shape[1:])
        neg_mask = None if negative_mask is None else negative_mask.reshape(batch, -1, negative_mask.shape[-1])
        neg = paired_maxsim_scores(query, query_mask, negative, neg_mask)
        if positive_ids is not None and negative_ids is not None:
            neg = neg.masked_fill(negative_ids.reshape(batch, -1) == positive_ids.unsqueeze(1), float("-inf"))
        scores = torch.cat([pos, neg], dim=1) / self.temperature
        labels = torch.zeros(batch, dtype=torch.long, device=query.device)
        return masked_cross_entropy(scores, labels, self.criterion)
