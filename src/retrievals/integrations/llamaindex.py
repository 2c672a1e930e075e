"""LlamaIndex: :class:`LlamaIndexEmbedding`, a ``llama_index.core.embeddings.BaseEmbedding``
(``pip install 'retrievals[llamaindex]'``).

    from llama_index.core import VectorStoreIndex
    from retrievals.integrations import LlamaIndexEmbedding

    embed_model = LlamaIndexEmbedding("path/to/model")          # or base_url="http://127.0.0.1:8000"
    index = VectorStoreIndex(nodes, embed_model=embed_model)

Queries (``get_query_embedding``) are embedded on the query side (query instruction), texts and nodes
(``get_text_embedding``, ``get_text_embedding_batch``) on the document side.
"""

from __future__ import annotations

from typing import Any, List, Optional

from . import missing_dependency
from .backend import RETRY_OPTIONS, make_backend

try:
    from llama_index.core.bridge.pydantic import PrivateAttr
    from llama_index.core.embeddings import BaseEmbedding
except ImportError as e:
    raise missing_dependency("llama_index.core", e) from e

__all__ = ["LlamaIndexEmbedding"]


class LlamaIndexEmbedding(BaseEmbedding):
    """Embeddings of a :class:`~retrievals.AutoModelForEmbedding` (``model``: loaded or a path) or of a
    ``retrievals serve`` server (``base_url``, ``api_key``, ``served_model_name``, ``timeout``, ``dimensions``,
    and :class:`~retrievals.integrations.backend.ServerBackend`'s ``max_concurrency``, ``max_retries``, ``backoff``).

    ``batch_size`` is texts per forward pass or per request, and LlamaIndex's ``embed_batch_size``;
    other keyword arguments (``model_name``, ``callback_manager`` ...) go to ``BaseEmbedding``.
    """

    _backend: Any = PrivateAttr()

    def __init__(self, model: Any = None, *, base_url: Optional[str] = None, batch_size: int = 32,
                 api_key: Optional[str] = None, served_model_name: Optional[str] = None, timeout: float = 60.0,
                 dimensions: Optional[int] = None, **kwargs: Any) -> None:
        server = {"api_key": api_key, "model_name": served_model_name, "timeout": timeout, "dimensions": dimensions}
        server |= {name: kwargs.pop(name) for name in RETRY_OPTIONS if name in kwargs}
        if base_url is None and server.keys() & set(RETRY_OPTIONS):
            raise TypeError(f"{sorted(server.keys() & set(RETRY_OPTIONS))} apply to a server (base_url), not a local model")
        backend = make_backend(model, base_url, batch_size=batch_size, **(server if base_url is not None else {}))
        kwargs.setdefault("model_name", backend.name)
        kwargs.setdefault("embed_batch_size", batch_size)
        super().__init__(**kwargs)
        self._backend = backend

    @classmethod
    def class_name(cls) -> str:
        return "RetrievalsEmbedding"

    @property
    def backend(self):
        return self._backend

    def _get_query_embedding(self, query: str) -> List[float]:
        return self._backend.embed([query], is_query=True)[0]

    async def _aget_query_embedding(self, query: str) -> List[float]:
        return (await self._backend.aembed([query], is_query=True))[0]

    def _get_text_embedding(self, text: str) -> List[float]:
        return self._backend.embed([text], is_query=False)[0]

    async def _aget_text_embedding(self, text: str) -> List[float]:
        return (await self._backend.aembed([text], is_query=False))[0]

    def _get_text_embeddings(self, texts: List[str]) -> List[List[float]]:
        return self._backend.embed(texts, is_query=False)

    async def _aget_text_embeddings(self, texts: List[str]) -> List[List[float]]:
        return await self._backend.aembed(texts, is_query=False)
