"""Adapters for the frameworks embeddings are plugged into: LangChain, LlamaIndex, MTEB, sentence-transformers.

Each adapter lives in its own module and imports its framework only when the adapter is first used, so
``import retrievals.integrations`` costs nothing and needs none of them:

- :class:`LangChainEmbeddings` (``retrievals[langchain]``): a ``langchain_core.embeddings.Embeddings``;
- :class:`LlamaIndexEmbedding` (``retrievals[llamaindex]``): a ``llama_index.core.embeddings.BaseEmbedding``;
- :class:`MTEBModel` (``retrievals[mteb]``): an encoder for ``mteb.evaluate``; :func:`beir_retrieval_task`:
  a BEIR folder as an mteb retrieval task;
- :func:`export_multi_vector_encoder` (sentence-transformers): a multi-vector model as a ``MultiVectorEncoder``.

The LangChain and LlamaIndex adapters embed with a loaded :class:`~retrievals.AutoModelForEmbedding` (or a
path to one) or through a running ``retrievals serve`` server (``base_url=``); see :mod:`.backend`.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict

# Public name -> module that defines it (imported on first access).
_EXPORTS: Dict[str, str] = {
    "LangChainEmbeddings": ".langchain",
    "LlamaIndexEmbedding": ".llamaindex",
    "MTEBModel": ".mteb",
    "beir_retrieval_task": ".mteb",
    "export_multi_vector_encoder": ".st_export",
    "LocalBackend": ".backend",
    "ServerBackend": ".backend",
    "EmbeddingServerError": ".backend",
    "make_backend": ".backend",
}

# Module of an adapter -> (the package it needs, the pip extra that installs it).
REQUIREMENTS: Dict[str, tuple] = {
    "langchain_core": ("langchain-core", "langchain"),
    "llama_index.core": ("llama-index-core", "llamaindex"),
    "mteb": ("mteb", "mteb"),
    "sentence_transformers": ("sentence-transformers>=6.0", None),  # MultiVectorEncoder
    "httpx": ("httpx", None),  # the server backend of both adapters
}

__all__ = sorted(_EXPORTS)


def missing_dependency(module: str, error: ImportError) -> ImportError:
    """An ImportError for an adapter whose framework ``module`` is not installed, naming the pip extra."""
    package, extra = REQUIREMENTS.get(module, (module, None))
    hint = f"pip install 'retrievals[{extra}]'" if extra else f"pip install '{package}'"
    return ImportError(f"this adapter needs {package} ({hint}): {error}")


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}; available: {', '.join(__all__)}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)


def __dir__():
    return __all__
