"""Reading a corpus of any size: JSONL (``.gz``), Parquet, or a folder of them, one record at a time.

The one corpus reader of the package: the BEIR loader (``eval``, ``finetune_beir``, ``embed``), ``build_hn``'s
candidate pool, the encode job and the pre-training stream all read documents through :class:`CorpusReader`.
Nothing here holds the corpus: it yields ``(row, id, text)`` in file order, with a policy for bad records
(raise naming ``file:line``, or count and skip) and one for empty documents (``skip`` with a logged count,
``embed``, or ``error`` naming ``file:line``). :func:`check_unique_ids` is one pass over the ids that keeps
8 bytes per row (a 64-bit hash), the only per-row state of the whole encode.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from .jsonl import open_text

logger = logging.getLogger(__name__)

CORPUS_EXTENSIONS = (".jsonl", ".jsonl.gz", ".parquet")
EMPTY_POLICIES = ("skip", "embed", "error")
EMPTY_DOCUMENTS_HELP = ("Documents with no title and no text: skip (the default; counted in the log), embed (as an "
                        "empty text) or error (refused, naming file:line)")


class CorpusError(ValueError):
    """A bad corpus record or file; the message names the file, the line (or row) and the field."""


@dataclass(frozen=True)
class CorpusRow:
    row: int  # position among the rows that are encoded (the shard layout follows it)
    id: str
    text: str  # title + " " + text, as encode_corpus joins them
    origin: str  # "file:line"
    title: str = ""  # the title alone ("" when none); ``text`` starts with it

    @property
    def body(self) -> str:
        """The text without the title."""
        return self.text[len(self.title):].lstrip() if self.title else self.text


@dataclass
class CorpusOptions:
    """How records are read: key names, and the policies for bad records and empty documents."""

    id_key: str = "_id"
    text_key: str = "text"
    title_key: Optional[str] = "title"
    skip_invalid: bool = False
    empty_documents: str = "skip"
    id_required: bool = True  # False: a record without an id is read with id ""

    def __post_init__(self) -> None:
        if self.empty_documents not in EMPTY_POLICIES:
            raise ValueError(f"empty_documents must be one of {', '.join(EMPTY_POLICIES)}, got {self.empty_documents!r}")


@dataclass
class CorpusStats:
    read: int = 0
    rows: int = 0
    invalid: int = 0
    empty: int = 0
    first_invalid: str = ""
    skipped: List[Dict[str, str]] = field(default_factory=list)  # ids (or origins) not encoded, with why

    def report(self, source: str) -> None:
        if self.invalid:
            logger.warning("%s: skipped %d invalid records (first: %s)", source, self.invalid, self.first_invalid)
        if self.empty:
            logger.warning("%s: %d empty documents (%s)", source, self.empty,
                           "skipped" if any(s["reason"] == "empty" for s in self.skipped) else "embedded")


def corpus_files(path: str) -> List[str]:
    """The corpus files of ``path``: the file itself, or a folder's corpus files in name order."""
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "*")) if f.endswith(CORPUS_EXTENSIONS))
        if not files:
            raise FileNotFoundError(f"{path}: no corpus files ({', '.join(CORPUS_EXTENSIONS)})")
        return files
    if not os.path.exists(path):
        raise FileNotFoundError(f"corpus {path!r} does not exist")
    if not path.endswith(CORPUS_EXTENSIONS):
        raise ValueError(f"corpus {path!r}: expected one of {', '.join(CORPUS_EXTENSIONS)} or a folder")
    return [path]


def fingerprint(files: List[str]) -> List[Dict[str, Any]]:
    """Name, size and modification time of each input file (a resumed job must read the same input)."""
    return [{"file": os.path.abspath(f), "bytes": os.path.getsize(f), "mtime_ns": os.stat(f).st_mtime_ns}
            for f in files]


