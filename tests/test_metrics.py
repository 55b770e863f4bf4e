from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuda_sync import synchronisation_forbidden
from factories import blocky_mask, random_mask
from pneumoseg import metrics, postprocess
from pneumoseg.errors import InvalidInputError
from reference import trapezoid_area
from reference_metrics import (
    ref_auc,
    ref_average_precision,
    ref_confusion,
    ref_dice,
    ref_iou,
    ref_pr_curve,
    ref_roc_points,
    ref_triplet_grid,
)


torch = pytest.importorskip("torch")


# ------------------------------------------------------------------------------------------ masks


def last_pixel(shape):
    m = np.zeros(shape, np.uint8)
    m[..., -1, -1] = 1
    return m


MASK_CASES = {
    # name: (pred, truth) as uint8 (N, H, W) or (H, W)
    "both empty": lambda r: (np.zeros((3, 5, 7), np.uint8), np.zeros((3, 5, 7), np.uint8)),
    "pred empty": lambda r: (np.zeros((2, 9, 4), np.uint8), random_mask(r, (2, 9, 4), 0.3)),
    "truth empty": lambda r: (random_mask(r, (2, 9, 4), 0.3), np.zeros((2, 9, 4), np.uint8)),
    "both full": lambda r: (np.ones((2, 6, 6), np.uint8), np.ones((2, 6, 6), np.uint8)),
    "full vs random": lambda r: (np.ones((3, 8, 5), np.uint8), random_mask(r, (3, 8, 5), 0.5)),
    "last pixel both": lambda r: (last_pixel((2, 11, 13)), last_pixel((2, 11, 13))),
    "last pixel vs empty": lambda r: (last_pixel((11, 13)), np.zeros((11, 13), np.uint8)),
    "one pixel each, apart": lambda r: (last_pixel((1, 4, 4)), np.pad(np.ones((1, 1, 1), np.uint8), ((0, 0), (0, 3), (0, 3)))),
    "single image": lambda r: (random_mask(r, (17, 23), 0.4), random_mask(r, (17, 23), 0.4)),
    "batch of one": lambda r: (random_mask(r, (1, 31, 9), 0.4), random_mask(r, (1, 31, 9), 0.4)),
    "many small": lambda r: (random_mask(r, (40, 7, 3), 0.3), random_mask(r, (40, 7, 3), 0.3)),
    # at least 4096 pixels per image: the per-image loop rather than the chunked row counts
    "large odd": lambda r: (np.stack([blocky_mask(r, (67, 71)) for _ in range(3)]),
                            np.stack([blocky_mask(r, (67, 71)) for _ in range(3)])),
    "large mixed": lambda r: (np.stack([blocky_mask(r, (65, 64)), np.zeros((65, 64), np.uint8)]),
                              np.stack([np.zeros((65, 64), np.uint8), blocky_mask(r, (65, 64))])),
}


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_dice_and_iou_match_reference(case):
    pred, truth = MASK_CASES[case](np.random.default_rng(7))
    dice = metrics.dice_per_image(pred, truth)
    jaccard = metrics.iou(pred, truth)
    np.testing.assert_allclose(dice, ref_dice(pred, truth) if pred.ndim == 3 else ref_dice(pred, truth)[0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(jaccard, ref_iou(pred, truth) if pred.ndim == 3 else ref_iou(pred, truth)[0], rtol=0, atol=1e-15)
    assert metrics.kaggle_dice(pred, truth) == pytest.approx(ref_dice(pred, truth).mean(), abs=1e-15)
    assert metrics.mean_iou(pred, truth) == pytest.approx(ref_iou(pred, truth).mean(), abs=1e-15)
    assert isinstance(metrics.kaggle_dice(pred, truth), float)


def test_dice_by_hand():
    pred = np.zeros((4, 2, 2), np.uint8)
    truth = np.zeros((4, 2, 2), np.uint8)
    pred[1, 0, 0] = 1  # false positive on an empty image: 0
    truth[2, 0] = 1  # missed: 0
    pred[3, 0] = 1
    truth[3, :, 0] = 1  # |P & T| = 1, |P| = 2, |T| = 2: 0.5
    np.testing.assert_array_equal(metrics.dice_per_image(pred, truth), [1.0, 0.0, 0.0, 0.5])
    np.testing.assert_array_equal(metrics.iou(pred, truth), [1.0, 0.0, 0.0, 1 / 3])
    assert metrics.kaggle_dice(pred, truth) == 0.375


@pytest.mark.parametrize("dtype", [np.bool_, np.uint8, np.int8, np.int32, np.int64, np.uint16, np.float16, np.float32, np.float64])
def test_any_dtype_nonzero_is_foreground(dtype):
    rng = np.random.default_rng(1)
    pred, truth = random_mask(rng, (5, 19, 12), 0.4), random_mask(rng, (5, 19, 12), 0.4)
    expected = ref_dice(pred, truth)
    if np.dtype(dtype).kind in "iu":
        # any nonzero value is foreground, negative ones too
        scale = -3 if np.dtype(dtype).kind == "i" else 255
        p, t = (pred.astype(np.int64) * scale).astype(dtype), (truth * 7).astype(dtype)
    else:
        p, t = pred.astype(dtype), truth.astype(dtype)
    np.testing.assert_allclose(metrics.dice_per_image(p, t), expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(metrics.dice_per_image(torch.from_numpy(p), torch.from_numpy(t)).numpy(), expected,
                               rtol=0, atol=1e-15)


@pytest.mark.parametrize("shape", [(13, 17), (1, 5, 3), (6, 33, 20), (3, 70, 65)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_threshold_matches_reference(shape, dtype):
    rng = np.random.default_rng(2)
    probs = rng.random(shape).astype(dtype)
    truth = random_mask(rng, shape, 0.3)
    fg = probs.astype(np.float64) > 0.55
    np.testing.assert_allclose(metrics.dice_per_image(probs, truth, threshold=0.55),
                               ref_dice(fg, truth)[0] if len(shape) == 2 else ref_dice(fg, truth), rtol=0, atol=1e-15)
    assert metrics.kaggle_dice(torch.from_numpy(probs), torch.from_numpy(truth), threshold=0.55).item() == pytest.approx(
        ref_dice(fg, truth).mean(), abs=1e-15)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_threshold_compares_exactly_as_postprocess(dtype):
    """A float32 0.3f is above the double 0.3: the metric thresholds as the native post-processing does."""
    values = np.array([0.3, np.nextafter(np.float32(0.3), 0), 0.29, 0.31, 0.75, 1.0, 0.0], dtype=dtype)
    probs = np.tile(values, (1, 5, 1))  # (1, 5, 7)
    truth = np.ones(probs.shape, np.uint8)
    ours = metrics.overlap_counts(probs, truth, threshold=0.3)[1]
    native = postprocess.postprocess(probs, top=None, bottom=0.3)
    assert ours[0] == np.count_nonzero(native) == np.count_nonzero(probs.astype(np.float64) > 0.3)
    assert metrics.overlap_counts(torch.from_numpy(probs), torch.from_numpy(truth), threshold=0.3)[1].item() == ours[0]


def test_bfloat16_and_logit_thresholds():
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.normal(size=(4, 20, 24)).astype(np.float32)).to(torch.bfloat16)
    truth = random_mask(rng, (4, 20, 24), 0.4)
    expected = ref_dice(logits.float().numpy().astype(np.float64) > 0.0, truth)
    got = metrics.dice_per_image(logits, torch.from_numpy(truth), threshold=0.0)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-15)


def test_layouts_and_non_contiguous_inputs():
    rng = np.random.default_rng(4)
    pred, truth = random_mask(rng, (5, 21, 14), 0.5), random_mask(rng, (5, 21, 14), 0.5)
    expected = ref_dice(pred, truth)
    # (N, 1, H, W) network output against (N, H, W) masks
    np.testing.assert_allclose(metrics.dice_per_image(pred[:, None], truth), expected, atol=1e-15, rtol=0)
    # transposed and strided views
    np.testing.assert_allclose(
        metrics.dice_per_image(np.ascontiguousarray(pred.transpose(0, 2, 1)).transpose(0, 2, 1), truth), expected,
        atol=1e-15, rtol=0)
    wide_p, wide_t = np.repeat(pred, 2, axis=2), np.repeat(truth, 2, axis=2)
    np.testing.assert_allclose(metrics.dice_per_image(wide_p[:, :, ::2], wide_t[:, :, 1::2]), expected, atol=1e-15, rtol=0)
    tp = torch.from_numpy(pred).transpose(1, 2)
    tt = torch.from_numpy(truth).transpose(1, 2)
    np.testing.assert_allclose(metrics.dice_per_image(tp, tt).numpy(), expected, atol=1e-15, rtol=0)
    # lists, and NumPy against torch
    np.testing.assert_allclose(metrics.dice_per_image(pred[0].tolist(), truth[0].tolist()), expected[0], atol=1e-15, rtol=0)
    mixed = metrics.dice_per_image(pred, torch.from_numpy(truth))
    assert isinstance(mixed, torch.Tensor)
    np.testing.assert_allclose(mixed.numpy(), expected, atol=1e-15, rtol=0)


def test_answer_types():
    rng = np.random.default_rng(5)
    pred, truth = random_mask(rng, (3, 8, 8), 0.5), random_mask(rng, (3, 8, 8), 0.5)
    assert metrics.dice_per_image(pred, truth).shape == (3,)
    assert np.ndim(metrics.dice_per_image(pred[0], truth[0])) == 0
    single = metrics.dice_per_image(torch.from_numpy(pred[0]), torch.from_numpy(truth[0]))
    assert isinstance(single, torch.Tensor) and single.shape == ()
    mean = metrics.kaggle_dice(torch.from_numpy(pred), torch.from_numpy(truth))
    assert isinstance(mean, torch.Tensor) and mean.shape == () and mean.dtype == torch.float64
    assert metrics.dice_per_image(np.zeros((0, 4, 4)), np.zeros((0, 4, 4))).shape == (0,)
    inter, p, t = metrics.overlap_counts(pred, truth)
    expected = np.array([[np.sum(a & b), a.sum(), b.sum()] for a, b in zip(pred, truth)])
    np.testing.assert_array_equal(np.stack([inter, p, t], 1), expected)


def test_requires_grad_tensors():
    probs = torch.rand(2, 9, 9, requires_grad=True)
    truth = torch.rand(2, 9, 9) > 0.5
    got = metrics.dice_per_image(probs, truth, threshold=0.5)
    np.testing.assert_allclose(got.numpy(), ref_dice(probs.detach().numpy() > 0.5, truth.numpy()), atol=1e-15, rtol=0)


@pytest.mark.parametrize(
    "pred, truth, kwargs, message",
    [
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), {}, "differ in shape"),
        (np.zeros((2, 4, 4)), np.zeros((3, 4, 4)), {}, "differ in shape"),
        (np.zeros((2, 2, 4, 4)), np.zeros((2, 4, 4)), {}, "2 channels"),
        (np.zeros(16), np.zeros(16), {}, r"\(H, W\)"),
        (np.zeros((2, 0, 4)), np.zeros((2, 0, 4)), {}, "no pixels"),
        (np.full((2, 4, 4), 0.7), np.zeros((2, 4, 4)), {}, "pred image 0 holds values other than 0 and 1"),
        (np.zeros((2, 4, 4)), np.full((2, 4, 4), 0.5), {}, "truth image 0 holds values other than 0 and 1"),
        (np.array([[[0.0, np.nan]], [[1.0, 0.2]]]), np.zeros((2, 1, 2)), {"threshold": 0.5}, "pred image 0 holds NaN"),
        (np.zeros((3, 4, 4), np.float32), np.zeros((3, 4, 4)), {"threshold": float("nan")}, "threshold"),
        (np.zeros((3, 4, 4), np.float32), np.zeros((3, 4, 4)), {"threshold": "0.5"}, "threshold"),
        (np.array([["a", "b"]]), np.zeros((1, 2)), {}, "dtype"),
        ([[1, 2], [3]], np.zeros((2, 2)), {}, "could not be read"),
    ],
)
def test_mask_errors(pred, truth, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        metrics.dice_per_image(pred, truth, **kwargs)


def test_masked_and_sparse_inputs_are_refused():
    mask = np.ma.masked_array(np.ones((2, 3, 3)), mask=np.zeros((2, 3, 3), bool))
    with pytest.raises(InvalidInputError, match="masked array"):
        metrics.dice_per_image(mask, np.ones((2, 3, 3)))
    with pytest.raises(InvalidInputError, match="masked array"):
        metrics.roc_auc(np.ma.masked_array([0, 1]), [0.2, 0.4])
    with pytest.raises(InvalidInputError, match="to_dense"):
        metrics.dice_per_image(torch.ones(2, 3, 3).to_sparse(), torch.ones(2, 3, 3))


def test_invalid_float_image_named_in_large_batches():
    pred = np.zeros((3, 80, 80), np.float32)
    pred[2, 5, 5] = 0.4
    with pytest.raises(InvalidInputError, match="pred image 2"):
        metrics.kaggle_dice(pred, np.zeros(pred.shape, np.uint8))


def test_empty_batch_mean_is_an_error():
    with pytest.raises(InvalidInputError, match="empty batch"):
        metrics.kaggle_dice(np.zeros((0, 4, 4)), np.zeros((0, 4, 4)))
    with pytest.raises(InvalidInputError, match="empty batch"):
        metrics.mean_iou(np.zeros((0, 4, 4)), np.zeros((0, 4, 4)))


def test_import_needs_no_torch():
    code = "import sys, numpy as np, pneumoseg; from pneumoseg import metrics; " \
           "metrics.kaggle_dice(np.ones((2, 3, 3)), np.ones((2, 3, 3))); metrics.roc_auc([0, 1], [0.1, 0.9]); " \
           "metrics.best_triplet(np.ones((2, 3, 3)), np.ones((2, 3, 3)), min_areas=(0,)); " \
           "assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------ classifiers


def scores_with_ties(rng, n, levels):
    return np.round(rng.random(n) * levels) / levels


CLASSIFIER_CASES = {
    "two": lambda r: (np.array([0, 1]), np.array([0.2, 0.7])),
    "two reversed": lambda r: (np.array([1, 0]), np.array([0.2, 0.7])),
    "tied pair": lambda r: (np.array([0, 1]), np.array([0.5, 0.5])),
    "all tied": lambda r: (np.array([0, 1, 1, 0, 1]), np.full(5, 0.3)),
    "perfect": lambda r: (np.r_[np.zeros(10), np.ones(7)], np.r_[np.linspace(0, 0.4, 10), np.linspace(0.6, 1, 7)]),
    "many ties": lambda r: (r.integers(0, 2, 300), scores_with_ties(r, 300, 5)),
    "few positives": lambda r: (np.r_[1, np.zeros(60, int)], r.random(61)),
    "distinct": lambda r: (r.integers(0, 2, 200), r.random(200)),
    "logits": lambda r: (r.integers(0, 2, 150), r.normal(size=150) * 8),
}


@pytest.mark.parametrize("case", list(CLASSIFIER_CASES))
def test_ranking_metrics_match_reference(case):
    y, s = CLASSIFIER_CASES[case](np.random.default_rng(11))
    assert metrics.roc_auc(y, s) == pytest.approx(ref_auc(y, s), abs=1e-15)
    assert metrics.average_precision(y, s) == pytest.approx(ref_average_precision(y, s), abs=1e-14)
    fpr, tpr, thresholds = metrics.roc_curve(y, s, drop_intermediate=False)
    ref_fpr, ref_tpr, ref_thresholds = ref_roc_points(y, s)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-15, rtol=0)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-15, rtol=0)
    np.testing.assert_array_equal(thresholds, ref_thresholds)
    # dropping points on straight segments changes neither the curve's area nor its end points
    fpr_d, tpr_d, _ = metrics.roc_curve(y, s)
    assert trapezoid_area(tpr_d, fpr_d) == pytest.approx(metrics.roc_auc(y, s), abs=1e-14)
    assert trapezoid_area(tpr, fpr) == pytest.approx(metrics.roc_auc(y, s), abs=1e-14)
    precision, recall, pr_thresholds = metrics.precision_recall_curve(y, s)
    ref_precision, ref_recall, ref_pr_thresholds = ref_pr_curve(y, s)
    np.testing.assert_allclose(precision, ref_precision, atol=1e-15, rtol=0)
    np.testing.assert_allclose(recall, ref_recall, atol=1e-15, rtol=0)
    np.testing.assert_array_equal(pr_thresholds, ref_pr_thresholds)


