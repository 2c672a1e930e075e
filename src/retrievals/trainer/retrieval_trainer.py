"""``RetrievalTrainer``: the Hugging Face ``Trainer`` with an embedding loss.

It overrides only what it must: ``compute_loss`` (embed each side, call ``loss_fn``),
``prediction_step`` (the eval loss), ``evaluate`` (adds an optional evaluator's metrics), saving
(``save_pretrained`` of the embedding model plus the loss's own parameters, so checkpoints load with
``from_pretrained`` and resume exactly) and loading a checkpoint. Distributed training comes from
the Trainer itself (``torchrun``); ``--fsdp`` shards with FSDP2, on CPUs too (see :mod:`.fsdp`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from transformers import Trainer

from ..losses import InfoNCE
from ..losses.simcse import inputs_to_embed
from ..losses.utils import LOSS_EXTRAS, SIDES
from . import fsdp
from .callbacks import EpochSamplingCallback, LossGradientCallback
from .checkpoints import CheckpointRanks
from .diagnostics import DiagnosticsMonitor, batch_diagnostics
from .param_groups import describe_groups, layerwise_param_groups

logger = logging.getLogger(__name__)

LOSS_STATE_NAME = "loss_state.safetensors"  # the loss's own parameters and buffers, beside the weights


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops before any checkpoint is written."""


