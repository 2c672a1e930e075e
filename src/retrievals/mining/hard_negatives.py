"""Hard-negative mining with a dense model and a FAISS inner-product index."""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np

logger = logging.getLogger(__name__)


def parse_range(text: str) -> Tuple[int, int]:
    """``"2-200"`` -> ``(2, 200)``: candidates at 0-based ranks 2..199 (the top 2 hits are skipped)."""
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", str(text))
    if not match or int(match.group(1)) >= int(match.group(2)):
        raise ValueError(f"range_for_sampling must look like '2-200' (start < end), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def normalize_text(text: str) -> str:
    """Whitespace- and case-insensitive key, so a positive with different spacing is still a positive."""
    return " ".join(text.split()).casefold()


@dataclass(frozen=True)
class PoolDocument:
    """A candidate-pool document. It is embedded, and written out as a negative, as :attr:`full_text`."""

    text: str
    title: str = ""
    doc_id: Optional[str] = None

    @property
    def full_text(self) -> str:
        """``title + " " + text`` (just the text when the title is blank)."""
        return f"{self.title} {self.text}" if self.title.strip() else self.text


PoolEntry = Union[str, PoolDocument]


def as_documents(entries: Sequence[PoolEntry]) -> List[PoolDocument]:
    """Pool entries as documents: a plain string is a document without title or id."""
    docs = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = PoolDocument(text=entry)
        elif not isinstance(entry, PoolDocument):
            raise TypeError(f"candidate_pool[{i}] must be a string or a PoolDocument, got {type(entry).__name__}")
        docs.append(entry)
    return docs


def _dedupe(docs: Sequence[PoolDocument]) -> List[PoolDocument]:
    """The first document of each distinct (normalised) full text, in order."""
    seen, out = set(), []
    for doc in docs:
        key = normalize_text(doc.full_text)
        if key not in seen:
            seen.add(key)
            out.append(doc)
    return out


class PositiveRule:
    """Decides which pool documents are a record's positives (never mined as its negatives).

    A document is banned when its normalised full text (title + text) or its normalised body text (without
    the title) equals a normalised positive or the query, or, with ``positive_id_key``, when the record
    lists its ``doc_id`` -- or that of any pool document with the same full text -- among its positive ids.
    """

    def __init__(self, pool: Sequence[PoolDocument], query_key: str, positive_key: str,
                 positive_id_key: Optional[str] = None) -> None:
        self.query_key, self.positive_key, self.positive_id_key = query_key, positive_key, positive_id_key
        self.keys_by_id: Dict[str, Set[str]] = {}
        for doc in pool:
            if doc.doc_id is not None:
                self.keys_by_id.setdefault(doc.doc_id, set()).add(normalize_text(doc.full_text))
        self.unknown_ids = 0

    def banned_keys(self, record: Dict[str, Any]) -> Set[str]:
        """Normalised texts that ``record``'s negatives must not have."""
        keys = {normalize_text(t) for t in _as_list(record.get(self.positive_key))}
        keys.add(normalize_text(record[self.query_key]))
        if self.positive_id_key:
            for doc_id in _as_ids(record.get(self.positive_id_key)):
                if doc_id not in self.keys_by_id:
                    self.unknown_ids += 1
                keys |= self.keys_by_id.get(doc_id, set())
        return keys

    @staticmethod
    def is_banned(doc: PoolDocument, banned: Set[str]) -> bool:
        return normalize_text(doc.full_text) in banned or normalize_text(doc.text) in banned


def _search(query_emb: np.ndarray, corpus_emb: np.ndarray, k: int) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(corpus_emb.shape[1])
    index.add(np.ascontiguousarray(corpus_emb, dtype=np.float32))
    _, indices = index.search(np.ascontiguousarray(query_emb, dtype=np.float32), min(k, corpus_emb.shape[0]))
    return indices


def _corpus(model, records: List[Dict[str, Any]], candidate_pool: Optional[Sequence[PoolEntry]], positive_key: str,
            negative_key: str, batch_size: int,
            corpus_embeddings: Optional[np.ndarray]) -> Tuple[List[PoolDocument], List[PoolDocument], np.ndarray]:
    """``(pool, corpus, corpus_embeddings)``: the whole pool (for the ids) and the searched, deduplicated corpus."""
    if corpus_embeddings is not None:
        if candidate_pool is None or len(candidate_pool) != len(corpus_embeddings):
            raise ValueError("corpus_embeddings needs a candidate_pool with one text per row")
        pool = as_documents(candidate_pool)
        return pool, pool, np.asarray(corpus_embeddings, dtype=np.float32)
    if candidate_pool is None:
        candidate_pool = [t for r in records for t in _as_list(r.get(positive_key)) + _as_list(r.get(negative_key))]
    pool = as_documents(candidate_pool)
    corpus = _dedupe(pool)
    if not corpus:
        raise ValueError("the candidate corpus is empty")
    texts = [doc.full_text for doc in corpus]
    return pool, corpus, np.asarray(model.encode_corpus(texts, batch_size=batch_size, show_progress_bar=True))


def mine_hard_negatives(
    model,
    records: List[Dict[str, Any]],
    candidate_pool: Optional[Sequence[PoolEntry]] = None,
    query_key: str = "query",
    positive_key: str = "positive",
    negative_key: str = "negative",
    range_for_sampling: Tuple[int, int] = (2, 200),
    negative_number: int = 15,
    seed: int = 42,
    batch_size: int = 64,
    corpus_embeddings: Optional[np.ndarray] = None,
    positive_id_key: Optional[str] = None,
) -> List[Dict[str, Any]]:
    """Return copies of ``records`` whose ``negative_key`` holds ``negative_number`` mined negatives.

    The corpus is ``candidate_pool`` (strings, or :class:`PoolDocument` with title and id) or, without
    one, every positive and negative in ``records`` (deduplicated in order, so the output is
    deterministic). Candidates come from ranks ``range_for_sampling`` of an exact inner-product search;
    the record's positives and query (see :class:`PositiveRule`; ``positive_id_key`` names the record's
    field of positive pool ids) and duplicates are removed; a seeded sample is drawn; when too few
    survive, the rest is back-filled from random corpus documents under the same rule. Negatives are
    the documents' full texts, as embedded. ``corpus_embeddings`` (rows aligned with ``candidate_pool``)
    skips re-encoding the pool.
    """
    if negative_number < 1:
        raise ValueError(f"negative_number must be >= 1, got {negative_number}")
    start, end = range_for_sampling
    pool, corpus, corpus_emb = _corpus(model, records, candidate_pool, positive_key, negative_key, batch_size,
                                       corpus_embeddings)
    rule = PositiveRule(pool, query_key, positive_key, positive_id_key)
    query_emb = np.asarray(model.encode_queries([r[query_key] for r in records], batch_size=batch_size,
                                                show_progress_bar=True))
    hits = _search(query_emb, corpus_emb, end)
    out, backfilled = [], 0
    for i, record in enumerate(records):
        banned = rule.banned_keys(record)
        rng = random.Random(seed * 1_000_003 + i)
        candidates = _dedupe([corpus[j] for j in hits[i][start:end] if j >= 0])
        candidates = [c for c in candidates if not rule.is_banned(c, banned)]
        chosen = rng.sample(candidates, negative_number) if len(candidates) > negative_number else candidates
        if len(chosen) < negative_number:
            backfilled += 1
            banned |= {normalize_text(c.full_text) for c in chosen}
            chosen = chosen + _backfill(corpus, rule, banned, negative_number - len(chosen), rng)
        out.append({**record, negative_key: [c.full_text for c in chosen]})
    if backfilled:
        logger.warning("%d of %d queries had fewer than %d candidates in range %d-%d; back-filled randomly",
                       backfilled, len(records), negative_number, start, end)
    if rule.unknown_ids:
        logger.warning("%d positive ids (field %r) are not in the candidate pool", rule.unknown_ids, positive_id_key)
    return out


def _backfill(corpus: Sequence[PoolDocument], rule: PositiveRule, banned: Set[str], count: int,
              rng: random.Random) -> List[PoolDocument]:
    pool = [doc for doc in corpus if not rule.is_banned(doc, banned)]
    if len(pool) < count:
        logger.warning("corpus too small: only %d negatives available where %d are needed", len(pool), count)
        return pool
    return rng.sample(pool, count)


def _as_list(value: Any) -> List[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _as_ids(value: Any) -> List[str]:
    """A record's positive ids (one id or a list; strings or integers) as strings."""
    if value is None:
        return []
    return [str(value)] if isinstance(value, (str, int)) else [str(v) for v in value]
