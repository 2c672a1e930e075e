"""FSDP2 (``fully_shard``) for :class:`RetrievalTrainer`, on CPU (gloo) as on accelerators.

accelerate keeps the Trainer's FSDP plugin only on accelerator devices: in ``AcceleratorState.__init__``
(``accelerate/state.py``) the branch that sets ``distributed_type = FSDP`` sits under
``distributed_type in [MULTI_GPU, MULTI_NPU, ...]``, and ``MULTI_CPU`` is not in that list, so ``--fsdp``
under ``torchrun`` on CPUs silently trains with DDP. FSDP2's ``fully_shard`` itself runs on CPU with gloo:
:func:`enable_fsdp_on_cpu` hands accelerate its plugin back, and the Trainer then shards, saves and
resumes through its own FSDP code paths.

A sharded model cannot call ``save_pretrained`` (its parameters are DTensor shards): every rank joins
:func:`full_state_dict`, and rank 0 saves :func:`plain_copy` (an unsharded copy holding those full
tensors) the usual way, so checkpoints and the final model load with ``from_pretrained``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Dict, Optional

import torch
from torch import nn
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# Forward/backward hooks of a module (FSDP's own among them); a copy made for saving needs none.
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


def _say_once(args, message: str) -> None:
    if getattr(args, "process_index", 0) == 0:
        logger.warning(message)


def fsdp_version(args) -> Optional[int]:
    """The FSDP version ``args`` ask for (``--fsdp``), or None."""
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    return int(plugin_args.get("fsdp_version", 2)) if getattr(args, "fsdp", None) and plugin_args else None


def drop_fsdp_without_ranks(args) -> None:
    """``--fsdp`` in a single process: nothing to shard across (the Trainer would refuse); say so and train unsharded."""
    if args is None or fsdp_version(args) is None or args.fsdp_config.get("xla", False) or args.world_size > 1:
        return
    _say_once(args, "--fsdp: FSDP shards the model across processes and this run has one; training unsharded "
                    "in this process instead (launch with torchrun --nproc_per_node N to shard)")
    args.fsdp, args.fsdp_plugin_args = False, None


def enable_fsdp_on_cpu(trainer) -> None:
    """After the Trainer built its Accelerator: on CPUs under torchrun, switch accelerate from DDP to FSDP2."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    version = fsdp_version(trainer.args)
    state = trainer.accelerator.state
    if version is None or trainer.is_fsdp_enabled or state.distributed_type != DistributedType.MULTI_CPU:
        return
    if version != 2:
        _say_once(trainer.args, f"--fsdp: FSDP{version} does not run on CPU; training runs with DDP instead "
                                "(fsdp_config {\"version\": 2} shards on CPU)")
        return
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    logger.info("--fsdp on CPU: FSDP2 (fully_shard) over %d processes (%s)", state.num_processes,
                torch.distributed.get_backend())


def check_fsdp_loss(trainer) -> None:
    """The FSDP optimizer checkpoint covers the model's parameters only: refuse a loss with its own."""
    loss = trainer.loss_fn
    if trainer.is_fsdp_enabled and isinstance(loss, nn.Module) and any(p.requires_grad for p in loss.parameters()):
        raise ValueError(f"--fsdp cannot train {type(loss).__name__}: it has trainable parameters of its own "
                         "(ArcFace class centres), which FSDP checkpoints do not hold; train it without --fsdp")


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def local_numel(model: nn.Module) -> int:
    """Parameter elements this rank holds (its shards under FSDP, everything otherwise)."""
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The full (unsharded) state dict on rank 0, on CPU; ``{}`` on the other ranks. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _unsharded_class(module: nn.Module) -> type:
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    return cls.__mro__[cls._orig_cls_mro_index] if isinstance(module, FSDPModule) else cls


