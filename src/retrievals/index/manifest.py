"""The manifest of a vectors folder (Parquet shards) and of an index: what model made the vectors,
how, and which files hold them with their checksums. Written atomically; read back to resume, to
check files before use, and to refuse a model that does not match."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from ..models.fingerprint import cached_file_sha256, file_sha256, model_fingerprint, write_json_atomic  # noqa: F401  (the index package's names for them)

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


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
