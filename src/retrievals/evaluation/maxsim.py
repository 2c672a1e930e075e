"""Retrieval with late-interaction (maxsim) scores of a :class:`~retrievals.models.multi_vector.MultiVectorModel`.

* :func:`rerank_maxsim` re-scores each query's top-``k`` first-stage documents (any run, e.g. dense
  ``evaluate_retrieval(...).run``) by maxsim; each needed document is encoded once.
* :func:`exact_maxsim_search` scores every document of a (small) corpus.
* :func:`evaluate_maxsim_rerank` does dense first stage + maxsim re-rank on a BEIR dataset.

All return the ``{qid: {doc_id: score}}`` run that :func:`~retrievals.evaluation.metrics.evaluate_run`
takes. Scores are the mean over query tokens (see :func:`~retrievals.losses.maxsim.maxsim_scores`).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..losses.maxsim import maxsim_scores
from .metrics import Run, evaluate_run
from .retrieval import RetrievalResult, evaluate_retrieval

logger = logging.getLogger(__name__)

# Upper bound on query-token x doc-token similarities held at once (float32: 4 bytes each).
MAX_SIM_ELEMENTS = 1 << 24
DEFAULT_METRICS = ("ndcg@10", "mrr@10", "recall@100", "map@100")


def pad_token_matrices(matrices: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[n_i, d]`` matrices into ``[N, max n_i, d]`` (zero padded) and a bool mask ``[N, max n_i]``."""
    if not matrices:
        raise ValueError("pad_token_matrices needs at least one matrix")
    lengths = torch.tensor([m.shape[0] for m in matrices])
    padded = torch.nn.utils.rnn.pad_sequence([m.to(dtype) for m in matrices], batch_first=True)
    mask = torch.arange(padded.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    return padded, mask


def _document_text(doc: Union[str, Mapping[str, str]]) -> str:
    if isinstance(doc, str):
        return doc
    title = doc.get("title") or ""
    return (title + " " + doc["text"]).strip() if title else doc["text"]


def _top_candidates(docs: Mapping[str, float], top_k: int) -> List[str]:
    """The ``top_k`` best documents of one query's run (ties by id, descending, as trec_eval)."""
    return [d for d, _ in sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)[:top_k]]


def rerank_maxsim(model, data: Any, first_stage_run: Run, top_k: int = 100, batch_size: int = 32,
                  precision: Optional[str] = None, storage_dtype: torch.dtype = torch.float16) -> Run:
    """Re-rank each query's top-``top_k`` documents of ``first_stage_run`` by maxsim.

    ``data`` has ``queries`` (``{qid: text}``) and ``corpus`` (``{doc_id: text or {"title", "text"}}``),
    e.g. a :class:`~retrievals.data.beir.BeirDataset`. Queries absent from the first-stage run get an
    empty ranking. Only first-stage candidates appear in the result.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    candidates = {qid: _top_candidates(first_stage_run.get(qid, {}), top_k) for qid in data.queries}
    needed = list(dict.fromkeys(d for docs in candidates.values() for d in docs))
    unknown = [d for d in needed if d not in data.corpus]
    if unknown:
        raise ValueError(f"first_stage_run names {len(unknown)} documents not in the corpus, e.g. {unknown[:3]}")
    logger.info("maxsim re-rank: %d queries, %d distinct candidate documents", len(candidates), len(needed))
    doc_tokens = dict(zip(needed, model.encode([_document_text(data.corpus[d]) for d in needed], is_query=False,
                                               batch_size=batch_size, precision=precision, dtype=storage_dtype)))
    query_ids = [q for q in candidates if candidates[q]]
    query_tokens = model.encode([data.queries[q] for q in query_ids], is_query=True, batch_size=batch_size,
                                precision=precision)
    run: Run = {qid: {} for qid in candidates}
    for qid, q in zip(query_ids, query_tokens):
        docs, mask = pad_token_matrices([doc_tokens[d] for d in candidates[qid]])
        scores = maxsim_scores(q.float().unsqueeze(0), None, docs, mask)[0]
        run[qid] = dict(zip(candidates[qid], scores.tolist()))
    return run


def exact_maxsim_search(model, queries: Mapping[str, str], corpus: Mapping[str, Union[str, Mapping[str, str]]],
                        top_k: int = 100, batch_size: int = 32, precision: Optional[str] = None,
                        docs_per_chunk: int = 512) -> Run:
    """Top-``top_k`` documents of the whole ``corpus`` by maxsim for every query (brute force; meant
    for small corpora: all document token matrices are held in memory, as float16)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not corpus:
        raise ValueError("exact_maxsim_search needs a non-empty corpus")
    doc_ids, query_ids = list(corpus), list(queries)
    doc_tokens = model.encode([_document_text(corpus[d]) for d in doc_ids], is_query=False, batch_size=batch_size,
                              precision=precision, dtype=torch.float16)
    q_pad, q_mask = pad_token_matrices(model.encode([queries[q] for q in query_ids], is_query=True,
                                                    batch_size=batch_size, precision=precision))
    k = min(top_k, len(doc_ids))
    best_scores = torch.full((len(query_ids), 0), float("-inf"))
    best_idx = torch.empty((len(query_ids), 0), dtype=torch.long)
    for start in range(0, len(doc_ids), docs_per_chunk):
        d_pad, d_mask = pad_token_matrices(doc_tokens[start:start + docs_per_chunk])
        scores = _blocked_scores(q_pad, q_mask, d_pad, d_mask)
        best_scores = torch.cat([best_scores, scores], dim=1)
        best_idx = torch.cat([best_idx, torch.arange(start, start + scores.shape[1]).expand(len(query_ids), -1)], dim=1)
        best_scores, order = best_scores.topk(min(k, best_scores.shape[1]), dim=1)
        best_idx = best_idx.gather(1, order)
    return {qid: {doc_ids[j]: float(s) for s, j in zip(best_scores[row].tolist(), best_idx[row].tolist())}
            for row, qid in enumerate(query_ids)}


