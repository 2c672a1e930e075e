"""Where the LangChain and LlamaIndex adapters get their vectors: a loaded model or a running server.

Both backends answer ``embed(texts, is_query)`` (and ``await aembed(...)``) with one ``list`` of floats per
text, in input order; ``is_query`` picks the model's query side (query instruction and max length) or its
document side, as :meth:`~retrievals.AutoModelForEmbedding.encode_queries` / ``encode_corpus`` do.

- :class:`LocalBackend` encodes in this process (``async`` calls run on a worker thread, one at a time).
- :class:`ServerBackend` posts to the ``/v1/embeddings`` route of ``retrievals serve`` with
  ``input_type`` ``query`` or ``document``, so the server applies the same instructions; vectors come as
  base64 float32, bit for bit what the server computed. Needs ``httpx``. It is the one HTTP client of both
  adapters, sync and async alike: at most ``max_concurrency`` requests in flight per backend, and a request
  answered 429 or 503 is sent again after ``Retry-After`` or an exponential backoff, whichever is longer.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import itertools
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from . import missing_dependency

Vectors = List[List[float]]


class LocalBackend:
    """Embed with an in-process :class:`~retrievals.AutoModelForEmbedding` (or a path, loaded on the spot)."""

    def __init__(self, model: Any, batch_size: int = 32, **load_kwargs: Any) -> None:
        if isinstance(model, (str, os.PathLike)):
            from ..models.embedding_model import AutoModelForEmbedding

            model = AutoModelForEmbedding.from_pretrained(model, **load_kwargs)
        elif load_kwargs:
            raise TypeError(f"loading arguments {sorted(load_kwargs)} need a model path, not a loaded model")
        if not hasattr(model, "encode_queries") or not hasattr(model, "encode_corpus"):
            raise TypeError(f"model must be an AutoModelForEmbedding or a path to one, got {type(model).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.batch_size = model, batch_size
        self._lock = threading.Lock()  # one encode at a time (async callers share the model)

    @property
    def name(self) -> str:
        source = getattr(getattr(self.model, "config", None), "_name_or_path", "") or "retrievals"
        return os.path.basename(os.path.normpath(str(source)))

    def embed(self, texts: Sequence[str], is_query: bool) -> Vectors:
        texts = list(texts)
        if not texts:
            return []
        encode = self.model.encode_queries if is_query else self.model.encode_corpus
        with self._lock:
            vectors = encode(texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32).tolist()

    async def aembed(self, texts: Sequence[str], is_query: bool) -> Vectors:
        return await asyncio.to_thread(self.embed, list(texts), is_query)


class EmbeddingServerError(RuntimeError):
    """The server answered with an error (its message and HTTP status are in the text)."""


def embeddings_url(base_url: str) -> str:
    """``http://host:port`` or ``http://host:port/v1`` (an OpenAI client's base URL) -> the embeddings route."""
    url = base_url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
    if url.endswith("/embeddings"):
        return url
    return url + ("/embeddings" if url.endswith("/v1") else "/v1/embeddings")


# Options of ServerBackend beyond base_url and batch_size that only a server backend takes.
RETRY_OPTIONS = ("max_concurrency", "max_retries", "backoff", "transport")
RETRY_STATUSES = (429, 503)  # at capacity, not ready: worth another try; anything else is an answer
MAX_BACKOFF_S = 30.0  # the exponential part stops growing here (a longer Retry-After is still honoured)
_sleep = time.sleep  # (tests replace these two)


async def _asleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