@pytest.mark.parametrize("case", list(CLASSIFIER_CASES))
def test_ranking_metrics_match_sklearn(case):
    sk = pytest.importorskip("sklearn.metrics")
    y, s = CLASSIFIER_CASES[case](np.random.default_rng(11))
    assert metrics.roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-14)
    assert metrics.average_precision(y, s) == pytest.approx(sk.average_precision_score(y, s), abs=1e-14)
    for drop in (True, False):
        for ours, theirs in zip(metrics.roc_curve(y, s, drop_intermediate=drop),
                                sk.roc_curve(y, s, drop_intermediate=drop)):
            np.testing.assert_allclose(ours, theirs, atol=1e-15, rtol=0)
        for ours, theirs in zip(metrics.precision_recall_curve(y, s, drop_intermediate=drop),
                                sk.precision_recall_curve(y, s, drop_intermediate=drop)):
            np.testing.assert_allclose(ours, theirs, atol=1e-15, rtol=0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 4)), min_size=2, max_size=40)
       .filter(lambda pairs: len({label for label, _ in pairs}) == 2))
def test_auc_and_ap_with_heavy_ties(pairs):
    y = np.array([label for label, _ in pairs])
    s = np.array([score for _, score in pairs], dtype=np.float64)
    assert metrics.roc_auc(y, s) == pytest.approx(ref_auc(y, s), abs=1e-15)
    assert metrics.average_precision(y, s) == pytest.approx(ref_average_precision(y, s), abs=1e-14)


