"""Semantic textual similarity: Spearman correlation of cosine scores with gold scores."""

from __future__ import annotations

from typing import Any, Dict

import numpy as np
from scipy.stats import pearsonr, spearmanr

from ..data.sts import StsPairs


def evaluate_sts(model, pairs: StsPairs, batch_size: int = 64, **encode_kwargs: Any) -> Dict[str, float]:
    """Spearman and Pearson (x100 not applied) between cosine(s1, s2) and the gold scores."""
    e1 = model.encode(pairs.sentences1, batch_size=batch_size, normalize_embeddings=True, **encode_kwargs)
    e2 = model.encode(pairs.sentences2, batch_size=batch_size, normalize_embeddings=True, **encode_kwargs)
    cosine = np.sum(np.asarray(e1) * np.asarray(e2), axis=1)
    return {
        "spearman": float(spearmanr(cosine, pairs.scores).statistic),
        "pearson": float(pearsonr(cosine, pairs.scores).statistic),
    }
