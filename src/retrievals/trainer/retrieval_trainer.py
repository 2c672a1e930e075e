"""``RetrievalTrainer``: the Hugging Face ``Trainer`` with an embedding loss.

It overrides only what it must: ``compute_loss`` (embed each side, call ``loss_fn``), saving
(``save_pretrained`` of the embedding model, so checkpoints load with ``from_pretrained``) and
loading a checkpoint to resume. Distributed training comes from the Trainer itself (``torchrun``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import torch
from torch import nn
from transformers import Trainer

from ..losses import InfoNCE
from ..losses.simcse import inputs_to_embed
from ..losses.utils import LOSS_EXTRAS, SIDES

logger = logging.getLogger(__name__)



class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops before any checkpoint is written."""


class RetrievalTrainer(Trainer):
    """``Trainer(model=AutoModelForEmbedding, loss_fn=..., data_collator=PairCollator(...), ...)``.

    ``loss_fn`` defaults to in-batch ``InfoNCE``. Collators with unset instruction / EOS fields
    take them from the model's config. ``remove_unused_columns`` is forced off (collators read the
    raw text columns). Assigning ``trainer.scheduler`` (the seed's spelling) sets ``lr_scheduler``.
    """

    def __init__(self, model: nn.Module = None, args=None, loss_fn: Optional[nn.Module] = None, **kwargs: Any):
        collator = kwargs.get("data_collator")
        if collator is not None and hasattr(collator, "with_model_config") and hasattr(model, "embedding_config"):
            kwargs["data_collator"] = collator.with_model_config(model.embedding_config)
        if args is not None and getattr(args, "remove_unused_columns", False):
            logger.info("RetrievalTrainer sets remove_unused_columns=False (collators need the text columns)")
            args.remove_unused_columns = False
        super().__init__(model=model, args=args, **kwargs)
        self.loss_fn = loss_fn if loss_fn is not None else InfoNCE()
        if isinstance(self.loss_fn, nn.Module) and any(p.requires_grad for p in self.loss_fn.parameters()):
            logger.info("loss_fn has trainable parameters; add them to the optimizer (done automatically "
                        "when the trainer creates it)")

    # The seed assigns ``trainer.scheduler``; the Trainer reads ``lr_scheduler``.
    @property
    def scheduler(self):
        return self.lr_scheduler

    @scheduler.setter
    def scheduler(self, value) -> None:
        self.lr_scheduler = value

    def create_optimizer(self):
        """The Trainer's optimizer, plus the loss's own parameters (ArcFace class centres)."""
        optimizer = super().create_optimizer()
        extra = [p for p in self.loss_fn.parameters() if p.requires_grad] if isinstance(self.loss_fn, nn.Module) else []
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        extra = [p for p in extra if id(p) not in known]
        if extra:
            optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
        return optimizer

    def compute_loss(self, model, inputs: Dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        """Embed each side and call ``loss_fn(query=, positive=, negative=, **extras)``.

        Two kinds of loss get something else: a loss with ``takes_model_inputs = True`` (the cached,
        gradient-cache losses) is called as ``loss_fn(model, inputs)`` and embeds in chunks itself;
        a model with ``returns_token_embeddings = True`` (multi-vector) passes each side's attention
        mask to the loss as ``query_mask`` / ``positive_mask`` / ``negative_mask``.
        """
        if getattr(self.loss_fn, "takes_model_inputs", False):
            embeddings: Dict[str, Any] = {}
            loss = self.loss_fn(model, inputs)
        else:
            embeddings = {side: model(**batch) for side, batch in inputs_to_embed(self.loss_fn, inputs).items()}
            extras = {k: inputs[k] for k in LOSS_EXTRAS if k in inputs}
            if getattr(self.accelerator.unwrap_model(model), "returns_token_embeddings", False):
                extras.update({f"{side}_mask": inputs[side]["attention_mask"] for side in SIDES if side in inputs})
            loss = self.loss_fn(**embeddings, **extras)
        if not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {self.state.global_step}; stopping before any further checkpoint "
                "(lower the learning rate, check the data, or use fp32)"
            )
        return (loss, embeddings) if return_outputs else loss

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        if not hasattr(model, "save_pretrained"):
            raise TypeError(f"{type(model).__name__} has no save_pretrained; pass an AutoModelForEmbedding")
        model.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from safetensors.torch import load_file

        from ..models.lora import is_peft_model, load_adapter_weights

        model = model or self.model
        if hasattr(model, "load_projection"):  # a multi-vector head, saved beside the backbone
            model.load_projection(resume_from_checkpoint, required=True)
        if is_peft_model(model.model):
            if not load_adapter_weights(model.model, resume_from_checkpoint):
                raise FileNotFoundError(f"Can't find a valid checkpoint at {resume_from_checkpoint} (no adapter/)")
            return
        path = os.path.join(resume_from_checkpoint, "model.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Can't find a valid checkpoint at {resume_from_checkpoint} (no model.safetensors)")
        missing, unexpected = model.model.load_state_dict(load_file(path), strict=False)
        real_missing = [k for k in missing if not k.endswith("position_ids")]
        if real_missing or unexpected:
            raise ValueError(f"checkpoint {resume_from_checkpoint} does not match the model: missing {real_missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
