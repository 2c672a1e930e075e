"""Dense retrieval evaluation on a BEIR-layout dataset."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from ..data.beir import BeirDataset
from .metrics import Run, evaluate_run
from .search import exact_search

logger = logging.getLogger(__name__)


@dataclass
class RetrievalResult:
    metrics: Dict[str, float]
    run: Run
    seconds: Dict[str, float] = field(default_factory=dict)


def evaluate_retrieval(
    model,
    data: BeirDataset,
    top_k: int = 100,
    batch_size: int = 32,
    metrics: Sequence[str] = ("ndcg@10", "mrr@10", "recall@100", "map@100"),
    corpus_embeddings: Optional[Any] = None,
    query_embeddings: Optional[Any] = None,
    **encode_kwargs: Any,
) -> RetrievalResult:
    """Encode queries and corpus (unless given, in ``data`` order), search exactly, and score the
    run against ``data.qrels``."""
    seconds: Dict[str, float] = {}
    doc_ids: List[str] = data.corpus_ids()
    t0 = time.perf_counter()
    if corpus_embeddings is None:
        corpus_embeddings = model.encode_corpus(data.corpus_texts(), batch_size=batch_size, convert_to_tensor=True,
                                                **encode_kwargs)
    seconds["encode_corpus"] = time.perf_counter() - t0
    query_ids = list(data.queries)
    t0 = time.perf_counter()
    if query_embeddings is None:
        query_embeddings = model.encode_queries([data.queries[q] for q in query_ids], batch_size=batch_size,
                                                convert_to_tensor=True, **encode_kwargs)
    seconds["encode_queries"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores, indices = exact_search(query_embeddings, corpus_embeddings, top_k=top_k)
    seconds["search"] = time.perf_counter() - t0
    run: Run = {
        qid: {doc_ids[j]: float(s) for s, j in zip(scores[row].tolist(), indices[row].tolist())}
        for row, qid in enumerate(query_ids)
    }
    return RetrievalResult(metrics=evaluate_run(run, data.qrels, list(metrics)), run=run, seconds=seconds)


def evaluate_dims(
    model,
    data: BeirDataset,
    dims: Sequence[int],
    top_k: int = 100,
    batch_size: int = 32,
    metrics: Sequence[str] = ("ndcg@10", "mrr@10", "recall@100", "map@100"),
    **encode_kwargs: Any,
) -> Dict[int, Dict[str, float]]:
    """Metrics at each embedding size in ``dims`` (Matryoshka): one full-size encode, then each
    prefix is cut and re-normalised (as ``encode(truncate_dim=d)`` would) and searched."""
    full = model.model.config.hidden_size
    corpus = model.encode_corpus(data.corpus_texts(), batch_size=batch_size, convert_to_tensor=True,
                                 truncate_dim=full, normalize_embeddings=False, **encode_kwargs)
    queries = model.encode_queries([data.queries[q] for q in data.queries], batch_size=batch_size,
                                   convert_to_tensor=True, truncate_dim=full, normalize_embeddings=False,
                                   **encode_kwargs)
    results: Dict[int, Dict[str, float]] = {}
    for dim in dims:
        result = evaluate_retrieval(model, data, top_k=top_k, metrics=metrics,
                                    corpus_embeddings=model.finalize_embeddings(corpus, None, dim),
                                    query_embeddings=model.finalize_embeddings(queries, None, dim))
        results[int(dim)] = result.metrics
    return results


class RetrievalEvaluator:
    """``evaluator(model) -> metrics``: dense retrieval on a BEIR-layout dev set, for
    ``RetrievalTrainer(evaluator=...)`` (metrics become ``eval_ndcg@10`` ...) and the dev callback."""

    def __init__(self, data: BeirDataset, **eval_kwargs: Any) -> None:
        self.data, self.eval_kwargs = data, eval_kwargs

    def __call__(self, model) -> Dict[str, float]:
        return evaluate_retrieval(model, self.data, **self.eval_kwargs).metrics