class RetrievalTrainer(Trainer):
    """``Trainer(model=AutoModelForEmbedding, loss_fn=..., data_collator=PairCollator(...), ...)``.

    ``loss_fn`` defaults to in-batch ``InfoNCE``. Collators with unset instruction / EOS fields
    take them from the model's config. ``remove_unused_columns`` is forced off (collators read the
    raw text columns). Assigning ``trainer.scheduler`` (the seed's spelling) sets ``lr_scheduler``.

    ``evaluator`` (optional): a callable ``evaluator(model) -> {"ndcg@10": ..., ...}`` (e.g.
    :class:`retrievals.evaluation.RetrievalEvaluator` over a BEIR dev split) whose metrics join
    ``evaluate()``'s as ``eval_ndcg@10`` ..., so ``eval_strategy``, ``metric_for_best_model`` and
    ``load_best_model_at_end`` work on them; with an evaluator, ``eval_dataset`` (eval loss) is optional.

    A training dataset with ``set_epoch`` (``RetrievalDataset``, ``ListwiseDataset``) is told each
    epoch, so sampled negatives and positives change between epochs. The loss counts as the mean over
    each batch; gradient accumulation divides it by the number of accumulated batches, whatever
    columns (``labels``) the batches carry.
    """

    def __init__(self, model: nn.Module = None, args=None, loss_fn: Optional[nn.Module] = None,
                 evaluator: Optional[Callable[[nn.Module], Dict[str, float]]] = None,
                 layerwise_lr_decay: Optional[float] = None, head_learning_rate: Optional[float] = None,
                 diagnostics: bool = True, **kwargs: Any):
        collator = kwargs.get("data_collator")
        if collator is not None and hasattr(collator, "with_model_config") and hasattr(model, "embedding_config"):
            pad_id = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
            kwargs["data_collator"] = collator.with_model_config(model.embedding_config, pad_token_id=pad_id)
        if args is not None and getattr(args, "remove_unused_columns", False):
            logger.info("RetrievalTrainer sets remove_unused_columns=False (collators need the text columns)")
            args.remove_unused_columns = False
        self.evaluator = evaluator
        self.diagnostics = DiagnosticsMonitor() if diagnostics else None
        self._last_diagnostics: Optional[Dict[str, float]] = None
        self.layerwise_lr_decay = layerwise_lr_decay if layerwise_lr_decay is not None else \
            getattr(args, "layerwise_lr_decay", None)
        self.head_learning_rate = head_learning_rate if head_learning_rate is not None else \
            getattr(args, "head_learning_rate", None)
        if evaluator is not None and kwargs.get("eval_dataset") is None:
            kwargs["eval_dataset"] = []  # no eval loss; the Trainer only needs something to evaluate
        fsdp.drop_fsdp_without_ranks(args)
        super().__init__(model=model, args=args, **kwargs)
        # Our loss is a mean over the batch: the Trainer must divide it by the accumulation steps itself
        # (with True it would expect the model to use num_items_in_batch whenever batches carry labels).
        self.model_accepts_loss_kwargs = False
        self.loss_fn = loss_fn if loss_fn is not None else InfoNCE()
        fsdp.check_fsdp_loss(self)
        if self.is_fsdp_enabled:
            self.add_callback(fsdp.ShardReport())
        self.add_callback(CheckpointRanks())  # completeness of a checkpoint is judged by the ranks that saved it
        if hasattr(self.train_dataset, "set_epoch"):
            if self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0:
                logger.warning("persistent dataloader workers keep their own copy of the dataset: sampled "
                               "negatives will not change between epochs")
            self.add_callback(EpochSamplingCallback(self.train_dataset))
        if isinstance(self.loss_fn, nn.Module) and any(p.requires_grad for p in self.loss_fn.parameters()):
            logger.info("loss_fn has trainable parameters; add them to the optimizer (done automatically "
                        "when the trainer creates it)")
            self.add_callback(LossGradientCallback(self.loss_fn))

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        fsdp.enable_fsdp_on_cpu(self)
        if self.is_fsdp_enabled:
            fsdp.check_ranks_agree(self)

    loss_is_scaled_for_ga = False  # compute_loss returns a batch mean; the Trainer divides by accumulation steps

    # The seed assigns ``trainer.scheduler``; the Trainer reads ``lr_scheduler``.
    @property
    def scheduler(self):
        return self.lr_scheduler

    @scheduler.setter
    def scheduler(self, value) -> None:
        self.lr_scheduler = value

    def create_optimizer(self):
        """The Trainer's optimizer, plus the loss's own parameters (ArcFace class centres). With
        ``layerwise_lr_decay`` or ``head_learning_rate``, the groups of :func:`layerwise_param_groups`
        (the Trainer's optimizer class and weight-decay split), listed once in the log."""
        if self.optimizer is None and (self.layerwise_lr_decay is not None or self.head_learning_rate is not None):
            decay_names = set(self.get_decay_parameter_names(self.model))
            no_decay = [n for n, _ in self.model.named_parameters() if n not in decay_names]
            groups = layerwise_param_groups(self.model, self.args.learning_rate, self.args.weight_decay, no_decay,
                                            self.layerwise_lr_decay, self.loss_fn, self.head_learning_rate)
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            if self.args.process_index == 0:
                logger.info("learning rates by parameter group:\n%s", describe_groups(groups))
            return self.optimizer
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
            if self.diagnostics is not None and model.training:
                self._diagnose(embeddings)
        if not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {self.state.global_step}; stopping before any further checkpoint "
                "(lower the learning rate, check the data, or use fp32)"
            )
        return (loss, embeddings) if return_outputs else loss

    def _diagnose(self, embeddings: Dict[str, Any]) -> None:
        """The batch's diagnostics (trainer/diagnostics.py), kept for the next log line."""
        query, positive, negative = (embeddings.get(k) for k in ("query", "positive", "negative"))
        if not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in (query, positive)) or \
                (negative is not None and (negative.dim() != 2 or negative.shape[0] % query.shape[0])):
            return  # multi-vector or unpaired sides: nothing comparable
        loss = getattr(self.loss_fn, "loss", self.loss_fn)  # a wrapper's (Matryoshka, memory bank) inner loss
        self._last_diagnostics = batch_diagnostics(query, positive, negative, getattr(loss, "temperature", 0.05))

    def log(self, logs: Dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, with the last batch's diagnostics beside the training loss; the rules warn."""
        if self._last_diagnostics is not None and "loss" in logs:
            logs = {**logs, **{k: round(v, 4) for k, v in self._last_diagnostics.items()}}
            self.diagnostics.check(self._last_diagnostics, self.state.global_step)
            self._last_diagnostics = None
        return super().log(logs, *args, **kwargs)

    def prediction_step(self, model, inputs: Dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: Optional[List[str]] = None) -> Tuple[torch.Tensor, None, None]:
        """The eval loss of one batch (the same loss as training, without gradients)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, eval_dataset=None, ignore_keys: Optional[List[str]] = None,
                 metric_key_prefix: str = "eval") -> Dict[str, float]:
        """The eval loss (when there is an eval dataset) plus the evaluator's metrics, logged once."""
        if self.evaluator is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        metrics: Dict[str, float] = {}
        if dataset is not None and len(dataset) > 0:
            output = self.evaluation_loop(self.get_eval_dataloader(dataset), description="Evaluation",
                                          prediction_loss_only=True, ignore_keys=ignore_keys,
                                          metric_key_prefix=metric_key_prefix)
            metrics.update(output.metrics)
        model = self.accelerator.unwrap_model(self.model)  # sharded (FSDP): every rank takes part in the encode
        found = self.evaluator(fsdp.ShardedEncoder(model) if fsdp.is_sharded(model) else model)
        metrics.update({f"{metric_key_prefix}_{k}": float(v) for k, v in found.items()})
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        """Rank 0 writes ``save_pretrained``'s files; a sharded (FSDP) model saves the full ``state_dict``
        the Trainer gathered (every rank gathers it when none is given)."""
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        model = fsdp.model_to_save(model, self.args.should_save, state_dict)
        if model is None:
            return
        os.makedirs(output_dir, exist_ok=True)
        if not hasattr(model, "save_pretrained"):
            raise TypeError(f"{type(model).__name__} has no save_pretrained; pass an AutoModelForEmbedding")
        model.save_pretrained(output_dir)
        self._save_loss_state(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def save_embedding_model(self, output_dir: str, merge_lora: bool = True) -> Optional[nn.Module]:
        """``save_pretrained`` of the trained model by rank 0; every rank must call it (a sharded model is
        gathered first). Returns the model on rank 0, unsharded (for encoding after training), else None."""
        model = fsdp.model_to_save(self.accelerator.unwrap_model(self.model), self.is_world_process_zero())
        if model is None:
            return None
        model.save_pretrained(output_dir, merge_lora=merge_lora)
        return model

    def _save_loss_state(self, output_dir: str) -> None:
        """Parameters and buffers of the loss (ArcFace class centres ...), so a resume restores them."""
        from safetensors.torch import save_file

        state = self.loss_fn.state_dict() if isinstance(self.loss_fn, nn.Module) else {}
        if state:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                      os.path.join(output_dir, LOSS_STATE_NAME))

    def _load_loss_state(self, checkpoint: str) -> None:
        from safetensors.torch import load_file

        state = self.loss_fn.state_dict() if isinstance(self.loss_fn, nn.Module) else {}
        if not state:
            return
        path = os.path.join(checkpoint, LOSS_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{checkpoint} has no {LOSS_STATE_NAME}, but the loss has parameters "
                                    f"({', '.join(list(state)[:4])}); it was saved by another loss or an older version")
        self.loss_fn.load_state_dict(load_file(path))

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        if checkpoint is None or not self.is_fsdp_enabled or not fsdp.load_full_optimizer(self, checkpoint):
            return super()._load_optimizer_and_scheduler(checkpoint)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: our checkpoints hold the backbone's weights (not the wrapper's)."""
        logger.info("Loading best model from %s (score: %s)", self.state.best_model_checkpoint, self.state.best_metric)
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from safetensors.torch import load_file

        from ..models.lora import is_peft_model, load_adapter_weights

        model = model or self.model
        self._load_loss_state(resume_from_checkpoint)
        if fsdp.is_sharded(model):
            return fsdp.load_sharded_checkpoint(self, model, resume_from_checkpoint)
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
