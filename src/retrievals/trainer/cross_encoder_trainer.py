"""Train a cross-encoder re-ranker (a sequence-classification model scoring ``(query, document)`` pairs)
from groups of one positive and mined negatives.

Losses (``CROSS_ENCODER_LOSSES``): ``listwise`` -- softmax cross-entropy of each group's scores with the
positive as the target (the re-ranker loss of FlagEmbedding / tevatron); ``binary`` -- per-pair binary
cross-entropy on the logits, positive 1, negatives 0 (sentence-transformers' default).
"""

from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn.functional as F
from transformers import Trainer

from ..models.cross_encoder import pair_scores
from .callbacks import EpochSamplingCallback


def listwise_loss(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` [groups, group size], positive in column 0."""
    return F.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device))


def binary_loss(scores: torch.Tensor) -> torch.Tensor:
    labels = torch.zeros_like(scores)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(scores, labels)


CROSS_ENCODER_LOSSES = {"listwise": listwise_loss, "binary": binary_loss}


class CrossEncoderTrainer(Trainer):
    """The HF Trainer with a group loss; batches come from
    :class:`~retrievals.data.collators.CrossEncoderCollator`."""

    def __init__(self, *args: Any, loss: str = "listwise", **kwargs: Any) -> None:
        if loss not in CROSS_ENCODER_LOSSES:
            raise ValueError(f"Unknown cross-encoder loss {loss!r}; valid losses are: {', '.join(CROSS_ENCODER_LOSSES)}")
        self.group_loss = CROSS_ENCODER_LOSSES[loss]
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            self.args.remove_unused_columns = False  # the collator's columns are the model's inputs
        self.model_accepts_loss_kwargs = False
        if hasattr(self.train_dataset, "set_epoch"):  # new negatives every epoch, as RetrievalTrainer
            self.add_callback(EpochSamplingCallback(self.train_dataset))

    def compute_loss(self, model, inputs: Dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        inputs = dict(inputs)
        group_size = int(inputs.pop("group_size"))
        logits = model(**inputs).logits.float()
        scores = pair_scores(logits).view(-1, group_size)
        loss = self.group_loss(scores)
        return (loss, {"scores": scores}) if return_outputs else loss
