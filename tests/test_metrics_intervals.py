"""Intervals for rates and operating points, and the BCa bootstrap: pneumoseg.metrics against
references written from the definitions (reference_metrics.py) and SciPy as a second opinion."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pneumoseg import metrics
from pneumoseg.errors import InvalidInputError
from factories import binormal
from reference_metrics import (ref_auc, ref_average_precision, ref_bca_levels, ref_clopper_pearson, ref_confusion,
                               ref_operating_point, ref_wilson)


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


# ------------------------------------------------------------- a threshold chosen on the same images

SMALL_CASES = {
    "continuous": lambda: binormal(0, 60),
    "ties": lambda: binormal(1, 70, decimals=1),
    "integers": lambda: (np.r_[np.ones(6, bool), np.zeros(9, bool)], np.r_[5, 9, 3, 7, 7, 2, 1, 4, 7, 0, 2, 3, 8, 1, 0]),
    "separated": lambda: (np.r_[np.ones(4, bool), np.zeros(5, bool)], np.r_[0.9, 0.8, 0.95, 0.7, 0.1, 0.2, 0.3, 0.05, 0.6]),
    "all equal": lambda: (np.r_[True, False, True, False, False], np.full(5, 0.4)),
    "one positive": lambda: (np.r_[True, np.zeros(8, bool)], np.linspace(0.1, 0.9, 9)),
}


def _stratified_resamples(y, s, n_resamples, seed):
    """The (labels, scores) rows bootstrap_ci draws within each class for this seed, recorded through a
    statistic that keeps them (operating_point_ci promises the same draws)."""
    seen: list = []

    def record(yy, ss):
        if yy.ndim == 2:
            seen.append((yy.copy(), ss.copy()))
        return np.zeros(yy.shape[:-1])

    metrics.bootstrap_ci(record, y, s, n_resamples=n_resamples, seed=seed, strata=y)
    return np.concatenate([a for a, _ in seen]), np.concatenate([b for _, b in seen])


@pytest.mark.parametrize("case", list(SMALL_CASES))
@pytest.mark.parametrize("target, value", [("sensitivity", 0.9), ("sensitivity", 1.0), ("specificity", 0.8),
                                           ("specificity", 0.97)])
def test_operating_point_interval_rechooses_the_threshold_in_every_resample(case, target, value):
    y, s = SMALL_CASES[case]()
    got = metrics.operating_point_ci(y, s, level=0.9, n_resamples=150, seed=5, **{target: value})
    # the reference: the same resamples, the operating point chosen in each by the loops of the definition
    ys, ss = _stratified_resamples(y, s, 150, 5)
    chosen = [ref_operating_point(a, b, target, value) for a, b in zip(ys, ss)]
    other = "specificity" if target == "sensitivity" else "sensitivity"
    thresholds = np.array([float(c["threshold"]) for c in chosen])
    rates = np.array([c[other] for c in chosen])
    assert got.point == metrics.operating_point(y, s, **{target: value})
    assert got.other_rate == other and got.rate.estimate == getattr(got.point, other)
    assert (got.rate.low, got.rate.high) == pytest.approx(tuple(np.quantile(rates, [0.05, 0.95])), abs=1e-12)
    assert (got.threshold.low, got.threshold.high) == tuple(np.quantile(thresholds, [0.05, 0.95], method="inverted_cdf"))
    assert got.n_infinite == int(np.isinf(thresholds).sum())
    assert (got.rate.level, got.rate.n_resamples, got.seed) == (0.9, 150, 5)
    report = got.to_dict()
    assert json.dumps(report, allow_nan=False) and report["target"] == target and report[other]["low"] == got.rate.low
    assert report["threshold"]["high"] == (None if math.isinf(got.threshold.high) else got.threshold.high)


def test_operating_point_interval_is_seeded_and_its_edges_are_defined():
    y, s = binormal(3, 300)
    a = metrics.operating_point_ci(y, s, sensitivity=0.9, n_resamples=300, seed=1)
    assert metrics.operating_point_ci(y, s, sensitivity=0.9, n_resamples=300, seed=1) == a
    assert metrics.operating_point_ci(y, s, sensitivity=0.9, n_resamples=300, seed=2) != a
    assert a.threshold.low <= a.threshold.estimate <= a.threshold.high and a.rate.low < a.rate.estimate < a.rate.high
    # all scores equal: a sensitivity target takes everything (specificity 0), a specificity target nothing
    y, s = SMALL_CASES["all equal"]()
    sens = metrics.operating_point_ci(y, s, sensitivity=0.9, n_resamples=50)
    assert (sens.threshold.low, sens.threshold.high, sens.rate.low, sens.rate.high) == (0.4, 0.4, 0.0, 0.0)
    spec = metrics.operating_point_ci(y, s, specificity=0.9, n_resamples=50)
    assert math.isinf(spec.threshold.low) and spec.n_infinite == 50 and (spec.rate.low, spec.rate.high) == (0.0, 0.0)
    assert spec.to_dict()["threshold"] == {"estimate": None, "low": None, "high": None}
    for labels, message in (([1, 1, 1], "no negatives"), ([0], "no positives")):  # one class, n = 1
        with pytest.raises(InvalidInputError, match=message):
            metrics.operating_point_ci(labels, [0.1] * len(labels), sensitivity=0.9)
    for kwargs, message in (({}, "exactly one target"), ({"sensitivity": 0.0}, "sensitivity must be in"),
                            ({"sensitivity": 0.9, "n_resamples": 0}, "n_resamples must be at least 1"),
                            ({"sensitivity": 0.9, "level": 1.5}, "level must be in"),
                            ({"specificity": 0.9, "seed": -1}, "seed must be at least 0")):
        with pytest.raises(InvalidInputError, match=message):
            metrics.operating_point_ci([1, 0, 1, 0], [0.3, 0.1, 0.8, 0.5], **kwargs)


def test_the_rechosen_interval_covers_the_population_rate_where_a_fixed_threshold_one_does_not():
    # binormal population: positives N(d, 1), negatives N(0, 1). Its threshold reaching sensitivity 0.9
    # is d + z_0.1 and the specificity there Phi(d + z_0.1). Samples of 60 positives and 240 negatives.
    from statistics import NormalDist

    d, normal = 1.5, NormalDist()
    true_specificity = normal.cdf(d + normal.inv_cdf(0.1))
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(60, bool), np.zeros(240, bool)]
    rechosen = fixed = 0
    rounds = 300
    for r in range(rounds):
        s = np.r_[rng.normal(d, 1, 60), rng.normal(0, 1, 240)]
        ci = metrics.operating_point_ci(y, s, sensitivity=0.9, n_resamples=400, seed=r)
        rechosen += ci.rate.low <= true_specificity <= ci.rate.high
        naive = metrics.rates_at_threshold(y, s, ci.point.threshold).specificity  # the threshold taken as given
        fixed += naive.low <= true_specificity <= naive.high
    # measured: 0.93 re-chosen, 0.50 with the threshold taken as fixed (the threshold's own noise is missed)
    assert rechosen / rounds >= 0.88 and fixed / rounds <= 0.7, (rechosen, fixed)


# ------------------------------------------------------------------------------------------ BCa


def _variance(v, axis=-1):
    return v.var(axis=axis)


def _ratio_of_means(a, b, axis=-1):
    return a.mean(axis=axis) / b.mean(axis=axis)


def _rank_auc(y, s, axis=-1):
    """Mann-Whitney AUC from average ranks (scipy.stats.rankdata), row by row."""
    from scipy.stats import rankdata

    y = y.astype(bool)
    ranks = rankdata(s, axis=axis)
    positives = y.sum(axis=axis)
    negatives = y.shape[axis] - positives
    return ((ranks * y).sum(axis=axis) - positives * (positives + 1) / 2) / (positives * negatives)


@pytest.mark.parametrize("name", ["mean", "variance of a skewed sample", "ratio of paired means", "AUC, unstratified"])
def test_bca_is_scipys_bca_on_the_same_resamples(name):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    x, w = rng.exponential(size=150), rng.exponential(size=150) + 0.5
    y, s = binormal(8, 150, prevalence=0.4)
    data, statistic = {
        "mean": ((x,), lambda v, axis=-1: v.mean(axis=axis)),
        "variance of a skewed sample": ((x,), _variance),
        "ratio of paired means": ((x, w), _ratio_of_means),
        "AUC, unstratified": ((y.astype(np.int64), s), _rank_auc),
    }[name]
    for level in (0.9, 0.95):
        got = metrics.bootstrap_ci(statistic, *data, level=level, n_resamples=1500, seed=6, method="bca")
        want = stats.bootstrap(data, statistic, paired=len(data) > 1, vectorized=True, n_resamples=1500,
                               confidence_level=level, method="BCa", rng=np.random.default_rng(6))
        # one chunk holds all 1500 resamples of 150, drawn as scipy draws them (Generator.integers(0, n,
        # (B, n))), so the resampled values are the same numbers; only the normal quantile functions
        # differ (statistics.NormalDist against scipy.special.ndtri), by rounding
        lo, hi = want.confidence_interval
        assert (got.low, got.high) == pytest.approx((lo, hi), rel=1e-10), name
        assert got.method == "bca" and got.estimate == pytest.approx(float(statistic(*data)))
        percentile = metrics.bootstrap_ci(statistic, *data, level=level, n_resamples=1500, seed=6)
        assert percentile.method == "bootstrap" and (percentile.low, percentile.high) != (got.low, got.high)


def test_bca_agrees_with_scipy_within_resampling_noise_when_the_draws_differ():
    stats = pytest.importorskip("scipy.stats")
    x = np.random.default_rng(2).exponential(size=3000)
    # 3000 samples take 699 resamples per chunk here, so the draws are no longer scipy's
    got = metrics.bootstrap_ci(_variance, x, n_resamples=2000, seed=1, method="bca")
    want = stats.bootstrap((x,), _variance, vectorized=True, n_resamples=2000, method="BCa",
                           rng=np.random.default_rng(1)).confidence_interval
    # Monte Carlo error of a 2.5% quantile of 2000 resamples: sqrt(.025 * .975 / 2000) / phi(1.96) = 0.06
    # standard errors of the statistic; 0.3 is five of those
    se = float(np.std([_variance(x[np.random.default_rng(k).integers(0, x.size, x.size)]) for k in range(200)]))
    assert abs(got.low - want.low) < 0.3 * se and abs(got.high - want.high) < 0.3 * se, (got, want, se)


def _jackknife(statistic, *arrays):
    n = len(arrays[0])
    return [statistic(*(np.delete(a, i) for a in arrays)) for i in range(n)]


@pytest.mark.parametrize("which", ["AUC", "AP"])
def test_stratified_bca_of_auc_and_ap_is_the_definition_on_the_same_resamples(which):
    y, s = binormal(9, 70, decimals=2)
    ys, ss = _stratified_resamples(y, s, 400, 2)
    ref = ref_auc if which == "AUC" else ref_average_precision
    values = [ref(a, b) for a, b in zip(ys, ss)]
    levels = ref_bca_levels(values, ref(y, s), _jackknife(ref, y, s), 0.95)
    if which == "AUC":
        got = metrics.roc_auc_ci(y, s, method="bca", n_resamples=400, seed=2)
    else:
        got = metrics.average_precision_ci(y, s, method="bca", n_resamples=400, seed=2)
    assert (got.low, got.high) == pytest.approx(tuple(np.quantile(values, levels)), abs=1e-12)
    assert got.method == "bca" and got.estimate == pytest.approx(ref(y, s)) and got.n_resamples == 400


def test_bca_edges_are_defined_or_refused_with_the_reason(monkeypatch):
    mean = lambda v: v.mean(axis=-1)  # noqa: E731
    # a statistic that does not move: every resample and leave-one-out value equal, acceleration 0
    flat = metrics.bootstrap_ci(mean, [2.0, 2.0, 2.0], method="bca", n_resamples=100)
    assert (flat.low, flat.high) == (2.0, 2.0)
    # all scores equal: AUC 0.5 in every resample and jackknife
    assert metrics.roc_auc_ci([1, 0, 1, 0, 0], [0.4] * 5, method="bca", n_resamples=100).low == 0.5
    refusals = [
        (lambda: metrics.bootstrap_ci(mean, [1.0], method="bca"), "needs 2 to"),
        (lambda: metrics.bootstrap_ci(lambda v: v.mean(-1) + 10 * (v.ndim == 2), [1.0, 2.0, 3.0], method="bca"),
         "all 2000 resampled values lie above the estimate"),
        # without its only positive the sensitivity is 0 / 0: no jackknife, no acceleration
        (lambda: metrics.bootstrap_ci(lambda t, p: (t & p).sum(-1) / t.sum(-1), [1, 0, 0, 0], [1, 1, 0, 0],
                                      strata=[1, 0, 0, 0], method="bca"), "undefined .NaN. without sample 0"),
        (lambda: metrics.roc_auc_ci([1, 0, 0, 0], [0.1, 0.2, 0.3, 0.4], method="bca"), "leave-one-out"),
        (lambda: metrics.average_precision_ci([1, 0, 0], [0.9, 0.2, 0.3], method="bca"), "leave-one-out"),
        # one outlier in 20: a = 0.154, so at z = 7 (level 1 - 1e-12) 1 - a (z0 + z) is negative
        (lambda: metrics.bootstrap_ci(mean, np.r_[np.zeros(19), 1.0], level=1 - 1e-12, method="bca"),
         "acceleration 0.154 is too large"),
        (lambda: metrics.bootstrap_ci(mean, [1.0, 2.0], method="BCa"), "method must be one of"),
        (lambda: metrics.average_precision_ci([1, 0], [0.9, 0.2], method="delong"), "method must be one of"),
    ]
    for call, message in refusals:
        with pytest.raises(InvalidInputError, match=message):
            with np.errstate(invalid="ignore", divide="ignore"):
                call()
    from pneumoseg.metrics import intervals

    monkeypatch.setattr(intervals, "MAX_JACKKNIFE_SAMPLES", 5)
    with pytest.raises(InvalidInputError, match="needs 2 to 5 samples"):
        metrics.bootstrap_ci(mean, np.arange(6.0), method="bca")
    assert metrics.bootstrap_ci(mean, np.arange(6.0)).method == "bootstrap"  # the percentile one has no such bound
