"""Where the LangChain and LlamaIndex adapters get their vectors: a loaded model or a running server.

Both backends answer ``embed(texts, is_query)`` (and ``await aembed(...)``) with one ``list`` of floats per
text, in input order; ``is_query`` picks the model's query side (query instruction and max length) or its
document side, as :meth:`~retrievals.AutoModelForEmbedding.encode_queries` / ``encode_corpus`` do.

- :class:`LocalBackend` encodes in this process (``async`` calls run on a worker thread, one at a time).
- :class:`ServerBackend` posts to the ``/v1/embeddings`` route of ``retrievals serve`` with
  ``input_type`` ``query`` or ``document``, so the server applies the same instructions; vectors come as
  base64 float32, bit for bit what the server computed. Needs ``httpx``.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
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


class ServerBackend:
    """Embed through a ``retrievals serve`` server; texts go in requests of at most ``batch_size``.

    ``model_name`` (the served name) is checked by the server when given; ``dimensions`` asks for
    Matryoshka-truncated vectors; ``api_key`` is sent as ``Authorization: Bearer``.
    """

    def __init__(self, base_url: str, api_key: Optional[str] = None, model_name: Optional[str] = None,
                 batch_size: int = 32, timeout: float = 60.0, dimensions: Optional[int] = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.url = embeddings_url(base_url)
        self.model_name, self.batch_size, self.timeout, self.dimensions = model_name, batch_size, timeout, dimensions
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

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

    def _vectors(self, response: Any, expected: int) -> Vectors:
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise EmbeddingServerError(f"{self.url} answered {response.status_code}: {message}")
        data = sorted(response.json()["data"], key=lambda d: d["index"])
        if len(data) != expected:
            raise EmbeddingServerError(f"{self.url} returned {len(data)} vectors for {expected} texts")
        return [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4").tolist() for d in data]

    def embed(self, texts: Sequence[str], is_query: bool) -> Vectors:
        httpx = _httpx()
        texts = list(texts)
        out: Vectors = []
        with httpx.Client(timeout=self.timeout, headers=self.headers) as client:
            for body in self._bodies(texts, is_query):
                out.extend(self._vectors(client.post(self.url, json=body), len(body["input"])))
        return out

    async def aembed(self, texts: Sequence[str], is_query: bool) -> Vectors:
        httpx = _httpx()
        bodies = self._bodies(list(texts), is_query)
        async with httpx.AsyncClient(timeout=self.timeout, headers=self.headers) as client:
            # all requests at once: the server's batcher packs them together
            responses = await asyncio.gather(*(client.post(self.url, json=body) for body in bodies))
        return [v for body, r in zip(bodies, responses) for v in self._vectors(r, len(body["input"]))]


Backend = Union[LocalBackend, ServerBackend]


def make_backend(model: Any = None, base_url: Optional[str] = None, batch_size: int = 32, **kwargs: Any) -> Backend:
    """A :class:`LocalBackend` for ``model`` (loaded model or path; ``kwargs`` go to ``from_pretrained``) or a
    :class:`ServerBackend` for ``base_url`` (``kwargs``: ``api_key``, ``model_name``, ``timeout``, ``dimensions``)."""
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
