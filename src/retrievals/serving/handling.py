"""What every route of the embedding server shares: the server's state (model, config, batcher, metrics),
reading a JSON body, answering with the error envelope and the counters (:func:`answer`), the one
embedding path (:func:`embed_texts`) and the model probe behind ``/health`` and the warm-up.

Both :mod:`.app` (``/v1/embeddings`` and the rest) and :mod:`.search` (``/v1/search``) build on this module.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ..models.embedding_model import AutoModelForEmbedding
from .batcher import DynamicBatcher, QueueFullError
from .config import ServerConfig
from .guard import error_response, json_response
from .metrics import ServerMetrics
from .protocol import APIError, EmbeddingRequest, check_token_limits, parse_json_body

logger = logging.getLogger(__name__)

__all__ = ["ServerState", "longest_input", "answer", "embed_texts", "check_model_name", "probe",
           "INLINE_TOKENIZE_CHARS"]

INLINE_TOKENIZE_CHARS = 20_000  # bigger requests are tokenized on a worker thread


def longest_input(model: AutoModelForEmbedding) -> int:
    """The model's max input length in tokens, the longer of its query and document sides."""
    cfg = model.embedding_config
    return max(cfg.max_length_for(True), cfg.max_length_for(False))


class ServerState:
    """One server's model, settings, batcher and metrics (``index_info`` once ``/v1/search`` is served)."""

    def __init__(self, model: AutoModelForEmbedding, config: ServerConfig) -> None:
        self.model, self.config = model, config
        self.metrics = ServerMetrics()
        self.dimension = model.get_sentence_embedding_dimension()
        self.created = int(time.time())
        hidden = model.model.config.hidden_size
        self.batcher = DynamicBatcher(self._encode, hidden, config, self.metrics)
        self.max_chars = config.input_chars_limit(longest_input(model))
        self.probe_ids = model.tokenize(["health check"])  # /health's tiny input, tokenized once
        self.index_info: Optional[Dict[str, Any]] = None  # set when /v1/search is served

    def _encode(self, ids: List[List[int]]):
        return self.model.encode_ids(ids, batch_size=self.config.max_batch_size)

    def limits(self) -> Dict[str, Any]:
        cfg = self.model.embedding_config
        return {"max_input_length": cfg.max_length, "max_query_length": cfg.max_length_for(True),
                "max_client_batch_size": self.config.max_client_batch_size, "max_input_chars": self.max_chars,
                "max_batch_tokens": self.config.max_batch_tokens, "auto_truncate": self.config.auto_truncate,
                **(self.search_limits() if self.index_info else {})}

    def search_limits(self) -> Dict[str, Any]:
        return {"max_top_k": self.config.max_top_k, "max_search_results": self.config.max_search_results,
                "max_response_bytes": self.config.max_response_bytes, "index": self.index_info}


async def _read_body(request: Request, limit: int) -> bytes:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {media_type or 'none'!r}",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def answer(request: Request, state: ServerState, handle, what: str) -> Response:
    """Read the JSON body and answer ``await handle(body) -> (payload, texts, tokens)`` (``None``: the client
    went away; ``payload``: a JSON object, or its serialized bytes); errors get the envelope (500s without
    details), and every outcome is counted."""
    started = time.perf_counter()
    try:
        result = await handle(parse_json_body(await _read_body(request, state.config.max_body_bytes)))
        if result is None:  # the client went away; nothing was computed for what was still queued
            state.metrics.failures.inc(reason="dropped")
            return Response(status_code=499)
        payload, texts, tokens = result
    except APIError as e:
        state.metrics.failures.inc(reason=e.code or str(e.status))
        return error_response(e)
    except Exception:
        logger.exception("%s request failed", what)
        state.metrics.failures.inc(reason="internal")
        return error_response(APIError(500, f"internal server error while computing {what}", code="internal_error"))
    state.metrics.embeddings.inc(texts)
    state.metrics.prompt_tokens.inc(tokens)
    state.metrics.request_duration.observe(time.perf_counter() - started)
    if isinstance(payload, bytes):
        return Response(payload, media_type="application/json")
    return json_response(payload)


async def embed_texts(request: Request, state: ServerState, req: EmbeddingRequest, single: bool,
                      field: str = "input") -> Optional[Tuple[np.ndarray, List[int]]]:
    """The one embedding path of every route: model name, tokenize (instruction, max length, truncation),
    token limits, the shared batcher, finalize. ``(vectors, tokens per text)``; ``None``: the client went away."""
    config = state.config
    check_model_name(req.model, config.served_model_name)
    ids = await _tokenize(state, req.texts, req.is_query, req.truncate)
    lengths = [len(x) for x in ids]
    check_token_limits(lengths, state.model.embedding_config.max_length_for(req.is_query), req.truncate,
                       config.max_request_tokens, len(req.texts) == 1 and single, field)
    try:
        job = state.batcher.submit(ids)
    except QueueFullError as e:
        raise APIError(429, f"{e}; retry after {config.retry_after} s", code="overloaded",
                       headers={"Retry-After": str(config.retry_after)}) from None
    pooled = await _await_job(request, state, job)
    if pooled is None:
        return None
    return state.model.finalize_embeddings(pooled, None, req.dimensions).numpy(), lengths


def check_model_name(name: Optional[str], served: str) -> None:
    if name is not None and name != served:
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise APIError(404, f"model {shown!r} not found; this server serves {served!r}", param="model",
                       code="model_not_found")


async def _tokenize(state: ServerState, texts: List[str], is_query: bool, truncate: bool) -> List[List[int]]:
    started = time.perf_counter()
    if sum(len(t) for t in texts) <= INLINE_TOKENIZE_CHARS:
        ids = state.model.tokenize(texts, is_query=is_query, truncation=truncate)
    else:
        ids = await run_in_threadpool(state.model.tokenize, texts, is_query, None, truncate)
    state.metrics.tokenize_duration.observe(time.perf_counter() - started)
    return ids


async def _await_job(request: Request, state: ServerState, job):
    """The job's pooled rows; ``None`` if the client disconnected first; 503 past the deadline."""
    gone = asyncio.create_task(_client_gone(request))
    try:
        done, _ = await asyncio.wait({job.future, gone}, timeout=state.config.request_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if job.future.done() and not job.future.cancelled():
        return job.future.result()  # raises the model's error, answered as a 500
    state.batcher.cancel(job)
    if gone in done:
        return None
    raise APIError(503, f"request timed out after {state.config.request_timeout:g} s", code="timeout")


async def _client_gone(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def probe(state: ServerState) -> None:
    """Run the model on a tiny input through the batcher (so a stuck model thread shows)."""
    if not state.batcher.running:
        raise APIError(503, "server is not running (starting or shutting down)", code="unavailable")
    job = state.batcher.submit(state.probe_ids, priority=True)
    done, _ = await asyncio.wait({job.future}, timeout=state.config.health_timeout)
    if not done:
        state.batcher.cancel(job)
        raise APIError(503, f"model did not answer within {state.config.health_timeout:g} s", code="unhealthy")
    try:
        vector = job.future.result()
    except Exception:
        logger.exception("health probe failed")
        raise APIError(503, "model call failed", code="unhealthy") from None
    if not bool(vector.isfinite().all()):
        raise APIError(503, "model returned non-finite values", code="unhealthy")
