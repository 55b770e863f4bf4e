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


# ------------------------------------------------- operating points, DeLong, calibration (all loops)


def ref_operating_point(labels, scores, target: str, value: float) -> dict:
    """Every distinct score (and inf, nothing positive) tried as the threshold of ``score >= t``:
    for a sensitivity target the highest threshold whose sensitivity reaches ``value``, for a
    specificity target the lowest whose specificity does. Counts by hand in float64."""
    y = [bool(v) for v in np.asarray(labels).tolist()]
    s = [float(v) for v in np.asarray(scores, dtype=np.float64).tolist()]
    P, N = sum(y), len(y) - sum(y)
    rows = []
    for t in sorted(set(s) | {np.inf}, reverse=True):
        tp = sum(1 for a, b in zip(y, s) if a and b >= t)
        fp = sum(1 for a, b in zip(y, s) if not a and b >= t)
        rows.append({"threshold": t, "tp": tp, "fp": fp, "fn": P - tp, "tn": N - fp,
                     "sensitivity": tp / P, "specificity": (N - fp) / N})
    if target == "sensitivity":
        return next(r for r in rows if r["sensitivity"] >= value)  # rows run from the highest threshold
    return [r for r in rows if r["specificity"] >= value][-1]


def ref_delong_variance(labels, scores) -> float:
    """DeLong's variance of the AUC from the Mann-Whitney kernel psi (1 above, 1/2 tied, 0 below), all
    pairs: each positive's and each negative's mean kernel, and their sample variances."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[y].tolist(), s[~y].tolist()
    m, n = len(pos), len(neg)

    def psi(a, b):
        return 1.0 if a > b else 0.5 if a == b else 0.0

    v10 = [sum(psi(a, b) for b in neg) / n for a in pos]
    v01 = [sum(psi(a, b) for a in pos) / m for b in neg]
    auc = sum(v10) / m
    s10 = sum((v - auc) ** 2 for v in v10) / (m - 1)
    s01 = sum((v - auc) ** 2 for v in v01) / (n - 1)
    return s10 / m + s01 / n


def ref_calibration(labels, scores, n_bins: int) -> list[tuple[float, float, int]]:
    """(positives' share, mean score, count) of each non-empty bin of ``n_bins`` equal-width bins on
    [0, 1], a score on an inner edge in the bin below it (the first bin is [0, 1/n_bins])."""
    edges = [b / n_bins for b in range(n_bins + 1)]
    members: list[list[tuple[bool, float]]] = [[] for _ in range(n_bins)]
    for label, p in zip(np.asarray(labels).tolist(), np.asarray(scores, dtype=np.float64).tolist()):
        b = 0
        while b < n_bins - 1 and p > edges[b + 1]:
            b += 1
        members[b].append((bool(label), p))
    return [(sum(a for a, _ in m) / len(m), sum(p for _, p in m) / len(m), len(m)) for m in members if m]


# ------------------------------------------------- binomial proportions (Wilson, Clopper-Pearson)


def ref_wilson(successes: int, trials: int, level: float) -> tuple[float, float]:
    """The p where the score test |p_hat - p| / sqrt(p (1 - p) / n) stays within z: the two roots of
    (p_hat - p)^2 n = z^2 p (1 - p), solved as the quadratic a p^2 + b p + c = 0."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    n, p_hat = float(trials), successes / trials
    a, b, c = n + z * z, -(2 * n * p_hat + z * z), n * p_hat * p_hat
    root = np.sqrt(max(b * b - 4 * a * c, 0.0))
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


def ref_clopper_pearson(successes: int, trials: int, level: float) -> tuple[float, float]:
    """The p where each one-sided binomial test just rejects at (1 - level) / 2: P(X >= k | p_low) and
    P(X <= k | p_high) equal (1 - level) / 2, the tails summed term by term (math.comb) and each
    equation solved by bisection (a tail is monotone in p)."""
    from math import comb

    k, n, half = successes, trials, (1 - level) / 2

    def upper_tail(p):  # P(X >= k), rises with p
        return sum(comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))

    def lower_tail(p):  # P(X <= k), falls with p
        return sum(comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(0, k + 1))

    def solve(f, rising):
        lo, hi = 0.0, 1.0
        for _ in range(100):
            mid = (lo + hi) / 2
            if (f(mid) < half) == rising:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    low = 0.0 if k == 0 else solve(upper_tail, True)
    high = 1.0 if k == n else solve(lower_tail, False)
    return low, high


def ref_bca_levels(values, estimate: float, jackknife, level: float) -> tuple[float, float]:
    """BCa's quantile levels (Efron & Tibshirani 1993, eqs. 14.10-14.15), term by term: z0 from the share
    of resampled values below the estimate (a tie counting one half), the acceleration from the
    leave-one-out values' skewness, then Phi(z0 + (z0 + z) / (1 - a (z0 + z))) for z at each end."""
    from statistics import NormalDist

    phi = NormalDist()
    values = [float(v) for v in values]
    share = sum(1.0 if v < estimate else 0.5 if v == estimate else 0.0 for v in values) / len(values)
    z0 = phi.inv_cdf(share)
    jack = [float(v) for v in jackknife]
    mean = sum(jack) / len(jack)
    num = sum((mean - v) ** 3 for v in jack)
    den = sum((mean - v) ** 2 for v in jack) ** 1.5
    a = num / (6 * den) if den else 0.0
    out = []
    for q in ((1 - level) / 2, (1 + level) / 2):
        z = phi.inv_cdf(q)
        out.append(phi.cdf(z0 + (z0 + z) / (1 - a * (z0 + z))))
    return out[0], out[1]
