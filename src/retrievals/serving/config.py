"""Server limits and batching settings, checked against the model before the server starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ["ServerConfig"]


@dataclass
class ServerConfig:
    """What the embedding server accepts and how it batches.

    Capacity is counted in texts: a request with N inputs holds N of ``max_queue_items`` slots from
    admission until it is answered (or dropped), so a batch request and N single requests weigh the
    same. A request that does not fit gets 429 at once, with ``Retry-After``.
    """

    served_model_name: Optional[str] = field(default=None, metadata={
        "help": "Name clients send as `model` (default: the model folder's name); other names get 404"})
    api_key: Optional[str] = field(default=None, metadata={
        "help": "Require Authorization: Bearer <key> on every route but /health (or set RETRIEVALS_API_KEY)"})
    max_client_batch_size: int = field(default=256, metadata={"help": "Inputs per request (more: 422)"})
    max_input_chars: Optional[int] = field(default=None, metadata={
        "help": "Characters per input, checked before tokenizing (default: 16 x the model's max length)"})
    max_request_tokens: Optional[int] = field(default=None, metadata={"help": "Tokens per request (default: no cap)"})
    max_body_bytes: int = field(default=8 * 1024 * 1024, metadata={"help": "Request body size (more: 413)"})
    auto_truncate: bool = field(default=True, metadata={"help": "Default `truncate` (False: 422 for long texts)"})
    max_batch_tokens: int = field(default=16384, metadata={"help": "Tokens per model batch (the batcher's budget)"})
    max_batch_size: int = field(default=128, metadata={"help": "Texts per model batch"})
    max_wait_ms: float = field(default=2.0, metadata={"help": "How long the oldest queued text waits for company"})
    batching: bool = field(default=True, metadata={"help": "False (--no_batching): one model call per request"})
    max_queue_items: int = field(default=1024, metadata={"help": "Capacity in texts, waiting + running (beyond: 429)"})
    request_timeout: float = field(default=60.0, metadata={"help": "Seconds until an admitted request gets 503"})
    health_timeout: float = field(default=10.0, metadata={"help": "Seconds /health waits for the model"})
    retry_after: int = field(default=1, metadata={"help": "Retry-After seconds sent with 429"})
    max_top_k: int = field(default=1000, metadata={"help": "Largest `top_k` of /v1/search (more: 422)"})
    max_search_results: int = field(default=10000, metadata={
        "help": "Hits per /v1/search request: queries x top_k (more: 422)"})
    max_response_bytes: int = field(default=32 * 1024 * 1024, metadata={
        "help": "Size of a /v1/search response, stored text included (more: 413)"})
    cors_origins: List[str] = field(default_factory=list, metadata={"help": "Origins allowed by CORS (off by default)"})

    def check(self, max_input_length: int) -> None:
        """Raise ``ValueError`` for settings that could never serve a valid request."""
        positive = ("max_client_batch_size", "max_body_bytes", "max_batch_tokens", "max_batch_size", "max_queue_items",
                    "max_top_k", "max_search_results", "max_response_bytes")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_batch_tokens < max_input_length:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) < the model's max input length ({max_input_length}): "
                "a text of full length could never be batched; raise max_batch_tokens or lower the max length")
        if self.max_queue_items < self.max_client_batch_size:
            raise ValueError(f"max_queue_items ({self.max_queue_items}) < max_client_batch_size "
                             f"({self.max_client_batch_size}): a full-size request could never be admitted")
        if self.max_wait_ms < 0 or self.request_timeout <= 0 or self.health_timeout <= 0:
            raise ValueError("max_wait_ms must be >= 0, request_timeout and health_timeout > 0")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is set but empty")

    def input_chars_limit(self, max_input_length: int) -> int:
        return self.max_input_chars or 16 * max_input_length

    def public(self) -> Dict[str, Any]:
        """The settings clients may see (no key)."""
        info = asdict(self)
        info.pop("api_key")
        info["auth"] = self.api_key is not None
        return info
