"""Loading a backbone and its tokenizer safely from a local directory, a GGUF file or the hub."""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

from transformers import AutoModel, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.utils.hub import cached_file

from .embedding_config import FileLocator
from .pooling import canonical_pooling_name

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH_CAP = 512  # max_length of a model that saves none, where its positions allow
# Keyword arguments that also concern the tokenizer (everything else goes to the model only).
TOKENIZER_KWARGS = ("gguf_file", "revision", "token", "cache_dir", "local_files_only", "subfolder")
# Keyword arguments that say where and how to fetch a hub repository's files.
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "force_download", "proxies")


def looks_like_local_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else is meant as a path on disk."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or name.endswith(".gguf")


def resolve_source(name_or_path: str, kwargs: Dict[str, Any]) -> Tuple[str, bool]:
    """Return ``(path_or_id, is_local)``; a ``.gguf`` file path becomes its folder plus ``gguf_file``."""
    path = os.path.expanduser(str(name_or_path))
    if os.path.isfile(path) and path.endswith(".gguf"):
        kwargs.setdefault("gguf_file", os.path.basename(path))
        return os.path.dirname(os.path.abspath(path)), True
    if os.path.isdir(path):
        return path, True
    if os.path.exists(path):
        raise ValueError(f"Model path {path!r} is a file; pass the model directory (or a .gguf file)")
    if looks_like_local_path(str(name_or_path)):
        raise FileNotFoundError(f"Model path {path!r} does not exist")
    return str(name_or_path), False


def hub_file_locator(repo_id: str, kwargs: Dict[str, Any]) -> FileLocator:
    """A :data:`~retrievals.models.embedding_config.FileLocator` for the files of hub repository ``repo_id``.

    Files are resolved the way transformers resolves the weights: through the HF cache (downloaded on
    first use; offline, the cache only), honouring ``revision``, ``cache_dir``, ``token``,
    ``local_files_only`` and ``subfolder`` in ``kwargs``. A file the repository lacks is ``None``.
    """
    options = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}

    def locate(relative: str) -> Optional[str]:
        return cached_file(repo_id, relative, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **options)

    return locate


def check_local_weights(path: str, kwargs: Dict[str, Any]) -> None:
    """Refuse pickle-only checkpoints and custom code unless the caller opted in."""
    if kwargs.get("gguf_file"):
        return
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} is not a model directory: config.json is missing")
    has_safetensors = bool(glob.glob(os.path.join(path, "*.safetensors")))
    has_pickle = bool(glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt")))
    if not has_safetensors and has_pickle and kwargs.get("use_safetensors") is not False:
        raise ValueError(
            f"{path!r} holds only pickle weights (*.bin), which can run arbitrary code when loaded; "
            "convert them to safetensors, or pass use_safetensors=False if you trust the source"
        )
    if not has_safetensors and not has_pickle:
        raise FileNotFoundError(f"{path!r} holds no model weights (*.safetensors)")


def weights_files(path: str, is_local: bool, kwargs: Dict[str, Any]) -> List[str]:
    """The weights files a model at ``path`` is loaded from (what its fingerprint hashes): the GGUF file
    when one is named, else the folder's ``*.safetensors``, else its ``pytorch_model*.bin`` (also with
    ``use_safetensors=False``). A hub model's files are those of its snapshot in the HF cache."""
    folder = path
    if not is_local:
        located = hub_file_locator(path, kwargs)("config.json")
        if not located:
            return []
        folder = os.path.dirname(located)
    elif kwargs.get("subfolder"):
        folder = os.path.join(path, kwargs["subfolder"])
    if kwargs.get("gguf_file"):
        return [os.path.join(folder, kwargs["gguf_file"])]
    pickles = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
    if kwargs.get("use_safetensors") is False:
        return pickles
    return sorted(glob.glob(os.path.join(folder, "*.safetensors"))) or pickles


def weights_state(module) -> Tuple[Tuple[str, int, int], ...]:
    """Which tensors a module holds and how often each was written in place (``_version``): recorded at load
    time, it tells whether the weights in memory are still those of the files (an optimizer step bumps it,
    a tensor swapped in changes the storage)."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return tuple((name, t.data_ptr(), t._version) for name, t in named)


def has_custom_code(path: str) -> bool:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file, encoding="utf-8") as f:
        return "auto_map" in json.load(f)


def load_backbone(path: str, is_local: bool, trust_remote_code: bool, kwargs: Dict[str, Any]):
    """Load ``(model, tokenizer)``; extra ``kwargs`` pass through to transformers."""
    if is_local:
        check_local_weights(path, kwargs)
        if has_custom_code(path) and not trust_remote_code:
            raise ValueError(f"{path!r} asks to run custom code (auto_map); pass trust_remote_code=True if you trust it")
    model_kwargs = dict(kwargs)
    if not model_kwargs.get("gguf_file"):
        model_kwargs.setdefault("use_safetensors", True if is_local else None)
    tokenizer_kwargs = {k: kwargs[k] for k in TOKENIZER_KWARGS if k in kwargs}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **tokenizer_kwargs)
        model = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code, **model_kwargs)
    except OSError as e:
        raise OSError(f"Could not load model {path!r}: {e}") from e
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise OSError(f"Could not load model {path!r}: corrupt or truncated safetensors file ({e})") from e
    if kwargs.get("gguf_file"):
        _forget_gguf_quantization(model)
    return model, tokenizer


def _forget_gguf_quantization(model) -> None:
    """GGUF weights are de-quantized to torch tensors on load, but transformers still marks the model
    as quantized, which blocks ``save_pretrained`` and full fine-tuning. Clear that marker."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)) == "gguf":
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def is_decoder_model(config) -> bool:
    """Decoder-only LLMs (Llama, Qwen2, Mistral, ...) as opposed to bidirectional encoders."""
    if getattr(config, "is_encoder_decoder", False):
        return False
    return config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def position_limit(config, tokenizer) -> Optional[int]:
    """The most tokens the model takes: the smaller of its position table (``max_position_embeddings``)
    and the tokenizer's ``model_max_length``; ``None`` when neither says. The one home of this limit:
    the default ``max_length`` and the ``embed`` flags' cap both come from it."""
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(x) for x in limits if isinstance(x, (int, float)) and x > 0]
    return min(limits) if limits else None


