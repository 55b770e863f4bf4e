"""Clinical operating points: the score threshold at which a classifier reaches a target sensitivity
(triage runs at high sensitivity) or a target specificity, and what it gives there.

Inputs as the other classification metrics take them (``labels`` 0/1, ``scores`` any finite numbers,
lists, NumPy arrays or torch tensors). A score is a positive prediction at threshold ``t`` when
``score >= t``, as ``roc_curve``'s thresholds.

Two kinds of interval, for two questions. At a threshold fixed in advance (one a model directory
ships, or ``--threshold``), each rate is a binomial proportion of a fixed group of images:
:func:`rates_at_threshold` gives Wilson or Clopper-Pearson intervals. At a threshold chosen on the
same images to reach a target, the choice is part of what varies from sample to sample:
:func:`operating_point_ci` bootstraps the whole procedure, choosing the threshold again in every
resample.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from .._checks import check_choice, check_int, check_real
from ..errors import InvalidInputError
from ._inputs import labels_and_scores
from .classification import _counts_at_thresholds, _require_both_classes
from .intervals import (_CHUNK_ELEMENTS, PROPORTION_METHODS, ConfidenceInterval, _check_level, _check_resamples,
                        _resample_indices, proportion_ci)

__all__ = ["OperatingPoint", "operating_point", "RatesAtThreshold", "rates_at_threshold", "OperatingPointInterval",
           "operating_point_ci"]


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold and the confusion counts of ``score >= threshold`` there.

    ``threshold`` is one of the scores (``inf`` when only predicting no image positive reaches a
    specificity target); ``ppv`` is None when nothing is predicted positive, ``npv`` when nothing is
    predicted negative."""

    target: str  # "sensitivity" or "specificity"
    target_value: float
    threshold: float
    sensitivity: float
    specificity: float
    ppv: Optional[float]
    npv: Optional[float]
    tp: int
    fp: int
    tn: int
    fn: int

    def to_dict(self) -> dict[str, Any]:
        """The fields for JSON: an infinite threshold (nothing positive) becomes None."""
        out = asdict(self)
        if math.isinf(self.threshold):
            out["threshold"] = None
        return out


def _target(sensitivity: Any, specificity: Any) -> tuple[str, float]:
    if (sensitivity is None) == (specificity is None):
        raise InvalidInputError("operating_point takes exactly one target: sensitivity=... or specificity=..."
                                + (" (both were given)" if sensitivity is not None else ""))
    name, value = ("sensitivity", sensitivity) if sensitivity is not None else ("specificity", specificity)
    # 0 would be reached by predicting nothing (or everything): no operating point to speak of
    return name, check_real(value, name, low=0.0, low_open=True, high=1.0)


def operating_point(labels: Any, scores: Any, *, sensitivity: Optional[float] = None,
                    specificity: Optional[float] = None) -> OperatingPoint:
    """The operating point that reaches one target, ``sensitivity`` or ``specificity`` in (0, 1].

    The candidate thresholds are the distinct scores (and ``inf``, nothing positive). For a
    sensitivity target the threshold is the highest one whose sensitivity reaches the target: the
    best specificity at that sensitivity. For a specificity target it is the lowest one whose
    specificity still reaches the target (the highest threshold would always be ``inf``): the best
    sensitivity at that specificity. Tied scores move together (a threshold cannot split a tie), so
    the value reached may exceed the target. "Reaches" compares the reported float ratio with the
    target, so 9 of 10 positives reach ``sensitivity=0.9``. Labels need both classes.
    """
    target, value = _target(sensitivity, specificity)
    y, s = labels_and_scores(labels, scores)
    positives, negatives = _require_both_classes(y, "operating_point")
    tps, fps, thresholds = _counts_at_thresholds(y, s)  # thresholds decreasing
    if target == "sensitivity":
        # sensitivity grows as the threshold falls and reaches 1 at the lowest score: always reached
        k = int(np.argmax(tps / positives >= value))
        threshold: float = thresholds[k].item()
        tp, fp = int(tps[k]), int(fps[k])
    else:
        reached = np.flatnonzero((negatives - fps) / negatives >= value)  # a prefix: specificity falls
        if reached.size:
            k = int(reached[-1])
            threshold, tp, fp = thresholds[k].item(), int(tps[k]), int(fps[k])
        else:  # even the top score takes a negative: only predicting nothing positive reaches it
            threshold, tp, fp = math.inf, 0, 0
    fn, tn = positives - tp, negatives - fp
    return OperatingPoint(
        target=target, target_value=value, threshold=threshold,
        sensitivity=tp / positives, specificity=tn / negatives,
        ppv=tp / (tp + fp) if tp + fp else None, npv=tn / (tn + fn) if tn + fn else None,
        tp=tp, fp=fp, tn=tn, fn=fn,
    )


