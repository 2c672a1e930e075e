"""Semantic textual similarity: Spearman correlation of cosine scores with gold scores."""

from __future__ import annotations

from typing import Any, Callable, Dict, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr

from ..data.sts import StsPairs


def sts_cosines(model, pairs: StsPairs, batch_size: int = 64, **encode_kwargs: Any) -> np.ndarray:
    """cosine(s1, s2) of every pair."""
    e1 = model.encode(pairs.sentences1, batch_size=batch_size, normalize_embeddings=True, **encode_kwargs)
    e2 = model.encode(pairs.sentences2, batch_size=batch_size, normalize_embeddings=True, **encode_kwargs)
    return np.sum(np.asarray(e1) * np.asarray(e2), axis=1)


def spearman_of(cosine: np.ndarray, gold: Sequence[float]) -> Callable[[np.ndarray], float]:
    """``statistic(indices)``: the Spearman correlation on those pairs (for the bootstrap)."""
    gold = np.asarray(gold, dtype=np.float64)
    return lambda idx: float(spearmanr(cosine[idx], gold[idx]).statistic)


def evaluate_sts(model, pairs: StsPairs, batch_size: int = 64, **encode_kwargs: Any) -> Dict[str, float]:
    """Spearman and Pearson (x100 not applied) between cosine(s1, s2) and the gold scores."""
    cosine = sts_cosines(model, pairs, batch_size, **encode_kwargs)
    return {
        "spearman": float(spearmanr(cosine, pairs.scores).statistic),
        "pearson": float(pearsonr(cosine, pairs.scores).statistic),
    }