def _blocked_scores(q_pad: torch.Tensor, q_mask: torch.Tensor, d_pad: torch.Tensor, d_mask: torch.Tensor) -> torch.Tensor:
    """``maxsim_scores`` in query blocks small enough to keep the similarity tensor bounded."""
    per_query = d_pad.shape[0] * d_pad.shape[1] * q_pad.shape[1]
    block = max(1, MAX_SIM_ELEMENTS // max(1, per_query))
    return torch.cat([maxsim_scores(q_pad[i:i + block], q_mask[i:i + block], d_pad, d_mask)
                      for i in range(0, q_pad.shape[0], block)], dim=0)


def fuse_runs(first: Run, second: Run, weight: float = 0.5) -> Run:
    """``weight * first + (1 - weight) * second`` per document, over the documents both runs score
    for a query (e.g. dense cosine and maxsim of the re-ranked candidates: both on the cosine scale)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    fused: Run = {}
    for qid, docs in second.items():
        base = first.get(qid, {})
        fused[qid] = {d: weight * base[d] + (1 - weight) * s for d, s in docs.items() if d in base}
    return fused


def evaluate_maxsim_rerank(model, data: Any, top_k: int = 100, first_stage_model=None, batch_size: int = 32,
                           metrics: Sequence[str] = DEFAULT_METRICS, **encode_kwargs: Any) -> Dict[str, RetrievalResult]:
    """Dense first stage (``first_stage_model``, default the multi-vector model's own pooled backbone
    ``model.embedder``), then maxsim re-rank of its top-``top_k``. Returns ``{"dense": ..., "maxsim": ...}``."""
    dense_model = first_stage_model if first_stage_model is not None else model.embedder
    dense = evaluate_retrieval(dense_model, data, top_k=top_k, batch_size=batch_size, metrics=metrics, **encode_kwargs)
    start = time.perf_counter()
    run = rerank_maxsim(model, data, dense.run, top_k=top_k, batch_size=batch_size,
                        precision=encode_kwargs.get("precision"))
    seconds = {"rerank": time.perf_counter() - start}
    return {"dense": dense, "maxsim": RetrievalResult(metrics=evaluate_run(run, data.qrels, list(metrics)), run=run,
                                                      seconds=seconds)}