def test_classifier_input_forms():
    rng = np.random.default_rng(12)
    y, s = rng.integers(0, 2, 50), rng.random(50).astype(np.float32)
    expected = ref_auc(y, s)
    forms = [
        (y.tolist(), s.tolist()),
        (y.astype(bool), s),
        (y.astype(np.float32), s.astype(np.float16).astype(np.float32)),
        (torch.from_numpy(y), torch.from_numpy(s)),
        (torch.from_numpy(y)[:, None], torch.from_numpy(s)[:, None]),  # a classifier's (N, 1) output
        (torch.from_numpy(y).bool(), torch.from_numpy(s).to(torch.bfloat16)),
        (y, torch.from_numpy(s).requires_grad_()),
    ]
    for labels, scores in forms:
        got = metrics.roc_auc(labels, scores)
        ranked = np.asarray(torch.as_tensor(scores).detach().float().numpy() if isinstance(scores, torch.Tensor) else scores)
        assert got == pytest.approx(ref_auc(y, ranked.ravel()), abs=1e-15)
    assert metrics.roc_auc(y, s) == pytest.approx(expected, abs=1e-15)
    # any monotone transform of the scores leaves the ranking metrics unchanged
    logits = np.log(s / (1 - s))
    assert metrics.roc_auc(y, logits) == pytest.approx(expected, abs=1e-15)
    assert metrics.average_precision(y, logits) == pytest.approx(metrics.average_precision(y, s), abs=1e-15)


