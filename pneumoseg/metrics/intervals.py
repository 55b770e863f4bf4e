"""Confidence intervals: a seeded percentile bootstrap over samples (images) for any statistic, and
ROC AUC's and average precision's intervals built on it, with DeLong's analytic interval for AUC;
the Wilson and Clopper-Pearson intervals of a binomial proportion (a rate at a fixed threshold).

The bootstrap draws all resamples as one index matrix (in chunks of rows, to bound memory) and asks
the statistic for a whole chunk at once, so 2000 resamples of a few thousand images take a fraction
of a second; the same seed gives the same resamples, and so the same interval, on every machine.
The interval is the percentile one: the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the
resampled statistic (NumPy's default linear interpolation), or with ``method="bca"`` Efron's
bias-corrected and accelerated one (other quantiles of the same resampled values).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Callable, Optional

import numpy as np

from .._checks import check_choice, check_int, check_real
from ..errors import InvalidInputError
from ._inputs import _vector, labels_and_scores
from .classification import _require_both_classes, average_precision, roc_auc

__all__ = ["ConfidenceInterval", "bootstrap_ci", "roc_auc_ci", "average_precision_ci", "proportion_ci"]

#: index-matrix elements per chunk of resamples (16 MiB as int64)
_CHUNK_ELEMENTS = 1 << 21
#: more resamples than anyone needs for a 95% interval; bounds the work a typo can ask for
MAX_RESAMPLES = 1_000_000
#: the bootstrap intervals: percentile, or bias-corrected and accelerated
BOOTSTRAP_METHODS = ("percentile", "bca")
#: BCa's jackknife evaluates n^2 values; 50,000 samples are 2.5e9 (minutes), past that it is refused
MAX_JACKKNIFE_SAMPLES = 50_000


@dataclass(frozen=True)
class ConfidenceInterval:
    """A statistic's value on the sample and its interval at ``level`` (e.g. 0.95)."""

    estimate: float
    low: float
    high: float
    level: float
    method: str  # "bootstrap" (percentile), "bca" (BCa bootstrap), "delong", "wilson" or "clopper-pearson"
    n_resamples: Optional[int] = None  # bootstrap only
    n_undefined: int = 0  # bootstrap resamples where the statistic was undefined (NaN), left out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_level(level: Any) -> float:
    return check_real(level, "level", low=0.0, high=1.0, low_open=True, high_open=True)


def _check_resamples(n_resamples: Any) -> int:
    return check_int(n_resamples, "n_resamples", low=1, high=MAX_RESAMPLES)


def _resample_indices(rng: np.random.Generator, rows: int, n: int, strata: Optional[list[np.ndarray]]) -> np.ndarray:
    """A (rows, n) matrix of sample indices drawn with replacement: from all n samples, or within each
    stratum (its members' columns side by side, so each stratum keeps its size)."""
    if strata is None:
        return rng.integers(0, n, size=(rows, n))
    return np.concatenate([members[rng.integers(0, members.size, size=(rows, members.size))] for members in strata],
                          axis=1)


def _scalar_statistic(value: Any) -> float:
    arr = np.asarray(value)
    if arr.shape != () or arr.dtype.kind not in "biuf":
        raise InvalidInputError(f"statistic must return one number for 1-D samples, got {arr.dtype} of shape {arr.shape}")
    return float(arr)


