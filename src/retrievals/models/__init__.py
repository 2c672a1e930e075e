from .cross_encoder import CrossEncoder
from .embedding_config import EmbeddingConfig
from .embedding_model import AutoModelForEmbedding
from .multi_vector import MultiVectorModel
from .pooling import POOLING_FUNCTIONS, Pooling
from .similarity import similarity

__all__ = ["AutoModelForEmbedding", "CrossEncoder", "EmbeddingConfig", "MultiVectorModel", "POOLING_FUNCTIONS", "Pooling",
           "similarity"]
