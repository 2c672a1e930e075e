"""Train/test leakage: training queries (and positives) that are copies or near-copies of test queries.

Exact: equal after normalisation (Unicode NFKC, case folded, punctuation dropped, whitespace collapsed).
Fuzzy: character 3-gram Jaccard similarity of the normalised texts >= ``min_jaccard`` (0.8), which catches
typos that move a sub-word tokenizer's embedding below the cosine threshold (no model needed).
Near: cosine of the model's embeddings at or above ``threshold`` (the model at hand: the one about to be
trained or evaluated). A test query with a leaked training twin inflates every figure measured on it.

Policies (``--on_leak``): ``warn`` (report and go on), ``error`` (stop before training), ``drop`` (remove
the leaked *training* examples; the test split is never changed, so figures stay comparable).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Set

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["LEAK_POLICIES", "Leak", "LeakReport", "check_leakage", "normalise"]

LEAK_POLICIES = {"warn": "report and go on", "error": "stop before training",
                 "drop": "remove the leaked training examples (the test split is never changed)"}
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
FUZZY_MIN_CHARS = 20


def normalise(text: str) -> str:
    """NFKC, case folded, punctuation dropped, whitespace collapsed: "What is X?" == "what is x"."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_PUNCT.sub(" ", text).split())


@dataclass(frozen=True)
class Leak:
    train_id: str
    test_id: str
    kind: str  # "exact query", "fuzzy query", "near query", "exact positive", ...
    cosine: Optional[float]
    train_text: str
    test_text: str


@dataclass
class LeakReport:
    leaks: List[Leak]
    n_train: int
    n_test: int
    threshold: Optional[float]
    counts: Dict[str, int] = field(default_factory=dict)

    @property
    def train_ids(self) -> Set[str]:
        return {leak.train_id for leak in self.leaks}

    @property
    def test_ids(self) -> Set[str]:
        return {leak.test_id for leak in self.leaks}

    def summary(self, examples: int = 3) -> str:
        near = f"cosine >= {self.threshold}" if self.threshold is not None else "no model: exact only"
        head = (f"leakage check: {len(self.test_ids)} of {self.n_test} test queries have a training twin "
                f"({len(self.train_ids)} of {self.n_train} training examples; {near}): "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) if self.leaks else
                f"leakage check: none of {self.n_test} test queries matches any of {self.n_train} training examples "
                f"({near})")
        lines = [head]
        for leak in self.leaks[:examples]:
            cos = f" cos {leak.cosine:.3f}" if leak.cosine is not None else ""
            lines.append(f"  {leak.kind}{cos}: train {leak.train_id} {leak.train_text[:70]!r} ~ test {leak.test_id} "
                         f"{leak.test_text[:70]!r}")
        return "\n".join(lines)

    def to_dict(self, examples: int = 20) -> Dict[str, object]:
        return {"n_train": self.n_train, "n_test": self.n_test, "threshold": self.threshold, "counts": self.counts,
                "leaked_test_queries": len(self.test_ids), "leaked_train_examples": len(self.train_ids),
                "leaked_test_ids": sorted(self.test_ids),
                "examples": [leak.__dict__ for leak in self.leaks[:examples]]}


def _exact(train: Mapping[str, str], test: Mapping[str, str], kind: str) -> List[Leak]:
    by_text: Dict[str, List[str]] = {}
    for tid, text in test.items():
        key = normalise(text)
        if key:
            by_text.setdefault(key, []).append(tid)
    return [Leak(rid, tid, f"exact {kind}", None, text, test[tid])
            for rid, text in train.items() for tid in by_text.get(normalise(text), [])]


def _shingles(text: str) -> Set[str]:
    padded = f" {normalise(text)} "
    return {padded[i:i + 3] for i in range(max(1, len(padded) - 2))}


