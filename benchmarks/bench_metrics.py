"""Metrics against what a user would otherwise run, in one pytest-benchmark session: the Kaggle Dice
against a NumPy per-image loop and a batched torch expression, ROC AUC against scikit-learn's
roc_auc_score, and the triplet grid search against thresholding the batch once per grid point.

    pytest benchmarks/bench_metrics.py --benchmark-json=metrics.json && python benchmarks/report.py metrics.json
"""

from __future__ import annotations

import numpy as np
import pytest

from factories import pneumothorax_blob
from pneumoseg import metrics

torch = pytest.importorskip("torch")


def mask_batch(n: int = 16, size: int = 1024):
    """SIIM-like: most images empty, the others a pneumothorax blob; predictions shifted and with
    false positives on some empty images. Also probability maps from which the predictions come."""
    rng = np.random.default_rng(0)
    truths = np.zeros((n, size, size), np.uint8)
    probs = (0.3 * rng.random((n, size, size), dtype=np.float32)).astype(np.float32)
    blobs = [pneumothorax_blob(size, seed=s) for s in range(4)]
    for i in range(n):
        blob = np.roll(blobs[i % 4], 13 * i, axis=0)
        if i % 4 == 0:
            truths[i] = blob
            probs[i] += 0.6 * np.roll(blob, 7, axis=1)
        elif i % 4 == 1:
            probs[i] += 0.6 * np.roll(blob, 50, axis=0)  # a false positive
    return probs, truths


PROBS, TRUTHS = mask_batch()
PREDS = (PROBS > 0.5).astype(np.uint8)


def numpy_dice_loop(preds, truths, threshold=None):
    """The per-image loop of Kaggle kernels."""
    scores = []
    for p, t in zip(preds, truths):
        p = p > threshold if threshold is not None else p.astype(bool)
        t = t.astype(bool)
        total = p.sum() + t.sum()
        scores.append(1.0 if total == 0 else 2.0 * np.logical_and(p, t).sum() / total)
    return float(np.mean(scores))


def torch_batched_dice(preds, truths, threshold=None):
    """A batched torch expression on CPU tensors, as in training loops."""
    p = preds > threshold if threshold is not None else preds != 0
    t = truths != 0
    inter = (p & t).flatten(1).sum(1).double()
    total = (p.flatten(1).sum(1) + t.flatten(1).sum(1)).double()
    return torch.where(total == 0, torch.ones_like(total), 2 * inter / total.clamp_min(1)).mean().item()


DICE_IMPLS = {
    "pneumoseg": (lambda p, t, th: metrics.kaggle_dice(p, t, threshold=th), False, "numpy"),
    "numpy per-image loop": (numpy_dice_loop, True, "numpy"),
    "torch batched (cpu)": (torch_batched_dice, True, "torch"),
}
DICE_INPUTS = {"uint8 masks": (PREDS, TRUTHS, None), "float32 probs, threshold 0.5": (PROBS, TRUTHS, 0.5)}


@pytest.mark.parametrize("impl", list(DICE_IMPLS))
@pytest.mark.parametrize("inputs", list(DICE_INPUTS))
def test_kaggle_dice(benchmark, inputs, impl):
    fn, is_baseline, kind = DICE_IMPLS[impl]
    preds, truths, threshold = DICE_INPUTS[inputs]
    if kind == "torch":
        preds, truths = torch.from_numpy(preds), torch.from_numpy(truths)
    benchmark.group = f"kaggle_dice 16x1024x1024 {inputs}"
    benchmark.extra_info.update(impl=impl, baseline=is_baseline)
    score = benchmark(fn, preds, truths, threshold)
    assert score == pytest.approx(numpy_dice_loop(*DICE_INPUTS[inputs]), abs=1e-12)


def classifier_outputs(n: int):
    rng = np.random.default_rng(1)
    labels = rng.random(n) < 0.22  # SIIM's share of positive images
    # probabilities rounded to 1e-4, as a float16/exported model gives: many ties
    scores = np.round(np.clip(0.35 * labels + rng.normal(0.35, 0.2, n), 0, 1), 4)
    return labels.astype(np.int64), scores


AUC_INPUTS = {n: classifier_outputs(n) for n in (2_000, 1_000_000)}


@pytest.mark.parametrize("impl", ["pneumoseg", "sklearn roc_auc_score"])
@pytest.mark.parametrize("n", list(AUC_INPUTS))
def test_roc_auc(benchmark, n, impl):
    labels, scores = AUC_INPUTS[n]
    if impl == "pneumoseg":
        fn = metrics.roc_auc
    else:
        fn = pytest.importorskip("sklearn.metrics").roc_auc_score
    benchmark.group = f"roc_auc {n:,} scores"
    benchmark.extra_info.update(impl=impl, baseline=impl != "pneumoseg")
    auc = benchmark(fn, labels, scores)
    assert auc == pytest.approx(metrics.roc_auc(labels, scores), abs=1e-12)


TRIPLET_GRID = {"tops": (0.5, 0.6, 0.7, 0.75, 0.8, 0.9), "min_areas": (0, 60, 120, 250, 500, 750, 1000),
                "bottoms": (0.2, 0.3, 0.4, 0.5)}
SMALL_PROBS, SMALL_TRUTHS = PROBS[:, ::2, ::2].copy(), TRUTHS[:, ::2, ::2].copy()  # 16 x 512 x 512


def naive_triplet_grid(probs, truths, tops, min_areas, bottoms):
    """Each grid point thresholds the whole batch anew (the winners' TripletMaskBinarization), in NumPy."""
    n = probs.shape[0]
    truth = truths.reshape(n, -1) != 0
    flat = probs.reshape(n, -1)
    best = (-1.0, None)
    for top in tops:
        above = (flat > top).sum(1)
        for area in min_areas:
            for bottom in bottoms:
                mask = flat > bottom
                mask[above < area] = False
                inter = np.logical_and(mask, truth).sum(1)
                total = mask.sum(1) + truth.sum(1)
                dice = np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))
                if dice.mean() > best[0]:
                    best = (dice.mean(), (top, area, bottom))
    return best


@pytest.mark.parametrize("impl", ["pneumoseg", "numpy threshold per grid point"])
def test_triplet_search(benchmark, impl):
    benchmark.group = "triplet grid 6x7x4 on 16x512x512"
    benchmark.extra_info.update(impl=impl, baseline=impl != "pneumoseg")
    if impl == "pneumoseg":
        choice = benchmark(metrics.best_triplet, SMALL_PROBS, SMALL_TRUTHS, **TRIPLET_GRID)
        score = choice.score
    else:
        score, _ = benchmark.pedantic(naive_triplet_grid, (SMALL_PROBS, SMALL_TRUTHS), TRIPLET_GRID, rounds=3)
    assert score == pytest.approx(metrics.best_triplet(SMALL_PROBS, SMALL_TRUTHS, **TRIPLET_GRID).score, abs=1e-12)
