"""Quantised embeddings (int8, binary) and search over them with float rescoring.

``quantize_embeddings`` turns float embeddings ``[n, d]`` into

* ``int8``: per-dimension ranges ``[start, start + 255 * step]`` (from ``calibration`` embeddings, or
  the input itself), ``value = clip(round((x - start) / step), 0, 255) - 128``; 4x smaller.
* ``binary``: one sign bit per dimension (``x > 0``), packed 8 per byte with ``np.packbits``; 32x smaller.

``quantized_search`` finds ``top_k * rescore_multiplier`` candidates per query cheaply (Hamming
distance with popcount for binary, int8 x int8 inner products for int8), then rescores those
candidates with the float query against the stored document vectors (de-quantised int8, or +-1 bits),
or against full-precision ``rescore_embeddings`` when given (these may be a ``np.memmap`` on disk).
It returns ``(scores, indices)`` like :func:`~retrievals.evaluation.search.exact_search`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .metrics import Run, evaluate_run

logger = logging.getLogger(__name__)

EMBEDDING_PRECISIONS = ("int8", "binary")
ArrayLike = Union[np.ndarray, torch.Tensor]


@dataclass
class QuantizedEmbeddings:
    """Quantised vectors: ``values`` is int8 ``[n, dim]`` or packed uint8 bits ``[n, ceil(dim / 8)]``."""

    values: np.ndarray
    precision: str
    dim: int
    starts: Optional[np.ndarray] = None  # int8 only: per-dimension range start and step
    steps: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.values)

    def dequantize(self, rows: Optional[np.ndarray] = None) -> np.ndarray:
        """Float32 vectors (of ``rows``, default all): range values for int8, +-1 for binary."""
        values = self.values if rows is None else self.values[rows]
        if self.precision == "int8":
            return self.starts + (values.astype(np.float32) + 128.0) * self.steps
        bits = np.unpackbits(values, axis=-1, count=self.dim)
        return bits.astype(np.float32) * 2.0 - 1.0


def _as_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"Expected [n, dim] embeddings, got shape {x.shape}")
    return x


def int8_ranges(calibration: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """Per-dimension ``(starts, steps)``: the calibration minimum and ``(max - min) / 255`` (1 where constant)."""
    cal = _as_numpy(calibration)
    if len(cal) == 0:
        raise ValueError("int8 quantisation needs at least one calibration embedding")
    starts = cal.min(axis=0)
    steps = (cal.max(axis=0) - starts) / 255.0
    return starts.astype(np.float32), np.where(steps > 0, steps, 1.0).astype(np.float32)


def _int8_values(x: np.ndarray, starts: np.ndarray, steps: np.ndarray) -> np.ndarray:
    return (np.clip(np.rint((x - starts) / steps), 0, 255) - 128).astype(np.int8)


def quantize_embeddings(embeddings: ArrayLike, precision: str = "binary", calibration: Optional[ArrayLike] = None,
                        ranges: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> QuantizedEmbeddings:
    """Quantise ``[n, dim]`` float embeddings to ``int8`` or ``binary`` (see the module docstring).

    For int8 the ranges come from ``ranges`` (``(starts, steps)``, e.g. another set's), else from
    ``calibration`` embeddings, else from ``embeddings`` itself; values outside them are clipped.
    """
    if precision not in EMBEDDING_PRECISIONS:
        raise ValueError(f"Unknown embedding precision {precision!r}; valid values are: {', '.join(EMBEDDING_PRECISIONS)}")
    x = _as_numpy(embeddings)
    if precision == "binary":
        return QuantizedEmbeddings(np.packbits(x > 0, axis=-1), "binary", x.shape[1])
    starts, steps = ranges if ranges is not None else int8_ranges(x if calibration is None else calibration)
    if starts.shape != (x.shape[1],):
        raise ValueError(f"int8 ranges are for {starts.shape[0]} dimensions, the embeddings have {x.shape[1]}")
    return QuantizedEmbeddings(_int8_values(x, starts, steps), "int8", x.shape[1], starts, steps)


def _words(packed: np.ndarray) -> np.ndarray:
    """Packed bits as uint64 words when the row length allows (8x fewer popcounts), else uint8."""
    packed = np.ascontiguousarray(packed)
    return packed.view(np.uint64) if packed.shape[1] % 8 == 0 else packed


def hamming_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances ``[len(a), len(b)]`` between rows of packed bit arrays (``np.packbits`` output)."""
    if a.dtype != np.uint8 or b.dtype != np.uint8 or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"Expected packed uint8 bit arrays of equal row length, got {a.dtype}{a.shape} and {b.dtype}{b.shape}")
    wa, wb = _words(a), _words(b)
    out = np.zeros((len(a), len(b)), dtype=np.int32)
    for w in range(wa.shape[1]):  # one popcount pass per word keeps memory at [len(a), len(b)]
        out += np.bitwise_count(wa[:, w:w + 1] ^ wb[None, :, w]).astype(np.int32)
    return out


