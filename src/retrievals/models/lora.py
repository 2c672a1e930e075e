"""LoRA adapters (peft) on the backbone of an ``AutoModelForEmbedding``."""

from __future__ import annotations

import copy
import logging
import os
from typing import Union

from torch import nn

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


def add_lora(model, rank: int = 8, alpha: int = 16, dropout: float = 0.05,
             target_modules: Union[str, list] = "all-linear") -> None:
    """Replace ``model.model`` with a peft ``PeftModel`` whose LoRA adapters are the only trainable weights."""
    from peft import LoraConfig, get_peft_model

    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [m.strip() for m in target_modules.split(",") if m.strip()]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        bias="none")
    model.model = get_peft_model(model.model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)


def is_peft_model(module: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(module, PeftModel)


def merged_copy(backbone: nn.Module) -> nn.Module:
    """A copy of a ``PeftModel`` with adapters merged into plain weights (the original keeps training)."""
    return copy.deepcopy(backbone).merge_and_unload()


def save_adapter(backbone: nn.Module, directory: str) -> None:
    backbone.save_pretrained(os.path.join(directory, ADAPTER_DIR))


def load_adapter_weights(backbone: nn.Module, directory: str) -> bool:
    """Load adapter weights saved by :func:`save_adapter` into a ``PeftModel``; False if none."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = os.path.join(directory, ADAPTER_DIR, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return False
    set_peft_model_state_dict(backbone, load_file(path))
    return True
