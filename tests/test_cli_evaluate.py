"""`pneumoseg evaluate` and the evaluation it rests on: Dice straight from the RLEs, against masks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pneumoseg import rle
from pneumoseg.cli import main
from pneumoseg.errors import DataFormatError
from pneumoseg.infer.evaluation import evaluate, read_scores_csv, rle_dice

from reference_metrics import ref_auc, ref_dice


def _masks(seed: int, n: int, shape=(40, 56)):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, *shape), np.uint8)
    for i in range(n):
        if i % 3:
            r, c = rng.integers(0, shape[0] - 10), rng.integers(0, shape[1] - 10)
            masks[i, r:r + rng.integers(3, 10), c:c + rng.integers(3, 10)] = 1
    return masks


def test_rle_dice_equals_the_dice_of_the_masks():
    truth, pred = _masks(0, 12), _masks(1, 12)
    pred[4] = truth[4]
    want = ref_dice(pred != 0, truth != 0)
    got = [rle_dice([rle.encode(p)], [rle.encode(t)]) for p, t in zip(pred, truth)]
    assert got == pytest.approx(want)
    assert rle_dice(["-1"], ["-1"]) == 1.0 and rle_dice(["-1"], [rle.encode(truth[1])]) == 0.0
    # two annotation rows of one image, split through the block's middle row so that each holds part
    rows = np.flatnonzero(truth[1].any(1))
    middle = (rows[0] + rows[-1] + 1) // 2
    half1, half2 = truth[1].copy(), truth[1].copy()
    half1[:middle], half2[middle:] = 0, 0
    assert half1.any() and half2.any()
    halves = [rle.encode(half1), rle.encode(half2)]
    assert rle_dice([rle.encode(truth[1])], halves) == 1.0 and rle_dice(halves, [rle.encode(truth[1])]) == 1.0
    # the union against a mask that overlaps both rows: Dice of the union, not of either row alone
    shifted = np.roll(truth[1], 1, axis=1)
    assert rle_dice(halves, [rle.encode(shifted)]) == pytest.approx(float(ref_dice(truth[1:2] != 0, shifted[None] != 0)[0]))


def test_evaluate_scores_a_submission():
    truth, pred = _masks(2, 9), _masks(3, 9)
    ids = [f"id{i}" for i in range(9)]
    t = {i: [rle.encode(m)] for i, m in zip(ids, truth)}
    p = {i: [rle.encode(m)] for i, m in zip(ids[:8], pred)}  # one truth image not predicted
    scores = {i: float(s) for i, s in zip(ids, np.linspace(0.1, 0.9, 9))}
    ev = evaluate(p, t, scores=scores)
    assert ev.kaggle_dice == pytest.approx(float(ref_dice(pred[:8] != 0, truth[:8] != 0).mean()))
    labels = truth[:8].any((1, 2))
    assert ev.empty_submission_dice == pytest.approx(float((~labels).mean()))
    cls = ev.classification()
    assert cls["auc"] == pytest.approx(ref_auc(labels.astype(int), np.linspace(0.1, 0.9, 9)[:8]))
    cm = cls["confusion_matrix"]
    predicted = np.linspace(0.1, 0.9, 9)[:8] >= 0.5
    assert (cm["tp"], cm["fp"]) == (int((predicted & labels).sum()), int((predicted & ~labels).sum()))
    assert ev.not_predicted == ["id8"]
    assert evaluate(t, t).kaggle_dice == 1.0
    with pytest.raises(DataFormatError, match="no ground truth"):
        evaluate({"other": ["-1"]}, t)
    with pytest.raises(DataFormatError, match="no score"):
        evaluate(p, t, scores={"id0": 0.5})



@pytest.mark.parametrize("text", ["0 99999999999", "99999999999999999999999 1"])
def test_an_rle_past_any_image_names_the_image_and_the_pixel(text):
    # The error spoke of an internal layout, "shape=(1024, 97656250) needs max_image_side" or
    # "shape[1] must be at most ...", and named neither the image nor the pixel.
    with pytest.raises(DataFormatError, match=r"ImageId 'b': .*paints pixel .* past the .* pixels") as info:
        evaluate({"a": ["-1"], "b": [text]}, {"a": ["-1"], "b": ["1 2"]})
    assert "shape" not in str(info.value)

def write_csv(path, rows):
    path.write_text("ImageId,EncodedPixels\n" + "".join(f"{i},{s}\n" for i, s in rows))


def test_evaluate_command(tmp_path, capsys):
    truth = _masks(4, 10)
    ids = [f"1.2.3.{i}" for i in range(10)]
    write_csv(tmp_path / "truth.csv", [(i, rle.encode(m)) for i, m in zip(ids, truth)])
    write_csv(tmp_path / "empty.csv", [(i, "-1") for i in ids])
    (tmp_path / "scores.csv").write_text("ImageId,Score\n" + "".join(f"{i},{0.9 if m.any() else 0.2}\n"
                                                                     for i, m in zip(ids, truth)))
    assert main(["evaluate", "--pred", str(tmp_path / "truth.csv"), "--truth", str(tmp_path / "truth.csv"),
                 "--scores", str(tmp_path / "scores.csv"), "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "Kaggle Dice 1.0000" in out and "AUC 1.0000" in out
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert report["kaggle_dice"] == 1.0 and report["classification"]["sensitivity"] == 1.0
    # with probability scores also the reliability diagram
    pictures = {"dice_histogram.png", "confusion_matrix.png", "roc.png", "precision_recall.png", "calibration.png"}
    if report["pictures"] != "none: matplotlib is not installed (pip install matplotlib)":
        assert set(report["pictures"]) == pictures
        assert all((tmp_path / "ev" / name).stat().st_size > 1000 for name in pictures)
    assert main(["evaluate", "--pred", str(tmp_path / "empty.csv"), "--truth", str(tmp_path / "truth.csv"),
                 "--out", str(tmp_path / "ev2")]) == 0
    report = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert report["kaggle_dice"] == pytest.approx(report["empty_submission_dice"]) == pytest.approx(
        float((~truth.any((1, 2))).mean()))
    assert report["classification"]["auc"] == 0.5 and report["classification"]["sensitivity"] == 0.0
    per_image = (tmp_path / "ev2" / "per_image.csv").read_text().splitlines()
    assert per_image[0] == "ImageId,Dice,TruthPositive,PredPositive,Score" and len(per_image) == 11


def test_evaluate_errors_are_one_line(tmp_path, capsys):
    write_csv(tmp_path / "truth.csv", [("a", "-1")])
    write_csv(tmp_path / "pred.csv", [("b", "-1")])
    (tmp_path / "scores.csv").write_text("a,not-a-number\n")
    cases = [
        (["--pred", str(tmp_path / "pred.csv"), "--truth", str(tmp_path / "truth.csv")], "no ground truth"),
        (["--pred", str(tmp_path / "truth.csv"), "--truth", str(tmp_path / "truth.csv"), "--scores",
          str(tmp_path / "scores.csv")], "is not a number"),
        (["--pred", str(tmp_path / "nope.csv"), "--truth", str(tmp_path / "truth.csv")], "no such file"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["evaluate", *args, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_scores_csv_reader(tmp_path):
    (tmp_path / "s.csv").write_text("ImageId,Score\na,0.25\n\nb,1\n")
    assert read_scores_csv(tmp_path / "s.csv") == {"a": 0.25, "b": 1.0}
    (tmp_path / "d.csv").write_text("a,0.1\na,0.2\n")
    with pytest.raises(DataFormatError, match="appears twice"):
        read_scores_csv(tmp_path / "d.csv")
    (tmp_path / "n.csv").write_text("a,nan\n")
    with pytest.raises(DataFormatError, match="not finite"):
        read_scores_csv(tmp_path / "n.csv")


def test_evaluation_summary_splits_dice_by_truth_class():
    # Two positives (one found exactly: 1, one missed: 0) and three negatives (one with a false mask:
    # 0, two left empty: 1), so positives average 1/2 and negatives 2/3, and the mean is 3/5; an
    # all-empty submission would score the negatives' share, 3/5 too.
    block = np.zeros((6, 5), np.uint8)
    block[1:4, 2:4] = 1
    hit = rle.encode(block)
    truth = {"p1": [hit], "p2": [hit], "n1": ["-1"], "n2": ["-1"], "n3": ["-1"]}
    pred = {"p1": [hit], "p2": ["-1"], "n1": [hit], "n2": ["-1"], "n3": ["-1"]}
    summary = evaluate(pred, truth).to_dict()
    assert (summary["images"], summary["positives"]) == (5, 2)
    assert summary["dice_on_positives"] == pytest.approx(1 / 2)
    assert summary["dice_on_negatives"] == pytest.approx(2 / 3)
    assert summary["kaggle_dice"] == pytest.approx(3 / 5) and summary["empty_submission_dice"] == pytest.approx(3 / 5)
    # without scores each image's score is its mask's emptiness: TP p1, FN p2, FP n1, TN n2 and n3
    cls = summary["classification"]
    assert cls["confusion_matrix"] == {"tn": 2, "fp": 1, "fn": 1, "tp": 1}
    # sensitivity 1 / (1 + 1), specificity 2 / (2 + 1), accuracy (1 + 2) / 5
    assert (cls["sensitivity"], cls["specificity"], cls["accuracy"]) == pytest.approx((1 / 2, 2 / 3, 3 / 5))


def test_the_summary_names_the_librarys_number_of_calibration_bins(monkeypatch):
    from pneumoseg.cli.evaluate import _summary
    from pneumoseg.infer import evaluation

    truth, pred = _masks(2, 9), _masks(3, 9)
    ids = [f"id{i}" for i in range(9)]
    t = {i: [rle.encode(m)] for i, m in zip(ids, truth)}
    p = {i: [rle.encode(m)] for i, m in zip(ids, pred)}
    scores = {i: float(s) for i, s in zip(ids, np.linspace(0.05, 0.95, 9))}
    for bins in (evaluation.CALIBRATION_BINS, 4):
        monkeypatch.setattr(evaluation, "CALIBRATION_BINS", bins)
        report = evaluate(p, t, scores=scores, bootstrap=0).to_dict()
        line = next(x for x in _summary(report) if x.startswith("calibration:"))
        filled = len(report["calibration"]["curve"]["images"])
        assert 0 < filled <= bins and line.endswith(f"({filled} non-empty of {bins} equal-width bins)"), line


def test_evaluate_needs_no_torch():
    """Scoring a submission is NumPy work: importing the inference package (for its evaluation module)
    must not load the predictor's torch, so `pneumoseg evaluate` runs on a core install."""
    import subprocess
    import sys

    code = ("import sys, pneumoseg.infer, pneumoseg.infer.evaluation, pneumoseg.cli.evaluate, pneumoseg.metrics; "
            "assert 'torch' not in sys.modules, 'torch was imported'; "
            "assert callable(pneumoseg.infer.collect_inputs)")
    subprocess.run([sys.executable, "-c", code], check=True)
