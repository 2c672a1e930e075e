"""``create_app(model, config)``: the FastAPI application of the embedding server.

Routes: ``POST /v1/embeddings`` (alias ``/embeddings``), ``GET /v1/models``, ``GET /v1/models/{id}``,
``GET /info``, ``GET /health`` (runs the model on a tiny input through the batcher),
``GET /metrics`` (Prometheus) and, with an index, ``POST /v1/search`` (:mod:`.search`). With an API
key every route but ``/health`` needs ``Authorization: Bearer <key>``; the check sits in a middleware
in front of all routes (:mod:`.guard`), so an alias or a new route cannot miss it. Nothing happens at
import: the batcher starts with the app's lifespan.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import asynccontextmanager
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..models.embedding_model import AutoModelForEmbedding
from .batcher import DynamicBatcher, QueueFullError
from .config import ServerConfig
from .guard import GuardMiddleware, add_error_handlers, error_response, json_response
from .metrics import ServerMetrics
from .protocol import (
    APIError,
    EmbeddingRequest,
    check_token_limits,
    embedding_response,
    model_card,
    parse_embedding_request,
    parse_json_body,
)

logger = logging.getLogger(__name__)

__all__ = ["create_app"]

INLINE_TOKENIZE_CHARS = 20_000  # bigger requests are tokenized on a worker thread


def create_app(model: AutoModelForEmbedding, config: Optional[ServerConfig] = None, index_dir: Optional[str] = None,
               nprobe: Optional[int] = None, **overrides: Any) -> FastAPI:
    """Build the server for a loaded ``model``; ``overrides`` replace fields of ``config``. With ``index_dir``
    (an index built from this model's vectors; another model is a ``ValueError`` naming both) it also
    serves ``POST /v1/search``, probing ``nprobe`` lists of an IVF index (default: the index's own)."""
    config = config or ServerConfig()
    for name, value in overrides.items():
        if not hasattr(config, name):
            raise TypeError(f"unknown server setting {name!r}")
        setattr(config, name, value)
    config.check(_longest_input(model))
    if not config.served_model_name:
        source = getattr(model.model.config, "_name_or_path", "") or "model"
        config.served_model_name = os.path.basename(os.path.normpath(source))
    searcher = None
    if index_dir is not None:
        from ..index import Searcher

        if nprobe is not None and nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        searcher = Searcher(index_dir, model, nprobe=nprobe)
    state = _ServerState(model, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.batcher.start()
        await _probe(state)  # warm-up: the first request should not pay for it
        logger.info("serving %r (dimension %d)", config.served_model_name, state.dimension)
        try:
            yield
        finally:
            await state.batcher.stop()

    app = FastAPI(title="retrievals embedding server", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    _add_routes(app, state)
    if searcher is not None:
        from .search import add_search_route

        add_search_route(app, state, searcher)
    add_error_handlers(app)
    app.add_middleware(GuardMiddleware, api_key=config.api_key, metrics=state.metrics)
    if config.cors_origins:  # outermost, so preflight requests need no key
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


def _longest_input(model: AutoModelForEmbedding) -> int:
    """The model's max input length in tokens, the longer of its query and document sides."""
    cfg = model.embedding_config
    return max(cfg.max_length_for(True), cfg.max_length_for(False))


class _ServerState:
    def __init__(self, model: AutoModelForEmbedding, config: ServerConfig) -> None:
        self.model, self.config = model, config
        self.metrics = ServerMetrics()
        self.dimension = model.get_sentence_embedding_dimension()
        self.created = int(time.time())
        hidden = model.model.config.hidden_size
        self.batcher = DynamicBatcher(self._encode, hidden, config, self.metrics)
        self.max_chars = config.input_chars_limit(_longest_input(model))
        self.probe_ids = model.tokenize(["health check"])  # /health's tiny input, tokenized once
        self.index_info: Optional[Dict[str, Any]] = None  # set when /v1/search is served

    def _encode(self, ids: List[List[int]]):
        return self.model.encode_ids(ids, batch_size=self.config.max_batch_size)

    def limits(self) -> Dict[str, Any]:
        cfg = self.model.embedding_config
        return {"max_input_length": cfg.max_length, "max_query_length": cfg.max_length_for(True),
                "max_client_batch_size": self.config.max_client_batch_size, "max_input_chars": self.max_chars,
                "max_batch_tokens": self.config.max_batch_tokens, "auto_truncate": self.config.auto_truncate,
                **({"max_top_k": self.config.max_top_k, "index": self.index_info} if self.index_info else {})}


# ---------------------------------------------------------------------- routes
def _add_routes(app: FastAPI, state: _ServerState) -> None:
    config, model = state.config, state.model

    async def embeddings(request: Request) -> Response:
        async def handle(body: Any):
            req = parse_embedding_request(body, state.dimension, config.max_client_batch_size, state.max_chars,
                                          config.auto_truncate)
            embedded = await embed_texts(request, state, req, isinstance(body["input"], str))
            if embedded is None:
                return None
            vectors, lengths = embedded
            payload = embedding_response(vectors, req.encoding_format, config.served_model_name, sum(lengths))
            return payload, len(lengths), sum(lengths)

        return await answer(request, state, handle, "embeddings")

    async def list_models() -> Response:
        card = model_card(config.served_model_name, state.created, state.dimension, state.limits())
        return json_response({"object": "list", "data": [card]})

    async def get_model(model_id: str) -> Response:
        _check_model_name(model_id, config.served_model_name)
        return json_response(model_card(config.served_model_name, state.created, state.dimension, state.limits()))

    async def info() -> Response:
        cfg = model.embedding_config
        return json_response({"version": __version__, "model": config.served_model_name, "dimension": state.dimension,
                      "pooling_method": cfg.pooling_method, "normalize_embeddings": cfg.normalize_embeddings,
                      "query_instruction": cfg.query_instruction, "document_instruction": cfg.document_instruction,
                      **state.limits(), "server": config.public(), "pid": os.getpid()})

    async def health() -> Response:
        try:
            await _probe(state)
        except APIError as e:
            return error_response(e)
        return json_response({"status": "ok", "model": config.served_model_name})

    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    for path in ("/v1/embeddings", "/embeddings"):
        app.add_api_route(path, embeddings, methods=["POST"], include_in_schema=False)
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", get_model, methods=["GET"])
    app.add_api_route("/info", info, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])


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


async def answer(request: Request, state: _ServerState, handle, what: str) -> Response:
    """Read the JSON body and answer ``await handle(body) -> (payload, texts, tokens)`` (``None``: the client
    went away); errors get the envelope (500s without details), and every outcome is counted."""
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
    return json_response(payload)


async def embed_texts(request: Request, state: _ServerState, req: EmbeddingRequest, single: bool,
                      field: str = "input") -> Optional[Tuple[np.ndarray, List[int]]]:
    """The one embedding path of every route: model name, tokenize (instruction, max length, truncation),
    token limits, the shared batcher, finalize. ``(vectors, tokens per text)``; ``None``: the client went away."""
    config = state.config
    _check_model_name(req.model, config.served_model_name)
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


def _check_model_name(name: Optional[str], served: str) -> None:
    if name is not None and name != served:
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise APIError(404, f"model {shown!r} not found; this server serves {served!r}", param="model",
                       code="model_not_found")


async def _tokenize(state: _ServerState, texts: List[str], is_query: bool, truncate: bool) -> List[List[int]]:
    started = time.perf_counter()
    if sum(len(t) for t in texts) <= INLINE_TOKENIZE_CHARS:
        ids = state.model.tokenize(texts, is_query=is_query, truncation=truncate)
    else:
        ids = await run_in_threadpool(state.model.tokenize, texts, is_query, None, truncate)
    state.metrics.tokenize_duration.observe(time.perf_counter() - started)
    return ids


async def _await_job(request: Request, state: _ServerState, job):
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


async def _probe(state: _ServerState) -> None:
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
