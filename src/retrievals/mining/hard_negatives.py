"""Hard-negative mining with a dense model and a FAISS inner-product index."""

from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np

from .false_negatives import FalseNegativeFilter

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


def _dedupe(items: Sequence[Any], doc_of: Callable[[Any], PoolDocument] = lambda item: item) -> List[Any]:
    """The first item of each distinct (normalised) document full text, in order; ``doc_of`` finds the
    document in an item (e.g. a ``(document, score)`` pair)."""
    seen, out = set(), []
    for item in items:
        key = normalize_text(doc_of(item).full_text)
        if key not in seen:
            seen.add(key)
            out.append(item)
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


def _search(query_emb: np.ndarray, corpus_emb: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(corpus_emb.shape[1])
    index.add(np.ascontiguousarray(corpus_emb, dtype=np.float32))
    return index.search(np.ascontiguousarray(query_emb, dtype=np.float32), min(k, corpus_emb.shape[0]))


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
    false_negatives: Optional[FalseNegativeFilter] = None,
    teacher: Any = None,
    report: Optional[Dict[str, int]] = None,
) -> List[Dict[str, Any]]:
    """Return copies of ``records`` whose ``negative_key`` holds ``negative_number`` mined negatives.

    The corpus is ``candidate_pool`` (strings, or :class:`PoolDocument` with title and id) or, without
    one, every positive and negative in ``records`` (deduplicated in order, so the output is
    deterministic). Candidates come from ranks ``range_for_sampling`` of an exact inner-product search;
    the record's positives and query (see :class:`PositiveRule`; ``positive_id_key`` names the record's
    field of positive pool ids) and duplicates are removed; a seeded sample is drawn; when too few
    survive, the rest is back-filled from random corpus documents under the same rule. Negatives are
    the documents' full texts, as embedded. ``corpus_embeddings`` (rows aligned with ``candidate_pool``)
    skips re-encoding the pool. ``false_negatives`` (:class:`~.false_negatives.FalseNegativeFilter`) drops
    likely unlabelled positives by score against the positive's, or by ``teacher`` (a cross-encoder or
    bi-encoder, asked only about the candidates a query still needs); ``report`` (a dict) receives the
    count each rule dropped and ``backfilled_queries`` (and, when it holds a ``"ranks"`` key, each record's
    ``{document text: search rank}``, for the refresh's staleness figures).
    """
    if negative_number < 1:
        raise ValueError(f"negative_number must be >= 1, got {negative_number}")
    start, end = range_for_sampling
    pool, corpus, corpus_emb = _corpus(model, records, candidate_pool, positive_key, negative_key, batch_size,
                                       corpus_embeddings)
    rule = PositiveRule(pool, query_key, positive_key, positive_id_key)
    query_emb = np.asarray(model.encode_queries([r[query_key] for r in records], batch_size=batch_size,
                                                show_progress_bar=True))
    scores, hits = _search(query_emb, corpus_emb, end)
    rules = false_negatives or FalseNegativeFilter()
    if rules.uses_teacher and teacher is None:
        raise ValueError("false_negatives.teacher_threshold needs a teacher model")
    positive_scores = _positive_scores(model, records, query_emb, positive_key, batch_size) \
        if rules.uses_positive_scores else [math.inf] * len(records)
    counts = report if report is not None else {}
    candidates_per_record, rngs = [], []
    if report is not None and "ranks" in report:  # each record's search ranks by text (refresh staleness)
        report["ranks"] = [{corpus[j].full_text: r for r, j in reversed(list(enumerate(row))) if j >= 0} for row in hits]
    for i, record in enumerate(records):
        banned = rule.banned_keys(record)
        ranked = _dedupe([(corpus[j], float(s)) for j, s in zip(hits[i][start:end], scores[i][start:end]) if j >= 0],
                         doc_of=lambda pair: pair[0])
        ranked = [(c, s) for c, s in ranked if not rule.is_banned(c, banned)]
        kept = rules.split_by_score([c for c, _ in ranked], [s for _, s in ranked], positive_scores[i], counts)
        candidates_per_record.append(kept)
        rngs.append(random.Random(seed * 1_000_003 + i))
    chosen_per_record = choose_negatives(rules, teacher, records, query_key, candidates_per_record, rngs,
                                         negative_number, batch_size, counts)
    out, backfilled = [], 0
    for i, (record, chosen, rng) in enumerate(zip(records, chosen_per_record, rngs)):
        if len(chosen) < negative_number:
            backfilled += 1
            banned = rule.banned_keys(record) | {normalize_text(c.full_text) for c in chosen}
            allowed = None
            if rules.uses_positive_scores:  # back-filled documents obey the score rules too
                limit = min(limit for _, limit in rules.limits(positive_scores[i]))
                allowed = corpus_emb @ query_emb[i] <= limit
            chosen = chosen + _backfill(corpus, rule, banned, negative_number - len(chosen), rng, allowed)
        out.append({**record, negative_key: [c.full_text for c in chosen]})
    counts["backfilled_queries"] = backfilled
    if backfilled:
        logger.warning("%d of %d queries had fewer than %d candidates in range %d-%d; back-filled randomly",
                       backfilled, len(records), negative_number, start, end)
    if rule.unknown_ids:
        logger.warning("%d positive ids (field %r) are not in the candidate pool", rule.unknown_ids, positive_id_key)
    dropped = {k: v for k, v in counts.items() if k in ("max_positive_ratio", "positive_margin", "teacher_threshold")}
    if dropped:
        logger.info("False-negative rules dropped candidates: %s", dropped)
    return out


