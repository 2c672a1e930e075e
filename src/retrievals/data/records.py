"""Reading training records from JSONL / JSON / CSV / TSV files, folders, or ``datasets`` objects.

Every record keeps its origin (``file:line``) so validation errors can name the file, the line
and the field.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Tuple, Union

from .jsonl import iter_jsonl, open_text

logger = logging.getLogger(__name__)

Record = Tuple[str, Dict[str, Any]]  # (origin "file:line", record)
TABLE_EXTENSIONS = (".csv", ".tsv", ".csv.gz", ".tsv.gz")
JSON_EXTENSIONS = (".jsonl", ".json", ".jsonl.gz")


class InvalidRecord(ValueError):
    """A training record that fails validation; the message names origin and field."""


@dataclass
class SkipCounter:
    """Counts records skipped under ``skip_invalid=True`` and reports them once."""

    skipped: int = 0
    first_error: str = ""

    def add(self, error: Exception) -> None:
        if not self.skipped:
            self.first_error = str(error)
        self.skipped += 1

    def report(self, total: int, source: str) -> None:
        if self.skipped:
            logger.warning("Skipped %d of %d invalid records in %s (first: %s)", self.skipped, total, source,
                           self.first_error)


def _iter_table(path: str) -> Iterator[Record]:
    delimiter = "\t" if ".tsv" in os.path.basename(path) else ","
    with open_text(path) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for line_no, row in enumerate(reader, start=2):
            yield f"{path}:{line_no}", dict(row)


def _iter_file(path: str) -> Iterator[Record]:
    if path.endswith(TABLE_EXTENSIONS):
        yield from _iter_table(path)
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            head = f.read(1)
            f.seek(0)
            if head == "[":
                for i, rec in enumerate(json.load(f)):
                    yield f"{path}:item {i}", rec
                return
        yield from ((f"{path}:{n}", r) for n, r in iter_jsonl(path))
    else:
        yield from ((f"{path}:{n}", r) for n, r in iter_jsonl(path))


def iter_records(source: Union[str, os.PathLike, Iterable[Dict[str, Any]]]) -> Iterator[Record]:
    """Yield ``(origin, record)`` from a file, a folder of files, or any iterable of dicts
    (a ``datasets.Dataset`` included)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            files = sorted(f for ext in JSON_EXTENSIONS + TABLE_EXTENSIONS for f in glob.glob(os.path.join(path, "*" + ext)))
            if not files:
                raise FileNotFoundError(f"{path}: no .jsonl/.json/.csv/.tsv files in this folder")
            for f in files:
                yield from _iter_file(f)
            return
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Training data {path!r} does not exist")
        yield from _iter_file(path)
        return
    for i, rec in enumerate(source):
        yield f"row {i}", dict(rec)


def text_field(record: Dict[str, Any], key: str, origin: str) -> str:
    if key not in record or record[key] is None:
        raise InvalidRecord(f"{origin}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise InvalidRecord(f"{origin}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidRecord(f"{origin}: field {key!r} is empty")
    return value


def text_list_field(record: Dict[str, Any], key: str, origin: str, required: bool = True) -> List[str]:
    """A string or a non-empty list of non-empty strings (JSON-encoded lists in CSV cells too)."""
    if key not in record or record[key] is None:
        if required:
            raise InvalidRecord(f"{origin}: missing field {key!r}")
        return []
    value = record[key]
    if isinstance(value, str) and value.startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if isinstance(value, str):
        return [text_field(record, key, origin)]
    items = value
    if not isinstance(items, list):
        raise InvalidRecord(f"{origin}: field {key!r} must be a string or a list of strings, got {type(value).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise InvalidRecord(f"{origin}: field {key!r}[{i}] must be a string, got {type(item).__name__}")
        if not item.strip():
            raise InvalidRecord(f"{origin}: field {key!r}[{i}] is empty")
    if required and not items:
        raise InvalidRecord(f"{origin}: field {key!r} is an empty list")
    return list(items)


def number_field(record: Dict[str, Any], key: str, origin: str) -> float:
    if key not in record or record[key] is None:
        raise InvalidRecord(f"{origin}: missing field {key!r}")
    try:
        value = float(record[key])
    except (TypeError, ValueError):
        raise InvalidRecord(f"{origin}: field {key!r} must be a number, got {record[key]!r}") from None
    if value != value:
        raise InvalidRecord(f"{origin}: field {key!r} is NaN")
    return value
