"""Hard-negative mining over a built index: the queries are searched in the (memory-mapped) index
instead of re-encoding the pool, negatives' texts come from the shards (``--store_text``) or from the
pool file, and back-filling draws random rows (no pass over the corpus per query)."""

from __future__ import annotations

import logging
import math
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .false_negatives import FalseNegativeFilter
from .hard_negatives import PoolDocument, PositiveRule, _as_ids, _as_list, _positive_scores, choose_negatives, normalize_text

logger = logging.getLogger(__name__)

# (rows, ids) -> {row: stored text (title + " " + body, the title unknown), or a PoolDocument with its title}
TextLookup = Callable[[Sequence[int], Sequence[str]], Dict[int, Union[str, PoolDocument]]]


class StoredDocument(PoolDocument):
    """A document whose text comes from the shards: ``title + " " + body`` joined, the title unknown."""


def _is_banned(doc: PoolDocument, banned: set, positives: set) -> bool:
    """The pool rule (:class:`PositiveRule`); for a stored text, whose title is unknown, a positive that ends it
    also bans it when what precedes it could be a title (no longer than the positive: the body after a title;
    a short positive does not ban every document ending with its words). The query does not: a document
    ending with the query's words is no positive (with titles, from ``--candidate_pool``, the pool rule alone
    decides)."""
    if PositiveRule.is_banned(doc, banned):
        return True
    full = normalize_text(doc.full_text)
    return isinstance(doc, StoredDocument) and any(
        full.endswith(" " + key) and len(full) - len(key) - 1 <= len(key) for key in positives if key)


def mine_from_index(searcher, records: List[Dict[str, Any]], texts_of: TextLookup, query_key: str = "query",
                    positive_key: str = "positive", negative_key: str = "negative",
                    range_for_sampling: Tuple[int, int] = (2, 200), negative_number: int = 15, seed: int = 42,
                    batch_size: int = 64, positive_id_key: Optional[str] = None,
                    false_negatives: Optional[FalseNegativeFilter] = None, teacher: Any = None,
                    report: Optional[Dict[str, int]] = None) -> List[Dict[str, Any]]:
    """Return copies of ``records`` with ``negative_number`` mined negatives each (same rules as
    :func:`~retrievals.mining.hard_negatives.mine_hard_negatives`: ranks ``range_for_sampling``,
    positives and the query banned by text or by ``positive_id_key`` ids, duplicates removed, the
    false-negative rules, seeded). Back-filled random rows obey the positive rule, not the score rules
    (their scores are not searched)."""
    start, end = range_for_sampling
    index = searcher.index
    rules = false_negatives or FalseNegativeFilter()
    if rules.uses_teacher and teacher is None:
        raise ValueError("false_negatives.teacher_threshold needs a teacher model")
    counts = report if report is not None else {}
    vectors = np.atleast_2d(searcher.model.encode_queries([r[query_key] for r in records], batch_size=batch_size,
                                                          convert_to_numpy=True, show_progress_bar=True))
    scores, hits = index.search_rows(vectors, end)
    ranked = [[(int(r), float(x)) for r, x in zip(row[start:end], sc[start:end]) if r >= 0] for row, sc in zip(hits, scores)]
    docs = _documents(index, texts_of, {r for row in ranked for r, _ in row})
    bans = [_bans(record, query_key, positive_key, positive_id_key) for record in records]
    positive_scores = _positive_scores(searcher.model, records, vectors, positive_key, batch_size) \
        if rules.uses_positive_scores else [math.inf] * len(records)
    candidates = []
    for rows, ban, positive_score in zip(ranked, bans, positive_scores):
        kept = _allowed([(docs[r], x) for r, x in rows], *ban)
        candidates.append(rules.split_by_score([d for d, _ in kept], [x for _, x in kept], positive_score, counts))
    rngs = [random.Random(seed * 1_000_003 + i) for i in range(len(records))]
    chosen = choose_negatives(rules, teacher, records, query_key, candidates, rngs, negative_number, batch_size, counts)
    short = [i for i, c in enumerate(chosen) if len(c) < negative_number]
    if short:  # random rows for the few that ran short: no pass over the corpus per query
        rng = random.Random(seed)
        extra = {i: rng.sample(range(index.index.ntotal), min(index.index.ntotal, 4 * negative_number)) for i in short}
        docs.update(_documents(index, texts_of, {r for rows in extra.values() for r in rows} - set(docs)))
        for i in short:
            taken = bans[i][0] | {normalize_text(d.full_text) for d in chosen[i]}
            chosen[i] += _pick([docs[r] for r in extra[i]], taken, bans[i][1], bans[i][2],
                               negative_number - len(chosen[i]), random.Random(seed * 1_000_003 + i + 1))
        logger.warning("%d of %d queries had fewer than %d candidates in range %d-%d; back-filled with random "
                       "documents", len(short), len(records), negative_number, start, end)
    counts["backfilled_queries"] = len(short)
    return [{**record, negative_key: [d.full_text for d in picked]} for record, picked in zip(records, chosen)]


def _documents(index, texts_of: TextLookup, rows: set) -> Dict[int, PoolDocument]:
    ordered = sorted(rows)
    ids = index.ids_of(ordered)
    texts = texts_of(ordered, ids)
    return {row: _document(texts[row], doc_id) for row, doc_id in zip(ordered, ids)}


def _document(found: Union[str, PoolDocument], doc_id: str) -> PoolDocument:
    if isinstance(found, PoolDocument):
        return PoolDocument(text=found.text, title=found.title, doc_id=doc_id)
    return StoredDocument(text=found, doc_id=doc_id)


def _bans(record: Dict[str, Any], query_key: str, positive_key: str,
          positive_id_key: Optional[str]) -> Tuple[set, set, set]:
    """Normalised texts and ids that the record's negatives must not be, and its normalised positives."""
    positives = {normalize_text(t) for t in _as_list(record.get(positive_key))}
    ids = set(_as_ids(record.get(positive_id_key))) if positive_id_key else set()
    return positives | {normalize_text(record[query_key])}, ids, positives


def _allowed(candidates: List[Tuple[PoolDocument, float]], banned: set, banned_ids: set,
             positives: set) -> List[Tuple[PoolDocument, float]]:
    """Candidates in rank order without duplicates, positives or the query."""
    seen, kept = set(), []
    for doc, score in candidates:
        key = normalize_text(doc.full_text)
        if key in seen or doc.doc_id in banned_ids or _is_banned(doc, banned, positives):
            continue
        seen.add(key)
        kept.append((doc, score))
    return kept


def _pick(candidates: List[PoolDocument], banned: set, banned_ids: set, positives: set, count: int,
          rng: random.Random) -> List[PoolDocument]:
    kept = [doc for doc, _ in _allowed([(d, 0.0) for d in candidates], banned, banned_ids, positives)]
    return rng.sample(kept, count) if len(kept) > count else kept
