"""Slow float64 references of the metrics, written from their definitions (never by calling
pneumoseg.metrics): per-pixel set arithmetic, all-pairs Mann-Whitney, precision at every positive."""

from __future__ import annotations

import numpy as np

from reference import ref_triplet


def _images(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 4:
        x = x[:, 0]
    return x[None] if x.ndim == 2 else x


def ref_overlaps(pred_fg, truth_fg) -> list[tuple[float, float, float]]:
    """(|P & T|, |P|, |T|) per image, counted pixel by pixel in float64."""
    out = []
    for p, t in zip(_images(pred_fg), _images(truth_fg)):
        inter = size_p = size_t = 0.0
        for a, b in zip(p.ravel().tolist(), t.ravel().tolist()):
            size_p += bool(a)
            size_t += bool(b)
            inter += bool(a) and bool(b)
        out.append((inter, size_p, size_t))
    return out


def ref_dice(pred_fg, truth_fg) -> np.ndarray:
    return np.array([1.0 if p + t == 0 else 2.0 * i / (p + t) for i, p, t in ref_overlaps(pred_fg, truth_fg)])


def ref_iou(pred_fg, truth_fg) -> np.ndarray:
    return np.array([1.0 if p + t - i == 0 else i / (p + t - i) for i, p, t in ref_overlaps(pred_fg, truth_fg)])


def ref_auc(labels, scores) -> float:
    """The probability that a positive outscores a negative, a tie counting one half: all pairs."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[y], s[~y]
    wins = 0.0
    for a in pos:
        for b in neg:
            wins += 1.0 if a > b else 0.5 if a == b else 0.0
    return wins / (len(pos) * len(neg))


def ref_roc_points(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of ``score >= t`` at every distinct score, decreasing, after (0, 0) at inf."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    thresholds = sorted(set(s.tolist()), reverse=True)
    fpr, tpr = [0.0], [0.0]
    for t in thresholds:
        predicted = s >= t
        tpr.append(float(np.sum(predicted & y)) / np.sum(y))
        fpr.append(float(np.sum(predicted & ~y)) / np.sum(~y))
    return np.array(fpr), np.array(tpr), np.array([np.inf] + thresholds)


def ref_pr_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) of ``score >= t`` at every distinct score, increasing, then (1, 0)."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    thresholds = sorted(set(s.tolist()))
    precision, recall = [], []
    for t in thresholds:
        predicted = s >= t
        tp = float(np.sum(predicted & y))
        precision.append(tp / np.sum(predicted))
        recall.append(tp / np.sum(y))
    return np.array(precision + [1.0]), np.array(recall + [0.0]), np.array(thresholds)


def ref_average_precision(labels, scores) -> float:
    """The mean over positives of the precision of ``score >= (that positive's score)``: the step-wise
    sum over thresholds of (recall gained) x precision, taken one positive at a time."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    precisions = []
    for score in s[y]:
        predicted = s >= score
        precisions.append(float(np.sum(predicted & y)) / np.sum(predicted))
    return float(np.mean(precisions))


def ref_confusion(labels, predicted) -> np.ndarray:
    m = np.zeros((2, 2), np.int64)
    for truth, guess in zip(np.asarray(labels).ravel().tolist(), np.asarray(predicted).ravel().tolist()):
        m[int(bool(truth)), int(bool(guess))] += 1
    return m


def ref_triplet_grid(probs, truths, tops, min_areas, bottoms, gate_scores=None, gate_thresholds=None) -> np.ndarray:
    """Kaggle Dice at every grid point, thresholding the whole batch anew for each one."""
    probs = _images(probs).astype(np.float64)
    truths = _images(truths) != 0
    gates = [None] if gate_thresholds is None else list(gate_thresholds)
    grid = np.zeros((len(gates), len(tops), len(min_areas), len(bottoms)))
    for g, gate in enumerate(gates):
        for a, top in enumerate(tops):
            for b, area in enumerate(min_areas):
                for c, bottom in enumerate(bottoms):
                    masks = ref_triplet(probs, top, area, bottom)
                    if gate is not None:
                        masks[np.asarray(gate_scores) < gate] = 0
                    grid[g, a, b, c] = ref_dice(masks, truths).mean()
    return grid if gate_thresholds is not None else grid[0]
