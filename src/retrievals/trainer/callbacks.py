"""Callbacks that ``RetrievalTrainer`` installs itself."""

from __future__ import annotations

import logging
import math

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def epoch_index(epoch: float) -> int:
    """The 0-based epoch that starts now, from ``TrainerState.epoch`` (``1.0`` after one whole epoch,
    ``1.5`` when resumed half-way through the second; float sums may land just below an integer)."""
    return int(math.floor(epoch + 1e-6)) if epoch else 0


class EpochSamplingCallback(TrainerCallback):
    """Tell the training dataset which epoch starts, so its per-item sampling (negatives, positives,
    list members) draws anew each epoch: ``dataset.set_epoch(e)`` at every epoch begin.

    The draw depends only on ``(seed, index, epoch)``, so a resumed run draws what the uninterrupted
    run drew. (accelerate forwards ``set_epoch`` to a dataset only in some sampler set-ups.)
    """

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = epoch_index(state.epoch)
        self.dataset.set_epoch(epoch)
        logger.debug("training data: epoch %d sampling", epoch)
        return control


class LossGradientCallback(TrainerCallback):
    """Zero the loss's own gradients after every optimizer step. The Trainer zeroes only the model's
    (``model.zero_grad()``), so the gradients of a loss with parameters (ArcFace class centres) would
    otherwise pile up over all steps, and a resumed run (which starts from zero) would diverge."""

    def __init__(self, loss_fn) -> None:
        self.loss_fn = loss_fn

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.loss_fn.zero_grad(set_to_none=True)
        return control
