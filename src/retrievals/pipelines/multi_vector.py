"""The embed pipeline's multi-vector (``--multi_vector_dim``) steps, called from :mod:`.embed`.

``--multi_vector_dim D`` wraps the loaded model in :class:`~retrievals.models.multi_vector.MultiVectorModel`
(a saved projection in ``--model_name_or_path`` is restored, a new one initialised otherwise);
``--do_train`` then needs ``--loss_fn maxsim`` (``--temperature`` and ``--use_inbatch_negative`` apply);
``--do_eval`` ranks by dense retrieval with the model's own pooled backbone and re-ranks the top 100
by maxsim (``metrics``; the dense figures are ``first_stage_metrics``).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Dict

from torch import nn

from ..data.beir import load_beir
from ..evaluation.maxsim import evaluate_maxsim_rerank
from ..models.multi_vector import MultiVectorModel, is_multi_vector_dir

logger = logging.getLogger(__name__)

RERANK_TOP_K = 100
# Loss wrappers of other flags that assume one vector per text.
UNSUPPORTED_FLAGS = ("matryoshka_dims", "memory_bank_size", "cached_mini_batch_size", "negatives_cross_device",
                     "do_encode")


def wrap_multi_vector(model: nn.Module, model_args, args) -> nn.Module:
    """``model`` unchanged without ``--multi_vector_dim``, else a ``MultiVectorModel`` around it."""
    dim = getattr(model_args, "multi_vector_dim", None)
    loss_name = str(getattr(args, "loss_fn", "")).lower()
    if dim is None:
        if loss_name == "maxsim" and args.do_train:
            raise ValueError("--loss_fn maxsim trains token embeddings: pass --multi_vector_dim (e.g. 128)")
        if is_multi_vector_dir(model_args.model_name_or_path):
            logger.warning("%s holds a multi-vector projection; pass --multi_vector_dim to use it",
                           model_args.model_name_or_path)
        return model
    if dim < 1:
        raise ValueError(f"--multi_vector_dim must be a positive integer, got {dim}")
    if args.do_train and loss_name != "maxsim":
        raise ValueError(f"--multi_vector_dim trains with --loss_fn maxsim, got --loss_fn {args.loss_fn!r}")
    for flag in UNSUPPORTED_FLAGS:
        if getattr(args, flag, None):
            raise ValueError(f"--{flag} is not supported with --multi_vector_dim")
    wrapped = MultiVectorModel(model, dim=dim)
    if is_multi_vector_dir(model_args.model_name_or_path):
        wrapped.load_projection(model_args.model_name_or_path, required=True)
        logger.info("Restored the %d-dim projection of %s", dim, model_args.model_name_or_path)
    return wrapped


def maxsim_loss_kwargs(args) -> Dict[str, Any]:
    """``MaxSimLoss`` arguments from the training flags."""
    return {"temperature": args.temperature, "use_inbatch_negative": args.use_inbatch_negative}


def evaluate_multi_vector(model: MultiVectorModel, data_args, result: Dict[str, Any]) -> Dict[str, Any]:
    """``--do_eval`` for a multi-vector model: dense top-100, re-ranked by maxsim."""
    if not data_args.eval_data_dir:
        raise ValueError("--do_eval needs --eval_data_dir (a BEIR-layout folder)")
    data = load_beir(data_args.eval_data_dir, split=data_args.eval_split)
    results = evaluate_maxsim_rerank(model, data, top_k=RERANK_TOP_K)
    result["metrics"] = results["maxsim"].metrics
    result["first_stage_metrics"] = results["dense"].metrics
    print(json.dumps({"maxsim_rerank": result["metrics"], "dense": result["first_stage_metrics"]}, indent=2))
    return result
