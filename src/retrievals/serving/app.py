"""``create_app(model, config)``: the FastAPI application of the embedding server.

Routes: ``POST /v1/embeddings`` (alias ``/embeddings``), ``GET /v1/models``, ``GET /v1/models/{id}``,
``GET /info``, ``GET /health`` (runs the model on a tiny input through the batcher),
``GET /metrics`` (Prometheus) and, with an index, ``POST /v1/search`` (:mod:`.search`). With an API
key every route but ``/health`` needs ``Authorization: Bearer <key>``; the check sits in a middleware
in front of all routes (:mod:`.guard`), so an alias or a new route cannot miss it. Nothing happens at
import: the batcher starts with the app's lifespan.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response

from .. import __version__
from ..models.embedding_model import AutoModelForEmbedding
from .config import ServerConfig
from .guard import GuardMiddleware, add_error_handlers, error_response, json_response
from .handling import ServerState, answer, check_model_name, embed_texts, longest_input, probe
from .protocol import APIError, embedding_response, model_card, parse_embedding_request

logger = logging.getLogger(__name__)

__all__ = ["create_app"]


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
    config.check(longest_input(model))
    if not config.served_model_name:
        source = getattr(model.model.config, "_name_or_path", "") or "model"
        config.served_model_name = os.path.basename(os.path.normpath(source))
    searcher = None
    if index_dir is not None:
        from ..index import Searcher

        if nprobe is not None and nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        searcher = Searcher(index_dir, model, nprobe=nprobe)
    state = ServerState(model, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.batcher.start()
        await probe(state)  # warm-up: the first request should not pay for it
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


# ---------------------------------------------------------------------- routes
def _add_routes(app: FastAPI, state: ServerState) -> None:
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
        check_model_name(model_id, config.served_model_name)
        return json_response(model_card(config.served_model_name, state.created, state.dimension, state.limits()))

    async def info() -> Response:
        cfg = model.embedding_config
        return json_response({"version": __version__, "model": config.served_model_name, "dimension": state.dimension,
                      "pooling_method": cfg.pooling_method, "normalize_embeddings": cfg.normalize_embeddings,
                      "query_instruction": cfg.query_instruction, "document_instruction": cfg.document_instruction,
                      **state.limits(), "server": config.public(), "pid": os.getpid()})

    async def health() -> Response:
        try:
            await probe(state)
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


