"""The settings that make an embedding model embed the same way everywhere.

``EmbeddingConfig`` is saved next to the weights as ``retrievals_config.json``; training, mining,
encoding and serving all read it. The same directory also carries sentence-transformers' files
(``modules.json``, ``1_Pooling/config.json``, ...) so it loads there too, and a plain
sentence-transformers directory is read back into an ``EmbeddingConfig``.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, Optional

from .pooling import canonical_pooling_name

logger = logging.getLogger(__name__)

CONFIG_NAME = "retrievals_config.json"

# Our pooling names <-> sentence-transformers' Pooling config keys.
ST_POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "last": "pooling_mode_lasttoken",
}


@dataclass
class EmbeddingConfig:
    pooling_method: str = "mean"
    normalize_embeddings: bool = True
    query_instruction: str = ""
    document_instruction: str = ""
    max_length: int = 512
    query_max_length: Optional[int] = None
    append_eos: bool = False
    padding_side: str = "right"
    truncate_dim: Optional[int] = None

    def __post_init__(self) -> None:
        self.pooling_method = canonical_pooling_name(self.pooling_method)
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        for name in ("max_length", "query_max_length", "truncate_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def max_length_for(self, is_query: bool) -> int:
        if is_query and self.query_max_length:
            return self.query_max_length
        return self.max_length

    def instruction_for(self, is_query: bool) -> str:
        return self.query_instruction if is_query else self.document_instruction

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "config") -> EmbeddingConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            logger.warning("Ignoring unknown keys in %s: %s", source, ", ".join(sorted(unknown)))
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, directory: str, dimension: int) -> None:
        """Write our config and sentence-transformers' files; ``dimension`` is the output size."""
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)
        write_sentence_transformers_files(self, directory, dimension)


FileLocator = Callable[[str], Optional[str]]
"""Maps a file's path inside a model (``"1_Pooling/config.json"``) to a local file, or ``None`` if absent."""


def folder_locator(directory: str) -> FileLocator:
    """A :data:`FileLocator` for a model directory on disk."""

    def locate(relative: str) -> Optional[str]:
        path = os.path.join(directory, *relative.split("/"))
        return path if os.path.isfile(path) else None

    return locate


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None


def load_saved_settings(directory: str, locate: Optional[FileLocator] = None) -> Dict[str, Any]:
    """Settings saved with a model: ours if present, else those of sentence-transformers.

    ``directory`` names the model (a folder, or a hub id in messages); ``locate`` finds its files
    (default: in the folder ``directory``; see :func:`retrievals.models.loading.hub_file_locator`).
    """
    locate = locate or folder_locator(directory)
    ours = locate(CONFIG_NAME)
    if ours:
        return _read_json(ours)
    if locate("modules.json"):
        return read_sentence_transformers_settings(directory, locate)
    return {}


def read_sentence_transformers_settings(directory: str, locate: Optional[FileLocator] = None) -> Dict[str, Any]:
    """Pooling, normalisation, max length and prompts from sentence-transformers' files."""
    locate = locate or folder_locator(directory)
    modules_file = locate("modules.json")
    if not modules_file:
        raise FileNotFoundError(f"{directory}: modules.json is missing")
    modules = _read_json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ValueError(f"{modules_file}: expected a JSON list of module objects")
    settings: Dict[str, Any] = {"normalize_embeddings": False}
    for module in modules:
        kind, sub = module.get("type", ""), module.get("path", "")
        if os.path.isabs(sub) or ".." in sub.replace("\\", "/").split("/"):
            raise ValueError(f"{modules_file}: module path {sub!r} leaves the model directory")
        if kind.endswith("models.Pooling"):
            settings["pooling_method"] = _read_pooling(directory, locate, posixpath.join(sub, "config.json"))
        elif kind.endswith("models.Normalize"):
            settings["normalize_embeddings"] = True
        elif kind.endswith("models.Transformer"):
            bert_cfg = locate(posixpath.join(sub, "sentence_bert_config.json"))
            max_len = _read_json(bert_cfg).get("max_seq_length") if bert_cfg else None
            if max_len:
                settings["max_length"] = int(max_len)
    st_cfg = locate("config_sentence_transformers.json")
    settings.update(_read_prompts(st_cfg) if st_cfg else {})
    return settings


def _read_pooling(directory: str, locate: FileLocator, relative: str) -> str:
    path = locate(relative)
    if not path:
        raise FileNotFoundError(f"{directory}/{relative} is missing (modules.json names a Pooling module there)")
    pooling = _read_json(path)
    chosen = [name for name, key in ST_POOLING_KEYS.items() if pooling.get(key)]
    if len(chosen) != 1:
        raise ValueError(f"{path}: expected exactly one pooling mode, found {chosen or 'none'}")
    return chosen[0]


def _read_prompts(path: str) -> Dict[str, str]:
    prompts = _read_json(path).get("prompts") or {}
    settings = {}
    if prompts.get("query"):
        settings["query_instruction"] = prompts["query"]
    for key in ("document", "passage", "corpus"):
        if prompts.get(key):
            settings["document_instruction"] = prompts[key]
            break
    return settings


def write_sentence_transformers_files(config: EmbeddingConfig, directory: str, dimension: int) -> None:
    """Write the files sentence-transformers needs to load ``directory`` with the same pooling."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if config.normalize_embeddings:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(directory, "2_Normalize"), exist_ok=True)
    os.makedirs(os.path.join(directory, "1_Pooling"), exist_ok=True)
    with open(os.path.join(directory, "modules.json"), "w", encoding="utf-8") as f:
        json.dump(modules, f, indent=2)
    pooling: Dict[str, Any] = {"word_embedding_dimension": dimension}
    pooling.update({key: name == config.pooling_method for name, key in ST_POOLING_KEYS.items()})
    pooling["pooling_mode_mean_sqrt_len_tokens"] = False
    pooling["include_prompt"] = True
    with open(os.path.join(directory, "1_Pooling", "config.json"), "w", encoding="utf-8") as f:
        json.dump(pooling, f, indent=2)
    with open(os.path.join(directory, "sentence_bert_config.json"), "w", encoding="utf-8") as f:
        json.dump({"max_seq_length": config.max_length, "do_lower_case": False}, f, indent=2)
    prompts = {}
    if config.query_instruction:
        prompts["query"] = config.query_instruction
    if config.document_instruction:
        prompts["document"] = config.document_instruction
    # plain encode() is the document side here; make it so in sentence-transformers too
    default = "document" if "document" in prompts else None
    st_config = {"prompts": prompts, "default_prompt_name": default, "similarity_fn_name": "cosine"}
    with open(os.path.join(directory, "config_sentence_transformers.json"), "w", encoding="utf-8") as f:
        json.dump(st_config, f, indent=2, ensure_ascii=False)
