"""`pneumoseg demo`, README's main job: synthesise, train, export, predict held-out studies, and beat
the all-empty submission by a clear margin (here with small settings)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from pneumoseg.cli import main  # noqa: E402
from pneumoseg.cli.demo import MARGIN  # noqa: E402
from pneumoseg.data import read_rle_csv  # noqa: E402

# A smaller demo: 32 + 16 studies at 96 px, networks at 64 px, a few epochs (under a minute on 2 cores).
SMALL = ["--n", "32", "--held-out", "16", "--size", "96", "--set", "epochs=3", "--set", "classifier.epochs=2",
         "--set", "samples_per_epoch=64", "--set", "classifier.samples_per_epoch=64", "--set", "data.image_size=64",
         "--set", "classifier.data.image_size=64"]


@pytest.mark.slow
def test_demo_learns_and_writes_everything(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["images"] == 16
    assert metrics["kaggle_dice"] >= metrics["empty_submission_dice"] + MARGIN
    assert f"Kaggle Dice {metrics['kaggle_dice']:.4f} on 16 held-out studies" in printed
    assert metrics["torch_onnxruntime_same_rle"] == "16/16"
    submission = read_rle_csv(out / "predictions" / "submission.csv")
    truth = read_rle_csv(out / "held-out" / "train-rle.csv")
    assert len(submission) == 16 and set(submission) == set(truth)  # one row per held-out study
    positives = [i for i, s in submission.items() if s != ["-1"]]
    assert sorted(p.name for p in (out / "predictions" / "overlays").iterdir()) == sorted(f"{i}.png" for i in positives)
    assert {"dice_histogram.png", "roc.png", "precision_recall.png", "confusion_matrix.png"} <= {
        p.name for p in (out / "evaluation").iterdir()}
    per_image = (out / "evaluation" / "per_image.csv").read_text().splitlines()  # as `pneumoseg evaluate` writes
    dice = [float(line.split(",")[1]) for line in per_image[1:]]
    assert len(dice) == 16 and np.mean(dice) == pytest.approx(metrics["kaggle_dice"], abs=1e-5)
    latency = json.loads((out / "latency.json").read_text())
    assert set(latency) == {"torch", "onnxruntime"}
    for row in latency.values():
        assert {"preprocess", "classify", "segment", "postprocess", "rle", "total"} <= set(row["timings"])
    assert "onnxruntime" in (out / "latency.txt").read_text()
    md = json.loads((out / "model" / "pneumoseg.json").read_text())
    assert {"classifier-onnx-fp32", "segmenter-onnx-fp32"} <= set(md["artefacts"])
    from PIL import Image

    with Image.open(out / "demo-studies.png") as im:
        picture = np.asarray(im)
    assert picture.shape[0] == 96 and picture.shape[2] == 3
    assert ((picture[..., 1] == 220) & (picture[..., 0] == 40)).any()  # the truth is outlined in green


def test_demo_refuses_someone_elses_folder_and_bad_settings(tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notes.txt" in err and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(["demo", "--out", str(tmp_path / "e"), "--set", "epochz=3"]) == 2
    assert "epochz" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
