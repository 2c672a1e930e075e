"""Round-trip consistency: a generated query is kept only when its source document is among the embedder's
top-k documents for it (the corpus searched exactly, in memory); optionally a cross-encoder must also score
the pair at or above a threshold (``sigmoid(logit) >= threshold``)."""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence

import numpy as np

from ..evaluation.search import exact_search

logger = logging.getLogger(__name__)


def in_top_k(model, queries: Sequence[str], doc_ids: Sequence[str], corpus_ids: Sequence[str],
             corpus_vectors: np.ndarray, top_k: int, batch_size: int = 64) -> List[bool]:
    """For each query, whether ``doc_ids[i]`` is in the model's top ``top_k`` of the corpus."""
    if not queries:
        return []
    position = {d: i for i, d in enumerate(corpus_ids)}
    missing = sorted({d for d in doc_ids if d not in position})
    if missing:
        raise ValueError(f"{len(missing)} generated queries name documents that are not in the corpus, "
                         f"e.g. {missing[:3]}")
    vectors = np.asarray(model.encode_queries(list(queries), batch_size=batch_size, show_progress_bar=True))
    _, top = exact_search(vectors, np.asarray(corpus_vectors), top_k=top_k)
    wanted = np.array([position[d] for d in doc_ids])
    return (top.numpy() == wanted[:, None]).any(axis=1).tolist()


def cross_encoder_pass(cross_encoder, queries: Sequence[str], documents: Sequence[str], threshold: float,
                       batch_size: int = 32) -> List[bool]:
    """Whether the cross-encoder's ``sigmoid(score)`` of each (query, document) reaches ``threshold``."""
    if not 0 < threshold < 1:
        raise ValueError(f"the cross-encoder threshold is compared with sigmoid(score): it must be in (0, 1), "
                         f"got {threshold}")
    if not queries:
        return []
    scores = cross_encoder.predict(list(zip(queries, documents)), batch_size=batch_size, show_progress_bar=True)
    return (1 / (1 + np.exp(-np.asarray(scores, dtype=np.float64))) >= threshold).tolist()


def apply(records: List[dict], keep: Sequence[bool], reason: str, candidates: Optional[List[int]] = None) -> int:
    """Mark ``records[candidates[i]]`` rejected with ``reason`` where ``keep[i]`` is false; returns how many."""
    rejected = 0
    for i, ok in zip(candidates if candidates is not None else range(len(records)), keep):
        if not ok:
            records[i]["reason"] = reason
            rejected += 1
    return rejected
