"""Operating points, confidence intervals (bootstrap, DeLong) and calibration: pneumoseg.metrics
against loops written from the definitions (reference_metrics.py) and scikit-learn, and the
`pneumoseg evaluate` figures and flags built on them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pneumoseg import metrics, rle
from pneumoseg.errors import InvalidInputError
from factories import binormal
from reference_metrics import ref_auc, ref_average_precision, ref_calibration, ref_delong_variance, ref_operating_point


CASES = {
    "continuous": lambda: binormal(0, 80),
    "ties": lambda: binormal(1, 90, decimals=1),
    "heavy ties": lambda: (np.r_[np.ones(5, bool), np.zeros(7, bool)], np.r_[0.5, 0.5, 0.5, 0.2, 0.9, 0.5, 0.5, 0.2, 0.2, 0.9, 0.1, 0.5]),
    "separated": lambda: (np.r_[np.ones(4, bool), np.zeros(5, bool)], np.r_[0.9, 0.8, 0.95, 0.7, 0.1, 0.2, 0.3, 0.05, 0.6]),
    "inverted": lambda: (np.r_[np.ones(4, bool), np.zeros(5, bool)], np.r_[0.1, 0.2, 0.05, 0.3, 0.9, 0.8, 0.95, 0.7, 0.6]),
    "all equal": lambda: (np.r_[True, False, True, False, False], np.full(5, 0.4)),
}


# --------------------------------------------------------------------------------- operating points


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("target", ["sensitivity", "specificity"])
@pytest.mark.parametrize("value", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_operating_point_matches_the_definition(case, target, value):
    y, s = CASES[case]()
    got = metrics.operating_point(y, s, **{target: value})
    want = ref_operating_point(y, s, target, value)
    assert got.threshold == want["threshold"]
    assert (got.tp, got.fp, got.tn, got.fn) == (want["tp"], want["fp"], want["tn"], want["fn"])
    assert got.sensitivity == pytest.approx(want["sensitivity"]) and got.specificity == pytest.approx(want["specificity"])
    assert getattr(got, target) >= value
    assert got.ppv == (None if got.tp + got.fp == 0 else pytest.approx(got.tp / (got.tp + got.fp)))
    assert got.npv == (None if got.tn + got.fn == 0 else pytest.approx(got.tn / (got.tn + got.fn)))
    assert (got.target, got.target_value) == (target, value)


@pytest.mark.parametrize("case", ["continuous", "ties", "heavy ties"])
def test_operating_point_agrees_with_sklearns_roc_curve(case):
    sk = pytest.importorskip("sklearn.metrics")
    y, s = CASES[case]()
    fpr, tpr, thresholds = sk.roc_curve(y, s, drop_intermediate=False)
    for value in (0.6, 0.9, 0.95):
        k = int(np.argmax(tpr >= value))  # the first (highest) threshold reaching the sensitivity
        got = metrics.operating_point(y, s, sensitivity=value)
        assert (got.threshold, got.sensitivity, 1 - got.specificity) == (thresholds[k], pytest.approx(tpr[k]), pytest.approx(fpr[k]))
        k = int(np.flatnonzero(1 - fpr >= value)[-1])  # the last (lowest) threshold keeping the specificity
        got = metrics.operating_point(y, s, specificity=value)
        assert got.threshold == thresholds[k] and got.sensitivity == pytest.approx(tpr[k])


def test_operating_point_ties_and_edges():
    # a tie straddles the target: 3 of 4 positives above 0.5, the fourth tied with a negative at 0.4,
    # so 0.9 sensitivity takes the tie whole (and its negative): sensitivity 1, not 0.9
    y = np.array([1, 1, 1, 1, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.7, 0.4, 0.4, 0.2, 0.1])
    p = metrics.operating_point(y, s, sensitivity=0.9)
    assert (p.threshold, p.sensitivity, p.specificity, p.fp) == (0.4, 1.0, pytest.approx(2 / 3), 1)
    # 9 of 10 positives reach 0.9 exactly (the float ratio, not 0.9's binary expansion)
    y10, s10 = np.r_[np.ones(10, int), 0], np.r_[np.arange(10, 0, -1) / 10, 0.05]
    assert metrics.operating_point(y10, s10, sensitivity=0.9).threshold == 0.2
    # all scores equal: only "everything positive" reaches a sensitivity, only "nothing" a specificity
    y, s = CASES["all equal"]()
    p = metrics.operating_point(y, s, specificity=0.5)
    assert math.isinf(p.threshold) and (p.tp, p.fp, p.ppv, p.npv) == (0, 0, None, pytest.approx(3 / 5))
    assert p.to_dict()["threshold"] is None and json.dumps(p.to_dict(), allow_nan=False)
    p = metrics.operating_point(y, s, sensitivity=1.0)
    assert (p.threshold, p.sensitivity, p.specificity, p.npv) == (0.4, 1.0, 0.0, None)
    # n = 2, integer scores: the threshold is a score, in the scores' type
    p = metrics.operating_point([0, 1], [3, 7], sensitivity=1.0)
    assert p.threshold == 7 and isinstance(p.threshold, int) and (p.sensitivity, p.specificity) == (1.0, 1.0)
    with pytest.raises(AttributeError):  # frozen
        p.threshold = 0  # type: ignore[misc]


def test_operating_point_takes_torch_tensors():
    torch = pytest.importorskip("torch")
    y, s = CASES["ties"]()
    want = metrics.operating_point(y, s, sensitivity=0.9)
    got = metrics.operating_point(torch.from_numpy(y), torch.from_numpy(s)[:, None], sensitivity=0.9)
    assert got == want


# ------------------------------------------------------------------------------------------- DeLong


@pytest.mark.parametrize("case", ["continuous", "ties", "heavy ties", "separated", "inverted"])
def test_delong_matches_the_pairwise_kernel_definition(case):
    y, s = CASES[case]()
    ci = metrics.roc_auc_ci(y, s, level=0.9)
    se = math.sqrt(ref_delong_variance(y, s))
    z = 1.6448536269514722  # the normal's 95th percentile
    assert ci.estimate == pytest.approx(ref_auc(y, s))
    assert ci.low == pytest.approx(max(0.0, ci.estimate - z * se), abs=1e-12)
    assert ci.high == pytest.approx(min(1.0, ci.estimate + z * se), abs=1e-12)
    assert (ci.method, ci.level, ci.n_resamples) == ("delong", 0.9, None)


def test_delong_on_separated_classes_has_no_width_and_needs_two_of_each():
    y, s = CASES["separated"]()
    ci = metrics.roc_auc_ci(y, s)
    assert (ci.estimate, ci.low, ci.high) == (1.0, 1.0, 1.0)
    with pytest.raises(InvalidInputError, match="at least 2 positives and 2 negatives"):
        metrics.roc_auc_ci([1, 0, 0], [0.9, 0.1, 0.2])
    # the bootstrap has no such need: n = 2 resamples to itself
    ci = metrics.roc_auc_ci([1, 0], [0.7, 0.3], method="bootstrap", n_resamples=50)
    assert (ci.estimate, ci.low, ci.high) == (1.0, 1.0, 1.0)


def test_delong_and_the_bootstrap_agree_on_random_data():
    for seed in range(3):
        y, s = binormal(10 + seed, 400)
        delong = metrics.roc_auc_ci(y, s)
        boot = metrics.roc_auc_ci(y, s, method="bootstrap", n_resamples=2000, seed=seed)
        assert boot.estimate == delong.estimate
        width_d, width_b = delong.high - delong.low, boot.high - boot.low
        assert width_b == pytest.approx(width_d, rel=0.15), (delong, boot)
        assert abs((boot.low + boot.high) - (delong.low + delong.high)) / 2 < 0.25 * width_d


def test_delong_covers_the_true_auc_about_as_often_as_promised():
    # binormal scores with unit variances and shift d have AUC Phi(d / sqrt 2)
    from statistics import NormalDist

    d, n = 1.0, 120
    true_auc = NormalDist().cdf(d / math.sqrt(2))
    rng = np.random.default_rng(7)
    covered = 0
    for _ in range(400):
        y = rng.random(n) < 0.4
        y[:2], y[2:4] = True, False
        s = rng.normal(size=n) + d * y
        ci = metrics.roc_auc_ci(y, s)
        covered += ci.low <= true_auc <= ci.high
    assert 0.91 <= covered / 400 <= 0.985, covered


# --------------------------------------------------------------------------------------- bootstrap


def _resamples(n_resamples, seed, *arrays, strata=None):
    """The resampled arrays bootstrap_ci hands its statistic (the draws depend only on the seed, the
    length, the strata and the number of resamples), recorded through a statistic that keeps them."""
    seen: list = []

    def record(*batch):
        if batch[0].ndim == 2:
            seen.append([b.copy() for b in batch])
        return np.zeros(batch[0].shape[:-1])

    metrics.bootstrap_ci(record, *arrays, n_resamples=n_resamples, seed=seed, strata=strata)
    return [np.concatenate([chunk[i] for chunk in seen]) for i in range(len(arrays))]


@pytest.mark.parametrize("case", ["continuous", "ties", "heavy ties"])
def test_bootstrap_auc_and_ap_are_the_percentiles_of_the_resamples_own_values(case):
    y, s = CASES[case]()
    ys, ss = _resamples(300, 3, y, s, strata=y)
    assert ys.shape == (300, y.size) and (ys.sum(1) == y.sum()).all()  # each class keeps its size
    pairs = set(zip(y.tolist(), s.tolist()))
    assert all(set(zip(a.tolist(), b.tolist())) <= pairs for a, b in zip(ys[:20], ss[:20]))  # rows, not cells
    for ci, ref in ((metrics.roc_auc_ci(y, s, method="bootstrap", n_resamples=300, seed=3), ref_auc),
                    (metrics.average_precision_ci(y, s, n_resamples=300, seed=3), ref_average_precision)):
        values = [ref(a, b) for a, b in zip(ys, ss)]
        assert (ci.low, ci.high) == pytest.approx(tuple(np.quantile(values, [0.025, 0.975])), abs=1e-12)
        assert ci.estimate == pytest.approx(ref(y, s)) and ci.n_undefined == 0


def test_bootstrap_is_reproducible_and_seeded():
    rng = np.random.default_rng(0)
    x = rng.random(257)
    mean = lambda v: v.mean(axis=-1)  # noqa: E731
    a = metrics.bootstrap_ci(mean, x, n_resamples=500, seed=11)
    assert metrics.bootstrap_ci(mean, x, n_resamples=500, seed=11) == a
    assert metrics.bootstrap_ci(mean, x, n_resamples=500, seed=12) != a
    assert a.estimate == pytest.approx(x.mean()) and a.low < a.estimate < a.high and a.method == "bootstrap"
    # the percentile interval of a mean: about +-1.96 standard errors
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert (a.high - a.low) / (2 * 1.96 * se) == pytest.approx(1.0, rel=0.15)
    # more resamples than one chunk: the chunks join into the same kind of interval
    big = np.arange(5000) % 7 / 7.0
    b = metrics.bootstrap_ci(mean, big, n_resamples=1000, seed=0)
    assert b.low < big.mean() < b.high


def test_bootstrap_is_wider_on_fewer_images_and_contains_the_estimate():
    widths = []
    for n in (60, 240, 960):
        y, s = binormal(5, n)
        for ci in (metrics.roc_auc_ci(y, s, method="bootstrap", n_resamples=400),
                   metrics.average_precision_ci(y, s, n_resamples=400),
                   metrics.bootstrap_ci(lambda t, p: (t & p).sum(-1) / t.sum(-1), y, s >= 0.5, strata=y, n_resamples=400)):
            assert ci.low <= ci.estimate <= ci.high
        widths.append(ci.high - ci.low)
    assert widths[0] > widths[1] > widths[2]


def test_bootstrap_leaves_out_undefined_resamples_and_counts_them():
    # unstratified sensitivity on 2 positives of 12: some resamples hold no positive (0 / 0)
    y = np.r_[True, True, np.zeros(10, bool)]
    predicted = np.r_[True, False, np.zeros(10, bool)]
    sens = lambda t, p: (t & p).sum(-1) / t.sum(-1)  # noqa: E731
    with np.errstate(invalid="ignore"):
        ci = metrics.bootstrap_ci(sens, y, predicted, n_resamples=400, seed=1)
    assert 0 < ci.n_undefined < 400 and 0.0 <= ci.low <= ci.high <= 1.0
    assert metrics.bootstrap_ci(sens, y, predicted, n_resamples=400, seed=1, strata=y).n_undefined == 0


def test_bootstrap_takes_torch_tensors():
    torch = pytest.importorskip("torch")
    x = np.linspace(0, 1, 50)
    mean = lambda v: v.mean(axis=-1)  # noqa: E731
    assert metrics.bootstrap_ci(mean, torch.from_numpy(x), n_resamples=100) == metrics.bootstrap_ci(mean, x, n_resamples=100)


# ------------------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n_bins", [1, 5, 10])
def test_calibration_matches_the_definition(case, n_bins):
    y, s = CASES[case]()
    prob_true, prob_pred, count = metrics.calibration_curve(y, s, n_bins=n_bins, return_counts=True)
    want = ref_calibration(y, s, n_bins)
    assert prob_true == pytest.approx([w[0] for w in want]) and prob_pred == pytest.approx([w[1] for w in want])
    assert count.tolist() == [w[2] for w in want]
    ece = sum(c * abs(t - p) for t, p, c in want) / len(y)
    assert metrics.expected_calibration_error(y, s, n_bins=n_bins) == pytest.approx(ece)
    assert metrics.brier_score(y, s) == pytest.approx(sum((float(p) - float(t)) ** 2 for t, p in zip(y, s)) / len(y))


def test_scores_on_the_bin_edges_fall_in_the_bin_below():
    scores = np.array([0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0])
    _, prob_pred, count = metrics.calibration_curve(np.zeros(7), scores, n_bins=10, return_counts=True)
    # [0, .1] holds 0 and 0.1; (.1, .2] 0.2; (.2, .3] 0.3; (.4, .5] 0.5; (.6, .7] 0.7; (.9, 1] 1
    assert count.tolist() == [2, 1, 1, 1, 1, 1] and prob_pred[0] == pytest.approx(0.05)


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
@pytest.mark.parametrize("case", ["continuous", "ties", "all equal"])
def test_calibration_agrees_with_sklearn(case, strategy):
    calibration = pytest.importorskip("sklearn.calibration")
    sk = pytest.importorskip("sklearn.metrics")
    y, s = CASES[case]()
    want = calibration.calibration_curve(y, s, n_bins=7, strategy=strategy)
    got = metrics.calibration_curve(y, s, n_bins=7, strategy=strategy)
    assert got[0] == pytest.approx(want[0]) and got[1] == pytest.approx(want[1])
    assert metrics.brier_score(y, s) == pytest.approx(sk.brier_score_loss(y, s))


def test_calibration_of_a_calibrated_and_of_an_overconfident_classifier():
    rng = np.random.default_rng(3)
    p = rng.random(20000)
    y = rng.random(20000) < p  # right p of the time: calibrated
    assert metrics.expected_calibration_error(y, p) < 0.02
    assert metrics.brier_score(y, p) == pytest.approx(1 / 6, abs=0.01)  # E[p(1-p)] for uniform p
    sharp = np.where(p > 0.5, 1.0, 0.0)  # same ranking, all-or-nothing: badly calibrated
    assert metrics.expected_calibration_error(y, sharp) > 0.2
    # one class only is fine for calibration (it needs no pairs)
    assert metrics.brier_score([0, 0], [0.0, 0.5]) == 0.125


# ---------------------------------------------------------------------------------- hostile input

BAD_CALLS = {
    "operating point, one class": (lambda: metrics.operating_point([1, 1], [0.2, 0.3], sensitivity=0.9), "no negatives"),
    "operating point, NaN score": (lambda: metrics.operating_point([1, 0], [np.nan, 0.3], sensitivity=0.9), "finite"),
    "operating point, no target": (lambda: metrics.operating_point([1, 0], [0.1, 0.3]), "exactly one target"),
    "operating point, two targets": (lambda: metrics.operating_point([1, 0], [0.1, 0.3], sensitivity=0.9, specificity=0.9), "both"),
    "operating point, target 0": (lambda: metrics.operating_point([1, 0], [0.1, 0.3], sensitivity=0), r"sensitivity must be in \(0, 1\]"),
    "operating point, target 1.5": (lambda: metrics.operating_point([1, 0], [0.1, 0.3], specificity=1.5), "specificity must be in"),
    "operating point, target NaN": (lambda: metrics.operating_point([1, 0], [0.1, 0.3], sensitivity=float("nan")), "finite"),
    "operating point, target a string": (lambda: metrics.operating_point([1, 0], [0.1, 0.3], sensitivity="0.9"), "real number"),
    "operating point, lengths": (lambda: metrics.operating_point([1, 0, 1], [0.1, 0.3], sensitivity=0.9), "has 3 values"),
    "auc ci, one class": (lambda: metrics.roc_auc_ci([0, 0, 0], [0.1, 0.2, 0.3]), "no positives"),
    "auc ci, level 1": (lambda: metrics.roc_auc_ci([1, 0, 1, 0], [0.1, 0.2, 0.3, 0.4], level=1), r"level must be in \(0, 1\)"),
    "auc ci, level 0": (lambda: metrics.roc_auc_ci([1, 0, 1, 0], [0.1, 0.2, 0.3, 0.4], level=0.0), "level must be in"),
    "auc ci, method": (lambda: metrics.roc_auc_ci([1, 0, 1, 0], [0.1, 0.2, 0.3, 0.4], method="wald"), "method must be one of"),
    "auc ci, resamples 0": (lambda: metrics.roc_auc_ci([1, 0], [0.1, 0.2], method="bootstrap", n_resamples=0), "n_resamples must be at least 1"),
    "ap ci, no positives": (lambda: metrics.average_precision_ci([0, 0], [0.1, 0.2]), "no positives"),
    "bootstrap, resamples float": (lambda: metrics.bootstrap_ci(np.mean, [1.0, 2.0], n_resamples=2.5), "n_resamples must be an integer"),
    "bootstrap, resamples bool": (lambda: metrics.bootstrap_ci(np.mean, [1.0, 2.0], n_resamples=True), "n_resamples must be an integer"),
    "bootstrap, resamples huge": (lambda: metrics.bootstrap_ci(np.mean, [1.0, 2.0], n_resamples=10**12), "at most"),
    "bootstrap, negative seed": (lambda: metrics.bootstrap_ci(np.mean, [1.0, 2.0], seed=-1), "seed must be at least 0"),
    "bootstrap, nothing to resample": (lambda: metrics.bootstrap_ci(np.mean), "at least one array"),
    "bootstrap, not callable": (lambda: metrics.bootstrap_ci(3, [1.0, 2.0]), "callable"),
    "bootstrap, lengths": (lambda: metrics.bootstrap_ci(np.mean, [1.0, 2.0], [1.0]), "arrays.1. has 1"),
    "bootstrap, strata length": (lambda: metrics.bootstrap_ci(np.mean, [1.0, 2.0], strata=[1]), "strata has 1"),
    "bootstrap, empty": (lambda: metrics.bootstrap_ci(np.mean, []), "empty"),
    "bootstrap, 2-D": (lambda: metrics.bootstrap_ci(np.mean, np.ones((3, 3))), "1-D"),
    "bootstrap, statistic keeps the axis": (lambda: metrics.bootstrap_ci(lambda v: v, [1.0, 2.0]), "one number"),
    "bootstrap, statistic reduces all": (lambda: metrics.bootstrap_ci(np.mean, [1.0, 2.0, 4.0]), "reduce the last axis"),
    "bootstrap, NaN estimate": (lambda: metrics.bootstrap_ci(lambda v: v.sum(-1) * np.nan, [1.0, 2.0]), "undefined"),
    "calibration, outside [0, 1]": (lambda: metrics.brier_score([1, 0], [1.2, 0.3]), r"in \[0, 1\].*scores\[0\] is 1.2"),
    "calibration, logits": (lambda: metrics.calibration_curve([1, 0], [-2.0, 0.3]), "probabilities"),
    "calibration, NaN": (lambda: metrics.expected_calibration_error([1, 0], [np.nan, 0.3]), "finite"),
    "calibration, labels 2": (lambda: metrics.brier_score([2, 0], [0.5, 0.3]), "only 0 and 1"),
    "calibration, bins 0": (lambda: metrics.calibration_curve([1, 0], [0.5, 0.3], n_bins=0), "n_bins must be at least 1"),
    "calibration, bins huge": (lambda: metrics.calibration_curve([1, 0], [0.5, 0.3], n_bins=10**9), "at most"),
    "calibration, strategy": (lambda: metrics.expected_calibration_error([1, 0], [0.5, 0.3], strategy="kmeans"), "strategy must be"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_is_a_named_value_error(name):
    call, message = BAD_CALLS[name]
    with pytest.raises(InvalidInputError, match=message):
        call()


# --------------------------------------------------------------------------- `pneumoseg evaluate`


def _study(tmp_path, n=40, seed=0):
    """Truth and submission CSVs of n small images (about a third positive) and a scores.csv."""
    rng = np.random.default_rng(seed)
    truth, pred, scores = [], [], []
    for i in range(n):
        m = np.zeros((24, 24), np.uint8)
        positive = i % 3 == 0
        if positive:
            m[4:12, 5:9] = 1
        p = np.roll(m, 1, axis=0) if rng.random() < 0.8 else np.zeros_like(m)
        truth.append((f"id{i}", rle.encode(m)))
        pred.append((f"id{i}", rle.encode(p)))
        scores.append((f"id{i}", float(np.clip(rng.normal(0.7 if positive else 0.3, 0.2), 0, 1))))
    for name, rows in (("truth.csv", truth), ("pred.csv", pred)):
        (tmp_path / name).write_text("ImageId,EncodedPixels\n" + "".join(f"{a},{b}\n" for a, b in rows))
    (tmp_path / "scores.csv").write_text("ImageId,Score\n" + "".join(f"{a},{b:.6f}\n" for a, b in scores))
    return [f"--{k}={tmp_path / (k + '.csv')}" for k in ("pred", "truth")]


def test_evaluate_reports_operating_points_intervals_and_calibration(tmp_path, capsys):
    from pneumoseg.cli import main

    args = _study(tmp_path)
    scores = f"--scores={tmp_path / 'scores.csv'}"
    assert main(["evaluate", *args, scores, "--out", str(tmp_path / "ev"), "--sensitivity", "0.9", "--specificity",
                 "0.8,1", "--bootstrap", "300", "--seed", "4"]) == 0
    printed = capsys.readouterr().out
    assert "95% intervals (bootstrap, 300 resamples over images, seed 4): Kaggle Dice [" in printed
    assert "operating points: sensitivity 0.9: score >= " in printed and "calibration: Brier " in printed
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    # the keys the demo and the older tests read are all still there
    assert {"images", "positives", "kaggle_dice", "empty_submission_dice", "dice_on_positives", "dice_on_negatives",
            "classification", "not_predicted", "pictures"} <= set(report)
    cls = report["classification"]
    assert {"confusion_matrix", "threshold", "scores", "sensitivity", "specificity", "accuracy", "auc",
            "average_precision"} <= set(cls)
    points = cls["operating_points"]
    assert [(p["target"], p["target_value"]) for p in points] == [("sensitivity", 0.9), ("specificity", 0.8),
                                                                   ("specificity", 1.0)]
    y = np.arange(40) % 3 == 0
    s = np.array([float(line.split(",")[1]) for line in (tmp_path / "scores.csv").read_text().splitlines()[1:]])
    assert points[0] == metrics.operating_point(y, s, sensitivity=0.9).to_dict()
    iv = report["intervals"]
    assert (iv["level"], iv["bootstrap_resamples"], iv["seed"]) == (0.95, 300, 4)
    for key in ("kaggle_dice", "auc", "auc_delong", "average_precision", "sensitivity", "specificity"):
        assert iv[key]["low"] <= iv[key]["estimate"] <= iv[key]["high"], key
    assert iv["auc"]["estimate"] == cls["auc"] and iv["kaggle_dice"]["estimate"] == report["kaggle_dice"]
    assert iv["auc_delong"]["low"] == metrics.roc_auc_ci(y, s).low
    assert iv["auc"]["low"] == metrics.roc_auc_ci(y, s, method="bootstrap", n_resamples=300, seed=4).low
    cal = report["calibration"]
    assert cal["brier_score"] == pytest.approx(metrics.brier_score(y, s))
    assert cal["expected_calibration_error"] == pytest.approx(metrics.expected_calibration_error(y, s))
    assert sum(cal["curve"]["images"]) == 40 and report["notes"] == []
    if isinstance(report["pictures"], list):
        assert "calibration.png" in report["pictures"]
        assert (tmp_path / "ev" / "calibration.png").stat().st_size > 1000
    # the same seed (and targets, which the operating points' intervals follow) gives the same intervals;
    # another seed other ones
    assert main(["evaluate", *args, scores, "--out", str(tmp_path / "ev2"), "--sensitivity", "0.9", "--specificity",
                 "0.8,1", "--bootstrap", "300", "--seed", "4"]) == 0
    assert json.loads((tmp_path / "ev2" / "metrics.json").read_text())["intervals"] == iv
    assert main(["evaluate", *args, scores, "--out", str(tmp_path / "ev3"), "--bootstrap", "300", "--seed", "5"]) == 0
    assert json.loads((tmp_path / "ev3" / "metrics.json").read_text())["intervals"]["auc"] != iv["auc"]


def test_evaluate_without_scores_or_bootstrap_says_what_it_left_out(tmp_path, capsys):
    from pneumoseg.cli import main

    args = _study(tmp_path)
    assert main(["evaluate", *args, "--out", str(tmp_path / "ev"), "--bootstrap", "0"]) == 0
    printed = capsys.readouterr().out
    assert "note: the scores are the masks' 0/1" in printed and "note: bootstrap off" in printed
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert report["classification"]["operating_points"] is None and report["calibration"] is None
    assert report["intervals"]["kaggle_dice"] is None and report["intervals"]["auc_delong"] is not None
    assert not (tmp_path / "ev" / "calibration.png").exists()
    assert len(report["notes"]) == 2
    # one class only in the truth: no AUC, operating points or their intervals, and no crash
    (tmp_path / "neg.csv").write_text("ImageId,EncodedPixels\n" + "".join(f"id{i},-1\n" for i in range(40)))
    assert main(["evaluate", f"--pred={tmp_path / 'neg.csv'}", f"--truth={tmp_path / 'neg.csv'}",
                 f"--scores={tmp_path / 'scores.csv'}", "--out", str(tmp_path / "ev2"), "--bootstrap", "50"]) == 0
    report = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert report["classification"]["operating_points"] is None and report["intervals"]["auc"] is None
    assert report["intervals"]["sensitivity"] is None and report["intervals"]["specificity"] is not None
    assert report["calibration"]["brier_score"] > 0 and "one class only" in report["notes"][0]
    fixed = report["intervals"]["fixed_threshold"]  # no positives: no sensitivity, the rest defined
    assert fixed["sensitivity"] is None and fixed["specificity"]["trials"] == 40
    assert report["intervals"]["operating_points"] is None


def test_evaluate_reports_rate_intervals_at_the_fixed_threshold_and_rechosen_operating_points(tmp_path, capsys):
    from pneumoseg.cli import main

    args = _study(tmp_path, n=60)
    scores = f"--scores={tmp_path / 'scores.csv'}"
    y = np.arange(60) % 3 == 0
    s = np.array([float(line.split(",")[1]) for line in (tmp_path / "scores.csv").read_text().splitlines()[1:]])
    assert main(["evaluate", *args, scores, "--out", str(tmp_path / "ev"), "--threshold", "0.6", "--sensitivity",
                 "0.9", "--specificity", "0.95", "--bootstrap", "300", "--seed", "4"]) == 0
    printed = capsys.readouterr().out
    iv = json.loads((tmp_path / "ev" / "metrics.json").read_text())["intervals"]
    assert (iv["bootstrap_method"], iv["proportion_method"], iv["not_computed"]) == ("percentile", "wilson", {})
    want = metrics.rates_at_threshold(y, s, 0.6).to_dict()
    assert iv["fixed_threshold"] == {**want, "predicted_positive": "score >= threshold"}
    assert iv["fixed_threshold"]["sensitivity"]["low"] == metrics.proportion_ci(want["tp"], want["tp"] + want["fn"]).low
    # the operating points' intervals, in the order of classification.operating_points
    assert iv["operating_points"] == [metrics.operating_point_ci(y, s, sensitivity=0.9, n_resamples=300, seed=4).to_dict(),
                                      metrics.operating_point_ci(y, s, specificity=0.95, n_resamples=300, seed=4).to_dict()]
    assert "95% Wilson intervals at score >= 0.6 (the threshold taken as fixed): sensitivity [" in printed
    assert ("95% operating point intervals (the threshold chosen again in each of 300 resamples, seed 4): "
            "sensitivity 0.9: threshold [") in printed and "; specificity 0.95: threshold [" in printed
    # BCa and the exact binomial interval on request; the percentile intervals' keys keep their values otherwise
    assert main(["evaluate", *args, scores, "--out", str(tmp_path / "bca"), "--threshold", "0.6", "--bootstrap", "300",
                 "--seed", "4", "--ci-method", "bca", "--proportion-ci", "clopper-pearson"]) == 0
    assert "95% intervals (BCa bootstrap, 300 resamples over images, seed 4): Kaggle Dice [" in capsys.readouterr().out
    bca = json.loads((tmp_path / "bca" / "metrics.json").read_text())["intervals"]
    assert (bca["bootstrap_method"], bca["fixed_threshold"]["method"]) == ("bca", "clopper-pearson")
    same = {"n_resamples": 300, "seed": 4}
    assert bca["auc"]["low"] == metrics.roc_auc_ci(y, s, method="bca", **same).low
    assert bca["average_precision"]["high"] == metrics.average_precision_ci(y, s, method="bca", **same).high
    assert bca["auc"] != iv["auc"] and bca["auc_delong"] == iv["auc_delong"]
    assert bca["fixed_threshold"]["ppv"]["high"] == metrics.rates_at_threshold(y, s, 0.6, method="clopper-pearson").ppv.high


def test_evaluate_leaves_out_a_bca_interval_that_is_undefined_and_says_why(tmp_path):
    from pneumoseg.cli import main

    # one positive image: without it the sensitivity and AUC are undefined, so BCa's jackknife is
    args = _study(tmp_path, n=40)
    truth = (tmp_path / "truth.csv").read_text().splitlines()
    keep = [truth[0], truth[1]] + [line for line in truth[2:] if line.endswith(",-1")]
    (tmp_path / "truth.csv").write_text("\n".join(keep) + "\n")
    pred = [line for line in (tmp_path / "pred.csv").read_text().splitlines() if line.split(",")[0] in
            {k.split(",")[0] for k in keep}]
    (tmp_path / "pred.csv").write_text("\n".join(pred) + "\n")
    assert main(["evaluate", *args, f"--scores={tmp_path / 'scores.csv'}", "--out", str(tmp_path / "ev"),
                 "--bootstrap", "200", "--ci-method", "bca"]) == 0
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    iv = report["intervals"]
    assert report["positives"] == 1 and iv["sensitivity"] is None and iv["auc"] is None
    assert set(iv["not_computed"]) == {"auc", "average_precision", "sensitivity"}
    assert iv["specificity"] is not None and iv["kaggle_dice"] is not None
    assert any(n.startswith("no BCa interval for sensitivity: method='bca' needs the statistic on every leave-one-out")
               for n in report["notes"])


@pytest.mark.parametrize("flag, value, message", [
    ("--sensitivity", "0", "each target must be in (0, 1]"),
    ("--sensitivity", "1.01", "each target must be in (0, 1]"),
    ("--specificity", "0.9,abc", "got 'abc'"),
    ("--specificity", "nan", "each target must be in (0, 1]"),
    ("--bootstrap", "-1", "at least 0"),
    ("--bootstrap", "1e3", "must be an integer"),
    ("--seed", "x", "must be an integer"),
    ("--ci-method", "BCa", "invalid choice: 'BCa'"),
    ("--proportion-ci", "exact", "invalid choice: 'exact'"),
])
def test_evaluate_flag_errors_are_one_line(tmp_path, capsys, flag, value, message):
    from pneumoseg.cli import main

    args = _study(tmp_path, n=6)
    assert main(["evaluate", *args, "--out", str(tmp_path / "ev"), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and message in err, err
    assert not (tmp_path / "ev").exists()


def test_the_command_and_the_library_share_their_defaults():
    import inspect

    from pneumoseg.cli import evaluate as command
    from pneumoseg.infer import evaluation

    defaults = {k: v.default for k, v in inspect.signature(evaluation.evaluate).parameters.items()}
    assert (defaults["sensitivity"], defaults["specificity"], defaults["bootstrap"]) == (
        command.SENSITIVITIES, command.SPECIFICITIES, command.BOOTSTRAP)
    assert (defaults["ci_method"], defaults["proportion_method"]) == (command.CI_METHOD, command.PROPORTION_METHOD)
    assert (command.CI_METHODS, command.PROPORTION_METHODS) == (metrics.intervals.BOOTSTRAP_METHODS,
                                                                metrics.intervals.PROPORTION_METHODS)
    assert command.targets("none") == () and command.targets("0.9, 1") == (0.9, 1.0)


def test_the_library_evaluate_refuses_bad_targets_and_resamples():
    from pneumoseg.infer.evaluation import evaluate

    truth = {"a": ["-1"], "b": ["1 3"]}
    for kwargs, message in (({"sensitivity": [1.5]}, r"sensitivity\[0\] must be in"), ({"specificity": 0.9}, "sequence"),
                            ({"bootstrap": -1}, "bootstrap must be at least 0"), ({"seed": 0.5}, "seed must be an integer"),
                            ({"ci_method": "BCa"}, "ci_method must be one of"),
                            ({"proportion_method": "exact"}, "proportion_method must be one of")):
        with pytest.raises(InvalidInputError, match=message):
            evaluate(truth, truth, **kwargs)


def test_the_library_evaluate_takes_targets_as_any_iterable_of_reals():
    from pneumoseg.infer.evaluation import evaluate

    truth = {"a": ["-1"], "b": ["1 3"], "c": ["-1"], "d": ["2 2"]}
    scores = {"a": 0.1, "b": 0.8, "c": 0.4, "d": 0.6}
    want = evaluate(truth, truth, scores=scores, sensitivity=[0.5, 1.0], specificity=[0.5], bootstrap=0)
    for sens, spec, want_spec in ((np.array([0.5, 1.0]), np.array([0.5], np.float32), (0.5,)),
                                  ((0.5, 1.0), (v for v in [0.5]), (0.5,)),
                                  (np.array([0.5, 1.0], np.float32), np.array([], np.float64), ())):
        got = evaluate(truth, truth, scores=scores, sensitivity=sens, specificity=spec, bootstrap=0)
        assert got.sensitivity_targets == want.sensitivity_targets == (0.5, 1.0)
        assert got.specificity_targets == want_spec
        assert all(type(t) is float for t in got.sensitivity_targets + got.specificity_targets)
    points = evaluate(truth, truth, scores=scores, sensitivity=np.array([0.5, 1.0]), bootstrap=0).to_dict()
    assert points["classification"]["operating_points"][:2] == want.to_dict()["classification"]["operating_points"][:2]
    # still refused: a string, a bare number (also a 0-d array), non-finite or out-of-range values
    for kwargs, message in (({"sensitivity": "0.9"}, "sequence"), ({"specificity": np.float64(0.9)}, "sequence"),
                            ({"sensitivity": np.array(0.9)}, "sequence"),
                            ({"sensitivity": np.array([0.9, np.nan])}, r"sensitivity\[1\] must be a finite number"),
                            ({"specificity": (np.inf,)}, r"specificity\[0\] must be a finite number"),
                            ({"sensitivity": np.array([0.0])}, r"sensitivity\[0\] must be in")):
        with pytest.raises(InvalidInputError, match=message):
            evaluate(truth, truth, scores=scores, **kwargs)
