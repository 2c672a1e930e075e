from .retrieval_trainer import NonFiniteLossError, RetrievalTrainer

__all__ = ["RetrievalTrainer", "NonFiniteLossError"]
