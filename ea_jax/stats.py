"""Seeded statistics over per-sample records: bootstrap intervals, rates and paired differences.

Every function is pure: records in, an explicit integer seed, a frozen result out. Undefined
results (no samples) come back as `None` fields, never as 0, so a report can tell "no data"
from "a rate of zero". Each result has `to_dict()` for JSON.

All bootstrap intervals here follow one procedure. With `rng = np.random.default_rng(seed)`,
it draws the whole resample index matrix at once, `rng.integers(0, n, size=(n_resamples, n))`,
and applies the statistic to each row. The interval is the `(1 - confidence) / 2` and
`(1 + confidence) / 2` quantiles of the resampled statistics, with numpy's default linear
interpolation. This is the percentile bootstrap described by Efron and Tibshirani in
"An Introduction to the Bootstrap" (1993).
"""

from __future__ import annotations

import dataclasses
import math
import statistics as pystats
from collections.abc import Callable, Sequence

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95
UNSCORABLE_LABELS = ("unscorable",)


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap confidence interval over `n` samples.

    `estimate`, `low` and `high` are all None when `n == 0`, because nothing was measured.
    """

    estimate: float | None
    low: float | None
    high: float | None
    n: int
    confidence: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RateResult:
    """The rate of one label among per-sample labels, with its confidence intervals and counts.

    The denominator is `n_total`, which includes the unscorable samples (counted as not
    positive). `n_unscorable` reports how many there were, so a reader can bound the rate:
    it lies between `rate` and `(n_positive + n_unscorable) / n_total`.
    """

    positive: str
    rate: float | None
    ci_low: float | None  # percentile bootstrap over samples
    ci_high: float | None
    wilson_low: float | None  # Wilson score interval, which stays informative at 0 or n positives
    wilson_high: float | None
    n_total: int
    n_positive: int
    n_unscorable: int
    confidence: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_options(seed: int, n_resamples: int, confidence: float) -> None:
    # default_rng(None) draws fresh OS entropy, so a missing seed would make results irreproducible.
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed={seed!r} is invalid; expected an int so the bootstrap is reproducible.")
    if not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples!r} is invalid; expected a positive integer.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} is invalid; expected a value in (0, 1), e.g. 0.95.")


def _as_finite_array(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} has shape {array.shape}; expected a 1-D sequence of numbers.")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(
            f"{name} contains {bad.size} non-finite values (first at index {int(bad[0])}: "
            f"{float(array[bad[0]])}); drop or label those samples before computing statistics."
        )
    return array


def _bootstrap_rows(values: np.ndarray, statistic: Callable, seed: int, n_resamples: int) -> np.ndarray:
    """Apply `statistic` to each bootstrap resample of `values`; returns shape (n_resamples,)."""
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, values.size, size=(n_resamples, values.size))  # (R, n)
    return np.array([float(statistic(values[row])) for row in indices])


def bootstrap_ci(
    values: Sequence[float],
    *,
    seed: int,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    statistic: Callable[[np.ndarray], float] = np.mean,
) -> Interval:
    """Estimate `statistic(values)` with a percentile bootstrap interval.

    Returns an `Interval` with None estimate and bounds when `values` is empty. Raises
    ValueError on non-finite values, because a NaN score means an unparsed sample that the
    caller must count, not average.
    """
    _check_options(seed, n_resamples, confidence)
    array = _as_finite_array(values, "values")
    if array.size == 0:
        return Interval(estimate=None, low=None, high=None, n=0, confidence=confidence)

    resampled = _bootstrap_rows(array, statistic, seed, n_resamples)
    alpha = 1.0 - confidence
    low, high = np.quantile(resampled, [alpha / 2, 1.0 - alpha / 2])
    return Interval(
        estimate=float(statistic(array)),
        low=float(low),
        high=float(high),
        n=int(array.size),
        confidence=confidence,
    )


def wilson_interval(
    n_positive: int, n_total: int, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, float] | None:
    """Return the Wilson score interval for a binomial proportion, or None when `n_total == 0`.

    Formula from Wilson (1927), "Probable inference, the law of succession, and statistical
    inference", JASA 22(158). Unlike the percentile bootstrap, it does not collapse to a point
    when no sample (or every sample) is positive.
    """
    if not 0 <= n_positive <= n_total:
        raise ValueError(
            f"n_positive={n_positive} is invalid for n_total={n_total}; expected 0 <= n_positive <= n_total."
        )
    if n_total == 0:
        return None
    z = pystats.NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2)
    p = n_positive / n_total
    denominator = 1.0 + z * z / n_total
    centre = (p + z * z / (2 * n_total)) / denominator
    half_width = z * math.sqrt(p * (1.0 - p) / n_total + z * z / (4 * n_total * n_total)) / denominator
    # At 0 or n positives the bound is exactly 0 or 1. Set it, since rounding leaves about 1e-17.
    low = 0.0 if n_positive == 0 else max(0.0, centre - half_width)
    high = 1.0 if n_positive == n_total else min(1.0, centre + half_width)
    return low, high


def rate_with_ci(
    labels: Sequence[str],
    positive: str,
    *,
    seed: int,
    unscorable_labels: Sequence[str] = UNSCORABLE_LABELS,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
) -> RateResult:
    """Compute the rate of `positive` among `labels` with bootstrap and Wilson intervals.

    Unscorable samples (any label in `unscorable_labels`) stay in the denominator and count
    as not positive. `n_unscorable` reports how many there were, so no sample is silently
    dropped. Use it for the harmful-compliance rate (`positive="compliance"` on red-team
    prompts) and the over-refusal rate (`positive="refusal"` on benign prompts).
    """
    if isinstance(labels, str):
        raise TypeError("labels is a single string; expected a sequence of per-sample labels.")
    if positive in unscorable_labels:
        raise ValueError(
            f"positive={positive!r} is also listed in unscorable_labels={tuple(unscorable_labels)!r}; "
            "choose a scorable label."
        )
    _check_options(seed, n_resamples, confidence)

    n_total = len(labels)
    indicator = np.array([label == positive for label in labels], dtype=np.float64)
    n_positive = int(indicator.sum())
    n_unscorable = sum(label in unscorable_labels for label in labels)

    interval = bootstrap_ci(indicator, seed=seed, n_resamples=n_resamples, confidence=confidence)
    wilson = wilson_interval(n_positive, n_total, confidence)
    return RateResult(
        positive=positive,
        rate=interval.estimate,
        ci_low=interval.low,
        ci_high=interval.high,
        wilson_low=None if wilson is None else wilson[0],
        wilson_high=None if wilson is None else wilson[1],
        n_total=n_total,
        n_positive=n_positive,
        n_unscorable=n_unscorable,
        confidence=confidence,
    )


def paired_bootstrap_diff(
    a: Sequence[float],
    b: Sequence[float],
    *,
    seed: int,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Interval:
    """Estimate mean(a - b) over paired samples, resampling pairs together.

    Sample i of `a` and sample i of `b` must come from the same item (same prompt or statement).
    Resampling the differences row by row is the same as resampling the pairs.
    """
    first = _as_finite_array(a, "a")
    second = _as_finite_array(b, "b")
    if first.shape != second.shape:
        raise ValueError(
            f"a has {first.size} samples and b has {second.size}; a paired difference needs "
            "one value in each for every item, in the same order."
        )
    return bootstrap_ci(first - second, seed=seed, n_resamples=n_resamples, confidence=confidence)
