"""Binary classifier metrics ("pneumothorax or not"): ROC AUC and curve, average precision and the
precision-recall curve, the confusion matrix, sensitivity and specificity.

``labels`` are 0/1 (bool, integers or floats); ``scores`` are any finite numbers where higher means
"more likely positive" (probabilities or logits: the ranking metrics do not care). Both may be lists,
NumPy arrays or torch tensors (CUDA ones are copied to the host) of shape (N,) or (N, 1). Ties in the
scores are handled as scikit-learn does: AUC is the Mann-Whitney statistic with half credit for tied
pairs, and average precision is the step-wise (not interpolated) sum ``sum_n (R_n - R_{n-1}) P_n``.
Where scikit-learn warns and returns NaN (a single class in ``labels``) these raise
``InvalidInputError``; so do NaN or infinite scores, labels other than 0/1 and length mismatches.

A score counts as a positive prediction at threshold ``t`` when ``score >= t``, as in ``roc_curve``'s
thresholds (and ``pneumoseg.postprocess.gate``).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..errors import InvalidInputError
from ._inputs import labels_and_scores, predictions

__all__ = [
    "roc_auc",
    "roc_curve",
    "average_precision",
    "precision_recall_curve",
    "confusion_matrix",
    "sensitivity_specificity",
]


def _require_both_classes(y: np.ndarray, metric: str) -> tuple[int, int]:
    positives = int(np.count_nonzero(y))
    negatives = y.size - positives
    if positives == 0 or negatives == 0:
        which = "negatives" if positives else "positives"
        raise InvalidInputError(f"{metric} is undefined when labels has no {which} (all {y.size} labels are "
                                f"{int(positives > 0)})")
    return positives, negatives


def _counts_at_thresholds(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives (int64, cumulative) when predicting ``score >= threshold`` for each
    distinct score taken as the threshold, in decreasing order of threshold."""
    # Descending by reversing an ascending sort: -s wraps for unsigned and the int64 minimum. The
    # order within a tie does not matter, as only each tie's last cumulative count is read.
    order = np.argsort(s, kind="stable")[::-1]
    s_sorted = s[order]
    last_of_tie = np.r_[np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s.size - 1]
    tps = np.cumsum(y[order], dtype=np.int64)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return tps, fps, s_sorted[last_of_tie]


def roc_auc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random negative,
    a tied pair counting one half (the Mann-Whitney U statistic over ``P * N``), computed exactly in
    integers from the tie groups."""
    y, s = labels_and_scores(labels, scores)
    positives, negatives = _require_both_classes(y, "roc_auc")
    tps, fps, _ = _counts_at_thresholds(y, s)
    pos_in_tie = np.diff(tps, prepend=0)
    neg_in_tie = np.diff(fps, prepend=0)
    negatives_below = negatives - fps
    # Twice U: each positive beats the negatives below its score and ties half of those at it.
    twice_u = int(np.dot(pos_in_tie, 2 * negatives_below + neg_in_tie))
    return twice_u / (2 * positives * negatives)


def roc_curve(labels: Any, scores: Any, *, drop_intermediate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` as ``sklearn.metrics.roc_curve``: one point per distinct score taken
    as the threshold, in decreasing order, after a first point (0, 0) at threshold ``inf``; with
    ``drop_intermediate`` the points on straight segments are dropped (the curve and its area are
    unchanged)."""
    y, s = labels_and_scores(labels, scores)
    positives, negatives = _require_both_classes(y, "roc_curve")
    tps, fps, thresholds = _counts_at_thresholds(y, s)
    if drop_intermediate and tps.size > 2:
        corner = np.logical_or(np.diff(fps, 2), np.diff(tps, 2))
        keep = np.flatnonzero(np.r_[True, corner, True])
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    fpr = np.r_[0.0, fps / negatives]
    tpr = np.r_[0.0, tps / positives]
    return fpr, tpr, np.r_[np.inf, thresholds]


def precision_recall_curve(
    labels: Any, scores: Any, *, drop_intermediate: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(precision, recall, thresholds)`` as ``sklearn.metrics.precision_recall_curve``: thresholds are
    the distinct scores in increasing order, precision and recall of ``score >= threshold`` at each,
    then a last point (precision 1, recall 0) without threshold. ``drop_intermediate`` keeps only the
    first and last threshold of each run of equal recall."""
    y, s = labels_and_scores(labels, scores)
    positives = int(np.count_nonzero(y))
    if positives == 0:
        raise InvalidInputError("precision_recall_curve is undefined when labels has no positives "
                                "(recall divides by their number)")
    tps, fps, thresholds = _counts_at_thresholds(y, s)
    if drop_intermediate and tps.size > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(tps[:-1]), np.diff(tps[1:])), True])
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    precision = tps / (tps + fps)  # never 0/0: each threshold is some sample's score
    recall = tps / positives
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def average_precision(labels: Any, scores: Any) -> float:
    """Average precision as ``sklearn.metrics.average_precision_score``: the precision at each distinct
    threshold weighted by the recall it adds, ``sum_n (R_n - R_{n-1}) P_n`` (no interpolation)."""
    y, s = labels_and_scores(labels, scores)
    positives = int(np.count_nonzero(y))
    if positives == 0:
        raise InvalidInputError("average_precision is undefined when labels has no positives")
    tps, fps, _ = _counts_at_thresholds(y, s)
    recall_gain = np.diff(tps, prepend=0) / positives
    return float(np.dot(recall_gain, tps / (tps + fps)))


def confusion_matrix(labels: Any, predictions_or_scores: Any, *, threshold: Optional[float] = None) -> np.ndarray:
    """The 2x2 int64 matrix ``[[TN, FP], [FN, TP]]`` (rows: truth, columns: prediction, as scikit-learn).

    Without ``threshold`` the second argument holds 0/1 predictions; with it, scores that predict
    positive where ``score >= threshold``.
    """
    y, p = predictions(labels, predictions_or_scores, threshold)
    tp = int(np.count_nonzero(y & p))
    fn = int(np.count_nonzero(y)) - tp
    fp = int(np.count_nonzero(p)) - tp
    tn = y.size - tp - fn - fp
    return np.array([[tn, fp], [fn, tp]], dtype=np.int64)


def sensitivity_specificity(
    labels: Any, predictions_or_scores: Any, *, threshold: Optional[float] = None
) -> tuple[float, float]:
    """``(sensitivity, specificity)``: TP / (TP + FN) and TN / (TN + FP), predictions taken as
    ``confusion_matrix`` takes them. Labels of a single class leave one of them undefined: an error."""
    (tn, fp), (fn, tp) = confusion_matrix(labels, predictions_or_scores, threshold=threshold)
    if tp + fn == 0 or tn + fp == 0:
        which = "positives, so sensitivity" if tp + fn == 0 else "negatives, so specificity"
        raise InvalidInputError(f"labels has no {which} is undefined")
    return float(tp / (tp + fn)), float(tn / (tn + fp))
