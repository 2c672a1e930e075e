from .metrics import RETRIEVAL_METRICS, evaluate_run
from .retrieval import RetrievalEvaluator, RetrievalResult, evaluate_retrieval
from .search import exact_search
from .sts import evaluate_sts

__all__ = [
    "RetrievalEvaluatorCallback", "RetrievalEvaluator", "RETRIEVAL_METRICS", "evaluate_run", "RetrievalResult",
    "evaluate_retrieval", "exact_search", "evaluate_sts",
]


def __getattr__(name: str):
    """The Trainer callback is imported when asked for: evaluating alone does not load the Trainer stack."""
    if name == "RetrievalEvaluatorCallback":
        from .callback import RetrievalEvaluatorCallback

        return RetrievalEvaluatorCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