def bootstrap_ci(statistic: Callable[..., Any], *arrays: Any, level: float = 0.95, n_resamples: int = 2000,
                 seed: int = 0, strata: Any = None, method: str = "percentile") -> ConfidenceInterval:
    """The bootstrap interval of ``statistic(*arrays)``, resampling samples (the arrays' common index,
    e.g. images) with replacement: the percentile interval, or with ``method="bca"`` the bias-corrected
    and accelerated one.

    ``arrays`` are 1-D and of one length n (lists, NumPy arrays or torch tensors; bool, integer or
    float). ``statistic`` must reduce the last axis: it is called once with the 1-D arrays (the
    estimate, one number) and then with (k, n) arrays of k resamples at a time, and must return k
    values, e.g. ``lambda dice: dice.mean(axis=-1)``. It must not depend on the samples' order. A NaN
    marks a resample where the statistic is undefined: those are left out and counted.

    ``strata`` (1-D, length n, e.g. the labels) resamples within each of its distinct values, so each
    group keeps its size: for sensitivity, specificity and AUC, which need both classes. ``seed`` fixes
    the resamples (NumPy's PCG64 generator).

    BCa (Efron 1987; Efron & Tibshirani 1993, 14.3) moves the percentile interval's two quantile
    levels by the bias correction ``z0 = Phi^-1(share of resampled values below the estimate, ties
    half)`` and the acceleration ``a = sum(d^3) / (6 sum(d^2)^1.5)``, ``d`` the jackknife values'
    mean minus each leave-one-out value: the level ``Phi(z0 + (z0 + z) / (1 - a (z0 + z)))`` for each
    normal quantile ``z`` of the two ends. It corrects a statistic whose resampled values are biased
    or skewed about the estimate (AP, a ratio near 0 or 1), with second-order accurate coverage where
    the percentile interval is first-order. Without ``strata`` this is
    ``scipy.stats.bootstrap(method="BCa", paired=True)``, which draws the same resamples for
    ``rng=np.random.default_rng(seed)`` when one chunk (about 2 million indices) holds them all. The jackknife
    calls the statistic on n leave-one-out samples of n - 1 (n^2 values in chunks), so BCa costs about
    one bootstrap of n resamples more, and is refused past ``MAX_JACKKNIFE_SAMPLES``. With ``strata``
    the jackknife still leaves out each sample in turn. BCa is an error where it is undefined: fewer
    than 2 samples, a leave-one-out value NaN (e.g. a sensitivity without its only positive), every
    resampled value on one side of the estimate (``z0`` infinite), or an acceleration so large that
    ``1 - a (z0 + z)`` is not positive (the adjusted level would fold back). Where every leave-one-out
    value is the same, ``a`` is 0 (nothing to correct;
    SciPy gives NaN there).
    """
    level = _check_level(level)
    n_resamples = _check_resamples(n_resamples)
    seed = check_int(seed, "seed", low=0)
    method = check_choice(method, "method", BOOTSTRAP_METHODS)
    if not callable(statistic):
        raise InvalidInputError(f"statistic must be callable, got {type(statistic).__name__}")
    if not arrays:
        raise InvalidInputError("bootstrap_ci needs at least one array to resample")
    samples = [_vector(a, f"arrays[{i}]") for i, a in enumerate(arrays)]
    n = samples[0].size
    for i, a in enumerate(samples[1:], 1):
        if a.size != n:
            raise InvalidInputError(f"arrays[0] has {n} values but arrays[{i}] has {a.size}")
    groups = None
    if strata is not None:
        keys = _vector(strata, "strata")
        if keys.size != n:
            raise InvalidInputError(f"strata has {keys.size} values but the arrays have {n}")
        _, inverse = np.unique(keys, return_inverse=True)
        groups = [np.flatnonzero(inverse == g) for g in range(int(inverse.max()) + 1)]
    if method == "bca" and not 2 <= n <= MAX_JACKKNIFE_SAMPLES:
        raise InvalidInputError(f"method='bca' needs 2 to {MAX_JACKKNIFE_SAMPLES:,} samples for its jackknife "
                                f"(n^2 values), got {n:,}: use method='percentile'")

    estimate = _scalar_statistic(statistic(*samples))
    if math.isnan(estimate):
        raise InvalidInputError("statistic is undefined (NaN) on the sample itself: no interval")
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // n)  # depends on n alone, so the draws do not depend on the machine
    values = np.empty(n_resamples, np.float64)
    for start in range(0, n_resamples, rows):
        k = min(rows, n_resamples - start)
        idx = _resample_indices(rng, k, n, groups)
        values[start:start + k] = _rows_statistic(statistic, samples, idx)
    defined = values[~np.isnan(values)]
    if defined.size == 0:
        raise InvalidInputError(f"statistic is undefined (NaN) on all {n_resamples} resamples: no interval "
                                "(pass strata= to keep each class in every resample)")
    alpha = 1.0 - level
    if method == "bca":
        levels = _bca_levels(defined, estimate, _jackknife(statistic, samples), alpha)
    else:
        levels = (alpha / 2, 1 - alpha / 2)
    low, high = np.quantile(defined, levels)
    return ConfidenceInterval(estimate, float(low), float(high), level, "bootstrap" if method == "percentile" else "bca",
                              n_resamples, n_resamples - int(defined.size))