def _candidate_scores(query: np.ndarray, corpus: QuantizedEmbeddings) -> np.ndarray:
    """First-stage scores (higher is better) of a query chunk against every quantised document."""
    if corpus.precision == "binary":
        return -hamming_distances(np.packbits(query > 0, axis=-1), corpus.values)
    q = torch.from_numpy(_int8_values(query, corpus.starts, corpus.steps))
    return torch._int_mm(q, torch.from_numpy(corpus.values).t()).numpy()


def _top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    if k >= scores.shape[1]:
        return np.argsort(-scores, axis=1, kind="stable")
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _rescore_stored(query: np.ndarray, corpus: QuantizedEmbeddings, candidates: np.ndarray) -> np.ndarray:
    """``query . dequantize(doc)`` for each query's candidates ``[c, m]``, without materialising float docs."""
    codes = corpus.values[candidates]  # [c, m, bytes or dim]
    if corpus.precision == "int8":
        # q . (start + (v + 128) * step) = q . start + 128 * (q * step).sum() + (q * step) . v
        scaled = query * corpus.steps
        const = query @ corpus.starts + 128.0 * scaled.sum(axis=1)
        dots = torch.bmm(torch.from_numpy(codes).float(), torch.from_numpy(scaled)[:, :, None])[:, :, 0]
        return dots.numpy() + const[:, None]
    # q . (2 bits - 1) = 2 q . bits - q.sum(); q . bits is a sum of per-byte table lookups
    nbytes = codes.shape[-1]
    padded = np.zeros((len(query), nbytes * 8), dtype=np.float32)
    padded[:, :corpus.dim] = query
    byte_bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.float32)  # [256, 8]
    table = padded.reshape(len(query), nbytes, 8) @ byte_bits.T  # [c, bytes, 256]
    rows = np.arange(len(query))[:, None, None]
    sums = table[rows, np.arange(nbytes)[None, None, :], codes].sum(axis=-1)
    return 2.0 * sums - query.sum(axis=1, keepdims=True)


