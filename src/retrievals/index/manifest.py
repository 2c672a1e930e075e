"""The manifest of a vectors folder (Parquet shards) and of an index: what model made the vectors,
how, and which files hold them with their checksums. Written atomically; read back to resume, to
check files before use, and to refuse a model that does not match."""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_EDGE_BYTES = 1 << 20  # weights are fingerprinted by size and their first and last MiB


def write_json_atomic(path: str, data: Dict[str, Any]) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``: readers see the old file
    or the new one, never half of one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


_PATH_KEYS = ("_name_or_path", "_commit_hash", "transformers_version")


def model_fingerprint(model) -> str:
    """A short hash of what decides a model's vectors: its embedding config, its backbone config and
    its weights (size plus the first and last MiB of each weights file, when loaded from a folder).
    Fine-tuned weights, another pooling or instruction: another fingerprint."""
    digest = hashlib.sha256()
    digest.update(json.dumps(model.embedding_config.to_dict(), sort_keys=True).encode())
    backbone = getattr(model, "model", model)
    settings = {k: v for k, v in backbone.config.to_dict().items() if k not in _PATH_KEYS}  # where, not what
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    folder = getattr(backbone.config, "_name_or_path", "") or ""
    weights = sorted(glob.glob(os.path.join(folder, "*.safetensors")) + glob.glob(os.path.join(folder, "*.gguf"))) \
        if os.path.isdir(folder) else []
    for path in weights:
        size = os.path.getsize(path)
        digest.update(f"{os.path.basename(path)}:{size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(_EDGE_BYTES))
            f.seek(max(0, size - _EDGE_BYTES))
            digest.update(f.read(_EDGE_BYTES))
    if not weights:  # in memory only (or a hub cache without a folder): hash the weights themselves
        for name, tensor in sorted(backbone.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes()[:_EDGE_BYTES])
    return digest.hexdigest()[:16]


@dataclass
class ShardInfo:
    name: str
    rows: int
    first_row: int
    sha256: str
    bytes: int


@dataclass
class VectorsManifest:
    """``manifest.json`` of a vectors folder."""

    model: str
    model_fingerprint: str
    dimension: int
    normalized: bool
    document_instruction: str
    dtype: str  # float32 | int8 | binary
    shard_size: int
    total_rows: Optional[int] = None  # rows to encode (known after the id pass)
    input: List[Dict[str, Any]] = field(default_factory=list)
    options: Dict[str, Any] = field(default_factory=dict)
    shards: List[ShardInfo] = field(default_factory=list)
    int8_ranges: Optional[Dict[str, List[float]]] = None  # starts / steps, fixed by the first shard
    skipped: int = 0
    complete: bool = False
    engine: str = "local"
    format_version: int = FORMAT_VERSION

    @property
    def count(self) -> int:
        return sum(s.rows for s in self.shards)

    def save(self, folder: str) -> None:
        write_json_atomic(os.path.join(folder, MANIFEST_NAME), asdict(self))

    @classmethod
    def load(cls, folder: str) -> VectorsManifest:
        path = os.path.join(folder, MANIFEST_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder!r} holds no {MANIFEST_NAME}: not a vectors folder written by "
                                    "retrievals.pipelines.encode")
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
        data["shards"] = [ShardInfo(**s) for s in data.get("shards", [])]
        return cls(**data)

    def check_model(self, fingerprint: str, model_name: str) -> None:
        """Refuse vectors (or an index) made by another model, naming both."""
        if fingerprint != self.model_fingerprint:
            raise ValueError(f"the vectors were made by {self.model} (fingerprint {self.model_fingerprint}); the model "
                             f"given is {model_name} (fingerprint {fingerprint}): encode the corpus again with it, "
                             "or pass the model that made them")