@pytest.mark.parametrize("threshold", [None, 0.0, 0.5, 0.31, 1.0])
def test_confusion_matrix_and_rates(threshold):
    rng = np.random.default_rng(13)
    y = rng.integers(0, 2, 120)
    s = scores_with_ties(rng, 120, 10)
    second = (s >= 0.5).astype(int) if threshold is None else s
    predicted = second if threshold is None else s >= threshold
    expected = ref_confusion(y, predicted)
    got = metrics.confusion_matrix(y, second, threshold=threshold)
    np.testing.assert_array_equal(got, expected)
    (tn, fp), (fn, tp) = expected
    sens, spec = metrics.sensitivity_specificity(y, second, threshold=threshold)
    assert (sens, spec) == (tp / (tp + fn), tn / (tn + fp))
    assert isinstance(sens, float) and isinstance(spec, float)
    sk = pytest.importorskip("sklearn.metrics")
    np.testing.assert_array_equal(got, sk.confusion_matrix(y, predicted.astype(int), labels=[0, 1]))


def test_roc_curve_threshold_points_are_confusion_matrices():
    rng = np.random.default_rng(14)
    y, s = rng.integers(0, 2, 80), scores_with_ties(rng, 80, 8)
    fpr, tpr, thresholds = metrics.roc_curve(y, s)
    for f, t, threshold in zip(fpr[1:], tpr[1:], thresholds[1:]):
        (tn, fp), (fn, tp) = metrics.confusion_matrix(y, s, threshold=threshold)
        assert (f, t) == (fp / (fp + tn), tp / (tp + fn))


