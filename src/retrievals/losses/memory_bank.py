"""Cross-batch negatives: a queue of recent document embeddings shared by every query.

Off by default. Like XBM (Wang et al., 2020, "Cross-Batch Memory for Embedding Learning") and the
queue of MoCo, documents embedded in the last steps stay as extra negatives after their batch is
gone, so each query sees ``batch + size`` candidates at the cost of one batch's compute. The queued
vectors are detached (no gradient) and slightly stale; a short warm-up of plain training first helps.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .infonce import InfoNCE
from .utils import flatten_negatives

__all__ = ["CrossBatchMemory"]


class CrossBatchMemory(nn.Module):
    """Wrap an in-batch :class:`InfoNCE`; the last ``size`` documents (positives and negatives of
    earlier steps; the oldest leave first) become extra negatives for every query.

    A queued document with the same text id as a query's positive is masked, not punished. The
    queue grows only in training mode; ``reset()`` empties it. Shapes as in :class:`InfoNCE`.
    """

    def __init__(self, loss: Optional[InfoNCE] = None, size: int = 4096) -> None:
        super().__init__()
        self.loss = loss if loss is not None else InfoNCE()
        if not isinstance(self.loss, InfoNCE) or not self.loss.use_inbatch_negative:
            raise ValueError("CrossBatchMemory wraps an InfoNCE loss with use_inbatch_negative=True")
        if size < 1:
            raise ValueError(f"memory bank size must be >= 1, got {size}")
        self.size = size
        self.reset()

    def reset(self) -> None:
        self.bank: Optional[torch.Tensor] = None
        self.bank_ids: Optional[torch.Tensor] = None

    def forward(self, query: torch.Tensor, positive: torch.Tensor, negative: Optional[torch.Tensor] = None,
                positive_ids: Optional[torch.Tensor] = None, negative_ids: Optional[torch.Tensor] = None,
                **kwargs: Any) -> torch.Tensor:
        loss = self.loss(query, positive, negative, positive_ids=positive_ids, negative_ids=negative_ids,
                         extra_negatives=self.bank, extra_negative_ids=self.bank_ids)
        if self.training and torch.is_grad_enabled():
            self._enqueue(positive, flatten_negatives(negative, query.shape[0]), positive_ids, negative_ids)
        return loss

    def _enqueue(self, positive, negative, positive_ids, negative_ids) -> None:
        docs = positive.detach() if negative is None else torch.cat([positive.detach(), negative.detach()])
        ids = None
        if positive_ids is not None and (negative is None or negative_ids is not None):
            ids = positive_ids if negative is None else torch.cat([positive_ids, negative_ids])
        if self.bank is not None and (self.bank.shape[-1] != docs.shape[-1] or (ids is None) != (self.bank_ids is None)):
            self.reset()
        self.bank = docs[: self.size] if self.bank is None else torch.cat([docs, self.bank])[: self.size]
        if ids is not None:
            self.bank_ids = ids[: self.size] if self.bank_ids is None else torch.cat([ids, self.bank_ids])[: self.size]
