"""Clinical operating points: the score threshold at which a classifier reaches a target sensitivity
(triage runs at high sensitivity) or a target specificity, and what it gives there.

Inputs as the other classification metrics take them (``labels`` 0/1, ``scores`` any finite numbers,
lists, NumPy arrays or torch tensors). A score is a positive prediction at threshold ``t`` when
``score >= t``, as ``roc_curve``'s thresholds.

Two kinds of interval, for two questions. At a threshold fixed in advance (one a model directory
ships, or ``--threshold``), each rate is a binomial proportion of a fixed group of images:
:func:`rates_at_threshold` gives Wilson or Clopper-Pearson intervals.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from .._checks import check_choice, check_real
from ..errors import InvalidInputError
from ._inputs import labels_and_scores
from .classification import _counts_at_thresholds, _require_both_classes
from .intervals import PROPORTION_METHODS, ConfidenceInterval, _check_level, proportion_ci

__all__ = ["OperatingPoint", "operating_point", "RatesAtThreshold", "rates_at_threshold"]


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
        threshold (nothing positive) becomes None."""
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
