"""`pneumoseg predict`: submission, scores, overlays and summary; skips reported; safe outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from pneumoseg import rle  # noqa: E402
from pneumoseg.cli import main  # noqa: E402
from pneumoseg.data import make_synthetic_siim, read_rle_csv  # noqa: E402
from pneumoseg.data.siim import find_dicoms  # noqa: E402
from pneumoseg.infer import Predictor  # noqa: E402

from infer_helpers import file_digests, model_dir  # noqa: E402


@pytest.fixture(scope="module")
def study_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("siim")
    make_synthetic_siim(root, n_images=6, size=80, positive_fraction=0.5, seed=3)
    return root


def read_png(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def test_predict_writes_a_submission_overlays_and_a_summary(study_set, tmp_path, capsys):
    (study_set / "dicom-images-train" / "readme.dcm").write_text("not a DICOM")
    try:
        before = file_digests(study_set)
        out = tmp_path / "pred"
        assert main(["predict", str(study_set), "--model", str(model_dir("classifier")), "--out", str(out),
                     "--batch-size", "4"]) == 0
        captured = capsys.readouterr()
        assert file_digests(study_set) == before  # inputs untouched
    finally:
        (study_set / "dicom-images-train" / "readme.dcm").unlink()
    assert "skipped" in captured.err and "readme.dcm" in captured.err and "not a DICOM file" in captured.err
    lines = (out / "submission.csv").read_text().splitlines()
    assert lines[0] == "ImageId,EncodedPixels"
    files = find_dicoms(study_set)
    submission = read_rle_csv(out / "submission.csv")
    assert list(submission) == list(files)  # one row per image, input order
    want = Predictor.from_dir(model_dir("classifier")).predict(study_set, return_masks=True)
    assert [submission[p.image_id] for p in want] == [[p.rle] for p in want]
    assert any(p.rle == "-1" for p in want) and any(p.positive for p in want)
    scores = dict(line.split(",") for line in (out / "scores.csv").read_text().splitlines()[1:])
    assert {k: float(v) for k, v in scores.items()} == pytest.approx({p.image_id: p.score for p in want}, abs=1e-6)
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == sorted(f"{p.image_id}.png" for p in want if p.positive)
    for p in want:
        if p.positive:
            picture = read_png(out / "overlays" / f"{p.image_id}.png")
            assert picture.shape == (*p.shape, 3)
            red = (picture[..., 0] == 255) & (picture[..., 1] == 40)
            assert red.any() and not red[p.mask == 0].all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 6 and summary["positives"] == sum(p.positive for p in want)
    assert summary["skipped"] == [{"path": str(study_set / "dicom-images-train" / "readme.dcm"),
                                   "reason": summary["skipped"][0]["reason"]}]
    assert summary["predictor"]["backend"] == "torch" and "total" in summary["timings_ms"]
    assert [d["image_id"] for d in summary["images_detail"]] == list(files)
    assert "predicted 6 images" in captured.out


def test_predict_never_replaces_a_submission_without_force(study_set, tmp_path, capsys):
    out = tmp_path / "pred"
    args = ["predict", str(study_set), "--model", str(model_dir("aux")), "--out", str(out), "--no-overlays"]
    assert main(args) == 0
    first = (out / "submission.csv").read_text()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "submission.csv already exists" in err and "--force" in err
    assert (out / "submission.csv").read_text() == first
    assert main(args + ["--force", "--segment", "all"]) == 0  # same answers, replaced
    assert (out / "submission.csv").read_text() == first
    assert not (out / "overlays").exists()


def test_a_submission_written_while_the_model_loads_is_not_replaced(study_set, tmp_path, capsys, monkeypatch):
    # The submission was checked only before the model loaded, and the folder taken after: a second
    # predict started while a first was still running replaced the first's submission, no --force.
    out = tmp_path / "pred"
    args = ["predict", str(study_set), "--model", str(model_dir("aux")), "--out", str(out), "--no-overlays"]
    load = Predictor.from_dir.__func__

    def finish_another_run_first(cls, *a, **kw):
        monkeypatch.setattr(Predictor, "from_dir", classmethod(load))
        assert main(args) == 0  # the other run, over before this one holds the folder
        other_run.append((out / "submission.csv").stat())
        return load(cls, *a, **kw)

    other_run = []
    monkeypatch.setattr(Predictor, "from_dir", classmethod(finish_another_run_first))
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert "submission.csv already exists" in err[-1] and "--force" in err[-1]
    now = (out / "submission.csv").stat()  # the same file, never replaced (a replacement is a new inode)
    assert (now.st_ino, now.st_mtime_ns) == (other_run[0].st_ino, other_run[0].st_mtime_ns)


def test_predict_input_errors_are_one_line(study_set, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["predict", str(empty), "--model", str(model_dir("aux")), "--out", str(tmp_path / "a")], "nothing to predict"),
        (["predict", str(study_set), "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "b")], "no such model"),
        (["predict", str(study_set), "--model", str(model_dir("aux")), "--out", str(tmp_path / "c"),
          "--backend", "onnxruntime"], "pneumoseg export"),
        (["predict", str(tmp_path / "missing.dcm"), "--model", str(model_dir("aux")), "--out", str(tmp_path / "d")],
         "does not exist"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.dcm").write_bytes(b"\0" * 10)
    assert main(["predict", str(only_bad), "--model", str(model_dir("aux")), "--out", str(tmp_path / "e")]) == 2
    assert "no image could be read" in capsys.readouterr().err
    assert not (tmp_path / "e" / "submission.csv").exists()



def test_a_broken_display_window_costs_an_overlay_its_window_not_the_run(study_set, tmp_path, capsys):
    # The overlays go through each file's own window; a WindowWidth of 0 made pydicom raise ValueError
    # from inside the run: a traceback, and no submission for images that were all predicted.
    import shutil

    import pydicom

    studies = tmp_path / "studies"
    shutil.copytree(study_set, studies)
    for path in find_dicoms(studies).values():
        ds = pydicom.dcmread(path)
        ds.WindowCenter, ds.WindowWidth = 100, 0
        ds.save_as(path)
    out = tmp_path / "pred"
    assert main(["predict", str(studies), "--model", str(model_dir("classifier")), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    positives = [line.split(",")[0] for line in (out / "submission.csv").read_text().splitlines()[1:]
                 if not line.endswith(",-1")]
    assert positives and sorted(p.name for p in (out / "overlays").iterdir()) == sorted(f"{i}.png" for i in positives)
    assert err.count("drawn over the full pixel range") == len(positives) and "Window Width" in err

def test_predict_refuses_someone_elses_folder(study_set, tmp_path, capsys):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "labels.csv").write_text("precious")
    assert main(["predict", str(study_set), "--model", str(model_dir("aux")), "--out", str(out)]) == 2
    assert "labels.csv" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["labels.csv"]


def test_submission_masks_decode_at_each_images_size(study_set, tmp_path):
    out = tmp_path / "p"
    assert main(["predict", str(study_set), "--model", str(model_dir("plain")), "--out", str(out), "--no-overlays"]) == 0
    for image_id, strings in read_rle_csv(out / "submission.csv").items():
        mask = rle.decode(strings[0], (80, 80))
        assert mask.shape == (80, 80)


@pytest.mark.parametrize("no_progress", [False, True])
def test_no_progress_turns_the_bars_off(study_set, tmp_path, capsys, no_progress):
    """`--no-progress` (as `train` has) for logs and scripts: tqdm otherwise draws to stderr whether or
    not it is a terminal. The progress bar's "image/s" rate is its mark."""
    flag = ["--no-progress"] if no_progress else []
    assert main(["predict", str(study_set), "--model", str(model_dir("classifier")), "--out", str(tmp_path / "p"),
                 "--no-overlays", *flag]) == 0
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--n", "2", "--size", "64", *flag]) == 0
    err = capsys.readouterr().err
    assert ("it/s" in err or "/s]" in err) != no_progress, err


