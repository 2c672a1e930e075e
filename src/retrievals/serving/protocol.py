"""The OpenAI embeddings contract: request parsing with clear errors, response and error bodies.

Request (``POST /v1/embeddings``)::

    {"input": "text" | ["text", ...], "model": "name", "encoding_format": "float" | "base64",
     "dimensions": 128, "user": "...",                         # OpenAI fields
     "input_type": "query" | "document", "truncate": true}     # ours

``input_type`` picks the side (query or document instruction and max length; default document);
``truncate`` (default: the server's ``auto_truncate``) cuts over-long texts at the model's max
length instead of answering 422. Errors use OpenAI's envelope
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set

import numpy as np

__all__ = ["APIError", "EmbeddingRequest", "parse_json_body", "parse_embedding_request", "embedding_response",
           "error_body", "check_fields", "optional_field", "parse_texts", "MAX_ECHO_CHARS", "MISSING"]

MAX_ECHO_CHARS = 40  # an error message never quotes more of a client's text than this
KNOWN_FIELDS = {"input", "model", "encoding_format", "dimensions", "user", "input_type", "truncate"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 500: "server_error"}


class APIError(Exception):
    """An error answered to the client as ``status`` with the OpenAI error envelope."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> Dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS] + "..."


@dataclass
class EmbeddingRequest:
    texts: List[str]
    model: Optional[str]
    encoding_format: str
    dimensions: Optional[int]
    is_query: bool
    truncate: bool


def parse_json_body(raw: bytes) -> Any:
    """Decode a JSON body; malformed or absurdly nested JSON is a 400, never a crash."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None


def parse_embedding_request(body: Any, dimension: int, max_items: int, max_chars: int,
                            auto_truncate: bool) -> EmbeddingRequest:
    """Validate an embeddings request body; raise :class:`APIError` naming the bad field."""
    check_fields(body, KNOWN_FIELDS)
    texts = parse_texts(body.get("input", MISSING), max_items, max_chars)
    model = optional_field(body, "model", str, "a string")
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise APIError(422, f"'encoding_format' must be 'float' or 'base64', got {_short(encoding_format)!r}",
                       param="encoding_format", code="invalid_value")
    dimensions = body.get("dimensions")
    if dimensions is not None and (type(dimensions) is not int or not 1 <= dimensions <= dimension):
        raise APIError(422, f"'dimensions' must be an integer from 1 to {dimension}, got {_short(dimensions)}",
                       param="dimensions", code="invalid_value")
    input_type = body.get("input_type") or "document"
    if input_type not in ("query", "document"):
        raise APIError(422, f"'input_type' must be 'query' or 'document', got {_short(input_type)!r}",
                       param="input_type", code="invalid_value")
    truncate = optional_field(body, "truncate", bool, "true or false", auto_truncate)
    optional_field(body, "user", str, "a string")
    return EmbeddingRequest(texts, model, encoding_format, dimensions, input_type == "query", truncate)


MISSING = object()


def check_fields(body: Any, known: Set[str]) -> None:
    """422 unless ``body`` is a JSON object with only ``known`` fields."""
    if not isinstance(body, dict):
        raise APIError(422, f"request body must be a JSON object, got {type(body).__name__}", code="invalid_type")
    unknown = sorted(set(body) - known)
    if unknown:
        raise APIError(422, f"unrecognized request argument(s): {', '.join(map(_short, unknown))}; "
                            f"accepted: {', '.join(sorted(known))}", param=unknown[0], code="unknown_field")


def optional_field(body: Dict[str, Any], name: str, kind: type, what: str, default: Any = None) -> Any:
    """``body[name]`` (``default`` when absent or null); 422 unless it is a ``kind``."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise APIError(422, f"'{name}' must be {what}, got {_short(value)}", param=name, code="invalid_type")
    return value


def parse_texts(value: Any, max_items: int, max_chars: int, field: str = "input") -> List[str]:
    """A string or a non-empty list of strings (at most ``max_items``, each non-blank, at most ``max_chars``)."""
    if value is MISSING or value is None:
        raise APIError(422, f"'{field}' is required: a string or a list of strings", param=field, code="missing_field")
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list):
        texts = value
    else:
        raise APIError(422, f"'{field}' must be a string or a list of strings, got {type(value).__name__}",
                       param=field, code="invalid_type")
    if not texts:
        raise APIError(400, f"'{field}' must contain at least 1 item", param=field, code="empty_input")
    if len(texts) > max_items:
        raise APIError(422, f"batch size {len(texts)} > maximum allowed batch size {max_items}", param=field,
                       code="too_many_inputs")
    for i, text in enumerate(texts):
        where = field if isinstance(value, str) else f"{field}[{i}]"
        if not isinstance(text, str):
            raise APIError(422, f"{where} must be a string, got {type(text).__name__} (token-id inputs are not "
                                "supported)", param=field, code="invalid_type")
        if not text.strip():
            raise APIError(400, f"{where} cannot be empty or whitespace only", param=field, code="empty_input")
        if len(text) > max_chars:
            raise APIError(422, f"{where} has {len(text)} characters; the maximum is {max_chars}", param=field,
                           code="input_too_long")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{where} is not valid Unicode (it contains a lone surrogate)", param=field,
                           code="invalid_text") from None
    return texts


def embedding_response(embeddings: np.ndarray, encoding_format: str, model: str, prompt_tokens: int) -> Dict[str, Any]:
    """The OpenAI ``list`` object; base64 is the little-endian float32 bytes of each vector."""
    embeddings = np.ascontiguousarray(embeddings, dtype="<f4")
    data: List[Dict[str, Any]] = []
    for index, vector in enumerate(embeddings):
        encoded: Any = (base64.b64encode(vector.tobytes()).decode("ascii") if encoding_format == "base64"
                        else vector.tolist())
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def model_card(name: str, created: int, dimension: int, limits: Dict[str, Any]) -> Dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "retrievals",
            "dimension": dimension, **limits}


def check_token_limits(lengths: Sequence[int], max_length: int, truncate: bool, max_request_tokens: Optional[int],
                       is_single: bool, field: str = "input") -> None:
    """422 for a text over ``max_length`` tokens (when not truncating) or a request over its token cap."""
    if not truncate:
        for i, n in enumerate(lengths):
            if n > max_length:
                where = field if is_single else f"{field}[{i}]"
                raise APIError(422, f"{where} has {n} tokens; the maximum is {max_length} "
                                    "(send \"truncate\": true to cut it)", param=field, code="input_too_long")
    total = sum(lengths)
    if max_request_tokens is not None and total > max_request_tokens:
        raise APIError(422, f"request has {total} tokens; the maximum per request is {max_request_tokens}",
                       param=field, code="too_many_tokens")
