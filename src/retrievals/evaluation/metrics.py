"""Ranking metrics over a run ``{qid: {docid: score}}`` and qrels ``{qid: {docid: relevance}}``.

Definitions follow trec_eval (and so pytrec_eval / BEIR): nDCG with linear gains and log2
discounts, ideal ranking from all judged documents; MRR, Recall and MAP count relevance > 0.
Ties in score are broken by document id, descending, as trec_eval does.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List

Run = Dict[str, Dict[str, float]]
Qrels = Dict[str, Dict[str, int]]


def _ranked(docs: Dict[str, float]) -> List[str]:
    return [d for d, _ in sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)]


def ndcg(ranking: List[str], rels: Dict[str, int], k: int) -> float:
    dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranking[:k]) if rels.get(d, 0) > 0)
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr(ranking: List[str], rels: Dict[str, int], k: int) -> float:
    for i, d in enumerate(ranking[:k]):
        if rels.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def recall(ranking: List[str], rels: Dict[str, int], k: int) -> float:
    relevant = {d for d, r in rels.items() if r > 0}
    return len(relevant.intersection(ranking[:k])) / len(relevant) if relevant else 0.0


def average_precision(ranking: List[str], rels: Dict[str, int], k: int) -> float:
    relevant = {d for d, r in rels.items() if r > 0}
    if not relevant:
        return 0.0
    hits, total = 0, 0.0
    for i, d in enumerate(ranking[:k]):
        if d in relevant:
            hits += 1
            total += hits / (i + 1)
    return total / len(relevant)


RETRIEVAL_METRICS: Dict[str, Callable[[List[str], Dict[str, int], int], float]] = {
    "ndcg": ndcg,
    "mrr": mrr,
    "recall": recall,
    "map": average_precision,
}


def _parse(metrics: List[str]) -> List[tuple]:
    parsed = []
    for spec in metrics:
        name, _, k = spec.partition("@")
        if name not in RETRIEVAL_METRICS or not k.isdigit():
            raise ValueError(f"Unknown metric {spec!r}; use name@k with name in {', '.join(RETRIEVAL_METRICS)}")
        parsed.append((spec, RETRIEVAL_METRICS[name], int(k)))
    return parsed


def per_query(run: Run, qrels: Qrels, metrics: List[str] = ("ndcg@10",)) -> Dict[str, Dict[str, float]]:
    """``{metric: {qid: value}}`` over the queries with a relevant document in ``qrels`` (a missing run
    counts as 0): what means, intervals and paired comparisons are computed from."""
    parsed = _parse(list(metrics))
    out: Dict[str, Dict[str, float]] = {spec: {} for spec, _, _ in parsed}
    for qid, rels in qrels.items():
        if not any(r > 0 for r in rels.values()):
            continue
        ranking = _ranked(run.get(qid, {}))
        for spec, fn, k in parsed:
            out[spec][qid] = fn(ranking, rels, k)
    return out


def evaluate_run(run: Run, qrels: Qrels, metrics: List[str] = ("ndcg@10", "mrr@10", "recall@100", "map@100")) -> Dict[str, float]:
    """Mean of each ``name@k`` metric over the queries in ``qrels`` (a missing run counts as 0)."""
    values = per_query(run, qrels, list(metrics))
    return {spec: sum(v.values()) / max(1, len(v)) for spec, v in values.items()}
