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

__all__ = [
    "AutoModelForEmbedding", "CrossEncoder", "MultiVectorModel", "EmbeddingConfig", "Pooling", "similarity", "RetrievalTrainer",
    "PairCollator", "TripletCollator", "RetrievalCollator", "ScoredPairCollator", "PointwiseCollator",
    "ListwiseCollator", "RetrievalDataset", "ScoredPairDataset", "PointwiseDataset", "ListwiseDataset",
    "__version__",
]
