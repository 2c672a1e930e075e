"""Inference backends behind one model option, ``AutoModelForEmbedding.from_pretrained(..., backend=)``.

- ``torch``: the model's own forward (bf16 autocast where the CPU is fast at it).
- ``openvino``: the whole forward (backbone and pooling) exported once to an OpenVINO graph, saved beside
  the model and reused; fp32 or bf16 inference hint by ``precision``, or int8 static quantization
  (``quantization="int8"``) calibrated on the user's own documents. Several inference streams share the
  cores. Needs the ``openvino`` extra (and ``nncf`` for int8), imported only when asked for.
- ``auto`` (the default): the fastest near-lossless backend for the CPU it runs on, measured once per model
  architecture and CPU, the choice cached on disk; models above ``AUTO_MAX_PARAMETERS`` stay on torch (an
  export of a multi-billion-parameter LLM costs minutes and gigabytes: ask for ``openvino`` by name). The
  training pipelines load their models with ``torch`` (see docs/speed.md); ``RETRIEVALS_BACKEND`` sets the
  default for a process.

This package sits below :mod:`retrievals.models`: it sees a model only as a ``torch.nn.Module`` and token
ids, so every export is keyed by the fingerprint its caller computes.
"""

from __future__ import annotations

import importlib.util
from typing import Dict

BACKENDS: Dict[str, str] = {
    "torch": "the model's own torch forward",
    "openvino": "an OpenVINO graph of the whole forward, exported once and reused (extra: openvino; int8: nncf)",
    "auto": "the fastest near-lossless backend on this CPU, measured once and cached",
}
EXTRAS: Dict[str, str] = {"openvino": "openvino", "nncf": "nncf"}
DEFAULT_BACKEND = "auto"
AUTO_MAX_PARAMETERS = 600_000_000  # larger models stay on torch under auto


def canonical_backend(name) -> str:
    """The backend's registry name; an unknown name lists the valid ones."""
    key = DEFAULT_BACKEND if name is None else str(name).strip().lower()
    if key not in BACKENDS:
        raise ValueError(f"Unknown backend {name!r}; valid backends are: {', '.join(BACKENDS)}")
    return key


def is_available(name: str) -> bool:
    """Whether the packages a backend needs are installed (``torch`` always is)."""
    if name == "torch":
        return True
    return importlib.util.find_spec(EXTRAS.get(name, name)) is not None


def require(package: str, what: str) -> None:
    """A clear error naming the missing package and how to install it."""
    if importlib.util.find_spec(package) is None:
        raise ImportError(f"{what} needs the {package!r} package: pip install 'retrievals[openvino]' "
                          f"(or pip install {package})")