def plain_copy(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> nn.Module:
    """An unsharded copy of a ``fully_shard``-ed ``model``: the same classes and attributes (config,
    tokenizer, peft config ...), its parameters and persistent buffers the tensors of ``state_dict``
    (from :func:`full_state_dict`), no hooks. For saving on rank 0 (``save_pretrained``, LoRA merge)."""
    done: Dict[int, object] = {}

    def tensor(key: str, old: torch.Tensor, parameter: bool):
        if id(old) not in done:  # tied weights stay tied
            if key not in state_dict:
                if parameter:
                    raise KeyError(f"the full state dict has no {key}")
                done[id(old)] = old  # a non-persistent buffer: never sharded
            else:
                new = state_dict[key]
                done[id(old)] = nn.Parameter(new, requires_grad=old.requires_grad) if parameter else new
        return done[id(old)]

    def copy_module(module: nn.Module, prefix: str) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        cls = _unsharded_class(module)
        clone = cls.__new__(cls)
        done[id(module)] = clone
        clone.__dict__.update(module.__dict__)
        for name in _HOOK_DICTS:
            if name in module.__dict__:
                clone.__dict__[name] = OrderedDict()
        clone._parameters = {n: None if p is None else tensor(prefix + n, p, True) for n, p in module._parameters.items()}
        clone._buffers = {n: None if b is None else tensor(prefix + n, b, False) for n, b in module._buffers.items()}
        clone._modules = {n: None if m is None else copy_module(m, f"{prefix}{n}.") for n, m in module._modules.items()}
        return clone

    return copy_module(model, "")


def model_to_save(model: nn.Module, saves_here: bool, state_dict: Optional[Dict[str, torch.Tensor]] = None):
    """The model to call ``save_pretrained`` on, on the rank that saves (``saves_here``), else None. A sharded
    model is gathered first (every rank must call this then; ``state_dict``: one the Trainer gathered already)
    and the saving rank gets an unsharded :func:`plain_copy`."""
    if is_sharded(model):
        state_dict = full_state_dict(model) if state_dict is None else state_dict
        return plain_copy(model, state_dict) if saves_here else None
    return model if saves_here else None


def load_sharded_checkpoint(trainer, model: nn.Module, checkpoint: str) -> None:
    """Resume a sharded model: accelerate's FSDP model file of the checkpoint (full or sharded state dict)."""
    import os

    from accelerate.utils import load_fsdp_model
    from accelerate.utils.constants import FSDP_MODEL_NAME

    if not any(name.startswith(FSDP_MODEL_NAME) for name in os.listdir(checkpoint)):
        raise FileNotFoundError(f"{checkpoint} has no {FSDP_MODEL_NAME}* (the FSDP weights the Trainer writes beside "
                                "the optimizer); it was saved without --fsdp or with save_only_model")
    load_fsdp_model(trainer.accelerator.state.fsdp_plugin, trainer.accelerator, model, checkpoint)


def load_full_optimizer(trainer, checkpoint: str) -> bool:
    """Resume the optimizer from a full (``FULL_STATE_DICT``) FSDP2 checkpoint; False for other layouts.

    accelerate's ``load_fsdp_optimizer`` loads strictly, and a parameter that never had a gradient (BERT's
    pooler under mean pooling, a frozen-in-practice head) has no AdamW state: the strict load refuses the
    checkpoint. Missing state is what DDP's ``load_state_dict`` accepts too, so we load non-strictly."""
    import os

    from accelerate.utils.constants import OPTIMIZER_NAME
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.fsdp.fully_sharded_data_parallel import StateDictType

    plugin = trainer.accelerator.state.fsdp_plugin
    path = os.path.join(checkpoint, f"{OPTIMIZER_NAME}.bin")
    if plugin.fsdp_version != 2 or plugin.state_dict_type != StateDictType.FULL_STATE_DICT or not os.path.isfile(path):
        return False
    rank0_only = bool(getattr(plugin.optim_state_dict_config, "rank0_only", False))
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=rank0_only, strict=False,
                               cpu_offload=bool(getattr(plugin.state_dict_config, "offload_to_cpu", False)))
    state = torch.load(path, weights_only=True) if trainer.args.process_index == 0 or not rank0_only else {}
    set_optimizer_state_dict(trainer.model, trainer.optimizer, state, options=options)
    trainer.accelerator.wait_for_everyone()
    return True