def _iter_raw(path: str) -> Iterator[Tuple[str, Any]]:
    """``(origin, record or CorpusError)`` for every record of one file, streamed."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                row += 1
                yield f"{path}:row {row}", record
        return
    with open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            origin = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield origin, CorpusError(f"{origin}: malformed JSON ({e.msg} at column {e.colno})")
                continue
            yield origin, record if isinstance(record, dict) else CorpusError(
                f"{origin}: expected a JSON object, got {type(record).__name__}")


class CorpusReader:
    """Iterate a corpus as :class:`CorpusRow` s; ``stats`` counts what was read, skipped and why."""

    def __init__(self, path: str, options: Optional[CorpusOptions] = None) -> None:
        self.path, self.options = path, options or CorpusOptions()
        self.files = corpus_files(path)
        self.stats = CorpusStats()

    def _parse(self, origin: str, record: Any) -> Tuple[str, str, str]:
        if isinstance(record, CorpusError):
            raise record
        o = self.options
        doc_id = record.get(o.id_key)
        if doc_id is None or (isinstance(doc_id, str) and not doc_id.strip()):
            if o.id_required:
                raise CorpusError(f"{origin}: missing field {o.id_key!r}")
            doc_id = ""
        if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool):
            raise CorpusError(f"{origin}: field {o.id_key!r} must be a string or an integer, got {type(doc_id).__name__}")
        text = record.get(o.text_key, "")
        title = record.get(o.title_key, "") if o.title_key else ""
        for key, value in ((o.text_key, text), (o.title_key, title)):
            if value is not None and not isinstance(value, str):
                raise CorpusError(f"{origin}: field {key!r} must be a string, got {type(value).__name__}")
        text, title = (text or "").strip(), (title or "").strip()
        return str(doc_id), f"{title} {text}".strip() if title else text, title

    def _empty_message(self, origin: str, doc_id: str) -> str:
        fields = " and ".join(repr(k) for k in (self.options.title_key, self.options.text_key) if k)
        return f"{origin}: document {doc_id!r} has empty {fields} (--empty_documents skip leaves such documents out)"

    def __iter__(self) -> Iterator[CorpusRow]:
        self.stats = stats = CorpusStats()
        for path in self.files:
            for origin, record in _iter_raw(path):
                stats.read += 1
                try:
                    doc_id, text, title = self._parse(origin, record)
                except CorpusError as e:
                    if not self.options.skip_invalid:
                        raise
                    stats.invalid += 1
                    stats.first_invalid = stats.first_invalid or str(e)
                    stats.skipped.append({"origin": origin, "reason": str(e)})
                    continue
                if not text:
                    if self.options.empty_documents == "error":
                        raise CorpusError(self._empty_message(origin, doc_id))
                    stats.empty += 1
                    if self.options.empty_documents == "skip":
                        stats.skipped.append({"id": doc_id, "origin": origin, "reason": "empty"})
                        continue
                yield CorpusRow(row=stats.rows, id=doc_id, text=text, origin=origin, title=title)
                stats.rows += 1


def id_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "big", signed=True)


def check_unique_ids(reader: CorpusReader) -> int:
    """One pass over the corpus before any work: the number of rows to encode, or a ``CorpusError``
    naming a duplicated id and both of its lines. Keeps 8 bytes per row (a hash of each id)."""
    hashes = np.empty(1 << 16, dtype=np.int64)
    count = 0
    for row in reader:
        if count == len(hashes):
            hashes = np.resize(hashes, 2 * len(hashes))
        hashes[count] = id_hash(row.id)
        count += 1
    ordered = np.sort(hashes[:count])
    repeated = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if repeated:  # confirm on the ids themselves (a 64-bit collision is not a duplicate)
        seen: Dict[str, str] = {}
        for row in reader:
            if id_hash(row.id) in repeated:
                if row.id in seen:
                    raise CorpusError(f"duplicate id {row.id!r} at {seen[row.id]} and {row.origin}; ids must be unique")
                seen[row.id] = row.origin
    return count


def sample_texts(path: str, count: int = 128, seed: int = 0, scan: int = 10_000) -> List[str]:
    """A seeded sample of ``count`` document texts among the first ``scan`` of a corpus (int8 calibration)."""
    import random

    texts = [row.text for row, _ in zip(CorpusReader(path, CorpusOptions(id_required=False)), range(scan))]
    if not texts:
        raise CorpusError(f"{path}: no documents to sample (int8 calibration needs some)")
    return texts if len(texts) <= count else random.Random(seed).sample(texts, count)