def retry_after_s(response: Any) -> float:
    """The wait a ``Retry-After`` header asks for (seconds or an HTTP date), 0 without one."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return 0.0


class ServerBackend:
    """Embed through a ``retrievals serve`` server; texts go in requests of at most ``batch_size``.

    ``model_name`` (the served name) is checked by the server when given; ``dimensions`` asks for
    Matryoshka-truncated vectors; ``api_key`` is sent as ``Authorization: Bearer``. At most
    ``max_concurrency`` requests are in flight at once (per backend, however many calls share it); one answered
    429 or 503 is sent again up to ``max_retries`` times, after ``Retry-After`` or ``backoff`` seconds doubled at
    each try (at most :data:`MAX_BACKOFF_S`), whichever is longer. ``transport``: an httpx transport for both
    clients (``httpx.MockTransport`` in tests).
    """

    def __init__(self, base_url: str, api_key: Optional[str] = None, model_name: Optional[str] = None,
                 batch_size: int = 32, timeout: float = 60.0, dimensions: Optional[int] = None,
                 max_concurrency: int = 4, max_retries: int = 6, backoff: float = 0.5, transport: Any = None) -> None:
        for name, value, least in (("batch_size", batch_size, 1), ("max_concurrency", max_concurrency, 1),
                                   ("max_retries", max_retries, 0), ("backoff", backoff, 0)):
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        self.url = embeddings_url(base_url)
        self.model_name, self.batch_size, self.timeout, self.dimensions = model_name, batch_size, timeout, dimensions
        self.max_concurrency, self.max_retries, self.backoff, self.transport = max_concurrency, max_retries, backoff, transport
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._slots = threading.BoundedSemaphore(max_concurrency)  # sync requests, all threads
        self._async_slots: weakref.WeakKeyDictionary[Any, asyncio.Semaphore] = weakref.WeakKeyDictionary()  # per loop

    @property
    def name(self) -> str:
        return self.model_name or self.url

    def _bodies(self, texts: List[str], is_query: bool) -> List[Dict[str, Any]]:
        extra: Dict[str, Any] = {"input_type": "query" if is_query else "document", "encoding_format": "base64"}
        if self.model_name:
            extra["model"] = self.model_name
        if self.dimensions:
            extra["dimensions"] = self.dimensions
        return [{"input": texts[i:i + self.batch_size], **extra} for i in range(0, len(texts), self.batch_size)]

    def _client_kwargs(self) -> Dict[str, Any]:
        return {"timeout": self.timeout, "headers": self.headers, "transport": self.transport}

    def _retry_wait(self, response: Any, attempt: int) -> Optional[float]:
        """Seconds to wait before sending again after ``attempt`` (0: the first try), or None: take the answer."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.max_retries:
            return None
        return max(retry_after_s(response), min(self.backoff * 2 ** attempt, MAX_BACKOFF_S))

    def _vectors(self, response: Any, expected: int, tries: int = 1) -> Vectors:
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            after = f" (after {tries} tries)" if tries > 1 else ""
            raise EmbeddingServerError(f"{self.url} answered {response.status_code}: {message}{after}")
        data = sorted(response.json()["data"], key=lambda d: d["index"])
        if len(data) != expected:
            raise EmbeddingServerError(f"{self.url} returned {len(data)} vectors for {expected} texts")
        return [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4").tolist() for d in data]

    def _post(self, client: Any, body: Dict[str, Any]) -> Vectors:
        with self._slots:
            for attempt in itertools.count():
                response = client.post(self.url, json=body)
                wait = self._retry_wait(response, attempt)
                if wait is None:
                    return self._vectors(response, len(body["input"]), attempt + 1)
                _sleep(wait)
        raise AssertionError("unreachable")

    async def _apost(self, client: Any, body: Dict[str, Any]) -> Vectors:
        loop = asyncio.get_running_loop()
        slots = self._async_slots.setdefault(loop, asyncio.Semaphore(self.max_concurrency))
        async with slots:
            for attempt in itertools.count():
                response = await client.post(self.url, json=body)
                wait = self._retry_wait(response, attempt)
                if wait is None:
                    return self._vectors(response, len(body["input"]), attempt + 1)
                await _asleep(wait)
        raise AssertionError("unreachable")

    def embed(self, texts: Sequence[str], is_query: bool) -> Vectors:
        httpx = _httpx()
        bodies = self._bodies(list(texts), is_query)
        with httpx.Client(**self._client_kwargs()) as client:
            if len(bodies) <= 1:
                return [v for body in bodies for v in self._post(client, body)]
            pool = ThreadPoolExecutor(min(self.max_concurrency, len(bodies)), thread_name_prefix="retrievals-embed")
            try:
                parts = list(pool.map(lambda body: self._post(client, body), bodies))
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # after an error: no more requests
        return [v for part in parts for v in part]

    async def aembed(self, texts: Sequence[str], is_query: bool) -> Vectors:
        httpx = _httpx()
        bodies = self._bodies(list(texts), is_query)
        async with httpx.AsyncClient(**self._client_kwargs()) as client:
            tasks = [asyncio.ensure_future(self._apost(client, body)) for body in bodies]
            try:
                parts = await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:  # after an error: no more requests
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        return [v for part in parts for v in part]


Backend = Union[LocalBackend, ServerBackend]


def make_backend(model: Any = None, base_url: Optional[str] = None, batch_size: int = 32, **kwargs: Any) -> Backend:
    """A :class:`LocalBackend` for ``model`` (loaded model or path; ``kwargs`` go to ``from_pretrained``) or a
    :class:`ServerBackend` for ``base_url`` (``kwargs``: ``api_key``, ``model_name``, ``timeout``, ``dimensions``,
    ``max_concurrency``, ``max_retries``, ``backoff``, ``transport``)."""
    if (model is None) == (base_url is None):
        raise ValueError("pass exactly one of model (a loaded AutoModelForEmbedding or its path) and base_url "
                         "(a running `retrievals serve` server)")
    if base_url is not None:
        return ServerBackend(base_url, batch_size=batch_size, **kwargs)
    return LocalBackend(model, batch_size=batch_size, **kwargs)


def _httpx():
    try:
        import httpx
    except ImportError as e:
        raise missing_dependency("httpx", e) from e
    return httpx
