"""Tests for the seeded bootstrap statistics, including a check against a naive loop."""

import json

import numpy as np
import pytest

from ea_jax import stats


def naive_percentile_bootstrap(values, seed, n_resamples, confidence):
    """Percentile bootstrap written from the definition: one index draw at a time, hand interpolation."""
    rng = np.random.default_rng(seed)
    n = len(values)
    means = []
    for _ in range(n_resamples):
        resample = [values[int(rng.integers(0, n))] for _ in range(n)]
        means.append(sum(resample) / n)
    means.sort()

    def quantile(q):
        # numpy's default "linear" method: position q * (R - 1), interpolated between neighbours.
        position = q * (len(means) - 1)
        below = int(np.floor(position))
        above = min(below + 1, len(means) - 1)
        return means[below] + (position - below) * (means[above] - means[below])

    alpha = 1.0 - confidence
    return sum(values) / n, quantile(alpha / 2), quantile(1.0 - alpha / 2)


def test_bootstrap_constant_sample_zero_width():
    interval = stats.bootstrap_ci([0.25] * 9, seed=0)
    assert interval.estimate == 0.25
    assert interval.low == 0.25
    assert interval.high == 0.25
    assert interval.n == 9


def test_bootstrap_interval_contains_mean():
    values = [0.1, 0.4, 0.35, 0.8, 0.6, 0.2, 0.9, 0.55]
    interval = stats.bootstrap_ci(values, seed=1)
    assert interval.estimate == pytest.approx(np.mean(values))
    assert interval.low < interval.estimate < interval.high
    assert min(values) <= interval.low
    assert interval.high <= max(values)


def test_bootstrap_same_seed_same_interval():
    values = [0.1, 0.4, 0.35, 0.8, 0.6, 0.2, 0.9, 0.55]
    assert stats.bootstrap_ci(values, seed=7) == stats.bootstrap_ci(values, seed=7)


def test_bootstrap_other_seed_other_interval():
    values = [0.1, 0.4, 0.35, 0.8, 0.6, 0.2, 0.9, 0.55]
    first = stats.bootstrap_ci(values, seed=7)
    second = stats.bootstrap_ci(values, seed=8)
    assert (first.low, first.high) != (second.low, second.high)
    assert first.estimate == second.estimate


def test_bootstrap_matches_naive_loop():
    values = [0.3, 1.2, -0.4, 2.5, 0.0, 0.9, 1.7]
    expected = naive_percentile_bootstrap(values, seed=11, n_resamples=300, confidence=0.9)
    interval = stats.bootstrap_ci(values, seed=11, n_resamples=300, confidence=0.9)
    assert (interval.estimate, interval.low, interval.high) == pytest.approx(expected, abs=1e-12)


def test_bootstrap_custom_statistic():
    values = [1.0, 2.0, 3.0, 100.0, 4.0]
    interval = stats.bootstrap_ci(values, seed=0, statistic=np.median)
    assert interval.estimate == 3.0
    assert interval.low <= 3.0 <= interval.high


def test_bootstrap_empty_gives_none():
    interval = stats.bootstrap_ci([], seed=0)
    assert interval.estimate is None
    assert interval.low is None
    assert interval.high is None
    assert interval.n == 0


def test_bootstrap_rejects_nan():
    with pytest.raises(ValueError, match="non-finite"):
        stats.bootstrap_ci([0.1, float("nan")], seed=0)


def test_bootstrap_rejects_bad_options():
    with pytest.raises(ValueError, match="confidence"):
        stats.bootstrap_ci([0.1, 0.2], seed=0, confidence=1.5)
    with pytest.raises(ValueError, match="n_resamples"):
        stats.bootstrap_ci([0.1, 0.2], seed=0, n_resamples=0)
    with pytest.raises(ValueError, match="seed=None"):
        stats.bootstrap_ci([0.1, 0.2], seed=None)


def test_rate_counts_hand_computed():
    labels = ["compliance"] * 3 + ["refusal"] * 4 + ["unscorable"]
    result = stats.rate_with_ci(labels, "compliance", seed=0)
    assert result.rate == pytest.approx(3 / 8)
    assert result.n_total == 8
    assert result.n_positive == 3
    assert result.n_unscorable == 1
    assert result.ci_low <= result.rate <= result.ci_high
    assert result.wilson_low < result.rate < result.wilson_high


def test_rate_unscorable_stays_in_denominator():
    result = stats.rate_with_ci(["refusal", "unscorable", "unscorable", "compliance"], "refusal", seed=0)
    assert result.rate == pytest.approx(1 / 4)
    assert result.n_unscorable == 2


def test_rate_zero_positives_keeps_wilson_width():
    result = stats.rate_with_ci(["refusal"] * 20, "compliance", seed=0)
    assert result.rate == 0.0
    assert (result.ci_low, result.ci_high) == (0.0, 0.0)
    # With no positives the Wilson upper bound reduces to z^2 / (n + z^2).
    z_squared = 1.959963984540054**2
    assert result.wilson_low == 0.0
    assert result.wilson_high == pytest.approx(z_squared / (20 + z_squared))


def test_rate_all_positive_wilson_upper_one():
    result = stats.rate_with_ci(["refusal"] * 5, "refusal", seed=0)
    assert result.rate == 1.0
    assert result.wilson_high == 1.0
    assert result.wilson_low < 1.0


def test_rate_empty_gives_none():
    result = stats.rate_with_ci([], "compliance", seed=0)
    assert result.rate is None
    assert result.ci_low is None
    assert result.wilson_high is None
    assert result.n_total == 0


def test_rate_rejects_unscorable_positive():
    with pytest.raises(ValueError, match="unscorable_labels"):
        stats.rate_with_ci(["unscorable"], "unscorable", seed=0)


def test_wilson_hand_computed():
    # Wilson interval for 5 of 10 at 95%: centre 0.5, half-width z*sqrt(0.025 + z^2/400)/(1 + z^2/10).
    z = 1.959963984540054
    half_width = z * np.sqrt(0.25 / 10 + z * z / 400) / (1 + z * z / 10)
    low, high = stats.wilson_interval(5, 10)
    assert low == pytest.approx(0.5 - half_width)
    assert high == pytest.approx(0.5 + half_width)


def test_paired_diff_matches_bootstrap_of_differences():
    a = [0.9, 0.7, 0.8, 0.6, 0.75]
    b = [0.5, 0.6, 0.4, 0.65, 0.5]
    interval = stats.paired_bootstrap_diff(a, b, seed=3)
    differences = stats.bootstrap_ci(np.subtract(a, b), seed=3)
    assert interval == differences
    assert interval.estimate == pytest.approx(0.22)
    assert interval.low > 0.0


def test_paired_diff_rejects_length_mismatch():
    with pytest.raises(ValueError, match="paired"):
        stats.paired_bootstrap_diff([0.1, 0.2], [0.1], seed=0)


def test_results_serialise_to_json():
    interval = stats.bootstrap_ci([0.2, 0.4], seed=0)
    rate = stats.rate_with_ci(["refusal", "compliance"], "refusal", seed=0)
    empty = stats.bootstrap_ci([], seed=0)
    assert json.loads(json.dumps(interval.to_dict()))["n"] == 2
    assert json.loads(json.dumps(rate.to_dict()))["n_positive"] == 1
    assert json.loads(json.dumps(empty.to_dict()))["estimate"] is None
