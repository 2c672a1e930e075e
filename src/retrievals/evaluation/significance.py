"""How much to trust a figure: bootstrap intervals over queries and paired tests between two systems.

A metric over 300 queries is a mean of 300 per-query values; resampling the queries (with replacement,
seeded) gives its 95% percentile interval. Two systems scored on the same queries are compared on their
per-query differences: the interval of the mean difference (paired bootstrap) and a two-sided p-value
from a paired sign-flip permutation test (under "no difference" each query's difference is as likely
negative as positive), exact when there are few queries, Monte Carlo otherwise (with the +1 correction,
so a p-value is never 0).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Mapping, Sequence

import numpy as np

__all__ = ["Interval", "PairedDifference", "bootstrap_interval", "bootstrap_statistic", "compare_metrics",
           "format_difference", "metric_intervals", "paired_difference", "paired_statistic"]

EXACT_LIMIT = 16  # queries up to which the permutation test enumerates all 2^n sign flips


@dataclass(frozen=True)
class Interval:
    """A mean with its ``level`` percentile-bootstrap interval over ``n`` units (queries or pairs)."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95
    resamples: int = 1000

    def __str__(self) -> str:
        return f"{self.mean:.4f} [{self.low:.4f}, {self.high:.4f}]"

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` on the same units: the mean difference, its interval and a two-sided p-value."""

    difference: Interval
    p_value: float
    wins: int
    losses: int
    ties: int

    def __str__(self) -> str:
        return format_difference(self)

    def to_dict(self) -> Dict[str, object]:
        return {"difference": self.difference.mean, "low": self.difference.low, "high": self.difference.high,
                "p_value": self.p_value, "n": self.difference.n, "wins": self.wins, "losses": self.losses,
                "ties": self.ties}


def _values(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(list(values), dtype=np.float64)
    if array.ndim != 1 or len(array) == 0:
        raise ValueError("need a non-empty list of per-query values")
    if not np.all(np.isfinite(array)):
        raise ValueError("per-query values must be finite")
    return array


def bootstrap_interval(values: Sequence[float], resamples: int = 1000, seed: int = 0, level: float = 0.95) -> Interval:
    """The mean of ``values`` and its percentile bootstrap interval: ``resamples`` means of ``len(values)``
    values drawn with replacement by ``numpy.random.default_rng(seed).integers``; ``resamples=0``: the
    interval is the mean itself."""
    array = _values(values)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 0:
        raise ValueError(f"resamples must be >= 0, got {resamples}")
    mean = float(array.mean())
    if resamples == 0:
        return Interval(mean, mean, mean, len(array), level, 0)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 256):  # bounded memory for large query sets
        rows = rng.integers(0, len(array), (min(256, resamples - start), len(array)))
        means[start:start + len(rows)] = array[rows].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(mean, float(low), float(high), len(array), level, resamples)


def _sign_flip_p(diff: np.ndarray, permutations: int, seed: int) -> float:
    observed = abs(diff.mean())
    tolerance = 1e-12 * max(1.0, observed)
    if len(diff) <= EXACT_LIMIT:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(diff))))
        means = np.abs(signs @ diff / len(diff))
        return float(np.mean(means >= observed - tolerance))
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, permutations, 512):
        count = min(512, permutations - start)
        signs = rng.choice((1.0, -1.0), size=(count, len(diff)))
        extreme += int(np.sum(np.abs(signs @ diff / len(diff)) >= observed - tolerance))
    return (extreme + 1) / (permutations + 1)


def paired_difference(a: Mapping[str, float], b: Mapping[str, float], resamples: int = 1000, seed: int = 0,
                      permutations: int = 10000, level: float = 0.95) -> PairedDifference:
    """``a - b`` over the units (query ids) both score; an id in one only is an error (the systems must be
    scored on the same queries). Interval: paired bootstrap; p-value: paired sign-flip permutation test."""
    only = set(a) ^ set(b)
    if only:
        raise ValueError(f"{len(only)} queries are scored by one system only (e.g. {sorted(only)[:3]}); "
                         "compare runs on the same queries")
    keys = sorted(a)
    diff = _values([a[k] - b[k] for k in keys])
    interval = bootstrap_interval(diff, resamples=resamples, seed=seed, level=level)
    return PairedDifference(interval, _sign_flip_p(diff, permutations, seed), int(np.sum(diff > 0)),
                            int(np.sum(diff < 0)), int(np.sum(diff == 0)))


def format_difference(result: PairedDifference, digits: int = 4) -> str:
    """``+0.0630 [+0.0400, +0.0800], p < 0.001`` style."""
    d = result.difference
    p = result.p_value
    p_text = "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
    return f"{d.mean:+.{digits}f} [{d.low:+.{digits}f}, {d.high:+.{digits}f}], {p_text}"


def metric_intervals(values: Mapping[str, Mapping[str, float]], resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> Dict[str, Interval]:
    """``{metric: Interval}`` from ``{metric: {query: value}}`` (:func:`retrievals.evaluation.metrics.per_query`);
    every metric resamples the same queries (same seed)."""
    return {metric: bootstrap_interval(list(column.values()), resamples, seed, level)
            for metric, column in values.items() if column}


def compare_metrics(a: Mapping[str, Mapping[str, float]], b: Mapping[str, Mapping[str, float]], resamples: int = 1000,
                    seed: int = 0, permutations: int = 10000) -> Dict[str, PairedDifference]:
    """``{metric: a - b}`` for the metrics both carry, per query (:func:`paired_difference`)."""
    return {m: paired_difference(a[m], b[m], resamples, seed, permutations) for m in a if m in b and a[m]}


def _resampled(n: int, statistic: Callable[[np.ndarray], float], resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)])


def bootstrap_statistic(n: int, statistic: Callable[[np.ndarray], float], resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> Interval:
    """A statistic of ``n`` units that is not a mean (an STS Spearman over pairs): its value on all units and
    the percentile interval of its values on ``resamples`` resamples (``statistic(indices)``)."""
    full = float(statistic(np.arange(n)))
    if resamples == 0:
        return Interval(full, full, full, n, level, 0)
    values = _resampled(n, statistic, resamples, seed)
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return Interval(full, float(low), float(high), n, level, resamples)


def paired_statistic(n: int, statistic_a: Callable[[np.ndarray], float], statistic_b: Callable[[np.ndarray], float],
                     resamples: int = 1000, seed: int = 0, level: float = 0.95) -> PairedDifference:
    """``a - b`` of a statistic on the same resampled units, with a two-sided bootstrap p-value (twice the
    share of resampled differences on the far side of 0, +1 corrected); wins/losses are not defined here."""
    def diff(idx: np.ndarray) -> float:
        return statistic_a(idx) - statistic_b(idx)

    interval = bootstrap_statistic(n, diff, resamples, seed, level)
    values = _resampled(n, diff, max(resamples, 1), seed)
    far = np.sum(values <= 0) if interval.mean > 0 else np.sum(values >= 0)
    p_value = min(1.0, 2 * (far + 1) / (len(values) + 1))
    return PairedDifference(interval, float(p_value), 0, 0, 0)