def test_gate_overrides_the_models_for_one_run(study_set, tmp_path, capsys):
    """`--gate T`: the images scoring at or above T are segmented (and only they can be positive), as
    the Predictor with that gate gives them; summary.json records it beside the model's gate."""
    model = model_dir("classifier")
    scores = sorted(p.score for p in Predictor.from_dir(model).predict(study_set))
    gate = scores[1]  # all but the lowest-scoring image pass; the model's 0.5 passes fewer
    out = tmp_path / "p"
    assert main(["predict", str(study_set), "--model", str(model), "--out", str(out), "--no-overlays",
                 "--no-progress", "--gate", repr(gate)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threshold_overrides"] == {"gate": {"value": gate, "model": 0.5}}
    assert summary["predictor"]["thresholds"]["gate"] == gate
    detail = summary["images_detail"]
    assert [d["segmented"] for d in detail] == [d["score"] >= gate for d in detail]
    assert sum(d["segmented"] for d in detail) == len(detail) - 1
    want = Predictor.from_dir(model, thresholds={"gate": gate}).predict(study_set)
    assert read_rle_csv(out / "submission.csv") == {p.image_id: [p.rle] for p in want}
    default = Predictor.from_dir(model).predict(study_set)
    assert sum(p.segmented for p in default) < len(detail) - 1  # the override changed which images pass
    # the same run without --gate writes no threshold_overrides key (summary.json as it was)
    assert main(["predict", str(study_set), "--model", str(model), "--out", str(tmp_path / "q"), "--no-overlays",
                 "--no-progress"]) == 0
    assert "threshold_overrides" not in json.loads((tmp_path / "q" / "summary.json").read_text())
    capsys.readouterr()


@pytest.mark.parametrize("args, match", [
    (["--gate", "1.5"], "argument --gate: the value must be in [0, 1], got 1.5"),
    (["--gate", "-0.1"], "argument --gate: the value must be in [0, 1]"),
    (["--gate", "nan"], "argument --gate"),
    (["--gate", "half"], "argument --gate: must be a number"),
    (["--thresholds", "top=2"], "argument --thresholds: top: the value must be in [0, 1]"),
    (["--thresholds", "min_area=-1"], "argument --thresholds: min_area: min_area must be at least 0"),
    (["--thresholds", "colour=1"], "argument --thresholds: must be KEY=VALUE pairs"),
    (["--gate", "0.3", "--thresholds", "gate=0.4"], "--gate 0.3 and --thresholds gate=0.4 disagree"),
    # a repeated --thresholds: argparse kept the last one, silently dropping the first one's keys
    (["--thresholds", "top=0.5", "--thresholds", "top=0.6"], "--thresholds: top is given twice"),
])
def test_bad_threshold_overrides_are_one_line_errors(study_set, tmp_path, capsys, args, match):
    out = tmp_path / "p"
    assert main(["predict", str(study_set), "--model", str(model_dir("classifier")), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pneumoseg: error: ") and match in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("given, named", [(["--gate", "0.3"], "--gate:"), (["--thresholds", "gate=0.3"], "--thresholds gate:")])
def test_gate_is_refused_for_a_model_without_a_gate(study_set, tmp_path, capsys, given, named):
    out = tmp_path / "p"
    assert main(["predict", str(study_set), "--model", str(model_dir("plain")), "--out", str(out), *given]) == 2
    err = capsys.readouterr().err
    assert "has no gate" in err and named in err  # the option the user gave
    assert not out.exists()


def test_thresholds_override_the_post_processing(study_set, tmp_path, capsys):
    model = model_dir("plain")
    out = tmp_path / "p"
    assert main(["predict", str(study_set), "--model", str(model), "--out", str(out), "--no-overlays", "--no-progress",
                 "--thresholds", "top=none,min_component_area=0"]) == 0
    want = Predictor.from_dir(model, thresholds={"top": None, "min_component_area": 0}).predict(study_set)
    assert read_rle_csv(out / "submission.csv") == {p.image_id: [p.rle] for p in want}
    overrides = json.loads((out / "summary.json").read_text())["threshold_overrides"]
    assert overrides == {"top": {"value": None, "model": 0.6}, "min_component_area": {"value": 0, "model": 4}}
    capsys.readouterr()
    # the same overrides over two --thresholds: both apply (before: only the last one's, silently)
    again = tmp_path / "q"
    assert main(["predict", str(study_set), "--model", str(model), "--out", str(again), "--no-overlays", "--no-progress",
                 "--thresholds", "top=none", "--thresholds", "min_component_area=0"]) == 0
    assert read_rle_csv(again / "submission.csv") == read_rle_csv(out / "submission.csv")
    assert json.loads((again / "summary.json").read_text())["threshold_overrides"] == overrides
    capsys.readouterr()


def _everything(folder):
    """Every path under ``folder`` (folders too) and each file's bytes: proof that nothing changed."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _refused(args, capsys, match):
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pneumoseg: error: ") and match in lines[0], lines
    return lines[0]


def test_out_an_input_of_predict_is_refused_and_left_as_it_was(study_set, tmp_path, capsys):
    """--out MODEL --force rewrote the model directory's manifest as a prediction folder's (saves and
    exports into it were then refused as another command's output); --out the images folder --force
    wrote the submission and overlays among the studies it read."""
    import shutil

    from infer_helpers import copy_model_dir
    from pneumoseg._fs import OutputKind, check_output_folder

    model = copy_model_dir("aux", tmp_path / "model")
    images = tmp_path / "images"
    shutil.copytree(study_set, images)
    model_before, images_before, top_before = _everything(model), _everything(images), sorted(tmp_path.iterdir())
    base = ["predict", str(images), "--model", str(model), "--no-progress"]
    for out, match in ((model, "is " + str(model)), (tmp_path / "." / "model", "an input of this command"),
                       (images, "is " + str(images)), (tmp_path, "holds "),
                       (model / "preds", "inside " + str(model))):
        line = _refused(base + ["--out", str(out), "--force"], capsys, match)
        assert str(out) in line
    assert _everything(model) == model_before and _everything(images) == images_before
    assert sorted(tmp_path.iterdir()) == top_before
    check_output_folder(model, what=OutputKind.MODEL_DIR)  # still the model directory's own
    # a folder of its own, rerun into (forced: the submission is replaced) as always
    out = tmp_path / "pred"
    assert main(base + ["--out", str(out)]) == 0
    first = (out / "submission.csv").read_text()
    assert main(base + ["--out", str(out), "--force"]) == 0
    assert (out / "submission.csv").read_text() == first
    capsys.readouterr()
