from .embedding_config import EmbeddingConfig
from .embedding_model import AutoModelForEmbedding
from .pooling import POOLING_FUNCTIONS, Pooling
from .similarity import similarity

__all__ = ["AutoModelForEmbedding", "EmbeddingConfig", "POOLING_FUNCTIONS", "Pooling", "similarity"]
