from .callback import RetrievalEvaluatorCallback
from .metrics import RETRIEVAL_METRICS, evaluate_run
from .retrieval import RetrievalEvaluator, RetrievalResult, evaluate_retrieval
from .search import exact_search
from .sts import evaluate_sts

__all__ = [
    "RetrievalEvaluatorCallback", "RetrievalEvaluator", "RETRIEVAL_METRICS", "evaluate_run", "RetrievalResult",
    "evaluate_retrieval", "exact_search", "evaluate_sts",
]