def quantized_search(
    query_embeddings: ArrayLike,
    corpus: QuantizedEmbeddings,
    top_k: int = 100,
    rescore_multiplier: int = 4,
    rescore_embeddings: Optional[ArrayLike] = None,
    chunk_size: int = 64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` documents per float query: ``top_k * rescore_multiplier`` candidates from the quantised
    corpus, rescored by inner product with the float query; returns ``(scores, indices)`` ``[nq, k]``.

    Rescoring uses ``rescore_embeddings[candidates]`` (float documents) when given, otherwise the
    de-quantised stored vectors (:meth:`QuantizedEmbeddings.dequantize`).
    """
    if rescore_multiplier < 1:
        raise ValueError(f"rescore_multiplier must be >= 1, got {rescore_multiplier}")
    queries = _as_numpy(query_embeddings)
    if queries.shape[1] != corpus.dim:
        raise ValueError(f"Queries have {queries.shape[1]} dimensions, the corpus {corpus.dim}")
    if rescore_embeddings is not None and tuple(rescore_embeddings.shape) != (len(corpus), corpus.dim):
        raise ValueError(f"rescore_embeddings must be [{len(corpus)}, {corpus.dim}], got {tuple(rescore_embeddings.shape)}")
    k = min(top_k, len(corpus))
    m = min(len(corpus), k * rescore_multiplier)
    all_scores = np.empty((len(queries), k), dtype=np.float32)
    all_indices = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk_size):
        q = queries[start:start + chunk_size]
        candidates = _top_indices(_candidate_scores(q, corpus), m)  # [c, m]
        if rescore_embeddings is not None:
            unique, inverse = np.unique(candidates.ravel(), return_inverse=True)  # sorted reads suit memmaps
            docs = _as_numpy(np.asarray(rescore_embeddings[unique]))[inverse].reshape(len(q), m, -1)
            rescored = torch.bmm(torch.from_numpy(docs), torch.from_numpy(q)[:, :, None])[:, :, 0].numpy()
        else:
            rescored = _rescore_stored(q, corpus, candidates)
        best = _top_indices(rescored, k)
        all_scores[start:start + len(q)] = np.take_along_axis(rescored, best, axis=1)
        all_indices[start:start + len(q)] = np.take_along_axis(candidates, best, axis=1)
    return torch.from_numpy(all_scores), torch.from_numpy(all_indices)


def run_from_search(query_ids: Sequence[str], doc_ids: Sequence[str], scores: torch.Tensor,
                    indices: torch.Tensor) -> Run:
    """``{qid: {docid: score}}`` from ``(scores, indices)`` rows in ``query_ids`` order."""
    return {qid: {doc_ids[j]: float(s) for s, j in zip(scores[row].tolist(), indices[row].tolist())}
            for row, qid in enumerate(query_ids)}


def evaluate_quantized_retrieval(
    model: Any,
    data: Any,
    precision: str = "binary",
    rescore_multiplier: int = 4,
    rescore_with_float: bool = False,
    top_k: int = 100,
    batch_size: int = 32,
    metrics: Sequence[str] = ("ndcg@10", "mrr@10", "recall@100", "map@100"),
):
    """Like :func:`~retrievals.evaluation.retrieval.evaluate_retrieval`, but searching ``precision``-quantised
    corpus embeddings (int8 ranges calibrated on the corpus) with rescoring; returns a ``RetrievalResult``."""
    from .retrieval import RetrievalResult

    if precision not in EMBEDDING_PRECISIONS:  # checked before spending minutes on encoding
        raise ValueError(f"Unknown embedding precision {precision!r}; valid values are: {', '.join(EMBEDDING_PRECISIONS)}")
    seconds: Dict[str, float] = {}
    doc_ids: List[str] = data.corpus_ids()
    query_ids = list(data.queries)
    t0 = time.perf_counter()
    corpus = model.encode_corpus(data.corpus_texts(), batch_size=batch_size)
    seconds["encode_corpus"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    queries = model.encode_queries([data.queries[q] for q in query_ids], batch_size=batch_size)
    seconds["encode_queries"] = time.perf_counter() - t0
    quantized = quantize_embeddings(corpus, precision)
    t0 = time.perf_counter()
    scores, indices = quantized_search(queries, quantized, top_k=top_k, rescore_multiplier=rescore_multiplier,
                                       rescore_embeddings=corpus if rescore_with_float else None)
    seconds["search"] = time.perf_counter() - t0
    run = run_from_search(query_ids, doc_ids, scores, indices)
    logger.info("%s corpus embeddings: %d bytes (float32: %d)", precision, quantized.values.nbytes, corpus.nbytes)
    return RetrievalResult(metrics=evaluate_run(run, data.qrels, list(metrics)), run=run, seconds=seconds)
