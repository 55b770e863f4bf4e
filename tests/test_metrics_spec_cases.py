"""Hand-derived cases for the metrics' rules that the randomised comparisons in test_metrics.py did not
reach (found by planting bugs in pneumoseg/metrics and seeing which survived): a ROC corner inside a
tie, integer scores against a fractional threshold, and the triplet search's ties, gate boundary and
grids given out of order."""

from __future__ import annotations

import numpy as np
import pytest

from factories import blocky_mask, random_mask
from pneumoseg import metrics
from reference import trapezoid_area
from reference_metrics import ref_confusion, ref_triplet_grid


def test_roc_curve_drops_collinear_points_and_keeps_a_corner_inside_a_tie():
    # Scores .95 .9 .8 for three positives, and .7 for a positive and a negative together.
    # Thresholds .95, .9, .8, .7 give (TP, FP) = (1, 0), (2, 0), (3, 0), (4, 1); with P = 4, N = 1
    # the points are (0, 1/4), (0, 2/4), (0, 3/4), (1, 1) after (0, 0). The point at .9 lies on the
    # vertical run from .95 to .8 and is dropped; the one at .8, where the curve turns into the
    # diagonal step of the tie, is a corner although TP rises by one on both sides of it (only FP
    # changes its step), so it stays. (The first and last threshold always stay, as in scikit-learn.)
    labels = [1, 1, 1, 1, 0]
    scores = [0.95, 0.9, 0.8, 0.7, 0.7]
    fpr, tpr, thresholds = metrics.roc_curve(labels, scores)
    np.testing.assert_array_equal(fpr, [0.0, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 0.25, 0.75, 1.0])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.95, 0.8, 0.7])
    # AUC: three positives beat the negative, the tied one counts a half: 3.5 / 4.
    assert metrics.roc_auc(labels, scores) == 0.875
    assert trapezoid_area(tpr, fpr) == pytest.approx(0.875, abs=1e-15)


@pytest.mark.parametrize("dtype", [np.int8, np.int64])
@pytest.mark.parametrize("threshold", [2.5, -1.5, 0.25, -0.75])
def test_integer_scores_against_a_fractional_threshold(dtype, threshold):
    # score >= 2.5 holds for 3 but not 2, score >= -1.5 for -1 but not -2: an integer score reaches a
    # fractional threshold only from the next integer up (ceil), never from the one below (floor).
    # The reference compares in float64, exact for these small integers.
    labels = np.array([0, 0, 1, 0, 1, 1])
    scores = np.array([-2, -1, 0, 1, 2, 3], dtype=dtype)
    expected = ref_confusion(labels, scores.astype(np.float64) >= threshold)
    np.testing.assert_array_equal(metrics.confusion_matrix(labels, scores, threshold=threshold), expected)


def test_unsigned_scores_against_a_fractional_threshold():
    labels = np.array([0, 1, 1])
    scores = np.array([0, 1, 2], dtype=np.uint8)
    # >= 1.5: only the 2; >= -0.5: all three (below the type's range, not wrapped around)
    np.testing.assert_array_equal(metrics.confusion_matrix(labels, scores, threshold=1.5), [[1, 0], [1, 1]])
    np.testing.assert_array_equal(metrics.confusion_matrix(labels, scores, threshold=-0.5), [[0, 1], [0, 2]])


def _probability_maps(rng, n, shape):
    """Truths (every other one empty) and probabilities that roughly follow them, with noise that
    overlaps them (background up to .6, truth from .4), so that every threshold of the grids below
    counts a different set of pixels."""
    truths = np.stack([np.zeros(shape, np.uint8) if i % 2 else blocky_mask(rng, shape, 2) for i in range(n)])
    return (0.4 * truths + 0.6 * rng.random((n,) + shape)).astype(np.float32), truths


def _two_images():
    """Image 0: a 4-pixel truth, probability .9 on it and 0 elsewhere. Image 1: an empty truth, .4 on
    two pixels (above a bottom of .3, below a top of .5) and 0 elsewhere."""
    truths = np.zeros((2, 4, 4), np.uint8)
    truths[0, 1:3, 1:3] = 1
    probs = np.zeros((2, 4, 4), np.float32)
    probs[0][truths[0] == 1] = 0.9
    probs[1, 0, :2] = 0.4
    return probs, truths