@dataclass(frozen=True)
class RatesAtThreshold:
    """The confusion counts of ``score >= threshold`` at a fixed threshold and each rate's interval.

    A rate is None where it is undefined, its denominator empty: ``sensitivity`` without positives,
    ``specificity`` without negatives, ``ppv`` when nothing is predicted positive, ``npv`` when
    nothing is predicted negative."""

    threshold: float
    level: float
    method: str  # "wilson" or "clopper-pearson"
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: Optional[ConfidenceInterval]  # tp of tp + fn
    specificity: Optional[ConfidenceInterval]  # tn of tn + fp
    ppv: Optional[ConfidenceInterval]  # tp of tp + fp
    npv: Optional[ConfidenceInterval]  # tn of tn + fn

    def to_dict(self) -> dict[str, Any]:
        """For JSON: each rate as ``{estimate, low, high, successes, trials}`` or None; an infinite
        threshold becomes None (``inf``: nothing positive, ``-inf``: everything; the counts tell which)."""
        out: dict[str, Any] = {"threshold": None if math.isinf(self.threshold) else self.threshold,
                               "level": self.level, "method": self.method,
                               "tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn}
        fractions = {"sensitivity": (self.tp, self.tp + self.fn), "specificity": (self.tn, self.tn + self.fp),
                     "ppv": (self.tp, self.tp + self.fp), "npv": (self.tn, self.tn + self.fn)}
        for name, (k, n) in fractions.items():
            ci = getattr(self, name)
            out[name] = None if ci is None else {"estimate": ci.estimate, "low": ci.low, "high": ci.high,
                                                 "successes": k, "trials": n}
        return out


def rates_at_threshold(labels: Any, scores: Any, threshold: float, *, level: float = 0.95,
                       method: str = "wilson") -> RatesAtThreshold:
    """Sensitivity, specificity, PPV and NPV of ``score >= threshold``, each with its binomial
    interval at ``level`` (:func:`pneumoseg.metrics.proportion_ci`: ``"wilson"`` or the exact
    ``"clopper-pearson"``).

    The threshold must have been fixed without these images (shipped with the model, chosen on a
    tuning set): the intervals treat it as a constant, so they are optimistic for a threshold chosen
    on the same images (use :func:`operating_point_ci` there). Sensitivity and specificity are
    proportions of the truth's classes; PPV and NPV of the predicted classes, given how many were
    predicted, and they depend on the prevalence of these images. ``threshold`` may be ``inf``
    (nothing positive) or ``-inf`` (everything); a rate whose denominator is empty is None, never 0
    or NaN (see :class:`RatesAtThreshold`). Labels of one class are allowed.
    """
    t = check_real(threshold, "threshold", finite=False)
    level = _check_level(level)
    method = check_choice(method, "method", PROPORTION_METHODS)
    y, s = labels_and_scores(labels, scores)
    predicted = s >= t
    tp = int(np.count_nonzero(predicted & y))
    fp = int(np.count_nonzero(predicted & ~y))
    fn = int(np.count_nonzero(y)) - tp
    tn = y.size - tp - fp - fn

    def ci(k: int, n: int) -> Optional[ConfidenceInterval]:
        return proportion_ci(k, n, level=level, method=method) if n else None

    return RatesAtThreshold(t, level, method, tp, fp, tn, fn,
                            sensitivity=ci(tp, tp + fn), specificity=ci(tn, tn + fp),
                            ppv=ci(tp, tp + fp), npv=ci(tn, tn + fn))


# ------------------------------------------------------------- a threshold chosen on the same images


@dataclass(frozen=True)
class OperatingPointInterval:
    """An operating point (on all the images) and the bootstrap intervals of the procedure that chose
    it: of its threshold, and of the other rate reached there (``other_rate`` names it: specificity
    for a sensitivity target, sensitivity for a specificity target).

    ``threshold`` may hold ``inf`` (only predicting nothing positive reached a specificity target in
    that resample); ``n_infinite`` counts those resamples."""

    point: OperatingPoint
    threshold: ConfidenceInterval
    other_rate: str  # "specificity" or "sensitivity"
    rate: ConfidenceInterval
    seed: int
    n_infinite: int = 0

    def to_dict(self) -> dict[str, Any]:
        """For JSON: the target, the threshold's and the other rate's ``{estimate, low, high}`` (an
        infinite threshold end becomes None: nothing positive), the level, method and resamples."""

        def ends(ci: ConfidenceInterval) -> dict[str, Optional[float]]:
            return {k: None if math.isinf(v) else v for k, v in (("estimate", ci.estimate), ("low", ci.low),
                                                                  ("high", ci.high))}

        return {"target": self.point.target, "target_value": self.point.target_value,
                "threshold": ends(self.threshold), "other_rate": self.other_rate, self.other_rate: ends(self.rate),
                "level": self.rate.level, "method": OPERATING_POINT_CI_METHOD, "n_resamples": self.rate.n_resamples,
                "seed": self.seed, "resamples_nothing_positive": self.n_infinite}


#: what :func:`operating_point_ci` does, in words for reports
OPERATING_POINT_CI_METHOD = ("percentile bootstrap within each truth class, the threshold chosen again in every "
                             "resample")


def _first_count_reaching(total: int, value: float) -> int:
    """The fewest positives c whose share c / total reaches ``value``, compared as operating_point
    compares (the float ratio), so the resamples pick thresholds exactly as it does."""
    return int(np.argmax(np.arange(total + 1) / total >= value))


def _most_false_positives(total: int, value: float) -> int:
    """The most negatives f above the threshold with specificity (total - f) / total still reaching
    ``value`` (at most total - 1, since value > 0)."""
    return int(np.flatnonzero((total - np.arange(total + 1)) / total >= value)[-1])


def operating_point_ci(labels: Any, scores: Any, *, sensitivity: Optional[float] = None,
                       specificity: Optional[float] = None, level: float = 0.95, n_resamples: int = 2000,
                       seed: int = 0) -> OperatingPointInterval:
    """The operating point reaching one target (as :func:`operating_point`) and the bootstrap
    intervals of its threshold and of the other rate, the threshold chosen again in each resample.

    Why this is the honest interval: the threshold is picked on these images to reach the target, so
    it is a statistic of the sample, and the other rate read at it inherits the picking's noise. A
    binomial interval at the picked threshold (:func:`rates_at_threshold`) takes the threshold as
    given and sees only the counting noise at it, so it is too narrow; for the target rate itself it
    says nothing, since the target is reached by construction. Choosing the threshold again in every
    resample lets it move as it would on another sample of the same population, so the other rate's
    interval carries both noises: it is what the procedure "choose the threshold reaching the target
    on such a set of images, read the other rate there" gives from sample to sample. (For the rate a
    threshold fixed today will give on new images, fix it and evaluate it on images it was not chosen
    on, with :func:`rates_at_threshold`.)

    Resamples are drawn within each class (as ``bootstrap_ci(..., strata=labels)``, the same draws
    for the same seed), so each keeps the positives and negatives the target needs, and the same
    ``seed`` gives the same intervals. Both are percentile intervals; the threshold's ends are
    resampled thresholds themselves (NumPy's ``inverted_cdf`` quantile: no value between two scores,
    and ``inf`` kept whole), the other rate's ends interpolate as ``bootstrap_ci``'s. BCa is not
    offered: the chosen threshold is an order statistic, whose jackknife (BCa's acceleration) is
    not a consistent estimate. Labels need both classes; equal scores give the one threshold there
    is (a sensitivity target: everything positive; a specificity target: ``inf``).
    """
    target, value = _target(sensitivity, specificity)
    level = _check_level(level)
    n_resamples = _check_resamples(n_resamples)
    seed = check_int(seed, "seed", low=0)
    y, s = labels_and_scores(labels, scores)
    positives, negatives = _require_both_classes(y, "operating_point_ci")
    point = operating_point(y, s, **{target: value})
    n = y.size
    # the column layout of _resample_indices with these strata: the negatives' block, then the positives'
    strata = [np.flatnonzero(~y), np.flatnonzero(y)]
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // n)  # as bootstrap_ci: the draws depend on n alone, not the machine
    thresholds = np.empty(n_resamples, np.float64)
    rates = np.empty(n_resamples, np.float64)
    if target == "sensitivity":
        kth = positives - _first_count_reaching(positives, value)  # the c-th highest positive, counted from below
    else:
        kth = negatives - 1 - _most_false_positives(negatives, value)  # the (f + 1)-th highest negative
    for start in range(0, n_resamples, rows):
        k = min(rows, n_resamples - start)
        drawn = s[_resample_indices(rng, k, n, strata)]
        neg, pos = drawn[:, :negatives], drawn[:, negatives:]
        if target == "sensitivity":
            # the highest threshold with c positives at or above it is the c-th highest positive score
            at = np.partition(pos, kth, axis=1)[:, kth]
            thresholds[start:start + k] = at
            rates[start:start + k] = np.count_nonzero(neg < at[:, None], axis=1) / negatives
        else:
            # specificity holds while at most f negatives are >= t, i.e. t above the (f + 1)-th highest
            # negative q; the lowest candidate there is the lowest resampled score above q (inf if none)
            q = np.partition(neg, kth, axis=1)[:, kth]
            above = drawn > q[:, None]
            lowest = np.where(above, drawn, drawn.max()).min(axis=1)
            thresholds[start:start + k] = np.where(above.any(axis=1), lowest.astype(np.float64), math.inf)
            rates[start:start + k] = np.count_nonzero(pos > q[:, None], axis=1) / positives
    alpha = 1.0 - level
    t_low, t_high = np.quantile(thresholds, [alpha / 2, 1 - alpha / 2], method="inverted_cdf")
    r_low, r_high = np.quantile(rates, [alpha / 2, 1 - alpha / 2])
    other = "specificity" if target == "sensitivity" else "sensitivity"
    return OperatingPointInterval(
        point=point,
        threshold=ConfidenceInterval(float(point.threshold), float(t_low), float(t_high), level, "bootstrap",
                                     n_resamples),
        other_rate=other,
        rate=ConfidenceInterval(getattr(point, other), float(r_low), float(r_high), level, "bootstrap", n_resamples),
        seed=seed, n_infinite=int(np.count_nonzero(np.isinf(thresholds))))
