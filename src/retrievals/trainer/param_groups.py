"""Optimizer parameter groups: layer-wise learning-rate decay and a learning rate for the loss's own head."""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from torch import nn

# ``encoder.layer.3.`` (BERT), ``layers.3.`` (Llama, Qwen), ``h.3.`` (GPT-2), ``block.3.`` (T5)
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")
EMBEDDING_PATTERN = re.compile(r"(?:^|\.)(?:embeddings|embed_tokens|wte|wpe|word_embeddings|shared)(?:\.|$)")


def layer_depth(name: str, num_layers: int) -> Optional[int]:
    """How many times the decay applies to parameter ``name``: the top layer 0, each layer below one more,
    the embeddings ``num_layers``; parameters above the layers (final norm, pooler) ``None`` (no decay)."""
    match = LAYER_PATTERN.search(name)
    if match:
        return num_layers - 1 - int(match.group(1))
    if EMBEDDING_PATTERN.search(name):
        return num_layers
    return None


def count_layers(names: Iterable[str]) -> int:
    found = [int(m.group(1)) for m in (LAYER_PATTERN.search(n) for n in names) if m]
    return max(found) + 1 if found else 0


def layerwise_param_groups(model: nn.Module, learning_rate: float, weight_decay: float, no_decay: Sequence[str],
                           layerwise_lr_decay: Optional[float] = None, head: Optional[nn.Module] = None,
                           head_learning_rate: Optional[float] = None) -> List[Dict[str, Any]]:
    """Parameter groups for the optimizer.

    Backbone parameter in layer ``i`` of ``L`` gets ``learning_rate * decay ** (L - 1 - i)`` (the top layer
    the full rate, each layer down the factor once more), the embeddings ``learning_rate * decay ** L`` (the
    lowest), parameters above the layers (final norm, pooler, projections) the full rate. ``no_decay`` names
    the parameters without weight decay (biases, norms: the Trainer's own list). The trainable parameters of
    ``head`` (the loss's class centres ...) get ``head_learning_rate`` (default ``learning_rate``), no weight
    decay. Groups carry a ``name`` for the start-up summary.
    """
    if layerwise_lr_decay is not None and not 0 < layerwise_lr_decay <= 1:
        raise ValueError(f"layerwise_lr_decay must be in (0, 1], got {layerwise_lr_decay}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    num_layers = count_layers(n for n, _ in named) if layerwise_lr_decay else 0
    if layerwise_lr_decay and not num_layers:
        raise ValueError(f"--layerwise_lr_decay: no numbered layers found in {type(model).__name__}'s parameter names")
    skip = set(no_decay)
    buckets: Dict[Tuple[str, float, float], List[nn.Parameter]] = {}
    for name, param in named:
        depth = layer_depth(name, num_layers) if layerwise_lr_decay else None
        label = "top" if depth is None else ("embeddings" if depth == num_layers else f"layer {num_layers - 1 - depth}")
        lr = learning_rate * (layerwise_lr_decay ** depth if depth is not None else 1.0)
        wd = 0.0 if name in skip else weight_decay
        buckets.setdefault((label, lr, wd), []).append(param)
    groups = [{"params": ps, "lr": lr, "weight_decay": wd, "name": label} for (label, lr, wd), ps in buckets.items()]
    seen = {id(p) for _, p in named}
    head_params = [p for p in (head.parameters() if isinstance(head, nn.Module) else []) if p.requires_grad
                   and id(p) not in seen]
    if head_params:
        groups.append({"params": head_params, "lr": head_learning_rate if head_learning_rate is not None else learning_rate,
                       "weight_decay": 0.0, "name": "loss head"})
    return groups


def describe_groups(groups: Sequence[Dict[str, Any]]) -> str:
    """One line per group name: parameters and learning rate (groups split by weight decay are merged)."""
    rows: Dict[str, List[float]] = {}
    for g in groups:
        count = sum(p.numel() for p in g["params"])
        row = rows.setdefault(g.get("name", "?"), [0, g["lr"]])
        row[0] += count
    return "\n".join(f"  {name:<12} {int(n):>12,d} params  lr {lr:.3g}" for name, (n, lr) in rows.items())
