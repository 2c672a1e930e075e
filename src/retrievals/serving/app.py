"""``create_app(model, config)``: the FastAPI application of the embedding server.

Routes: ``POST /v1/embeddings`` (alias ``/embeddings``), ``GET /v1/models``, ``GET /v1/models/{id}``,
``GET /info``, ``GET /health`` (runs the model on a tiny input through the batcher) and
``GET /metrics`` (Prometheus). With an API key every route but ``/health`` needs
``Authorization: Bearer <key>``; the check sits in a middleware in front of all routes, so an alias
or a new route cannot miss it. Nothing happens at import: the batcher starts with the app's lifespan.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from typing import Any, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..models.embedding_model import AutoModelForEmbedding
from .batcher import DynamicBatcher, QueueFullError
from .config import ServerConfig
from .metrics import ServerMetrics
from .protocol import (
    APIError,
    check_token_limits,
    embedding_response,
    model_card,
    parse_embedding_request,
    parse_json_body,
)

logger = logging.getLogger(__name__)

__all__ = ["create_app"]

ROUTES = ("/v1/embeddings", "/embeddings", "/v1/models", "/health", "/metrics", "/info")
INLINE_TOKENIZE_CHARS = 20_000  # bigger requests are tokenized on a worker thread


def create_app(model: AutoModelForEmbedding, config: Optional[ServerConfig] = None, **overrides: Any) -> FastAPI:
    """Build the server for a loaded ``model``; ``overrides`` replace fields of ``config``."""
    config = config or ServerConfig()
    for name, value in overrides.items():
        if not hasattr(config, name):
            raise TypeError(f"unknown server setting {name!r}")
        setattr(config, name, value)
    config.check(_longest_input(model))
    if not config.served_model_name:
        source = getattr(model.model.config, "_name_or_path", "") or "model"
        config.served_model_name = os.path.basename(os.path.normpath(source))
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
    _add_error_handlers(app)
    app.add_middleware(_GuardMiddleware, api_key=config.api_key, metrics=state.metrics)
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

    def _encode(self, ids: List[List[int]]):
        return self.model.encode_ids(ids, batch_size=self.config.max_batch_size)

    def limits(self) -> Dict[str, Any]:
        cfg = self.model.embedding_config
        return {"max_input_length": cfg.max_length, "max_query_length": cfg.max_length_for(True),
                "max_client_batch_size": self.config.max_client_batch_size, "max_input_chars": self.max_chars,
                "max_batch_tokens": self.config.max_batch_tokens, "auto_truncate": self.config.auto_truncate}


# ---------------------------------------------------------------------- routes
def _add_routes(app: FastAPI, state: _ServerState) -> None:
    config, model = state.config, state.model

    async def embeddings(request: Request) -> Response:
        started = time.perf_counter()
        try:
            body = parse_json_body(await _read_body(request, config.max_body_bytes))
            req = parse_embedding_request(body, state.dimension, config.max_client_batch_size, state.max_chars,
                                          config.auto_truncate)
            _check_model_name(req.model, config.served_model_name)
            ids = await _tokenize(state, req.texts, req.is_query, req.truncate)
            lengths = [len(x) for x in ids]
            check_token_limits(lengths, model.embedding_config.max_length_for(req.is_query), req.truncate,
                               config.max_request_tokens, len(req.texts) == 1 and isinstance(body["input"], str))
            try:
                job = state.batcher.submit(ids)
            except QueueFullError as e:
                raise APIError(429, f"{e}; retry after {config.retry_after} s", code="overloaded",
                               headers={"Retry-After": str(config.retry_after)}) from None
            pooled = await _await_job(request, state, job)
            if pooled is None:  # the client went away; nothing was computed for what was still queued
                state.metrics.failures.inc(reason="dropped")
                return Response(status_code=499)
            vectors = model.finalize_embeddings(pooled, None, req.dimensions).numpy()
            payload = embedding_response(vectors, req.encoding_format, config.served_model_name, sum(lengths))
        except APIError as e:
            state.metrics.failures.inc(reason=e.code or str(e.status))
            return _error_response(e)
        except Exception:
            logger.exception("embedding request failed")
            state.metrics.failures.inc(reason="internal")
            return _error_response(APIError(500, "internal server error while computing embeddings",
                                            code="internal_error"))
        state.metrics.embeddings.inc(len(lengths))
        state.metrics.prompt_tokens.inc(sum(lengths))
        state.metrics.request_duration.observe(time.perf_counter() - started)
        return Response(json.dumps(payload, separators=(",", ":")), media_type="application/json")

    async def list_models() -> Response:
        card = model_card(config.served_model_name, state.created, state.dimension, state.limits())
        return _json({"object": "list", "data": [card]})

    async def get_model(model_id: str) -> Response:
        _check_model_name(model_id, config.served_model_name)
        return _json(model_card(config.served_model_name, state.created, state.dimension, state.limits()))

    async def info() -> Response:
        cfg = model.embedding_config
        return _json({"version": __version__, "model": config.served_model_name, "dimension": state.dimension,
                      "pooling_method": cfg.pooling_method, "normalize_embeddings": cfg.normalize_embeddings,
                      "query_instruction": cfg.query_instruction, "document_instruction": cfg.document_instruction,
                      **state.limits(), "server": config.public()})

    async def health() -> Response:
        try:
            await _probe(state)
        except APIError as e:
            return _error_response(e)
        return _json({"status": "ok", "model": config.served_model_name})

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


# ---------------------------------------------------------------------- errors, auth, metrics
def _json(payload: Dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status_code=status, media_type="application/json")


def _error_response(error: APIError) -> Response:
    response = _json(error.body(), error.status)
    response.headers.update(error.headers)
    return response


def _add_error_handlers(app: FastAPI) -> None:
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = {404: f"no route {request.url.path[:80]!r}", 405: f"method {request.method} not allowed here"}
        return _error_response(APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)),
                                        code="not_found" if exc.status_code == 404 else None))

    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path[:80])
        return _error_response(APIError(500, "internal server error", code="internal_error"))

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


def _route_label(path: str) -> str:
    if path in ROUTES:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


class _GuardMiddleware:
    """API-key check (constant time) on every route but ``/health``; counts responses by route and code."""

    def __init__(self, app, api_key: Optional[str], metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics
        self.key = api_key.encode("utf-8") if api_key is not None else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_and_record(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        if self.key is not None and scope["path"] != "/health" and not self.authorized(scope):
            await _error_response(APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                                  )(scope, receive, send_and_record)
            self.metrics.failures.inc(reason="invalid_api_key")
        else:
            await self.app(scope, receive, send_and_record)
        self.metrics.requests.inc(route=_route_label(scope["path"]), code=str(status["code"]))

    def authorized(self, scope) -> bool:
        header = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return False
        return hmac.compare_digest(token, self.key)