def _positive_scores(model, records: List[Dict[str, Any]], query_emb: np.ndarray, positive_key: str,
                     batch_size: int) -> List[float]:
    """Each record's lowest query-positive score, with the model's similarity (``inf`` without positives:
    no limit)."""
    positions: Dict[str, int] = {}
    for record in records:
        for text in _as_list(record.get(positive_key)):
            positions.setdefault(text, len(positions))
    if not positions:
        return [math.inf] * len(records)
    emb = np.asarray(model.encode_corpus(list(positions), batch_size=batch_size), dtype=np.float32)
    out = []
    for i, record in enumerate(records):
        rows = [positions[t] for t in _as_list(record.get(positive_key))]
        out.append(float((emb[rows] @ query_emb[i]).min()) if rows else math.inf)
    return out


def choose_negatives(rules: FalseNegativeFilter, teacher, records: List[Dict[str, Any]], query_key: str,
                     candidates_per_record: List[List[PoolDocument]], rngs: List[random.Random], negative_number: int,
                     batch_size: int, counts: Dict[str, int]) -> List[List[PoolDocument]]:
    """Each record's negatives from its allowed candidates: a seeded sample of ``negative_number``, or with
    the teacher rule, the first that the teacher does not score as relevant (:func:`_teacher_choice`)."""
    if rules.uses_teacher:
        return _teacher_choice(teacher, rules, records, query_key, candidates_per_record, rngs, negative_number,
                               batch_size, counts)
    return [rng.sample(c, negative_number) if len(c) > negative_number else c
            for c, rng in zip(candidates_per_record, rngs)]


def _teacher_choice(teacher, rules: FalseNegativeFilter, records: List[Dict[str, Any]], query_key: str,
                    candidates_per_record: List[List[PoolDocument]], rngs: List[random.Random],
                    negative_number: int, batch_size: int, counts: Dict[str, int]) -> List[List[PoolDocument]]:
    """Candidates in a seeded random order, checked by the teacher a round at a time (only as many as are
    still needed per query, all queries in one scoring call) until each query has enough or none remain."""
    from ..models.cross_encoder import CrossEncoder
    from .teacher import score_candidates

    cross = isinstance(teacher, CrossEncoder)
    if cross and not 0 < float(rules.teacher_threshold) < 1:
        raise ValueError(f"teacher_threshold {rules.teacher_threshold} with a cross-encoder teacher must be a "
                         "probability in (0, 1): the rule compares sigmoid(score) with it")
    orders = [rng.sample(c, len(c)) for c, rng in zip(candidates_per_record, rngs)]
    chosen: List[List[PoolDocument]] = [[] for _ in records]
    cursor = [0] * len(records)
    while True:
        todo = [i for i in range(len(records)) if len(chosen[i]) < negative_number and cursor[i] < len(orders[i])]
        if not todo:
            return chosen
        batches = {i: orders[i][cursor[i]:cursor[i] + negative_number - len(chosen[i])] for i in todo}
        scored = score_candidates(teacher, [records[i][query_key] for i in todo],
                                  [[d.full_text for d in batches[i]] for i in todo], batch_size=batch_size)
        for i, row in zip(todo, scored):
            cursor[i] += len(batches[i])
            for doc, score in zip(batches[i], row):
                if rules.teacher_relevant(score, cross):
                    counts["teacher_threshold"] = counts.get("teacher_threshold", 0) + 1
                else:
                    chosen[i].append(doc)


def _backfill(corpus: Sequence[PoolDocument], rule: PositiveRule, banned: Set[str], count: int,
              rng: random.Random, allowed: Optional[np.ndarray] = None) -> List[PoolDocument]:
    pool = [doc for j, doc in enumerate(corpus)
            if not rule.is_banned(doc, banned) and (allowed is None or allowed[j])]
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