@pytest.mark.parametrize(
    "fn, labels, scores, message",
    [
        (metrics.roc_auc, [1, 1, 1], [0.1, 0.2, 0.3], "no negatives"),
        (metrics.roc_auc, [0, 0], [0.1, 0.2], "no positives"),
        (metrics.roc_curve, [0, 0], [0.1, 0.2], "no positives"),
        (metrics.average_precision, [0, 0, 0], [0.1, 0.2, 0.3], "no positives"),
        (metrics.precision_recall_curve, [0, 0], [0.1, 0.2], "no positives"),
        (metrics.roc_auc, [0, 1, 1], [0.1, float("nan"), 0.3], r"scores\[1\] is nan"),
        (metrics.roc_auc, [0, 1, 1], [0.1, 0.2, float("inf")], "finite"),
        (metrics.roc_auc, [0, 2, 1], [0.1, 0.2, 0.3], r"labels\[1\] is 2"),
        (metrics.roc_auc, [0, -1, 1], [0.1, 0.2, 0.3], "only 0 and 1"),
        (metrics.roc_auc, [0.0, 0.5, 1.0], [0.1, 0.2, 0.3], "only 0 and 1"),
        (metrics.roc_auc, [0, 1, float("nan")], [0.1, 0.2, 0.3], "only 0 and 1"),
        (metrics.roc_auc, [0, 1], [0.1, 0.2, 0.3], "2 values but scores has 3"),
        (metrics.roc_auc, [], [], "empty"),
        (metrics.roc_auc, [0, 1], [[0.1, 0.9], [0.8, 0.2]], r"\(N,\) or \(N, 1\)"),
        (metrics.roc_auc, 1, 0.5, r"\(N,\) or \(N, 1\)"),
        (metrics.roc_auc, ["no", "yes"], [0.1, 0.2], "dtype"),
    ],
)
def test_classifier_errors(fn, labels, scores, message):
    with pytest.raises(InvalidInputError, match=message):
        fn(labels, scores)


def test_single_class_ap_and_confusion_are_defined_where_meaningful():
    # AP with no negatives: every threshold has precision 1
    assert metrics.average_precision([1, 1, 1], [0.2, 0.5, 0.1]) == 1.0
    np.testing.assert_array_equal(metrics.confusion_matrix([0, 0, 0], [0, 1, 0]), [[2, 1], [0, 0]])
    with pytest.raises(InvalidInputError, match="no positives, so sensitivity"):
        metrics.sensitivity_specificity([0, 0, 0], [0, 1, 0])
    with pytest.raises(InvalidInputError, match="no negatives, so specificity"):
        metrics.sensitivity_specificity([1, 1], [0.3, 0.9], threshold=0.5)
    with pytest.raises(InvalidInputError, match="pass threshold="):
        metrics.confusion_matrix([0, 1, 1], [0.2, 0.7, 0.9])
    with pytest.raises(InvalidInputError, match="threshold"):
        metrics.confusion_matrix([0, 1, 1], [0.2, 0.7, 0.9], threshold=float("nan"))


