"""Bootstrap intervals and paired tests: against a hand computation and against scipy on fixed cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from retrievals.evaluation.significance import bootstrap_interval, format_difference, paired_difference

VALUES = [0.0, 1.0, 0.5, 0.25, 0.75, 1.0, 0.0, 0.6]


def test_bootstrap_interval_equals_a_hand_computation():
    got = bootstrap_interval(VALUES, resamples=200, seed=7)
    # by hand: the same draws, the mean of each resample, the 2.5th and 97.5th percentiles (linear interpolation)
    rng = np.random.default_rng(7)
    rows = rng.integers(0, len(VALUES), (200, len(VALUES)))
    means = sorted(sum(VALUES[i] for i in row) / len(VALUES) for row in rows)
    def percentile(q):
        pos = q / 100 * (len(means) - 1)
        lo = int(pos)
        return means[lo] + (pos - lo) * (means[min(lo + 1, len(means) - 1)] - means[lo])
    assert got.mean == pytest.approx(sum(VALUES) / len(VALUES))
    assert got.low == pytest.approx(percentile(2.5)) and got.high == pytest.approx(percentile(97.5))
    assert got.low < got.mean < got.high and got.n == 8
    assert bootstrap_interval(VALUES, resamples=200, seed=7) == got  # seeded
    assert bootstrap_interval(VALUES, resamples=0).low == got.mean  # --bootstrap 0


def test_bootstrap_interval_covers_like_scipy_on_a_large_sample():
    rng = np.random.default_rng(0)
    values = rng.beta(2, 3, size=300)
    ours = bootstrap_interval(values, resamples=5000, seed=1)
    theirs = stats.bootstrap((values,), np.mean, n_resamples=5000, method="percentile", random_state=1).confidence_interval
    assert ours.low == pytest.approx(theirs.low, abs=0.004) and ours.high == pytest.approx(theirs.high, abs=0.004)


def test_paired_p_value_equals_scipy_exact_permutation_test():
    a = {f"q{i}": v for i, v in enumerate([0.9, 0.8, 0.7, 1.0, 0.6, 0.95, 0.5, 0.85, 0.4, 0.75])}
    b = {f"q{i}": v for i, v in enumerate([0.7, 0.8, 0.6, 0.9, 0.65, 0.7, 0.45, 0.6, 0.5, 0.7])}
    got = paired_difference(a, b, resamples=1000, seed=0)
    diff = np.array([a[k] - b[k] for k in sorted(a)])
    theirs = stats.permutation_test((diff,), np.mean, permutation_type="samples", n_resamples=np.inf,
                                    alternative="two-sided")
    assert got.p_value == pytest.approx(theirs.pvalue, rel=1e-9)
    assert got.difference.mean == pytest.approx(diff.mean()) and (got.wins, got.losses, got.ties) == (7, 2, 1)
    assert 0.01 < got.p_value < 0.1


def test_paired_monte_carlo_p_value_is_close_to_scipy_and_never_zero():
    rng = np.random.default_rng(3)
    base = rng.uniform(size=200)
    a = {str(i): v for i, v in enumerate(base + rng.normal(0.02, 0.1, size=200))}
    b = {str(i): v for i, v in enumerate(base)}
    got = paired_difference(a, b, permutations=20000, seed=0)
    diff = np.array([a[k] - b[k] for k in sorted(a)])
    theirs = stats.permutation_test((diff,), np.mean, permutation_type="samples", n_resamples=20000,
                                    alternative="two-sided", random_state=0).pvalue
    assert got.p_value == pytest.approx(theirs, abs=0.01)
    huge = paired_difference({k: v + 1 for k, v in b.items()}, b, permutations=1000)
    assert huge.p_value == pytest.approx(1 / 1001) and format_difference(huge).endswith("p < 0.001")


def test_identical_systems_and_bad_input():
    same = paired_difference({"a": 0.5, "b": 0.2}, {"a": 0.5, "b": 0.2})
    assert same.p_value == 1.0 and same.difference.mean == 0 and same.ties == 2
    with pytest.raises(ValueError, match="one system only"):
        paired_difference({"a": 1.0, "b": 0.0}, {"a": 1.0})
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_interval([])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_interval([0.1, float("nan")])
