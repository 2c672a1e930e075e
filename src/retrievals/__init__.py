"""retrievals: text-embedding models, fine-tuning, hard-negative mining, evaluation and serving.

The names below are imported when first used (PEP 562), so ``import retrievals`` and the command line of a
pipeline that does not train (serve, eval, encode, index, search) do not load the Trainer stack."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {  # public name -> the module that defines it
    **dict.fromkeys(("AutoModelForEmbedding", "CrossEncoder", "EmbeddingConfig", "MultiVectorModel", "Pooling",
                     "similarity"), ".models"),
    "RetrievalTrainer": ".trainer",
    **dict.fromkeys(("ListwiseCollator", "PairCollator", "PointwiseCollator", "RetrievalCollator",
                     "ScoredPairCollator", "TripletCollator"), ".data.collators"),
    **dict.fromkeys(("ListwiseDataset", "PointwiseDataset", "RetrievalDataset", "ScoredPairDataset"),
                    ".data.datasets"),
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'retrievals' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # resolved once
    return value


def __dir__():
    return sorted(__all__)


def search(index_dir, queries, top_k: int = 10, model=None, nprobe=None, **load_kwargs):
    """Search a built index (see :func:`retrievals.index.search`); faiss is imported only when called."""
    from .index.search import search as _search

    return _search(index_dir, queries, top_k=top_k, model=model, nprobe=nprobe, **load_kwargs)


__all__ = [*_EXPORTS, "search", "__version__"]