# ---------------------------------------------------------------------------------- triplet search


def network_like_batch(rng, n, shape, empty_every=2):
    """Truths (some empty) and probability maps that roughly follow them, with false-positive blocks."""
    truths = np.stack([np.zeros(shape, np.uint8) if i % empty_every == 0 else blocky_mask(rng, shape, 2) for i in range(n)])
    probs = 0.55 * truths + 0.35 * rng.random((n,) + shape)
    for i in range(0, n, 3):
        probs[i] += 0.4 * blocky_mask(rng, shape, 1)
    return np.clip(probs, 0, 1).astype(np.float32), truths


GRID = {"tops": (0.5, 0.7, 0.85), "min_areas": (0, 20, 150, 600), "bottoms": (0.3, 0.5, 0.7)}


@pytest.mark.parametrize("shape", [(24, 31), (40, 40)])
def test_triplet_grid_matches_brute_force(shape):
    rng = np.random.default_rng(21)
    probs, truths = network_like_batch(rng, 7, shape)
    choice = metrics.best_triplet(probs, truths, **GRID)
    expected = ref_triplet_grid(probs, truths, GRID["tops"], GRID["min_areas"], GRID["bottoms"])
    np.testing.assert_allclose(choice.scores, expected, atol=1e-14, rtol=0)
    assert choice.score == pytest.approx(expected.max(), abs=1e-14)
    assert choice.gate_threshold is None and choice.images == 7
    # the chosen triplet applied by the native post-processing scores what the search said
    masks = postprocess.triplet_threshold(probs, choice.top, choice.min_area, choice.bottom)
    assert metrics.kaggle_dice(masks, truths) == pytest.approx(choice.score, abs=1e-14)
    # the first best point in grid order
    best = np.argwhere(expected >= expected.max() - 1e-12)[0]
    assert (choice.top, choice.min_area, choice.bottom) == (
        GRID["tops"][best[0]], GRID["min_areas"][best[1]], GRID["bottoms"][best[2]])


def test_triplet_with_gating_matches_brute_force():
    rng = np.random.default_rng(22)
    probs, truths = network_like_batch(rng, 9, (20, 26))
    gate_scores = np.clip(truths.reshape(9, -1).max(1) * 0.5 + rng.random(9) * 0.6, 0, 1)
    gates = (0.2, 0.5, 0.8)
    choice = metrics.best_triplet(probs, truths, gate_scores=gate_scores, gate_thresholds=gates, **GRID)
    expected = ref_triplet_grid(probs, truths, GRID["tops"], GRID["min_areas"], GRID["bottoms"], gate_scores, gates)
    assert choice.scores.shape == (3, 3, 4, 3)
    np.testing.assert_allclose(choice.scores, expected, atol=1e-14, rtol=0)
    masks = postprocess.postprocess(probs, gate_scores, **choice.postprocess_kwargs())
    assert metrics.kaggle_dice(masks, truths) == pytest.approx(choice.score, abs=1e-14)


def test_triplet_search_in_batches_equals_one_call_and_torch_input():
    rng = np.random.default_rng(23)
    probs, truths = network_like_batch(rng, 10, (30, 22))
    scores = rng.random(10)
    whole = metrics.best_triplet(probs, truths, gate_scores=scores, **GRID)
    assert whole.gate_thresholds == metrics.triplet.DEFAULT_GATE_THRESHOLDS
    search = metrics.TripletSearch(**GRID)
    for start in (0, 3, 4, 9):
        stop = {0: 3, 3: 4, 4: 9, 9: 10}[start]
        batch = slice(start, stop)
        search.update(torch.from_numpy(probs[batch])[:, None], torch.from_numpy(truths[batch]), torch.from_numpy(scores[batch]))
    parts = search.result()
    np.testing.assert_allclose(parts.scores, whole.scores, atol=1e-14, rtol=0)
    assert (parts.top, parts.min_area, parts.bottom, parts.gate_threshold, parts.images) == (
        whole.top, whole.min_area, whole.bottom, whole.gate_threshold, 10)
    search.reset()
    with pytest.raises(InvalidInputError, match="no images"):
        search.result()


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_triplet_thresholds_exact_for_other_float_types(dtype):
    rng = np.random.default_rng(24)
    levels = np.array([0.3, 0.5, 0.7, 0.29, 0.71], dtype=dtype)  # pixels exactly at the thresholds
    probs = rng.choice(levels, size=(6, 12, 12))
    truths = random_mask(rng, (6, 12, 12), 0.4)
    grid = {"tops": (0.5, 0.7), "min_areas": (0, 10, 40), "bottoms": (0.3, 0.5)}
    choice = metrics.best_triplet(probs, truths, **grid)
    np.testing.assert_allclose(choice.scores, ref_triplet_grid(probs, truths, *grid.values()), atol=1e-14, rtol=0)


