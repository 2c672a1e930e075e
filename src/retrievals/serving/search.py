"""``POST /v1/search``: query texts -> the ids (and scores, optionally the stored text) of the best
documents of an index built from the served model's vectors.

Request::

    {"query": "text" | ["text", ...], "top_k": 10, "model": "name", "return_text": false, "truncate": true}

The queries take the path of ``/v1/embeddings`` with ``"input_type": "query"`` (same limits, query
instruction and max length, truncation, the shared batcher); the index is then searched on a worker
thread, exactly as :meth:`retrievals.index.Searcher.search_vectors` does. Response::

    {"object": "list", "model": "name", "usage": {"prompt_tokens": n, "total_tokens": n},
     "data": [{"object": "search_result", "index": 0, "results": [{"id": "d1", "score": 0.83, "text": "..."}]}]}

``text`` only with ``"return_text": true``, which needs vectors encoded with ``store_text=True`` (else 400).
The response is bounded: ``queries x top_k`` at most ``max_search_results`` (else 422 before any work), and
its JSON at most ``max_response_bytes`` (else 413). Results are serialized query by query as they are found
(with ``return_text``, the texts of a few hundred hits at a time), so a request over the byte limit stops
once it passes the limit, never holding much more than the limit.
:func:`add_search_route` is called by :func:`~retrievals.serving.app.create_app` when it is given an index.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from .handling import ServerState, answer, embed_texts
from .protocol import MISSING, APIError, EmbeddingRequest, check_fields, optional_field, parse_texts

logger = logging.getLogger(__name__)

__all__ = ["SearchRequest", "parse_search_request", "search_results", "add_search_route",
           "index_info"]

SEARCH_FIELDS = {"query", "top_k", "model", "return_text", "truncate", "user"}
DEFAULT_TOP_K = 10
TEXT_HITS_PER_READ = 512  # with return_text: hits whose stored text is read at a time


@dataclass
class SearchRequest:
    queries: EmbeddingRequest  # the query side of an embeddings request
    top_k: int
    return_text: bool


def parse_search_request(body: Any, max_items: int, max_chars: int, auto_truncate: bool, max_top_k: int,
                         max_results: Optional[int] = None) -> SearchRequest:
    """Validate a search request body; raise :class:`APIError` naming the bad field (or the limit:
    ``queries x top_k`` over ``max_results`` is a 422 naming ``max_search_results``)."""
    check_fields(body, SEARCH_FIELDS)
    texts = parse_texts(body.get("query", MISSING), max_items, max_chars, field="query")
    model = optional_field(body, "model", str, "a string")
    top_k = body.get("top_k")
    top_k = DEFAULT_TOP_K if top_k is None else top_k
    if type(top_k) is not int or not 1 <= top_k <= max_top_k:
        shown = top_k if isinstance(top_k, (int, float)) else type(top_k).__name__
        raise APIError(422, f"'top_k' must be an integer from 1 to {max_top_k}, got {shown}", param="top_k",
                       code="invalid_value")
    if max_results is not None and len(texts) * top_k > max_results:
        raise APIError(422, f"{len(texts)} queries x top_k {top_k} = {len(texts) * top_k} results; the maximum per "
                            f"request is {max_results} (max_search_results): send fewer queries or a smaller top_k",
                       param="top_k", code="too_many_results")
    return_text = optional_field(body, "return_text", bool, "true or false", False)
    truncate = optional_field(body, "truncate", bool, "true or false", auto_truncate)
    optional_field(body, "user", str, "a string")
    return SearchRequest(EmbeddingRequest(texts, model, "float", None, True, truncate), top_k, return_text)


def search_results(searcher, vectors: np.ndarray, top_k: int, return_text: bool, model: str, prompt_tokens: int,
                   max_bytes: int) -> bytes:
    """The serialized ``list`` of ``search_result`` objects, one per query in request order, best hit first;
    :class:`APIError` 413 naming ``max_response_bytes`` as soon as it would pass ``max_bytes``."""
    head = b'{"object":"list","data":['
    tail = b"]," + _dumps({"model": model, "usage": {"prompt_tokens": prompt_tokens,
                                                     "total_tokens": prompt_tokens}})[1:]
    step = max(1, TEXT_HITS_PER_READ // top_k) if return_text else len(vectors)
    parts: List[bytes] = []
    size = len(head) + len(tail)
    for start in range(0, len(vectors), step):
        result = searcher.search_vectors(vectors[start:start + step], top_k, return_text)
        for i, (ids, scores) in enumerate(zip(result.ids, result.scores)):
            hits = [{"id": doc_id, "score": float(score)} for doc_id, score in zip(ids, scores)]
            if result.texts is not None:
                for hit, text in zip(hits, result.texts[i]):
                    hit["text"] = text
            part = _dumps({"object": "search_result", "index": start + i, "results": hits})
            size += len(part) + (1 if parts else 0)
            if size > max_bytes:
                raise APIError(413, f"the response would exceed {max_bytes} bytes (max_response_bytes), reached at "
                                    f"query {start + i}: send fewer queries, a smaller top_k or no return_text",
                               param="top_k", code="response_too_large")
            parts.append(part)
    return head + b",".join(parts) + tail


def _dumps(payload: Dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode("ascii")  # ensure_ascii: one byte per character


def index_info(searcher, text_kept: bool) -> Dict[str, Any]:
    """What ``/info`` and ``/v1/models`` report about the index (no paths)."""
    manifest = searcher.index.manifest
    nprobe = None
    if manifest.nlist:
        import faiss

        nprobe = int(faiss.extract_index_ivf(searcher.index.index).nprobe)
    return {"type": manifest.index_type, "factory": manifest.factory, "count": manifest.count,
            "dimension": manifest.dimension, "nlist": manifest.nlist, "nprobe": nprobe,
            "expected_recall_at_10": manifest.expected_recall_at_10 if nprobe == manifest.nprobe else None,
            "model_fingerprint": manifest.vectors["model_fingerprint"], "text_stored": text_kept}


def _text_problem(searcher) -> Optional[str]:
    """``None`` when ``return_text`` can be served, else the 400 message that refuses it."""
    try:
        kept = bool(searcher.vectors_manifest().options.get("store_text"))
    except (OSError, ValueError) as e:
        logger.warning("return_text is unavailable: %s", e)
        return "'return_text' is unavailable: the corpus text of this index cannot be read on this server"
    if not kept:
        return ("'return_text' is unavailable: the corpus text was not kept when the index's vectors were encoded "
                "(encode with --store_text to keep it)")
    return None


def add_search_route(app: FastAPI, state: ServerState, searcher) -> None:
    """Serve ``POST /v1/search`` on ``app`` with ``searcher`` (a :class:`~retrievals.index.Searcher` over
    ``state.model``); reports the index in ``state.index_info``."""
    config = state.config
    text_problem = _text_problem(searcher)
    state.index_info = index_info(searcher, text_problem is None)

    async def search(request: Request) -> Response:
        async def handle(body: Any):
            req = parse_search_request(body, config.max_client_batch_size, state.max_chars, config.auto_truncate,
                                       config.max_top_k, config.max_search_results)
            if req.return_text and text_problem:
                raise APIError(400, text_problem, param="return_text", code="text_not_stored")
            embedded = await embed_texts(request, state, req.queries, isinstance(body["query"], str), field="query")
            if embedded is None:
                return None
            vectors, lengths = embedded
            started = time.perf_counter()
            payload = await run_in_threadpool(search_results, searcher, vectors, req.top_k, req.return_text,
                                              config.served_model_name, sum(lengths), config.max_response_bytes)
            state.metrics.search_duration.observe(time.perf_counter() - started)
            state.metrics.searches.inc(len(lengths))
            return payload, len(lengths), sum(lengths)

        return await answer(request, state, handle, "search results")

    app.add_api_route("/v1/search", search, methods=["POST"], include_in_schema=False)
    logger.info("serving /v1/search over a %s index of %d vectors", state.index_info["type"], state.index_info["count"])
