"""Pooling of token embeddings into one vector per text.

Every function takes ``hidden`` of shape ``[batch, seq_len, dim]`` and ``mask`` of shape
``[batch, seq_len]`` (1 for real tokens, 0 for padding) and returns ``[batch, dim]``.
All of them are correct for both left and right padding.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

__all__ = ["POOLING_FUNCTIONS", "Pooling", "get_pooling_function"]


def _first_token_index(mask: torch.Tensor) -> torch.Tensor:
    # argmax returns the first maximal position: the first real token.
    return mask.to(torch.int8).argmax(dim=1)


def _last_token_index(mask: torch.Tensor) -> torch.Tensor:
    seq_len = mask.shape[1]
    return seq_len - 1 - mask.to(torch.int8).flip(dims=[1]).argmax(dim=1)


def cls_pooling(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The first real token (the [CLS] position for BERT-like models)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, _first_token_index(mask)]


def last_token_pooling(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last real token (the appended EOS for decoder LLMs)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, _last_token_index(mask)]


def mean_pooling(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the real tokens."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    summed = (hidden * weights).sum(dim=1)
    return summed / weights.sum(dim=1).clamp(min=1e-9)


def max_pooling(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over the real tokens."""
    filled = hidden.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(hidden.dtype).min)
    return filled.max(dim=1).values


def weighted_mean_pooling(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Position-weighted mean (SGPT): the i-th real token has weight i (1-based)."""
    positions = mask.long().cumsum(dim=1) * mask.long()
    weights = positions.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


POOLING_FUNCTIONS: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cls": cls_pooling,
    "mean": mean_pooling,
    "last": last_token_pooling,
    "max": max_pooling,
    "weightedmean": weighted_mean_pooling,
}

# Names used by other libraries, mapped to ours.
POOLING_ALIASES: Dict[str, str] = {
    "avg": "mean",
    "average": "mean",
    "lasttoken": "last",
    "last_token": "last",
    "eos": "last",
    "weighted_mean": "weightedmean",
    "cls_token": "cls",
}


def canonical_pooling_name(name: str) -> str:
    """Map ``name`` (or a known alias) to one of :data:`POOLING_FUNCTIONS`' keys."""
    if not isinstance(name, str):
        raise TypeError(f"pooling_method must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    key = POOLING_ALIASES.get(key, key)
    if key not in POOLING_FUNCTIONS:
        valid = ", ".join(sorted(POOLING_FUNCTIONS))
        raise ValueError(f"Unknown pooling_method {name!r}; valid names are: {valid}")
    return key


def get_pooling_function(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return POOLING_FUNCTIONS[canonical_pooling_name(name)]


class Pooling(nn.Module):
    """``Pooling(mode)(hidden, mask) -> [batch, dim]``; ``mode`` is one of :data:`POOLING_FUNCTIONS`."""

    def __init__(self, mode: str = "mean") -> None:
        super().__init__()
        self.mode = canonical_pooling_name(mode)
        self._fn = POOLING_FUNCTIONS[self.mode]

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._fn(hidden, mask)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