def _rows_statistic(statistic: Callable[..., Any], samples: list[np.ndarray], idx: np.ndarray) -> np.ndarray:
    """The statistic of each row of the (k, m) index matrix ``idx`` into the samples, checked to be k values."""
    k, m = idx.shape
    got = np.asarray(statistic(*(a[idx] for a in samples)), dtype=np.float64)
    if got.shape != (k,):
        raise InvalidInputError(f"statistic must reduce the last axis: for {k} resamples of shape ({k}, {m}) it "
                                f"returned shape {got.shape}, not ({k},)")
    return got


def _jackknife(statistic: Callable[..., Any], samples: list[np.ndarray]) -> np.ndarray:
    """The statistic without sample i, for each i: rows of n - 1 indices, a chunk of rows per call."""
    n = samples[0].size
    keep = np.arange(n - 1)
    rows = max(1, _CHUNK_ELEMENTS // (n - 1))
    out = np.empty(n, np.float64)
    for start in range(0, n, rows):
        left_out = np.arange(start, min(n, start + rows))
        out[left_out] = _rows_statistic(statistic, samples, keep + (keep >= left_out[:, None]))
    undefined = np.flatnonzero(np.isnan(out))
    if undefined.size:
        raise InvalidInputError(f"method='bca' needs the statistic on every leave-one-out sample (its acceleration), "
                                f"but it is undefined (NaN) without sample {int(undefined[0])} ({undefined.size} such "
                                "samples): use method='percentile'")
    return out


def _bca_levels(values: np.ndarray, estimate: float, jackknife: np.ndarray, alpha: float) -> tuple[float, float]:
    """BCa's two quantile levels of the resampled ``values`` (see bootstrap_ci)."""
    normal = NormalDist()
    below = (np.count_nonzero(values < estimate) + np.count_nonzero(values <= estimate)) / (2 * values.size)
    if below in (0.0, 1.0):
        raise InvalidInputError(f"method='bca' is undefined here: all {values.size} resampled values lie "
                                f"{'above' if below == 0.0 else 'below'} the estimate {estimate!r} (infinite bias "
                                "correction); use method='percentile'")
    z0 = normal.inv_cdf(below)
    d = jackknife.mean() - jackknife
    spread = float(np.sum(d * d))
    a = float(np.sum(d ** 3)) / (6.0 * spread ** 1.5) if spread > 0 else 0.0
    levels = []
    for z in (normal.inv_cdf(alpha / 2), normal.inv_cdf(1 - alpha / 2)):
        shrink = 1.0 - a * (z0 + z)
        if shrink <= 0:
            raise InvalidInputError(f"method='bca' is undefined here: the acceleration {a:.3g} is too large for "
                                    "this level (1 - a (z0 + z) is not positive); use method='percentile'")
        levels.append(normal.cdf(z0 + (z0 + z) / shrink))
    return levels[0], levels[1]


# ------------------------------------------------------------------- ranking statistics, resampled


def _score_groups(s: np.ndarray) -> tuple[np.ndarray, int]:
    """Each score's tie group, numbered in increasing order of score, and the number of groups."""
    distinct, inverse = np.unique(s, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64), int(distinct.size)


def _group_counts(y: np.ndarray, group: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per resample (row), the positives and negatives in each score group: two (k, groups) int64
    matrices, counted with one bincount over row-offset group numbers (no per-row sort)."""
    y2 = y.reshape(-1, y.shape[-1])
    g2 = group.reshape(-1, group.shape[-1])
    k = g2.shape[0]
    keys = g2 + (np.arange(k, dtype=np.int64) * groups)[:, None]
    total = np.bincount(keys.ravel(), minlength=k * groups).reshape(k, groups)
    positive = np.bincount(keys[y2.astype(bool)], minlength=k * groups).reshape(k, groups)
    return positive, total - positive


def _auc_rows(y: np.ndarray, group: np.ndarray, groups: int) -> np.ndarray:
    """ROC AUC of each row (Mann-Whitney, ties half), from the score groups; NaN without both classes."""
    pos, neg = _group_counts(y, group, groups)
    neg_below = np.cumsum(neg, axis=1) - neg
    twice_u = np.einsum("kg,kg->k", pos, 2 * neg_below + neg)
    pairs = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = twice_u / (2.0 * pairs)
    return out.reshape(y.shape[:-1])


def _ap_rows(y: np.ndarray, group: np.ndarray, groups: int) -> np.ndarray:
    """Average precision of each row (step-wise, as ``average_precision``); NaN without positives."""
    pos, neg = _group_counts(y, group, groups)
    pos, neg = pos[:, ::-1], neg[:, ::-1]  # decreasing score: thresholds from the top
    tp = np.cumsum(pos, axis=1)
    predicted = tp + np.cumsum(neg, axis=1)
    precision = np.divide(tp, predicted, out=np.zeros(tp.shape), where=predicted > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.einsum("kg,kg->k", pos, precision) / pos.sum(1)
    return out.reshape(y.shape[:-1])


def _delong(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """AUC and DeLong's variance by the midrank formulation (Sun & Xu 2014): the structural
    components of each positive and negative come from three midrankings, in O(n log n)."""
    pos, neg = s[y], s[~y]
    m, n = pos.size, neg.size
    ranks_all = _midranks(np.concatenate([pos, neg]))
    # V10: per positive, the share of negatives below it (ties half); V01: per negative, of positives above
    v10 = (ranks_all[:m] - _midranks(pos)) / n
    v01 = 1.0 - (ranks_all[m:] - _midranks(neg)) / m
    auc = float(v10.mean())
    return auc, float(v10.var(ddof=1) / m + v01.var(ddof=1) / n)


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, each tie group given the mean of the ranks it spans."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], x.size]
    ranks = np.empty(x.size, np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def roc_auc_ci(labels: Any, scores: Any, *, level: float = 0.95, method: str = "delong", n_resamples: int = 2000,
               seed: int = 0) -> ConfidenceInterval:
    """ROC AUC and its interval at ``level``.

    ``method="delong"``: DeLong's asymptotic normal interval, AUC +- z * SE with the variance from
    the structural components (DeLong, DeLong & Clarke-Pearson 1988, computed as Sun & Xu 2014),
    clipped to [0, 1]; it needs at least two positives and two negatives, and is the single point
    [1, 1] for perfectly separated classes (variance 0). ``method="bootstrap"``: the percentile
    bootstrap with ``n_resamples`` resamples drawn within each class (as pROC's stratified bootstrap),
    seeded by ``seed``; ``method="bca"``: the BCa interval of the same resamples (see
    :func:`bootstrap_ci`; with one positive or one negative its jackknife is undefined)."""
    level = _check_level(level)
    method = check_choice(method, "method", ("delong", "bootstrap", "bca"))
    y, s = labels_and_scores(labels, scores)
    positives, negatives = _require_both_classes(y, "roc_auc_ci")
    if method != "delong":
        group, groups = _score_groups(s)
        ci = bootstrap_ci(lambda yy, gg: _auc_rows(yy, gg, groups), y, group, level=level, n_resamples=n_resamples,
                          seed=seed, strata=y, method="percentile" if method == "bootstrap" else "bca")
        return ConfidenceInterval(roc_auc(y, s), ci.low, ci.high, level, ci.method, ci.n_resamples, ci.n_undefined)
    if min(positives, negatives) < 2:
        raise InvalidInputError(f"roc_auc_ci(method='delong') needs at least 2 positives and 2 negatives (the "
                                f"variance of each class's components), got {positives} and {negatives}")
    _, variance = _delong(y, s)
    auc = roc_auc(y, s)  # exact in integers; the midrank mean agrees to rounding
    half = NormalDist().inv_cdf(0.5 + level / 2) * math.sqrt(max(variance, 0.0))
    return ConfidenceInterval(auc, max(0.0, auc - half), min(1.0, auc + half), level, "delong")


def average_precision_ci(labels: Any, scores: Any, *, level: float = 0.95, n_resamples: int = 2000,
                         seed: int = 0, method: str = "percentile") -> ConfidenceInterval:
    """Average precision and its bootstrap interval (``method="percentile"`` or ``"bca"``, see
    :func:`bootstrap_ci`), resampling within each class (AP depends on the share of positives, which
    resampling within classes keeps). AP's resampled values are skewed and biased
    (a resample repeats images; on binormal data the resamples' mean AP was 0.003-0.006 above the
    estimate), which BCa corrects for."""
    level = _check_level(level)
    method = check_choice(method, "method", BOOTSTRAP_METHODS)
    y, s = labels_and_scores(labels, scores)
    _require_both_classes(y, "average_precision_ci")
    group, groups = _score_groups(s)
    ci = bootstrap_ci(lambda yy, gg: _ap_rows(yy, gg, groups), y, group, level=level, n_resamples=n_resamples,
                      seed=seed, strata=y, method=method)
    return ConfidenceInterval(average_precision(y, s), ci.low, ci.high, level, ci.method, ci.n_resamples,
                              ci.n_undefined)


# ------------------------------------------------------------------------------ binomial proportions

#: the proportion intervals' methods
PROPORTION_METHODS = ("wilson", "clopper-pearson")


def _check_count(value: Any, name: str) -> int:
    return check_int(value, name, low=0)


def proportion_ci(successes: int, trials: int, *, level: float = 0.95, method: str = "wilson") -> ConfidenceInterval:
    """The proportion ``successes / trials`` and its two-sided interval at ``level``, for a rate at a
    threshold fixed before looking at these samples (sensitivity: true positives of the positives).

    ``method="wilson"``: Wilson's score interval (Wilson 1927), the inversion of the normal score
    test; it stays inside [0, 1] and keeps near its nominal coverage down to a handful of trials,
    where the Wald interval ``p +- z sqrt(p(1-p)/n)`` collapses to a point at 0 or n successes.
    ``method="clopper-pearson"``: the exact interval (Clopper & Pearson 1934), the inversion of the
    two one-sided binomial tests at ``(1 - level) / 2`` each: coverage at least ``level`` for every
    true rate, so wider. As ``scipy.stats.binomtest(k, n).proportion_ci(level, method)``.

    ``trials`` 0 is an error: the rate is undefined (no positives for a sensitivity, nothing predicted
    positive for a PPV), and no interval could say otherwise.
    """
    level = _check_level(level)
    method = check_choice(method, "method", PROPORTION_METHODS)
    k, n = _check_count(successes, "successes"), _check_count(trials, "trials")
    if n == 0:
        raise InvalidInputError("trials is 0: the proportion is undefined (0 / 0), so it has no interval")
    if k > n:
        raise InvalidInputError(f"successes ({k}) must not exceed trials ({n})")
    alpha = 1.0 - level
    if method == "wilson":
        z = NormalDist().inv_cdf(1.0 - alpha / 2)
        z2 = z * z
        center = (k + z2 / 2) / (n + z2)
        half = z / (n + z2) * math.sqrt(k * (n - k) / n + z2 / 4)
        # the formula's ends are inside [0, 1]; clipping takes off the last ulp of rounding
        low, high = max(0.0, center - half), min(1.0, center + half)
        if k == 0:
            low = 0.0
        if k == n:
            high = 1.0
    else:
        # P(X >= k | p_low) = alpha/2 and P(X <= k | p_high) = alpha/2, through the beta quantiles
        low = 0.0 if k == 0 else _beta_quantile(alpha / 2, k, n - k + 1)
        high = 1.0 if k == n else _beta_quantile(1 - alpha / 2, k + 1, n - k)
    return ConfidenceInterval(k / n, low, high, level, method)


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (modified Lentz;
    Numerical Recipes 6.4), taken on the side of x where it converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 100_000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)), -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return math.exp(log_front) * f / a


def _beta_quantile(q: float, a: float, b: float) -> float:
    """x with I_x(a, b) = q, by bisection (I_x rises with x): slow but exact to the last bits, and
    called a few times per report."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