def test_triplet_default_grid_scales_min_areas():
    rng = np.random.default_rng(25)
    probs, truths = network_like_batch(rng, 4, (64, 64))
    choice = metrics.best_triplet(probs, truths)
    assert choice.min_areas == (0, 1, 2, 4, 8, 12, 16)  # the 1024x1024 areas over 256
    assert choice.tops == metrics.triplet.DEFAULT_TOPS and choice.bottoms == metrics.triplet.DEFAULT_BOTTOMS
    assert choice.scores.shape == (6, 7, 4)
    assert choice.score == choice.scores.max() and 0.0 <= choice.score <= 1.0


def test_triplet_min_area_beyond_int64_saturates():
    # An area above 2**63 - 1 means "never positive", as postprocess reads it; it overflowed int64.
    probs, truths = np.full((2, 4, 4), 0.6, np.float32), np.zeros((2, 4, 4), np.uint8)
    choice = metrics.best_triplet(probs, truths, min_areas=(2**70,), tops=(0.5,), bottoms=(0.5,))
    assert choice.min_area == 2**63 - 1
    assert choice.score == 1.0  # every prediction emptied, every truth empty
    assert postprocess.postprocess(probs, **choice.postprocess_kwargs()).sum() == 0


def test_triplet_errors():
    probs, truths = np.full((2, 4, 4), 0.6, np.float32), np.zeros((2, 4, 4), np.uint8)
    with pytest.raises(InvalidInputError, match="floating-point"):
        metrics.best_triplet(truths, truths)
    nan = probs.copy()
    nan[1, 0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="image 1 of this batch holds NaN"):
        metrics.best_triplet(nan, truths)
    with pytest.raises(InvalidInputError, match="tops is empty"):
        metrics.best_triplet(probs, truths, tops=())
    with pytest.raises(InvalidInputError, match="bottoms value must be in"):
        metrics.best_triplet(probs, truths, bottoms=(0.3, 1.5))
    with pytest.raises(InvalidInputError, match="min_areas value must be a non-negative integer"):
        metrics.best_triplet(probs, truths, min_areas=(10, -1))
    with pytest.raises(InvalidInputError, match="gate_scores has 3 values for a batch of 2"):
        metrics.best_triplet(probs, truths, gate_scores=[0.1, 0.2, 0.3])
    with pytest.raises(InvalidInputError, match="gate_scores"):
        metrics.best_triplet(probs, truths, gate_scores=[0.1, float("nan")])
    search = metrics.TripletSearch(gate_thresholds=(0.5,))
    with pytest.raises(InvalidInputError, match="every batch"):
        search.update(probs, truths)
    search = metrics.TripletSearch()
    search.update(probs, truths)
    with pytest.raises(InvalidInputError, match="without gating"):
        search.update(probs, truths, [0.2, 0.3])


# ------------------------------------------------------------------------------------------- CUDA


@pytest.fixture
def device_path_on_cpu(monkeypatch):
    """Route CPU tensors through the batched torch code that CUDA input takes, so its arithmetic and
    its NaN flags are checked on machines without a GPU too."""
    from pneumoseg.metrics import _inputs, segmentation, triplet

    def as_device_pair(pred, truth):
        pair = _inputs.mask_pair(pred, truth)
        p, t = torch.as_tensor(pair.pred), torch.as_tensor(pair.truth)
        return _inputs.MaskPair(p, t, pair.single, True, True, p.device)

    monkeypatch.setattr(segmentation, "mask_pair", as_device_pair)
    monkeypatch.setattr(triplet, "mask_pair", as_device_pair)


def test_device_path_arithmetic(device_path_on_cpu):
    rng = np.random.default_rng(33)
    probs = rng.random((5, 23, 17)).astype(np.float32)
    truth = random_mask(rng, (5, 23, 17), 0.3)
    truth[0], probs[0] = 0, 0.2  # both empty at threshold 0.5
    dice = metrics.dice_per_image(probs, truth, threshold=0.5)
    assert isinstance(dice, torch.Tensor) and dice.dtype == torch.float64
    np.testing.assert_allclose(dice.numpy(), ref_dice(probs > 0.5, truth), atol=1e-15, rtol=0)
    np.testing.assert_allclose(metrics.iou(probs, truth, threshold=0.5).numpy(), ref_iou(probs > 0.5, truth), atol=1e-15, rtol=0)
    assert metrics.kaggle_dice(probs, truth, threshold=0.5).item() == pytest.approx(ref_dice(probs > 0.5, truth).mean(), abs=1e-15)
    # invalid images are NaN there instead of an error (raising would synchronise)
    bad = (probs > 0.5).astype(np.float32)
    bad[1, 0, 0], bad[3, 2, 2] = 0.5, np.nan
    got = metrics.dice_per_image(bad, truth).numpy()
    assert np.isnan(got[[1, 3]]).all()
    np.testing.assert_allclose(got[[0, 2, 4]], ref_dice(probs > 0.5, truth)[[0, 2, 4]], atol=1e-15, rtol=0)
    nan_probs = probs.copy()
    nan_probs[4, 1, 1] = np.nan
    assert np.isnan(metrics.dice_per_image(nan_probs, truth, threshold=0.5).numpy()[4])
    soft_truth = truth.astype(np.float32) * 0.9
    assert np.isnan(metrics.dice_per_image(probs, soft_truth, threshold=0.5).numpy()[1:]).all()