def default_settings(backbone, tokenizer, saved: Dict[str, Any], explicit: Dict[str, Any]) -> Dict[str, Any]:
    """Settings of a model with nothing saved or given: pooling by architecture (``last`` for decoders,
    ``mean`` else), ``max_length`` the model's :func:`position_limit` up to 512."""
    decoder = is_decoder_model(backbone.config)
    settings: Dict[str, Any] = {"pooling_method": "last" if decoder else "mean"}
    if "pooling_method" not in saved and explicit["pooling_method"] is None:
        logger.warning("No pooling_method given or saved; using %r for this %s model",
                       settings["pooling_method"], "decoder" if decoder else "encoder")
    settings["max_length"] = min(DEFAULT_MAX_LENGTH_CAP, position_limit(backbone.config, tokenizer) or DEFAULT_MAX_LENGTH_CAP)
    settings["padding_side"] = "right"
    return settings


def needs_eos(backbone, tokenizer, pooling_method: str) -> bool:
    """Decoder LLMs pooled on the last token need EOS there; append it unless the tokenizer does."""
    if canonical_pooling_name(pooling_method) != "last" or not is_decoder_model(backbone.config):
        return False
    return tokenizer.eos_token_id is not None and not tokenizer_appends_eos(tokenizer)


def tokenizer_appends_eos(tokenizer) -> bool:
    eos = tokenizer.eos_token_id
    if eos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[-1] == eos


def ensure_pad_token(tokenizer, num_embeddings: Optional[int] = None) -> None:
    """Reuse EOS (or UNK) as padding when the tokenizer has none, or when its pad id lies outside
    the model's embedding table; never grow the vocabulary."""
    pad_id = tokenizer.pad_token_id
    if pad_id is not None and (num_embeddings is None or pad_id < num_embeddings):
        return
    for candidate in (tokenizer.eos_token, tokenizer.unk_token):
        if candidate is not None:
            if pad_id is not None:
                logger.warning("pad token id %d is outside the embedding table (%d); padding with %r",
                               pad_id, num_embeddings, candidate)
            tokenizer.pad_token = candidate
            return
    raise ValueError("The tokenizer has no usable pad, eos or unk token to pad with")
