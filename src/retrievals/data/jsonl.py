"""Reading JSONL files with errors that name the file, the line and the field; writing them whole."""

from __future__ import annotations

import gzip
import json
import os
from typing import Any, Dict, Iterable, Iterator, Tuple


def open_text(path: str):
    """Open ``path`` for reading text; ``.gz`` files are decompressed."""
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def write_jsonl(path: str, records: Iterable[Any]) -> None:
    """One JSON value per line (UTF-8, not ASCII-escaped), written to ``path.tmp`` then renamed: a reader
    sees the whole file or none of it, even after a kill."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(tmp, path)


def iter_jsonl(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line; malformed lines raise ``ValueError``."""
    with open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            yield line_no, record


def require_str(record: Dict[str, Any], key: str, path: str, line_no: int, allow_empty: bool = False) -> str:
    """``record[key]`` as a string, or a ``ValueError`` naming file, line and field."""
    if key not in record:
        raise ValueError(f"{path}:{line_no}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{path}:{line_no}: field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{path}:{line_no}: field {key!r} is empty")
    return value