def _fuzzy(train: Mapping[str, str], test: Mapping[str, str], kind: str, min_jaccard: float,
           seen: Set[tuple]) -> List[Leak]:
    """Pairs whose character 3-gram Jaccard similarity is >= ``min_jaccard``. Candidates share a rare 3-gram
    (one in at most max(50, 5%) of the test texts; a near copy shares most of its 3-grams, rare ones too),
    found through an inverted index: the cost grows with shared rare 3-grams, not with train x test."""
    # texts under FUZZY_MIN_CHARS characters share most 3-grams by chance ("cat dog" ~ "cat dot"): exact and
    # near only for them
    test_sets = {tid: _shingles(text) for tid, text in test.items() if len(normalise(text)) >= FUZZY_MIN_CHARS}
    index: Dict[str, List[str]] = {}
    for tid, grams in test_sets.items():
        for g in grams:
            index.setdefault(g, []).append(tid)
    rare = max(50, len(test_sets) // 20)
    leaks = []
    for rid, text in train.items():
        if len(normalise(text)) < FUZZY_MIN_CHARS:
            continue
        grams = _shingles(text)
        candidates = {tid for g in grams if len(index.get(g, ())) <= rare for tid in index.get(g, ())}
        if not candidates:  # only common 3-grams (a very short text): every test text that shares one
            candidates = {tid for g in grams for tid in index.get(g, ())}
        for tid in candidates:
            n = len(grams & test_sets[tid])
            jaccard = n / (len(grams) + len(test_sets[tid]) - n)
            if jaccard >= min_jaccard and (rid, tid) not in seen:
                seen.add((rid, tid))
                leaks.append(Leak(rid, tid, f"fuzzy {kind}", None, text, test[tid]))
    return leaks


def _near(model, train: Mapping[str, str], test: Mapping[str, str], kind: str, threshold: float, batch_size: int,
          seen: Set[tuple], is_query: bool) -> List[Leak]:
    train_ids, test_ids = list(train), list(test)
    if not train_ids or not test_ids:
        return []
    test_vectors = np.asarray(model.encode_queries([test[t] for t in test_ids], batch_size=batch_size,
                                                   normalize_embeddings=True), dtype=np.float32)
    encode = model.encode_queries if is_query else model.encode_corpus
    leaks = []
    for start in range(0, len(train_ids), 4096):  # bounded memory: a block of training texts at a time
        block = train_ids[start:start + 4096]
        vectors = np.asarray(encode([train[r] for r in block], batch_size=batch_size, normalize_embeddings=True),
                             dtype=np.float32)
        scores = vectors @ test_vectors.T
        for i, j in zip(*np.nonzero(scores >= threshold)):
            pair = (block[i], test_ids[j])
            if pair not in seen:
                leaks.append(Leak(block[i], test_ids[j], f"near {kind}", float(scores[i, j]), train[block[i]],
                                  test[test_ids[j]]))
    return leaks


def check_leakage(train_queries: Mapping[str, str], test_queries: Mapping[str, str],
                  train_positives: Optional[Mapping[str, str]] = None, model=None, threshold: float = 0.95,
                  batch_size: int = 64, min_jaccard: Optional[float] = 0.8) -> LeakReport:
    """Training examples (``{id: query}``, and optionally ``{id: positive text}`` under the same ids) that
    equal a test query after :func:`normalise`, share >= ``min_jaccard`` of their character 3-grams with one
    (None: off), or (with ``model``) whose embedding has cosine >= ``threshold`` with one. A pair is counted
    once, under the first test that finds it (exact, fuzzy, near)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    sources = {"query": train_queries, **({"positive": train_positives} if train_positives else {})}
    leaks: List[Leak] = []
    for kind, texts in sources.items():
        exact = _exact(texts, test_queries, kind)
        leaks += exact
        seen = {(leak.train_id, leak.test_id) for leak in exact}
        if min_jaccard is not None and kind == "query":  # documents against queries: exact and near only
            leaks += _fuzzy(texts, test_queries, kind, min_jaccard, seen)
        if model is not None:
            leaks += _near(model, texts, test_queries, kind, threshold, batch_size, seen, is_query=kind == "query")
    counts: Dict[str, int] = {}
    for leak in leaks:
        counts[leak.kind] = counts.get(leak.kind, 0) + 1
    ids: Set[str] = set(train_queries) | set(train_positives or {})
    report = LeakReport(leaks, len(ids), len(test_queries), threshold if model is not None else None, counts)
    return report


def apply_policy(report: LeakReport, policy: str, where: str = "") -> Set[str]:
    """Act on ``report`` by ``policy``; returns the training ids to drop (empty unless ``drop``)."""
    if policy not in LEAK_POLICIES:
        raise ValueError(f"Unknown --on_leak {policy!r}; valid: {', '.join(LEAK_POLICIES)}")
    if not report.leaks:
        logger.info("%s", report.summary())
        return set()
    logger.warning("%s%s", f"{where}: " if where else "", report.summary())
    if policy == "error":
        raise ValueError(f"{where + ': ' if where else ''}{len(report.test_ids)} test queries leak into the training "
                         f"data (--on_leak error); --on_leak drop removes the {len(report.train_ids)} training examples")
    return report.train_ids if policy == "drop" else set()


def pairs_by_id(ids: Sequence[str], texts: Sequence[str]) -> Dict[str, str]:
    """``{id: text}`` from parallel lists (ids made unique by position)."""
    return {f"{i}": t for i, t in zip(ids, texts)}
