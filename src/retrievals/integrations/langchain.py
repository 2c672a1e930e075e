"""LangChain: :class:`LangChainEmbeddings`, a ``langchain_core.embeddings.Embeddings`` (``pip install 'retrievals[langchain]'``).

    from langchain_core.vectorstores import InMemoryVectorStore
    from retrievals.integrations import LangChainEmbeddings

    store = InMemoryVectorStore(LangChainEmbeddings("path/to/model"))         # or a loaded model
    store = InMemoryVectorStore(LangChainEmbeddings(base_url="http://127.0.0.1:8000"))  # `retrievals serve`

``embed_query`` embeds on the query side (query instruction), ``embed_documents`` on the document side.
"""

from __future__ import annotations

from typing import Any, List, Optional

from . import missing_dependency
from .backend import make_backend

try:
    from langchain_core.embeddings import Embeddings
except ImportError as e:
    raise missing_dependency("langchain_core", e) from e

__all__ = ["LangChainEmbeddings"]


class LangChainEmbeddings(Embeddings):
    """Embeddings of a :class:`~retrievals.AutoModelForEmbedding` (``model``: loaded or a path, ``load_kwargs``
    go to ``from_pretrained``) or of a ``retrievals serve`` server (``base_url``, ``api_key``, ``model_name``,
    ``timeout``, ``dimensions``, ``max_concurrency``, ``max_retries``, ``backoff``: see
    :class:`~retrievals.integrations.backend.ServerBackend`). ``batch_size`` is texts per forward pass, or per
    request to the server."""

    def __init__(self, model: Any = None, *, base_url: Optional[str] = None, batch_size: int = 32,
                 **kwargs: Any) -> None:
        self.backend = make_backend(model, base_url, batch_size=batch_size, **kwargs)

    def embed_documents(self, texts: List[str]) -> List[List[float]]:
        return self.backend.embed(texts, is_query=False)

    def embed_query(self, text: str) -> List[float]:
        return self.backend.embed([text], is_query=True)[0]

    async def aembed_documents(self, texts: List[str]) -> List[List[float]]:
        return await self.backend.aembed(texts, is_query=False)

    async def aembed_query(self, text: str) -> List[float]:
        return (await self.backend.aembed([text], is_query=True))[0]
