"""Calibration of probability scores: is a score of 0.8 right 80% of the time?

The Brier score, the reliability curve (as ``sklearn.calibration.calibration_curve``) and the expected
calibration error over the same bins. ``labels`` are 0/1; ``scores`` must be probabilities, finite
and in [0, 1] (a logit is not calibrated or not: convert it first), else ``InvalidInputError``.
Labels of one class are allowed: calibration is defined without the other.

Bins, as scikit-learn's: ``strategy="uniform"`` cuts [0, 1] into ``n_bins`` equal-width bins (edges
``np.linspace(0, 1, n_bins + 1)``), ``"quantile"`` at the scores' quantiles (``np.percentile``); a
score on an inner edge belongs to the bin below it (bins are (a, b], the first [0, b]). Empty bins
are left out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._checks import check_choice, check_int
from ..errors import InvalidInputError
from ._inputs import binary_vector, score_vector

__all__ = ["brier_score", "calibration_curve", "expected_calibration_error"]

#: far more bins than a reliability curve can use; bounds the arrays a typo would allocate
MAX_BINS = 100_000


def _labels_and_probabilities(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = binary_vector(labels, "labels")
    p = score_vector(scores, "scores")
    if y.shape != p.shape:
        raise InvalidInputError(f"labels has {y.shape[0]} values but scores has {p.shape[0]}")
    outside = (p < 0) | (p > 1)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise InvalidInputError(f"scores must be probabilities in [0, 1] for calibration; scores[{i}] is "
                                f"{p[i].item()!r} ({int(outside.sum())} values outside [0, 1])")
    return y, p


def brier_score(labels: Any, scores: Any) -> float:
    """The mean squared difference between the probability and the 0/1 outcome
    (``sklearn.metrics.brier_score_loss``): 0 is perfect, 0.25 what a constant 0.5 scores."""
    y, p = _labels_and_probabilities(labels, scores)
    return float(np.mean(np.square(p - y)))


def _bins(labels: Any, scores: Any, n_bins: Any, strategy: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty bin: the positives' share, the mean score and the count."""
    y, p = _labels_and_probabilities(labels, scores)
    n_bins = check_int(n_bins, "n_bins", low=1, high=MAX_BINS)
    strategy = check_choice(strategy, "strategy", ("uniform", "quantile"))
    if strategy == "quantile":
        edges = np.percentile(p, np.linspace(0, 1, n_bins + 1) * 100)
    else:
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], p)  # side="left": a score on an edge goes to the bin below
    count = np.bincount(ids, minlength=n_bins)
    score_sum = np.bincount(ids, weights=p, minlength=n_bins)
    positive = np.bincount(ids, weights=y.astype(np.float64), minlength=n_bins)
    used = count > 0
    return positive[used] / count[used], score_sum[used] / count[used], count[used]


def calibration_curve(labels: Any, scores: Any, *, n_bins: int = 10, strategy: str = "uniform",
                      return_counts: bool = False) -> Any:
    """``(prob_true, prob_pred)`` per non-empty bin, as ``sklearn.calibration.calibration_curve``: the
    share of positives and the mean score of the images in each bin, in increasing order of bin. With
    ``return_counts`` a third array holds each bin's number of images (int64)."""
    prob_true, prob_pred, count = _bins(labels, scores, n_bins, strategy)
    return (prob_true, prob_pred, count.astype(np.int64)) if return_counts else (prob_true, prob_pred)


def expected_calibration_error(labels: Any, scores: Any, *, n_bins: int = 10, strategy: str = "uniform") -> float:
    """``sum_b (n_b / N) |positives' share_b - mean score_b|`` over the bins of
    :func:`calibration_curve` (by default 10 equal-width bins on [0, 1]): 0 for a calibrated classifier."""
    prob_true, prob_pred, count = _bins(labels, scores, n_bins, strategy)
    return float(np.dot(count, np.abs(prob_true - prob_pred)) / count.sum())
