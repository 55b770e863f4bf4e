"""Intervals for rates and operating points, and the BCa bootstrap: pneumoseg.metrics against
references written from the definitions (reference_metrics.py) and SciPy as a second opinion."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pneumoseg import metrics
from pneumoseg.errors import InvalidInputError
from reference_metrics import ref_clopper_pearson, ref_confusion, ref_wilson


def binormal(seed: int, n: int, prevalence: float = 0.3, separation: float = 1.2, decimals=None):
    """Labels and probability-like scores: positives' scores shifted up, squashed into (0, 1)."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < prevalence
    y[:2], y[2:4] = True, False  # both classes, at least two of each
    s = 1 / (1 + np.exp(-(rng.normal(size=n) + separation * y)))
    return y, (s.round(decimals) if decimals is not None else s)


# ------------------------------------------------------------------ proportions at a fixed threshold

COUNTS = [(0, 1), (1, 1), (0, 5), (5, 5), (1, 2), (3, 10), (9, 10), (17, 40), (1, 97), (96, 97), (50, 100)]


@pytest.mark.parametrize("k, n", COUNTS)
@pytest.mark.parametrize("level", [0.8, 0.95, 0.99])
def test_proportion_intervals_match_the_definitions(k, n, level):
    wilson = metrics.proportion_ci(k, n, level=level)
    exact = metrics.proportion_ci(k, n, level=level, method="clopper-pearson")
    assert (wilson.low, wilson.high) == pytest.approx(ref_wilson(k, n, level), abs=1e-12)
    assert (exact.low, exact.high) == pytest.approx(ref_clopper_pearson(k, n, level), abs=1e-9)
    for ci, method in ((wilson, "wilson"), (exact, "clopper-pearson")):
        assert (ci.estimate, ci.level, ci.method, ci.n_resamples) == (k / n, level, method, None)
        assert 0.0 <= ci.low <= ci.estimate <= ci.high <= 1.0
    # at 0 or n successes the interval reaches the end it cannot go past
    assert (wilson.low == exact.low == 0.0) == (k == 0) and (wilson.high == exact.high == 1.0) == (k == n)


@pytest.mark.parametrize("n", [1, 2, 7, 40, 333, 3205, 12000])
def test_proportion_intervals_agree_with_scipys_binomtest(n):
    stats = pytest.importorskip("scipy.stats")
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        for level in (0.9, 0.95, 0.999):
            test = stats.binomtest(k, n)
            for ours, theirs in (("wilson", "wilson"), ("clopper-pearson", "exact")):
                got = metrics.proportion_ci(k, n, level=level, method=ours)
                want = test.proportion_ci(confidence_level=level, method=theirs)
                # both are exact to rounding: scipy's beta quantiles, our continued fraction
                assert (got.low, got.high) == pytest.approx((want.low, want.high), rel=1e-9, abs=1e-12), (k, n, ours)


def test_clopper_pearson_covers_every_true_rate_and_wilson_about_the_level():
    # coverage computed exactly: the binomial probability of each k whose interval holds p
    from math import comb

    n, level = 30, 0.95
    exact = [metrics.proportion_ci(k, n, level=level, method="clopper-pearson") for k in range(n + 1)]
    wilson = [metrics.proportion_ci(k, n, level=level) for k in range(n + 1)]
    pmf = lambda k, p: comb(n, k) * p**k * (1 - p) ** (n - k)  # noqa: E731
    grid = np.linspace(0.01, 0.99, 99)
    cover_exact = [sum(pmf(k, p) for k, ci in enumerate(exact) if ci.low <= p <= ci.high) for p in grid]
    cover_wilson = [sum(pmf(k, p) for k, ci in enumerate(wilson) if ci.low <= p <= ci.high) for p in grid]
    assert min(cover_exact) >= level - 1e-12  # the exact interval's guarantee, at every p
    assert 0.93 < float(np.mean(cover_wilson)) < 0.96 and float(np.mean(cover_wilson)) < float(np.mean(cover_exact))


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.62, 0.9])
@pytest.mark.parametrize("method", ["wilson", "clopper-pearson"])
def test_rates_at_a_fixed_threshold_are_the_proportions_of_the_confusion_counts(threshold, method):
    y, s = binormal(0, 150)
    got = metrics.rates_at_threshold(y, s, threshold, level=0.9, method=method)
    (tn, fp), (fn, tp) = ref_confusion(y, s >= threshold).tolist()
    assert (got.tp, got.fp, got.tn, got.fn) == (tp, fp, tn, fn)
    for name, k, n in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp), ("ppv", tp, tp + fp),
                       ("npv", tn, tn + fn)):
        ci = getattr(got, name)
        assert ci == metrics.proportion_ci(k, n, level=0.9, method=method), name
        assert got.to_dict()[name] == {"estimate": ci.estimate, "low": ci.low, "high": ci.high, "successes": k,
                                       "trials": n}
    sk = pytest.importorskip("sklearn.metrics")
    assert sk.confusion_matrix(y, s >= threshold).ravel().tolist() == [got.tn, got.fp, got.fn, got.tp]
    assert got.sensitivity.estimate == pytest.approx(sk.recall_score(y, s >= threshold))
    assert got.ppv.estimate == pytest.approx(sk.precision_score(y, s >= threshold))


