"""Weight quantisation of the backbone: int8 dynamic (CPU inference) and bitsandbytes 8/4-bit (CUDA).

``quantization="int8"`` replaces every ``nn.Linear`` of the backbone with an int8 dynamic linear:
weights stored as int8 (one scale per output channel), activations quantised on the fly per call.
It uses ``torch.ao.quantization.quantize_dynamic`` (fbgemm/oneDNN VNNI kernels) while torch still
ships it, and otherwise :class:`Int8DynamicLinear`, a small ``torch._int_mm`` implementation.
Int8 models are for inference only: training and ``save_pretrained`` raise a clear error.

``"bnb-8bit"`` / ``"bnb-4bit"`` load the weights through bitsandbytes (a transformers
``BitsAndBytesConfig``); they need a CUDA device and the ``bitsandbytes`` package, checked before
any weight is read.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from typing import Any, Dict, Iterator, Optional, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

QUANTIZATION_METHODS: Dict[str, str] = {
    "int8": "int8 dynamic quantisation of the backbone's Linear layers, CPU inference only",
    "bnb-8bit": "bitsandbytes LLM.int8() weights (CUDA)",
    "bnb-4bit": "bitsandbytes NF4 weights with bf16/fp16 compute (CUDA)",
}
INT8_BACKENDS = ("auto", "torch", "native")


def canonical_quantization(name: Optional[str]) -> Optional[str]:
    """``None``/``""``/``"none"`` mean no quantisation; anything else must be a known method."""
    if name is None or str(name).strip().lower() in ("", "none", "no"):
        return None
    key = str(name).strip().lower().replace("_", "-")
    if key not in QUANTIZATION_METHODS:
        raise ValueError(f"Unknown quantization {name!r}; valid values are: {', '.join(QUANTIZATION_METHODS)} "
                         "(or none)")
    return key


# ---------------------------------------------------------------------------------------------- bitsandbytes
def check_bitsandbytes_available(method: str) -> None:
    """Raise ``ValueError`` unless a CUDA device and the bitsandbytes package are present."""
    if not torch.cuda.is_available():
        raise ValueError(f"quantization={method!r} (bitsandbytes) needs a CUDA device, and none is available; "
                         "on CPU use quantization='int8' (dynamic int8) instead")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"quantization={method!r} needs the bitsandbytes package, which is not installed "
                         "(pip install bitsandbytes)")


def bnb_quantization_config(method: str):
    """The transformers ``BitsAndBytesConfig`` for ``bnb-8bit`` or ``bnb-4bit`` (no checks, no loading)."""
    from transformers import BitsAndBytesConfig

    method = canonical_quantization(method)
    if method == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if method == "bnb-4bit":
        compute = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute)
    raise ValueError(f"{method!r} is not a bitsandbytes method; use bnb-8bit or bnb-4bit")


def prepare_quantization(name: Optional[str], load_kwargs: Dict[str, Any],
                         device: Optional[Union[str, torch.device]]) -> Optional[str]:
    """Validate ``name`` before loading; for bitsandbytes add ``quantization_config``/``device_map`` to
    ``load_kwargs``. Returns the canonical method name (or ``None``)."""
    method = canonical_quantization(name)
    if method is None:
        return None
    if method == "int8":
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"quantization='int8' (dynamic int8) runs on CPU only, got device={str(device)!r}")
        return method
    check_bitsandbytes_available(method)
    if device is not None and torch.device(device).type != "cuda":
        raise ValueError(f"quantization={method!r} loads the weights onto a CUDA device, got device={str(device)!r}")
    if "quantization_config" in load_kwargs:
        raise ValueError(f"Pass either quantization={method!r} or quantization_config=, not both")
    load_kwargs["quantization_config"] = bnb_quantization_config(method)
    index = torch.device(device).index if device is not None else None
    load_kwargs.setdefault("device_map", {"": index if index is not None else torch.cuda.current_device()})
    return method


# ---------------------------------------------------------------------------------------------- int8 dynamic
class Int8DynamicLinear(nn.Module):
    """``y = x W^T + b`` with W stored as int8 (per output channel scale) and x quantised per row at run
    time (symmetric int8), multiplied with ``torch._int_mm`` into int32 and rescaled to float32."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_t", torch.round(weight / scale[:, None]).to(torch.int8).t().contiguous())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        x_scale = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
        xq = torch.round(x2 / x_scale).to(torch.int8)
        out = torch._int_mm(xq, self.weight_t).float() * x_scale * self.weight_scale
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype=int8"


@contextlib.contextmanager
def _quiet_torch_ao() -> Iterator[None]:
    """torch.ao.quantization warns that it is deprecated on every call; we already know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*")
        yield


def _torch_ao_quantize_dynamic():
    try:
        with _quiet_torch_ao():
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        return None
    return quantize_dynamic, per_channel_dynamic_qconfig


def _replace_linears(module: nn.Module) -> int:
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8DynamicLinear(child))
            count += 1
        else:
            count += _replace_linears(child)
    return count


def quantize_int8(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Quantise the ``nn.Linear`` layers of ``model.model`` (an :class:`AutoModelForEmbedding`) to int8
    dynamic linears, in place, on CPU; the model then runs in fp32 and refuses training and saving.

    ``backend``: ``torch`` (``torch.ao`` ``quantize_dynamic``, per-channel weights), ``native``
    (:class:`Int8DynamicLinear`) or ``auto`` (torch when available).
    """
    if backend not in INT8_BACKENDS:
        raise ValueError(f"Unknown int8 backend {backend!r}; valid values are: {', '.join(INT8_BACKENDS)}")
    if getattr(model, "quantization", None):
        raise ValueError(f"The model is already quantized ({model.quantization})")
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("int8 dynamic quantisation runs on CPU only; load the model with device='cpu'")
    model.float()
    model.eval()
    torch_ao = _torch_ao_quantize_dynamic() if backend in ("auto", "torch") else None
    if backend == "torch" and torch_ao is None:
        raise ValueError("backend='torch' needs torch.ao.quantization.quantize_dynamic, which this torch lacks")
    if torch_ao is not None:
        quantize_dynamic, qconfig = torch_ao
        with _quiet_torch_ao():
            quantize_dynamic(model.model, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)
        used = "torch"
    else:
        _replace_linears(model.model)
        used = "native"
    model.quantization = "int8"
    model.int8_backend = used
    model.precision = "fp32"
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.register_forward_pre_hook(_inference_only_hook)
    logger.info("Quantized the backbone's Linear layers to int8 (dynamic, %s backend)", used)
    return model


def _inference_only_hook(module: nn.Module, args: Any) -> None:
    if module.training and torch.is_grad_enabled():
        raise ValueError("This model is int8-quantized (quantization='int8') and can only run inference; "
                         "load it without quantization to train it")
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.float32:
        raise ValueError("An int8-quantized model runs in fp32; encode it with precision='fp32' (the default "
                         "for such models), not under bf16/fp16 autocast")


def check_can_save(model: nn.Module) -> None:
    """``save_pretrained`` of an int8-dynamic model would write packed weights nothing can load: refuse."""
    if getattr(model, "quantization", None) == "int8":
        raise ValueError("Cannot save an int8-quantized model (its packed weights do not load back); save the "
                         "fp32 model and pass quantization='int8' when loading it")
