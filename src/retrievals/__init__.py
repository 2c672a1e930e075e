"""retrievals: text-embedding models, fine-tuning, hard-negative mining, evaluation and serving."""

from .models import AutoModelForEmbedding, EmbeddingConfig, Pooling, similarity

__version__ = "0.1.0"

__all__ = ["AutoModelForEmbedding", "EmbeddingConfig", "Pooling", "similarity", "__version__"]