def test_rates_at_threshold_leave_an_empty_denominator_undefined():
    y, s = np.array([1, 0, 1, 0, 0]), np.array([0.9, 0.2, 0.4, 0.6, 0.1])
    nothing = metrics.rates_at_threshold(y, s, math.inf)  # nothing predicted positive: no PPV
    assert nothing.ppv is None and (nothing.tp, nothing.fp) == (0, 0) and nothing.sensitivity.estimate == 0.0
    report = nothing.to_dict()
    assert report["threshold"] is None and report["ppv"] is None and json.dumps(report, allow_nan=False)
    everything = metrics.rates_at_threshold(y, s, -math.inf)  # nothing predicted negative: no NPV
    assert everything.npv is None and everything.specificity.estimate == 0.0
    one_class = metrics.rates_at_threshold([0, 0, 0], [0.1, 0.7, 0.3], 0.5)  # no positives: no sensitivity
    assert one_class.sensitivity is None and one_class.specificity.estimate == pytest.approx(2 / 3)
    single = metrics.rates_at_threshold([1], [0.8], 0.5)  # n = 1
    assert (single.sensitivity.estimate, single.specificity, single.npv) == (1.0, None, None)
    assert single.sensitivity.high == 1.0 and 0 < single.sensitivity.low < 1
    equal = metrics.rates_at_threshold([1, 0, 1, 0], [0.4] * 4, 0.4)  # all scores equal: all positive
    assert (equal.tp, equal.fp, equal.npv) == (2, 2, None)


PROPORTION_ERRORS = {
    "no trials": (lambda: metrics.proportion_ci(0, 0), "trials is 0"),
    "more successes than trials": (lambda: metrics.proportion_ci(4, 3), "must not exceed"),
    "negative": (lambda: metrics.proportion_ci(-1, 3), "successes must be at least 0"),
    "float count": (lambda: metrics.proportion_ci(1.5, 3), "successes must be an integer"),
    "bool count": (lambda: metrics.proportion_ci(True, 3), "successes must be an integer"),
    "level 1": (lambda: metrics.proportion_ci(1, 3, level=1.0), r"level must be in \(0, 1\)"),
    "method": (lambda: metrics.proportion_ci(1, 3, method="wald"), "method must be one of"),
    "rates, NaN threshold": (lambda: metrics.rates_at_threshold([1, 0], [0.2, 0.3], float("nan")), "threshold"),
    "rates, method": (lambda: metrics.rates_at_threshold([1, 0], [0.2, 0.3], 0.5, method="exact"), "method must be"),
    "rates, empty": (lambda: metrics.rates_at_threshold([], [], 0.5), "empty"),
    "rates, lengths": (lambda: metrics.rates_at_threshold([1, 0], [0.3], 0.5), "labels has 2"),
}


@pytest.mark.parametrize("name", list(PROPORTION_ERRORS))
def test_proportion_interval_errors_are_named_value_errors(name):
    call, message = PROPORTION_ERRORS[name]
    with pytest.raises(InvalidInputError, match=message):
        call()
