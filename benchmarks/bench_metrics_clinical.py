"""Bootstrap intervals at the SIIM stage-2 test size (3205 images): pneumoseg's vectorised resampling
(one index matrix per chunk, the statistic computed for all resamples at once) against the loop a user
would otherwise write, one scikit-learn call per resample.

    pytest benchmarks/bench_metrics_clinical.py --benchmark-json=clinical.json && python benchmarks/report.py clinical.json
"""

from __future__ import annotations

import numpy as np
import pytest

from pneumoseg import metrics

N_IMAGES = 3205  # SIIM-ACR stage 2 test images


def study(n: int = N_IMAGES):
    """Labels (22% positive, as SIIM), probability scores rounded to 1e-4 (ties) and per-image Dice."""
    rng = np.random.default_rng(0)
    labels = rng.random(n) < 0.22
    scores = np.clip(rng.normal(np.where(labels, 0.65, 0.3), 0.18), 0, 1).round(4)
    dice = np.where(labels, rng.random(n), (rng.random(n) < 0.85).astype(np.float64))
    return labels, scores, dice


LABELS, SCORES, DICE = study()


def sklearn_loop(metric, labels, scores, n_resamples, seed=0):
    """Percentile interval from a Python loop: resample within each class, one metric call each."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    values = []
    for _ in range(n_resamples):
        idx = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
        values.append(metric(labels[idx], scores[idx]))
    return tuple(np.quantile(values, [0.025, 0.975]))


PNEUMOSEG = {
    "roc_auc_ci bootstrap": lambda b: metrics.roc_auc_ci(LABELS, SCORES, method="bootstrap", n_resamples=b),
    "average_precision_ci": lambda b: metrics.average_precision_ci(LABELS, SCORES, n_resamples=b),
    "bootstrap_ci mean Dice": lambda b: metrics.bootstrap_ci(lambda d: d.mean(axis=-1), DICE, n_resamples=b),
}


@pytest.mark.parametrize("n_resamples", [1000, 2000])
@pytest.mark.parametrize("what", list(PNEUMOSEG))
def test_bootstrap(benchmark, what, n_resamples):
    benchmark.group = f"{what.split()[0]} {n_resamples} resamples x {N_IMAGES} images"
    benchmark.extra_info.update(impl="pneumoseg", baseline=False)
    ci = benchmark(PNEUMOSEG[what], n_resamples)
    assert ci.low <= ci.estimate <= ci.high


@pytest.mark.parametrize("what", ["roc_auc_ci bootstrap", "average_precision_ci"])
def test_bootstrap_sklearn_loop(benchmark, what):
    sk = pytest.importorskip("sklearn.metrics")
    metric = sk.roc_auc_score if what.startswith("roc") else sk.average_precision_score
    benchmark.group = f"{what.split()[0]} 1000 resamples x {N_IMAGES} images"
    benchmark.extra_info.update(impl="sklearn per-resample loop", baseline=True)
    low, high = benchmark.pedantic(sklearn_loop, (metric, LABELS, SCORES, 1000), rounds=2)
    ours = PNEUMOSEG[what](1000)
    # other draws, same distribution: the ends agree to a fraction of the width
    assert abs(low - ours.low) < 0.2 * (ours.high - ours.low) and abs(high - ours.high) < 0.2 * (ours.high - ours.low)
