"""retrievals: text-embedding models, fine-tuning, hard-negative mining, evaluation and serving."""

from .data.collators import (
    ListwiseCollator,
    PairCollator,
    PointwiseCollator,
    RetrievalCollator,
    ScoredPairCollator,
    TripletCollator,
)
from .data.datasets import ListwiseDataset, PointwiseDataset, RetrievalDataset, ScoredPairDataset
from .models import AutoModelForEmbedding, CrossEncoder, EmbeddingConfig, MultiVectorModel, Pooling, similarity
from .trainer import RetrievalTrainer

__version__ = "0.1.0"


def search(index_dir, queries, top_k: int = 10, model=None, nprobe=None, **load_kwargs):
    """Search a built index (see :func:`retrievals.index.search`); faiss is imported only when called."""
    from .index.search import search as _search

    return _search(index_dir, queries, top_k=top_k, model=model, nprobe=nprobe, **load_kwargs)

__all__ = [
    "AutoModelForEmbedding", "CrossEncoder", "MultiVectorModel", "EmbeddingConfig", "Pooling", "similarity", "RetrievalTrainer",
    "PairCollator", "TripletCollator", "RetrievalCollator", "ScoredPairCollator", "PointwiseCollator",
    "ListwiseCollator", "RetrievalDataset", "ScoredPairDataset", "PointwiseDataset", "ListwiseDataset",
    "search", "__version__",
]
