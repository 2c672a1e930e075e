"""Hard-negative mining with a dense model and a FAISS inner-product index."""

from __future__ import annotations

import logging
import random
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

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


def _dedupe(texts: Sequence[str]) -> List[str]:
    seen, out = set(), []
    for t in texts:
        key = normalize_text(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _search(query_emb: np.ndarray, corpus_emb: np.ndarray, k: int) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(corpus_emb.shape[1])
    index.add(np.ascontiguousarray(corpus_emb, dtype=np.float32))
    _, indices = index.search(np.ascontiguousarray(query_emb, dtype=np.float32), min(k, corpus_emb.shape[0]))
    return indices


def mine_hard_negatives(
    model,
    records: List[Dict[str, Any]],
    candidate_pool: Optional[Sequence[str]] = None,
    query_key: str = "query",
    positive_key: str = "positive",
    negative_key: str = "negative",
    range_for_sampling: Tuple[int, int] = (2, 200),
    negative_number: int = 15,
    seed: int = 42,
    batch_size: int = 64,
    corpus_embeddings: Optional[np.ndarray] = None,
) -> List[Dict[str, Any]]:
    """Return copies of ``records`` whose ``negative_key`` holds ``negative_number`` mined negatives.

    The corpus is ``candidate_pool`` or, without one, every positive and negative in ``records``
    (deduplicated in order, so the output is deterministic). Candidates come from ranks
    ``range_for_sampling`` of an exact inner-product search; positives (compared whitespace- and
    case-insensitively), the query itself and duplicates are removed; a seeded sample is drawn;
    when too few survive, the rest is back-filled from random corpus texts that are not positives.
    ``corpus_embeddings`` (rows aligned with ``candidate_pool``) skips re-encoding the pool.
    """
    if negative_number < 1:
        raise ValueError(f"negative_number must be >= 1, got {negative_number}")
    start, end = range_for_sampling
    if corpus_embeddings is not None:
        if candidate_pool is None or len(candidate_pool) != len(corpus_embeddings):
            raise ValueError("corpus_embeddings needs a candidate_pool with one text per row")
        corpus, corpus_emb = list(candidate_pool), np.asarray(corpus_embeddings, dtype=np.float32)
    else:
        corpus = _dedupe(list(candidate_pool) if candidate_pool is not None else
                         [t for r in records for t in _as_list(r.get(positive_key)) + _as_list(r.get(negative_key))])
        if not corpus:
            raise ValueError("the candidate corpus is empty")
        corpus_emb = np.asarray(model.encode_corpus(corpus, batch_size=batch_size, show_progress_bar=True))
    query_emb = np.asarray(model.encode_queries([r[query_key] for r in records], batch_size=batch_size,
                                                show_progress_bar=True))
    hits = _search(query_emb, corpus_emb, end)
    out, backfilled = [], 0
    for i, record in enumerate(records):
        banned = {normalize_text(t) for t in _as_list(record.get(positive_key))} | {normalize_text(record[query_key])}
        rng = random.Random(seed * 1_000_003 + i)
        candidates = _dedupe([corpus[j] for j in hits[i][start:end] if j >= 0])
        candidates = [c for c in candidates if normalize_text(c) not in banned]
        chosen = rng.sample(candidates, negative_number) if len(candidates) > negative_number else candidates
        if len(chosen) < negative_number:
            backfilled += 1
            chosen = chosen + _backfill(corpus, banned | {normalize_text(c) for c in chosen},
                                        negative_number - len(chosen), rng)
        new = dict(record)
        new[negative_key] = chosen
        out.append(new)
    if backfilled:
        logger.warning("%d of %d queries had fewer than %d candidates in range %d-%d; back-filled randomly",
                       backfilled, len(records), negative_number, start, end)
    return out


def _backfill(corpus: Sequence[str], banned: set, count: int, rng: random.Random) -> List[str]:
    pool = [t for t in corpus if normalize_text(t) not in banned]
    if len(pool) < count:
        logger.warning("corpus too small: only %d negatives available where %d are needed", len(pool), count)
        return pool
    return rng.sample(pool, count)


def _as_list(value: Any) -> List[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)
