"""Errors, auth and request counting in front of every route: the OpenAI error envelope for all errors
(unknown routes and methods included, 500s without details), the API-key middleware and response
counters by route and code."""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any, Dict, Optional

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .metrics import ServerMetrics
from .protocol import APIError

logger = logging.getLogger(__name__)

__all__ = ["ROUTES", "GuardMiddleware", "add_error_handlers", "error_response", "json_response", "route_label"]

ROUTES = ("/v1/embeddings", "/embeddings", "/v1/search", "/v1/models", "/health", "/metrics", "/info")


def json_response(payload: Dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status_code=status, media_type="application/json")


def error_response(error: APIError) -> Response:
    response = json_response(error.body(), error.status)
    response.headers.update(error.headers)
    return response


def add_error_handlers(app: FastAPI) -> None:
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = {404: f"no route {request.url.path[:80]!r}", 405: f"method {request.method} not allowed here"}
        return error_response(APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)),
                                       code="not_found" if exc.status_code == 404 else None))

    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path[:80])
        return error_response(APIError(500, "internal server error", code="internal_error"))

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


def route_label(path: str) -> str:
    if path in ROUTES:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


class GuardMiddleware:
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
            await error_response(APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                                 )(scope, receive, send_and_record)
            self.metrics.failures.inc(reason="invalid_api_key")
        else:
            await self.app(scope, receive, send_and_record)
        self.metrics.requests.inc(route=route_label(scope["path"]), code=str(status["code"]))

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
