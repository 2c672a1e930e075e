"""ArcFace with an adaptive margin, for point-wise (text, label) fine-tuning."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn


def dynamic_margins(class_counts: Sequence[int], low: float = 0.05, high: float = 0.5, power: float = 0.25) -> torch.Tensor:
    """Per-class ArcFace margins from class frequencies (the "dynamic margin" of the Google Landmark
    Recognition 2020 winners): rare classes get larger margins.

    ``m_c = low + (high - low) * (n_c**-power - n_max**-power) / (n_min**-power - n_max**-power)``

    so the rarest class gets ``high``, the most frequent ``low``, and every margin lies in ``[low, high]``
    (counts below 1 count as 1). When all classes have the same count, every class gets ``(low + high) / 2``.
    """
    if not 0 <= low <= high:
        raise ValueError(f"margin bounds must satisfy 0 <= low <= high, got ({low}, {high})")
    x = torch.as_tensor(class_counts, dtype=torch.float64).clamp(min=1) ** -power
    span = x.max() - x.min()
    if span <= 0:
        return torch.full(x.shape, (low + high) / 2, dtype=torch.float)
    return (low + (high - low) * (x - x.min()) / span).float()



class ArcFaceAdaptiveMarginLoss(nn.Module):
    """Additive angular margin softmax over learnable class centres.

    ``logit_c = scale * cos(theta_c + m_y * [c == y])`` with ``cos(theta_c)`` the cosine between
    the embedding and class centre ``c``. The margin ``m_y`` is per class: ``margin`` by default,
    or adaptive when ``class_counts`` is given (rare classes get larger margins, as in the Google Landmark
    winning solutions): with ``margin_bounds=(low, high)``, :func:`dynamic_margins` maps the counts
    linearly in ``n ** -0.25`` onto ``[low, high]``; without, ``margin * (n_min / n_y) ** 0.25`` (the same
    family, with ``high = margin`` and ``low = margin * (n_min / n_max) ** 0.25``).

    Args: ``in_features`` (embedding size), ``out_features`` (number of classes), ``scale``,
    ``margin``, ``class_counts`` (optional ``[C]``), ``margin_bounds`` (optional ``(low, high)``),
    ``criterion`` (default cross-entropy). Centres start xavier-uniform; :meth:`init_centres` sets them
    (e.g. to each class's mean embedding under the starting model, or to saved centres).
    Inputs: ``embeddings`` ``[B, D]`` (the query side), ``labels`` ``[B]`` integer classes; scalar.
    The class weights are parameters of this module: ``RetrievalTrainer`` adds them to the optimizer
    (as their own parameter group, at the Trainer's learning rate), saves them with every checkpoint
    and restores them on resume; with your own optimizer, pass ``loss_fn.parameters()`` to it too.
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 30.0, margin: float = 0.3,
                 class_counts: Optional[torch.Tensor] = None, criterion: Optional[nn.Module] = None,
                 margin_bounds: Optional[Tuple[float, float]] = None) -> None:
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.xavier_uniform_(self.weight)
        margins = torch.full((out_features,), float(margin))
        if class_counts is not None:
            counts = torch.as_tensor(class_counts, dtype=torch.float).clamp(min=1)
            if len(counts) != out_features:
                raise ValueError(f"class_counts has {len(counts)} entries for {out_features} classes")
            low, high = margin_bounds or (float(margin * (counts.min() / counts.max()) ** 0.25), float(margin))
            margins = dynamic_margins(counts, low, high) if margin_bounds or counts.max() > counts.min() else margins
        self.register_buffer("margins", margins)
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()

    @torch.no_grad()
    def init_centres(self, centres: torch.Tensor) -> None:
        """Set the class centres (``[classes, in_features]``; normalised in the forward anyway)."""
        centres = torch.as_tensor(centres, dtype=self.weight.dtype)
        if centres.shape != self.weight.shape:
            raise ValueError(f"centres have shape {tuple(centres.shape)}, expected {tuple(self.weight.shape)} "
                             "(classes x embedding size)")
        if not torch.isfinite(centres).all() or (centres.norm(dim=-1) == 0).any():
            raise ValueError("centres must be finite and non-zero")
        self.weight.copy_(centres)

    def forward(self, query: torch.Tensor, positive: Optional[torch.Tensor] = None,
                negative: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        if labels is None:
            raise ValueError("ArcFaceAdaptiveMarginLoss needs integer class labels")
        labels = labels.long()
        cosine = nn.functional.linear(nn.functional.normalize(query, dim=-1),
                                      nn.functional.normalize(self.weight, dim=-1))
        # clamp keeps sqrt/acos away from their non-differentiable ends (|cos| = 1 gives NaN grads)
        cosine = cosine.clamp(-1 + 1e-7, 1 - 1e-7)
        target_cos = cosine.gather(1, labels.unsqueeze(1)).squeeze(1)
        m = self.margins[labels]
        sine = torch.sqrt(1.0 - target_cos**2)
        shifted = target_cos * torch.cos(m) - sine * torch.sin(m)  # cos(theta + m)
        # past theta + m > pi the function stops decreasing; use the CosFace-style fallback there
        shifted = torch.where(target_cos > torch.cos(math.pi - m), shifted, target_cos - torch.sin(math.pi - m) * m)
        logits = cosine.scatter(1, labels.unsqueeze(1), shifted.unsqueeze(1).to(cosine.dtype))
        return self.criterion(self.scale * logits, labels)