def check_ranks_agree(trainer) -> None:
    """Before sharding: every rank must hold the same weights. ``fully_shard`` keeps each rank's own slice of
    its own copy, so an unseeded random init (LoRA's A) would silently train a mix of the ranks' models
    (DDP hides it by broadcasting rank 0's). One float64 sum per parameter, gathered: a pass over the weights."""
    import torch.distributed as dist

    named = list(trainer.model.named_parameters())
    if not (dist.is_available() and dist.is_initialized()) or not named:
        return
    sums = torch.stack([p.detach().double().sum() for _, p in named]).to(trainer.args.device)
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    ranks = torch.stack(gathered).cpu()  # [world, parameters]
    spread, tolerance = ranks.amax(0) - ranks.amin(0), 1e-6 * ranks.abs().amax(0).clamp_min(1.0)
    differ = [name for (name, _), d, t in zip(named, spread, tolerance) if d > t]
    if differ:
        raise RuntimeError(f"--fsdp: the ranks hold different weights in {len(differ)} parameters ({differ[:3]} ...); "
                           "fully_shard would train a mix of them. Seed every random init (--seed) before loading")


class ShardedEncoder:
    """``encode_queries`` / ``encode_corpus`` of a ``fully_shard``-ed :class:`AutoModelForEmbedding`, every rank
    taking part (what the online hard-negative refresh mines with under ``--fsdp``; every rank must call it
    with the same texts). The texts' length-sorted batches (those of ``encode``) are dealt to the ranks in turn;
    each rank runs its batches through the sharded model's forward, where FSDP gathers the weights, so every
    rank runs the same number of forwards (one out of batches repeats a one-text batch); the rows are then
    summed across the ranks (each row is filled on one rank only, so the sum is exact). Returns float32
    arrays, truncated and normalised as ``encode`` does."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def encode_queries(self, texts, batch_size: int = 32, **_: object):
        return self.encode(list(texts), True, batch_size)

    def encode_corpus(self, texts, batch_size: int = 32, **_: object):
        return self.encode(list(texts), False, batch_size)

    def encode(self, texts, is_query: bool, batch_size: int):
        import torch.distributed as dist

        from ..models.embedding_model import DEFAULT_CPU_BATCH_TOKENS, length_sorted_batches
        from ..models.precision import autocast_context, resolve_precision
        from ..models.tokenization import check_texts, pad_batch

        model, rank, world = self.model, dist.get_rank(), dist.get_world_size()
        check_texts(texts)
        ids = model.tokenize(texts, is_query=is_query)
        device = model.device
        out = torch.zeros((len(ids), model.model.config.hidden_size), dtype=torch.float32, device=device)
        batches = list(length_sorted_batches([len(x) for x in ids], batch_size,
                                             DEFAULT_CPU_BATCH_TOKENS if device.type == "cpu" else None))
        own = batches[rank::world]
        precision = resolve_precision(model.precision, device, owner=model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), autocast_context(precision, device, model.dtype):
                for turn in range(-(-len(batches) // world)):
                    batch = own[turn] if turn < len(own) else batches[0][:1]
                    inputs = pad_batch([ids[i] for i in batch], model.tokenizer.pad_token_id,
                                       model.embedding_config.padding_side, device)
                    embeddings = model(**inputs)  # through FSDP's hooks: the weights are gathered here
                    if turn < len(own):
                        out[batch] = embeddings.float()
        finally:
            model.train(was_training)
            if hasattr(model, "reshard"):  # the root FSDP module keeps its weights gathered after a forward
                model.reshard()
        step = max(1, (1 << 24) // max(out.shape[1], 1))  # rows per all-reduce: 64 MiB of float32
        for start in range(0, len(ids), step):
            dist.all_reduce(out[start:start + step])
        # forward normalised each row when the model normalises: finalize's truncate-then-normalise is unchanged
        return model.finalize_embeddings(out.cpu()).numpy()


class ShardReport(TrainerCallback):
    """Logs, once training has sharded the model, how many parameter elements each rank holds."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and is_sharded(model):
            held, total = local_numel(model), sum(p.numel() for p in model.parameters())
            logger.info("FSDP rank %d holds %d of %d parameter elements (%.1f%%)", args.process_index,
                        held, total, 100.0 * held / max(total, 1))