def test_triplet_ties_choose_the_first_grid_point():
    probs, truths = _two_images()
    # With top .5 and bottom .3, image 0 has 4 pixels above top and image 1 has none, so:
    #   min_area 0: both positive; image 0 Dice 1, image 1 paints 2 pixels on an empty truth: 0 -> 0.5
    #   min_area 1..4: image 0 positive (Dice 1), image 1 negative and empty (Dice 1)  -> 1.0
    #   min_area 5: image 0 negative on a non-empty truth (0), image 1 Dice 1          -> 0.5
    # Four points tie at the best; the first in grid order (min_area 1) wins.
    choice = metrics.best_triplet(probs, truths, tops=(0.5,), min_areas=(0, 1, 2, 3, 4, 5), bottoms=(0.3,))
    np.testing.assert_array_equal(choice.scores[0, :, 0], [0.5, 1.0, 1.0, 1.0, 1.0, 0.5])
    assert (choice.top, choice.min_area, choice.bottom, choice.score) == (0.5, 1, 0.3, 1.0)


def test_triplet_gate_keeps_a_score_equal_to_its_threshold():
    probs, truths = _two_images()
    # Image 0's score equals the gate threshold .5: kept (score >= threshold, as postprocess.gate), so
    # at min_area 1 both images score 1. Were it gated out, image 0 would be empty on its truth: 0.5.
    choice = metrics.best_triplet(probs, truths, tops=(0.5,), min_areas=(1,), bottoms=(0.3,),
                                  gate_scores=np.array([0.5, 0.2]), gate_thresholds=(0.5, 0.6))
    np.testing.assert_array_equal(choice.scores[:, 0, 0, 0], [1.0, 0.5])
    assert (choice.gate_threshold, choice.score) == (0.5, 1.0)
    gated = ref_triplet_grid(probs, truths, (0.5,), (1,), (0.3,), np.array([0.5, 0.2]), (0.5, 0.6))
    np.testing.assert_array_equal(choice.scores, gated)


def test_triplet_grids_out_of_order_and_interleaved_match_brute_force():
    # Tops below some bottoms, and every grid unsorted: the search shares one count per distinct
    # threshold between tops and bottoms, so each grid value must find its own count again.
    rng = np.random.default_rng(31)
    probs, truths = _probability_maps(rng, 8, (22, 27))
    grid = {"tops": (0.8, 0.45, 0.6), "min_areas": (40, 0, 10), "bottoms": (0.55, 0.2, 0.4)}
    scores = np.clip(truths.reshape(8, -1).max(1) * 0.5 + rng.random(8) * 0.6, 0, 1)
    gates = (0.6, 0.2)
    choice = metrics.best_triplet(probs, truths, gate_scores=scores, gate_thresholds=gates, **grid)
    expected = ref_triplet_grid(probs, truths, *grid.values(), scores, gates)
    np.testing.assert_allclose(choice.scores, expected, atol=1e-14, rtol=0)
    best = np.argwhere(expected >= expected.max() - 1e-12)[0]
    assert (choice.gate_threshold, choice.top, choice.min_area, choice.bottom) == (
        gates[best[0]], grid["tops"][best[1]], grid["min_areas"][best[2]], grid["bottoms"][best[3]])


def test_triplet_with_a_repeated_bottom_scores_both_copies_alike():
    rng = np.random.default_rng(32)
    probs = rng.random((5, 9, 9)).astype(np.float32)
    truths = random_mask(rng, (5, 9, 9), 0.3)
    grid = {"tops": (0.9,), "min_areas": (0, 5), "bottoms": (0.7, 0.3, 0.7)}
    choice = metrics.best_triplet(probs, truths, **grid)
    np.testing.assert_allclose(choice.scores, ref_triplet_grid(probs, truths, *grid.values()), atol=1e-14, rtol=0)


def test_triplet_choice_of_gate_zero_is_passed_on_to_postprocess():
    from pneumoseg import postprocess

    probs, truths = _two_images()
    scores = np.array([0.3, 0.2])
    # Gate 0 keeps both images (Dice 1 each at min_area 1); gate .5 drops image 0 (0.5). The best is
    # gate 0, and postprocess_kwargs must say so: left out, postprocess's default gate of .5 applies.
    choice = metrics.best_triplet(probs, truths, tops=(0.5,), min_areas=(1,), bottoms=(0.3,),
                                  gate_scores=scores, gate_thresholds=(0.0, 0.5))
    assert choice.postprocess_kwargs() == {"top": 0.5, "min_area": 1, "bottom": 0.3, "gate_threshold": 0.0}
    masks = postprocess.postprocess(probs, scores, **choice.postprocess_kwargs())
    assert metrics.kaggle_dice(masks, truths) == choice.score == 1.0
