"""ArcFace with an adaptive margin, for point-wise (text, label) fine-tuning."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


class ArcFaceAdaptiveMarginLoss(nn.Module):
    """Additive angular margin softmax over learnable class centres.

    ``logit_c = scale * cos(theta_c + m_y * [c == y])`` with ``cos(theta_c)`` the cosine between
    the embedding and class centre ``c``. The margin ``m_y`` is per class: ``margin`` by default,
    or adaptive, ``margin * (n_min / n_y) ** 0.25`` from class frequencies (rare classes get larger
    margins, as in the Google Landmark winning solutions) when ``class_counts`` is given.

    Args: ``in_features`` (embedding size), ``out_features`` (number of classes), ``scale``,
    ``margin``, ``class_counts`` (optional ``[C]``), ``criterion`` (default cross-entropy).
    Inputs: ``embeddings`` ``[B, D]`` (the query side), ``labels`` ``[B]`` integer classes; scalar.
    The class weights are parameters of this module: ``RetrievalTrainer`` adds them to the optimizer
    (as their own parameter group, at the Trainer's learning rate), saves them with every checkpoint
    and restores them on resume; with your own optimizer, pass ``loss_fn.parameters()`` to it too.
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 30.0, margin: float = 0.3,
                 class_counts: Optional[torch.Tensor] = None, criterion: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.xavier_uniform_(self.weight)
        margins = torch.full((out_features,), float(margin))
        if class_counts is not None:
            counts = torch.as_tensor(class_counts, dtype=torch.float).clamp(min=1)
            margins = margin * (counts.min() / counts) ** 0.25
        self.register_buffer("margins", margins)
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()

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
