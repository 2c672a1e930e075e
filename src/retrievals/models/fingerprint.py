"""The fingerprint of a model: a short hash of everything that decides its vectors (embedding config,
backbone config, every weight), and the file hashes behind it, cached by file identity. Indexes,
vectors folders and exported backends (:mod:`retrievals.backends`) are all keyed by it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Dict

from ..backends.store import cache_dir, write_json_atomic

logger = logging.getLogger(__name__)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


_PATH_KEYS = ("_name_or_path", "_commit_hash", "transformers_version")
_PEFT_PATH_KEYS = ("base_model_name_or_path", "revision")
_FILE_HASHES: Dict[str, str] = {}  # file identity -> sha256 of its bytes, in this process
_CACHE_FILE = "weights-sha256.json"


def _cache_path() -> str:
    """Where the file hashes outlive the process: the package's cache folder (``$RETRIEVALS_CACHE_DIR``)."""
    return os.path.join(cache_dir(), _CACHE_FILE)


def cached_file_sha256(path: str) -> str:
    """:func:`file_sha256` of a weights file, cached by the file's identity (real path, size, mtime_ns,
    inode) in this process and in a small JSON file, so a multi-GB model is read once, not at every load."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    if key in _FILE_HASHES:
        return _FILE_HASHES[key]
    cache_file = _cache_path()
    try:
        with open(cache_file, encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    digest = cache.get(key) if isinstance(cache, dict) else None
    if not isinstance(digest, str):
        digest = file_sha256(real)
        cache = {k: v for k, v in (cache if isinstance(cache, dict) else {}).items()  # drop stale entries
                 if os.path.exists(k.rsplit("|", 3)[0]) and not k.startswith(real + "|")}
        cache[key] = digest
        try:
            os.makedirs(os.path.dirname(cache_file), exist_ok=True)
            write_json_atomic(cache_file, cache)
        except OSError as e:
            logger.debug("weights hash cache %s not written: %s", cache_file, e)
    _FILE_HASHES[key] = digest
    return digest


def _hash_tensors(digest, state: Dict[str, Any]) -> None:
    """Every byte of every tensor (streamed one tensor at a time), with its name, dtype and shape."""
    import torch

    for name, value in sorted(state.items()):
        digest.update(name.encode())
        if not isinstance(value, torch.Tensor):
            digest.update(repr(value).encode())
            continue
        tensor = value.detach()
        tensor = tensor.dequantize() if tensor.is_quantized else tensor
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def model_fingerprint(model, with_variant: bool = True) -> str:
    """A short hash of what decides a model's vectors: its embedding config (pooling, normalisation,
    instructions, max lengths), its backbone config and all its weights. Weights loaded from files are
    hashed whole from the files (:func:`cached_file_sha256`, ~1.2 s per GB once, then cached); a model
    built in memory, or changed in memory since it was loaded (an optimizer step), is hashed tensor by
    tensor; LoRA adapters not merged yet are hashed from memory.
    The path the model was loaded from does not count (a copy, or a relative path, is the same model).
    Quantisation counts (``with_variant=False``: the float model the quantised one was made from)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(model.embedding_config.to_dict(), sort_keys=True).encode())
    quantization = getattr(model, "quantization", None)
    if with_variant and quantization:  # lossy vectors: int8 (torch's dynamic or OpenVINO's static) is another model
        digest.update(f"quantization:{quantization}:{getattr(model, 'int8_backend', 'torch')}".encode())
    backbone = getattr(model, "model", model)
    settings = {k: v for k, v in backbone.config.to_dict().items() if k not in _PATH_KEYS}  # where, not what
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    from .loading import weights_files, weights_state

    files = getattr(model, "weights_files", None)
    if files is None:  # built without from_pretrained: the weights of the folder it names, if any
        folder = getattr(backbone.config, "_name_or_path", "") or ""
        files = weights_files(folder, True, {}) if os.path.isdir(folder) else []
    elif getattr(model, "loaded_weights_state", None) != weights_state(backbone):
        files = []  # trained or edited in memory since loading: its files are not this model any more
    for path in files:
        digest.update(f"{os.path.basename(path)}:{cached_file_sha256(path)}".encode())
    peft_config = getattr(backbone, "peft_config", None)
    if not files:  # in memory only (or a hub model without a local snapshot): the weights themselves
        _hash_tensors(digest, backbone.state_dict())
    elif peft_config:  # adapters on top of the loaded files, not merged yet
        adapters = {name: {k: v for k, v in c.to_dict().items() if k not in _PEFT_PATH_KEYS} for name, c in peft_config.items()}
        digest.update(json.dumps(adapters, sort_keys=True, default=str).encode())
        _hash_tensors(digest, {k: v for k, v in backbone.state_dict().items() if "lora_" in k})
    return digest.hexdigest()[:16]
