"""InfoNCE (multiple-negatives ranking) loss."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .utils import (
    check_pair,
    check_similarity,
    flatten_negatives,
    for_similarity,
    gather_ids,
    gather_with_grad,
    masked_cross_entropy,
)


class InfoNCE(nn.Module):
    """Contrastive cross-entropy of each query against its positive and negative documents.

    Args:
        criterion: classification loss over the score rows (default ``nn.CrossEntropyLoss()``);
            the seed's ``InfoNCE(nn.CrossEntropyLoss(label_smoothing=0.05))`` form.
        temperature: scores are ``similarity(query, document) / temperature``.
        use_inbatch_negative: the other queries' positives (and all negatives) in the batch are
            negatives too; off, each query sees only its own positive and its own negatives.
        negatives_cross_device: gather documents from every rank (see ``gather_with_grad``).
        symmetric: add the document -> query direction (positives against all queries); a query whose
            positive is the same text as the row's positive is masked there too.
        similarity: ``"cosine"`` (default: embeddings are L2-normalised inside the loss, so models that
            do not normalise, e.g. sentence-transformers folders without a Normalize module, train with
            the same logit scale) or ``"dot"`` (raw inner products, for models trained for them).

    Shapes: ``query`` and ``positive`` ``[B, D]``; ``negative`` ``[B, n, D]`` or ``[B*n, D]``
    (optional); ``extra_negatives`` ``[M, D]`` (optional, e.g. a memory bank) are candidates for
    every query, after the (gathered) batch, with optional ``extra_negative_ids`` ``[M]``;
    ``positive_ids`` ``[B]`` and ``negative_ids`` ``[B*n]`` (optional) identify texts: an in-batch
    candidate with the same id as a query's positive is masked out (not punished), since it is the
    same text. Returns a scalar.
    """

    def __init__(
        self,
        criterion: Optional[nn.Module] = None,
        temperature: float = 0.05,
        use_inbatch_negative: bool = True,
        negatives_cross_device: bool = False,
        symmetric: bool = False,
        similarity: str = "cosine",
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.similarity = check_similarity(similarity)
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.temperature = temperature
        self.use_inbatch_negative = use_inbatch_negative
        self.negatives_cross_device = negatives_cross_device
        self.symmetric = symmetric

    def forward(
        self,
        query: torch.Tensor,
        positive: torch.Tensor,
        negative: Optional[torch.Tensor] = None,
        positive_ids: Optional[torch.Tensor] = None,
        negative_ids: Optional[torch.Tensor] = None,
        extra_negatives: Optional[torch.Tensor] = None,
        extra_negative_ids: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> torch.Tensor:
        check_pair(query, positive)
        query, positive, negative, extra_negatives = (for_similarity(t, self.similarity) for t in
                                                      (query, positive, negative, extra_negatives))
        negative = flatten_negatives(negative, query.shape[0])
        if not self.use_inbatch_negative:
            if extra_negatives is not None:
                raise ValueError("extra_negatives need use_inbatch_negative=True")
            return self._own_candidates_loss(query, positive, negative, positive_ids, negative_ids)
        docs, doc_ids, offset = self._candidates(positive, negative, positive_ids, negative_ids)
        if extra_negatives is not None:
            docs = torch.cat([docs, extra_negatives.to(docs.dtype)], dim=0)
            if doc_ids is not None:
                if extra_negative_ids is None:  # -1 never equals a text id
                    extra_negative_ids = torch.full((extra_negatives.shape[0],), -1, dtype=doc_ids.dtype,
                                                    device=doc_ids.device)
                doc_ids = torch.cat([doc_ids, extra_negative_ids])
        labels = torch.arange(query.shape[0], device=query.device) + offset
        scores = query @ docs.T / self.temperature
        scores = _mask_duplicates(scores, labels, positive_ids, doc_ids)
        loss = masked_cross_entropy(scores, labels, self.criterion)
        if self.symmetric:
            loss = (loss + self._document_to_query_loss(query, positive, positive_ids)) / 2
        return loss

    def _document_to_query_loss(self, query, positive, positive_ids):
        """Each positive against all (gathered) queries; a query whose own positive is the same text
        is masked, as in the query -> document direction."""
        if self.negatives_cross_device:
            (queries, offset), query_ids = gather_with_grad(query), gather_ids(positive_ids)
        else:
            queries, offset, query_ids = query, 0, positive_ids
        scores = positive @ queries.T / self.temperature
        labels = torch.arange(query.shape[0], device=query.device) + offset
        scores = _mask_duplicates(scores, labels, positive_ids, query_ids)
        return masked_cross_entropy(scores, labels, self.criterion)

    def _candidates(self, positive, negative, positive_ids, negative_ids):
        pieces, ids = [positive], [positive_ids]
        if negative is not None:
            pieces.append(negative)
            ids.append(negative_ids)
        if self.negatives_cross_device:
            gathered = [gather_with_grad(p) for p in pieces]
            offset = gathered[0][1]
            pieces = [g for g, _ in gathered]
            ids = [gather_ids(i) for i in ids]
        else:
            offset = 0
        doc_ids = torch.cat(ids) if all(i is not None for i in ids) else None
        return torch.cat(pieces, dim=0), doc_ids, offset

    def _own_candidates_loss(self, query, positive, negative, positive_ids, negative_ids):
        if negative is None:
            raise ValueError("use_inbatch_negative=False needs hard negatives: with only the positive "
                             "to choose from, the loss is constant")
        batch = query.shape[0]
        negative = negative.reshape(batch, -1, negative.shape[-1])
        pos_scores = (query * positive).sum(-1, keepdim=True)
        neg_scores = torch.einsum("bd,bnd->bn", query, negative)
        if positive_ids is not None and negative_ids is not None:
            same = negative_ids.reshape(batch, -1) == positive_ids.unsqueeze(1)
            neg_scores = neg_scores.masked_fill(same, float("-inf"))
        scores = torch.cat([pos_scores, neg_scores], dim=1) / self.temperature
        return masked_cross_entropy(scores, torch.zeros(batch, dtype=torch.long, device=query.device), self.criterion)


def _mask_duplicates(scores, labels, positive_ids, doc_ids):
    """Set to -inf every candidate that is the query's positive text but not its label column."""
    if positive_ids is None or doc_ids is None:
        return scores
    same = positive_ids.unsqueeze(1) == doc_ids.unsqueeze(0)
    same[torch.arange(scores.shape[0], device=scores.device), labels] = False
    return scores.masked_fill(same, float("-inf"))