def test_device_path_triplet_search(device_path_on_cpu):
    rng = np.random.default_rng(34)
    probs, truths = network_like_batch(rng, 8, (26, 19))
    scores = rng.random(8)
    search = metrics.TripletSearch(**GRID)
    search.update(probs[:5], truths[:5], scores[:5])
    search.update(probs[5:].astype(np.float16), truths[5:], scores[5:])
    expected = ref_triplet_grid(np.concatenate([probs[:5], probs[5:].astype(np.float16).astype(np.float32)]), truths,
                                GRID["tops"], GRID["min_areas"], GRID["bottoms"], scores, metrics.triplet.DEFAULT_GATE_THRESHOLDS)
    np.testing.assert_allclose(search.result().scores, expected, atol=1e-14, rtol=0)
    probs[6, 3, 3] = np.nan
    search = metrics.TripletSearch(**GRID)
    search.update(probs, truths)
    with pytest.raises(InvalidInputError, match="NaN in 1 images"):
        search.result()



@pytest.mark.cuda
def test_cuda_dice_stays_on_device_without_sync():
    rng = np.random.default_rng(31)
    probs = rng.random((6, 97, 130)).astype(np.float32)
    truth = random_mask(rng, (6, 97, 130), 0.3)
    truth[0] = 0
    probs[0] = 0.1  # both empty
    p, t = torch.from_numpy(probs).cuda(), torch.from_numpy(truth).cuda()
    torch.cuda.synchronize()
    with synchronisation_forbidden():
        dice = metrics.dice_per_image(p, t, threshold=0.5)
        mean = metrics.kaggle_dice(p[:, None], t.bool(), threshold=0.5)
        jaccard = metrics.iou(p, t.float(), threshold=0.5)
    assert dice.is_cuda and mean.is_cuda and jaccard.is_cuda and mean.shape == ()
    np.testing.assert_allclose(dice.cpu().numpy(), ref_dice(probs > 0.5, truth), atol=1e-15, rtol=0)
    np.testing.assert_allclose(jaccard.cpu().numpy(), ref_iou(probs > 0.5, truth), atol=1e-15, rtol=0)
    assert mean.item() == pytest.approx(ref_dice(probs > 0.5, truth).mean(), abs=1e-15)
    # NumPy truth against a CUDA prediction: moved to the device
    np.testing.assert_allclose(metrics.dice_per_image(p, truth, threshold=0.5).cpu().numpy(), dice.cpu().numpy())


@pytest.mark.cuda
def test_cuda_invalid_images_are_nan_and_devices_must_agree():
    pred = torch.zeros(3, 8, 8, device="cuda")
    pred[1, 0, 0] = 0.5  # a probability without a threshold
    truth = torch.zeros(3, 8, 8, device="cuda")
    dice = metrics.dice_per_image(pred, truth).cpu().numpy()
    assert dice[0] == 1.0 and np.isnan(dice[1]) and dice[2] == 1.0
    with pytest.raises(InvalidInputError, match="different devices"):
        metrics.dice_per_image(pred, truth.cpu())


@pytest.mark.cuda
def test_cuda_triplet_search_matches_cpu():
    rng = np.random.default_rng(32)
    probs, truths = network_like_batch(rng, 8, (64, 48))
    scores = rng.random(8)
    p16 = torch.from_numpy(probs).cuda().half()  # float16 on the GPU: thresholds compared exactly there too
    t, s = torch.from_numpy(truths).cuda(), torch.from_numpy(scores).cuda()
    search = metrics.TripletSearch(**GRID)
    torch.cuda.synchronize()
    with synchronisation_forbidden():
        for batch in (slice(0, 5), slice(5, 8)):
            search.update(p16[batch], t[batch], s[batch])
    cpu = metrics.best_triplet(p16.cpu().numpy(), truths, gate_scores=scores, **GRID)
    np.testing.assert_allclose(search.result().scores, cpu.scores, atol=1e-14, rtol=0)
    nan = torch.from_numpy(probs).cuda()
    nan[2, 0, 0] = float("nan")
    search = metrics.TripletSearch(**GRID)
    search.update(nan, torch.from_numpy(truths).cuda())
    with pytest.raises(InvalidInputError, match="NaN in 1 images"):
        search.result()
