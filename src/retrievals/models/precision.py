"""Choosing the numeric precision used for inference.

``"auto"`` picks bfloat16 where the hardware runs it fast (CUDA devices with bf16 support, CPUs
with AVX512-BF16 or AMX) and float32 elsewhere. On CPU the weights stay float32 and the forward
pass runs under ``torch.autocast``; training code is therefore never handed bf16 master weights.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import weakref
from typing import ContextManager, Optional

import torch

logger = logging.getLogger(__name__)

PRECISIONS = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
BF16_ENV = "RETRIEVALS_CPU_BF16"
_WARNED_FP16_ON_CPU: weakref.WeakSet = weakref.WeakSet()  # models already told that fp16 falls back on CPU


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX). ``RETRIEVALS_CPU_BF16=0``
    (or ``1``) overrides the reading: ``0`` runs the fp32 path of a CPU without bf16 units."""
    forced = os.environ.get(BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


@functools.cache
def cpu_class() -> str:
    """The CPU's model name and the class that decides its precision: AMX, AVX512-BF16, AVX2-only (bf16 emulated)."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown CPU":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if "amx_bf16" in flags:
        kind = "AMX (bf16 units)"
    elif "avx512_bf16" in flags:
        kind = "AVX512-BF16 (bf16 units)"
    elif "avx2" in flags:
        kind = "AVX2-only (no bf16 units: fp32)"
    else:
        kind = "no AVX2 (fp32)"
    forced = os.environ.get(BF16_ENV, "").strip()
    if forced in ("0", "1"):
        kind += f"; {BF16_ENV}={forced}: bf16 path {'on' if forced == '1' else 'off'}"
    return f"{name}, {os.cpu_count()} cores, {kind}"


def canonical_precision(name: str) -> str:
    key = PRECISION_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in PRECISIONS:
        raise ValueError(f"Unknown precision {name!r}; valid names are: {', '.join(PRECISIONS)}")
    return key


def resolve_precision(name: str, device: torch.device, owner: Optional[object] = None) -> str:
    """Turn ``auto`` (or an unsupported request) into the precision actually used on ``device``.

    The fp16-on-CPU fallback is logged once per ``owner`` (the model; every call when none is given),
    not on every ``encode``."""
    key = canonical_precision(name)
    if device.type == "cuda":
        if key == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return key
    if device.type == "cpu":
        if key == "auto":
            return "bf16" if cpu_has_fast_bf16() else "fp32"
        if key == "fp16":
            fallback = "bf16" if cpu_has_fast_bf16() else "fp32"
            if _first_time(owner):
                logger.warning("fp16 is slow on CPU; using %s instead", fallback)
            return fallback
        return key
    return "fp32" if key == "auto" else key


def _first_time(owner: Optional[object]) -> bool:
    """True on the first call for ``owner`` (always for ``None``), then False."""
    if owner is None:
        return True
    if owner in _WARNED_FP16_ON_CPU:
        return False
    _WARNED_FP16_ON_CPU.add(owner)
    return True


def autocast_context(precision: str, device: torch.device, weights_dtype: torch.dtype) -> ContextManager:
    """Autocast for ``precision`` unless the weights already have that dtype."""
    dtype: Optional[torch.dtype] = PRECISIONS[precision]
    if dtype is None or dtype == torch.float32 or weights_dtype == dtype:
        return contextlib.nullcontext()
    if device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
