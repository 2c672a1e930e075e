"""SimCSE: contrastive learning from dropout views (unsupervised) or labelled pairs (supervised)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from .infonce import InfoNCE
from .utils import SIDES


def inputs_to_embed(loss: nn.Module, batch: Dict[str, Any]) -> Dict[str, Any]:
    """The token inputs of each side a loss embeds; a pair-less batch for :class:`SimCSE` embeds its
    queries a second time as ``positive`` (the second dropout view)."""
    sides = {side: batch[side] for side in SIDES if side in batch}
    if "positive" not in sides and isinstance(loss, SimCSE):
        sides["positive"] = batch["query"]
    return sides


class SimCSE(InfoNCE):
    """SimCSE loss (Gao et al., 2021), an in-batch InfoNCE with temperature 0.05 by default.

    Unsupervised: pass the same texts twice as ``query`` and ``positive``; the model in train mode
    gives two dropout views, and the other texts of the batch are the negatives. Supervised: pass
    entailment pairs as ``query``/``positive`` and contradictions as ``negative`` ``[B, D]``.
    Shapes as :class:`InfoNCE`; returns a scalar.
    """

    def __init__(self, criterion: Optional[nn.Module] = None, temperature: float = 0.05,
                 negatives_cross_device: bool = False, similarity: str = "cosine") -> None:
        super().__init__(criterion, temperature=temperature, use_inbatch_negative=True,
                         negatives_cross_device=negatives_cross_device, similarity=similarity)

    def forward(self, query: torch.Tensor, positive: Optional[torch.Tensor] = None,
                negative: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        if positive is None:
            raise ValueError("SimCSE needs a second view: pass the same texts encoded twice in train mode")
        return super().forward(query, positive, negative, **kwargs)
