"""`pneumoseg tune`: the gate chosen on labelled images as the operating point rule chooses it, the
reports, --write's round trip into the model directory, and its hostile inputs."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

pytest.importorskip("torch")

from pneumoseg.cli import main  # noqa: E402
from pneumoseg.data import make_synthetic_siim, read_rle_csv  # noqa: E402
from pneumoseg.errors import DataFormatError, OutputError  # noqa: E402
from pneumoseg.infer import Predictor  # noqa: E402
from pneumoseg.models.model_dir import CONFIG_NAME, load_model_dir  # noqa: E402

from infer_helpers import THRESHOLDS, copy_model_dir, file_digests, model_dir  # noqa: E402


@pytest.fixture(scope="module")
def study_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("siim")
    make_synthetic_siim(root, n_images=24, size=80, positive_fraction=0.4, seed=5)
    return root


@pytest.fixture(scope="module")
def scored(study_set):
    """(ImageIds, labels, scores) computed apart from the command: the full pipeline at the model's
    own thresholds, labels read from the CSV."""
    preds = Predictor.from_dir(model_dir("classifier")).predict(study_set)
    truth = read_rle_csv(study_set / "train-rle.csv")
    ids = [p.image_id for p in preds]
    labels = np.array([any(r != "-1" for r in truth[i]) for i in ids])
    scores = np.array([p.score for p in preds])
    assert 0 < labels.sum() < labels.size
    return ids, labels, scores


def reference_gate(labels, scores, *, sensitivity=None, specificity=None) -> float:
    """The operating point from its definition, one candidate threshold (a distinct score) at a time:
    the highest reaching the sensitivity, or the lowest whose specificity still reaches the target."""
    candidates = sorted(set(scores.tolist()), reverse=True)
    pos, neg = scores[labels], scores[~labels]
    if sensitivity is not None:
        return next(t for t in candidates if np.count_nonzero(pos >= t) / pos.size >= sensitivity)
    reaching = [t for t in candidates if np.count_nonzero(neg < t) / neg.size >= specificity]
    return min(reaching) if reaching else math.inf


def written_gate(labels, scores, **target) -> float:
    """The gate tune writes: midway from the score reaching the target to the next lower score, as a float32."""
    reached = reference_gate(labels, scores, **target)
    lower = scores[scores < reached]
    if not lower.size:
        return float(np.float32(reached * (1 - 1e-4)))
    # in float32, where the Predictor compares, and still above the lower score there
    return float(max(np.float32((reached + lower.max()) / 2), np.nextafter(np.float32(lower.max()), np.float32(1))))


def tune(model, study_set, out, *extra, truth=None):
    return main(["tune", str(model), "--images", str(study_set), "--truth", str(truth or study_set / "train-rle.csv"),
                 "--out", str(out), "--no-progress", "--bootstrap", "200", *extra])


@pytest.mark.parametrize("target", [("--sensitivity", 0.9), ("--specificity", 0.75)])
def test_tune_chooses_the_operating_point_of_the_scores_and_changes_nothing(study_set, scored, tmp_path, capsys,
                                                                             target):
    from pneumoseg import metrics

    model = copy_model_dir("classifier", tmp_path / "model")
    before = file_digests(model)
    flag, value = target
    assert tune(model, study_set, tmp_path / "out", flag, str(value)) == 0
    out = capsys.readouterr().out
    assert file_digests(model) == before  # without --write, byte for byte and mtime
    report = json.loads((tmp_path / "out" / "tune.json").read_text())
    ids, labels, scores = scored
    name = flag[2:]
    reached = reference_gate(labels, scores, **{name: value})  # one image's score
    assert report["operating_point"]["threshold"] == reached
    # the gate written sits midway to the next lower score: the same split of these images, with room for
    # the ~1e-7 a score moves between batch sizes
    want = written_gate(labels, scores, **{name: value})
    assert report["gate"]["new"] == want and report["gate"]["current"] == THRESHOLDS["gate"]
    assert np.array_equal(scores >= want, scores >= reached)
    assert [r["image_id"] for r in report["scores"]] == ids
    assert report["images"] == labels.size and report["positives"] == int(labels.sum())
    # the counts there, from their definition
    at = report["at_new_gate"]
    assert (at["tp"], at["fp"]) == (int(np.count_nonzero(scores[labels] >= want)),
                                    int(np.count_nonzero(scores[~labels] >= want)))
    assert at["sensitivity"]["successes"] == at["tp"] and at["sensitivity"]["trials"] == int(labels.sum())
    current = report["at_current_gate"]
    assert current["tp"] == int(np.count_nonzero(scores[labels] >= THRESHOLDS["gate"]))
    assert current["method"] == "wilson"
    # the interval is operating_point_ci's on these scores with the same seed (the gate chosen again per resample)
    ci = metrics.operating_point_ci(labels, scores, **{name: value}, n_resamples=200, seed=0).to_dict()
    assert report["interval"] == ci
    assert report["written"] is None
    assert (tmp_path / "out" / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"gate {want!r}" in out and "unchanged" in out and "200 resamples" in out


def test_write_round_trips_and_the_predictor_uses_the_new_gate(study_set, scored, tmp_path, capsys):
    model = copy_model_dir("classifier", tmp_path / "model")
    md = load_model_dir(model)
    # an exported artefact (any bytes: its listing and fingerprint are what must survive)
    md.add_artefact("classifier-onnx-fp32", "onnx/classifier.onnx", b"not really onnx", format="onnx",
                    network="classifier", precision="fp32")
    raw_before = json.loads((model / CONFIG_NAME).read_text())
    weights_before = {p.name: p.read_bytes() for p in model.glob("*.safetensors")}
    assert tune(model, study_set, tmp_path / "out", "--sensitivity", "0.9", "--write") == 0
    out = capsys.readouterr().out
    ids, labels, scores = scored
    gate = written_gate(labels, scores, sensitivity=0.9)
    assert gate != THRESHOLDS["gate"]  # the test shows a change
    assert f"-> {gate!r}" in out
    raw = json.loads((model / CONFIG_NAME).read_text())
    assert raw["format_version"] == raw_before["format_version"] == 1
    assert raw["thresholds"] == {**raw_before["thresholds"], "gate": gate}
    tuned = raw.pop("gate_tuned")
    assert {k: v for k, v in raw.items() if k != "thresholds"} == {k: v for k, v in raw_before.items() if k != "thresholds"}
    assert tuned["value"] == gate and tuned["previous"] == THRESHOLDS["gate"]
    assert tuned["target"] == {"kind": "sensitivity", "value": 0.9}
    assert (tuned["n_images"], tuned["n_positive"]) == (labels.size, int(labels.sum()))
    import hashlib

    assert tuned["truth_sha256"] == hashlib.sha256((study_set / "train-rle.csv").read_bytes()).hexdigest()
    assert tuned["date"].endswith("+00:00") and tuned["pneumoseg_version"]
    assert {p.name: p.read_bytes() for p in model.glob("*.safetensors")} == weights_before
    loaded = load_model_dir(model)
    assert loaded.gate_tuned == tuned and loaded.thresholds.gate == gate
    assert loaded.artefact_path("classifier-onnx-fp32", verify=True).is_file()  # still listed, fingerprint valid
    assert json.loads((tmp_path / "out" / "tune.json").read_text())["written"]["gate_tuned"] == tuned
    from pneumoseg._fs import OutputKind, check_output_folder

    # the rewritten pneumoseg.json is listed in the directory's manifest: still pneumoseg's own output,
    # which a training run's --resume or another save replaces without --force
    check_output_folder(model, what=OutputKind.MODEL_DIR)
    # the Predictor reads the new gate: stage 2 runs exactly for the images scoring at or above it
    preds = Predictor.from_dir(model).predict(study_set)
    assert [p.segmented for p in preds] == (scores >= gate).tolist()
    assert sum(p.segmented for p in preds) > sum(p.segmented for p in Predictor.from_dir(model_dir("classifier")).predict(study_set))


def test_a_given_gate_is_reported_and_written_as_given(study_set, scored, tmp_path, capsys):
    model = copy_model_dir("aux", tmp_path / "model")  # the segmenter's own classification head gates
    assert tune(model, study_set, tmp_path / "out", "--gate", "0.3", "--write") == 0
    report = json.loads((tmp_path / "out" / "tune.json").read_text())
    assert report["gate"] == {"new": 0.3, "current": THRESHOLDS["gate"], "source": "segmenter"}
    assert report["operating_point"] is None and report["interval"] is None
    assert load_model_dir(model).thresholds.gate == 0.3
    assert load_model_dir(model).gate_tuned["target"] == {"kind": "gate", "value": 0.3}


def test_the_loader_reads_directories_with_and_without_gate_tuned(tmp_path):
    model = copy_model_dir("classifier", tmp_path / "model")
    assert load_model_dir(model).gate_tuned is None  # written before tune existed
    md = load_model_dir(model)
    md.set_gate(0.25, {"value": 0.25, "previous": 0.5, "target": {"kind": "gate", "value": 0.25}})
    again = load_model_dir(model)
    assert again.thresholds.gate == 0.25 and again.gate_tuned["previous"] == 0.5
    again.save()  # rewritten by another writer (export does this), the record stays
    assert load_model_dir(model).gate_tuned == again.gate_tuned
    # networks written over since the scores were computed: the gate belongs to the old ones
    stale = load_model_dir(model)
    raw = json.loads((model / CONFIG_NAME).read_text())
    changed = {**raw, "networks": {**raw["networks"], "classifier": {**raw["networks"]["classifier"], "sha256": "0" * 64}}}
    (model / CONFIG_NAME).write_text(json.dumps(changed))
    with pytest.raises(OutputError, match="networks changed"):
        stale.set_gate(0.1, {"value": 0.1})
    assert json.loads((model / CONFIG_NAME).read_text()) == changed
    for bad in ("yes", {"value": 2.0}):
        (model / CONFIG_NAME).write_text(json.dumps({**raw, "gate_tuned": bad}))
        with pytest.raises(DataFormatError, match="gate_tuned"):
            load_model_dir(model)


def run_refused(args, capsys, match):
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pneumoseg: error: "), captured.err
    assert match in lines[0], lines[0]
    return lines[0]


def test_images_without_a_truth_row_are_refused_or_skipped(study_set, scored, tmp_path, capsys):
    ids, labels, scores = scored
    truth = read_rle_csv(study_set / "train-rle.csv")
    missing = ids[3]
    partial = tmp_path / "partial.csv"
    partial.write_text("ImageId,EncodedPixels\n" + "".join(f"{i},{r}\n" for i, rles in truth.items() if i != missing
                                                           for r in rles) + "1.2.3.not.here,-1\n")
    model = copy_model_dir("classifier", tmp_path / "model")
    line = run_refused(["tune", str(model), "--images", str(study_set), "--truth", str(partial), "--sensitivity", "0.9",
                        "--out", str(tmp_path / "out"), "--no-progress"], capsys, "1 of the 24 images have no row")
    assert missing in line and "--skip-unlabelled" in line
    assert not (tmp_path / "out").exists()
    assert tune(model, study_set, tmp_path / "out", "--sensitivity", "0.9", "--skip-unlabelled", truth=partial) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "tune.json").read_text())
    assert report["unlabelled_left_out"] == [missing] and report["images"] == 23
    assert report["truth_rows_without_image"] == 1 and "1 truth row(s) have no image" in out
    keep = np.array([i != missing for i in ids])
    assert [r["image_id"] for r in report["scores"]] == [i for i in ids if i != missing]
    assert [r["positive"] for r in report["scores"]] == labels[keep].tolist()
    # other batches than the full set's: on a CPU a score may move in its last float32 bit with the batch
    own = np.array([r["score"] for r in report["scores"]])
    assert own == pytest.approx(scores[keep], abs=1e-6)
    assert report["gate"]["new"] == written_gate(labels[keep], own, sensitivity=0.9)


def test_hostile_inputs_are_one_line_errors_and_change_nothing(study_set, tmp_path, capsys):
    model = copy_model_dir("classifier", tmp_path / "model")
    before = file_digests(model)
    base = ["tune", str(model), "--images", str(study_set), "--out", str(tmp_path / "out"), "--no-progress"]
    truth = str(study_set / "train-rle.csv")
    for value in ("0", "1.5", "nan", "-0.1"):
        run_refused([*base, "--truth", truth, "--sensitivity", value], capsys, "argument --sensitivity: must be in (0, 1]")
    run_refused([*base, "--truth", truth, "--gate", "1.5"], capsys, "argument --gate")
    run_refused([*base, "--truth", truth], capsys, "one of the arguments --sensitivity --specificity --gate is required")
    # one class only: every image negative
    negatives = tmp_path / "negatives.csv"
    negatives.write_text("ImageId,EncodedPixels\n" + "".join(f"{i},-1\n" for i in read_rle_csv(truth)))
    run_refused([*base, "--truth", str(negatives), "--sensitivity", "0.9", "--write"], capsys,
                "no operating point without images of both classes")
    # none of the images named in the truth
    other = tmp_path / "other.csv"
    other.write_text("ImageId,EncodedPixels\n1.2.3,-1\n1.2.4,1 2\n")
    run_refused([*base, "--truth", str(other), "--sensitivity", "0.9"], capsys, "none of the 24 images has a row")
    # no gate to tune
    plain = copy_model_dir("plain", tmp_path / "plain")
    run_refused(["tune", str(plain), "--images", str(study_set), "--truth", truth, "--sensitivity", "0.9",
                 "--out", str(tmp_path / "out")], capsys, "the model has no gate to tune")
    assert file_digests(model) == before and not (tmp_path / "out").exists()


def test_a_specificity_no_gate_reaches_is_refused(study_set, scored, tmp_path, capsys):
    ids, labels, scores = scored
    # the highest-scoring image made negative, the rest as they are: specificity 1 needs a gate above it
    top = ids[int(np.argmax(scores))]
    truth = read_rle_csv(study_set / "train-rle.csv")
    csv = tmp_path / "truth.csv"
    csv.write_text("ImageId,EncodedPixels\n" + "".join(f"{i},{'-1' if i == top else r}\n" for i, rles in truth.items()
                                                       for r in rles))
    model = copy_model_dir("classifier", tmp_path / "model")
    run_refused(["tune", str(model), "--images", str(study_set), "--truth", str(csv), "--specificity", "1",
                 "--out", str(tmp_path / "out"), "--no-progress", "--write"], capsys, "no gate reaches specificity 1")


def test_an_unwritable_model_directory_is_refused_before_any_work(study_set, tmp_path, capsys, monkeypatch):
    import pneumoseg.cli.tune as tune_module

    model = copy_model_dir("classifier", tmp_path / "model")
    before = file_digests(model)
    real_access = os.access
    # root writes anywhere: the permission check is what is tested
    monkeypatch.setattr(tune_module.os, "access", lambda p, mode: False if str(p) == str(model) else real_access(p, mode))
    run_refused(["tune", str(model), "--images", str(study_set), "--truth", str(study_set / "train-rle.csv"),
                 "--sensitivity", "0.9", "--write", "--out", str(tmp_path / "out")], capsys, "not writable")
    assert file_digests(model) == before and not (tmp_path / "out").exists()


def test_a_failed_write_leaves_no_partial_file_and_no_report(study_set, tmp_path, capsys, monkeypatch):
    model = copy_model_dir("classifier", tmp_path / "model")
    before = file_digests(model)
    real_replace = os.replace

    def refuse_config(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst)) == CONFIG_NAME:
            raise PermissionError(13, "Permission denied", os.fspath(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refuse_config)
    run_refused(["tune", str(model), "--images", str(study_set), "--truth", str(study_set / "train-rle.csv"),
                 "--sensitivity", "0.9", "--write", "--out", str(tmp_path / "out"), "--no-progress"], capsys,
                "Permission denied")
    monkeypatch.undo()
    assert file_digests(model) == before  # no temporary file left beside pneumoseg.json, the file as it was
    assert not (tmp_path / "out" / "tune.json").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_model_directory_is_refused(study_set, tmp_path, capsys):
    model = copy_model_dir("classifier", tmp_path / "model")
    before = file_digests(model)
    model.chmod(0o555)
    try:
        run_refused(["tune", str(model), "--images", str(study_set), "--truth", str(study_set / "train-rle.csv"),
                     "--sensitivity", "0.9", "--write", "--out", str(tmp_path / "out")], capsys, "not writable")
    finally:
        model.chmod(0o755)
    assert file_digests(model) == before


def test_the_written_gate_splits_float32_scores_as_the_predictor_compares_them():
    """The Predictor compares its float32 scores with the gate in float32 (torch casts the Python
    float): a float64 midpoint between two adjacent float32 scores rounds to one of them there, and
    half the time to the lower one, which the report counts as below the gate but the Predictor flags."""
    import torch

    from pneumoseg.cli.tune import gate_below

    for high in (np.float32(0.49999997), np.float32(0.75), np.float32(0.99999994), np.float32(0.3)):
        low = np.nextafter(high, np.float32(0))
        scores = [float(high), float(low), 0.1]
        gate = gate_below(scores, float(high))
        in_float32 = (torch.tensor(scores, dtype=torch.float32) >= gate).tolist()
        in_float64 = (np.array(scores) >= gate).tolist()
        assert in_float32 == in_float64 == [True, False, False], (float(high), gate)
    # every image flagged: the gate is below the lowest score in float32 too
    gate = gate_below([0.5, 0.75], 0.5)
    assert (torch.tensor([0.5, 0.75]) >= gate).tolist() == [True, True] and gate < 0.5


@pytest.mark.parametrize("change", ["preprocessing", "crop", "gate"])
def test_set_gate_refuses_a_description_whose_scores_or_gate_changed_since_loading(tmp_path, change):
    """The scores depend on the preprocessing and each network's entry (crop, input size), not only its
    weights; and a gate another `tune --write` set meanwhile is not the 'previous' gate the report
    compared with. Either is refused, the file left as it was."""
    model = copy_model_dir("classifier", tmp_path / "model")
    stale = load_model_dir(model)
    raw = json.loads((model / CONFIG_NAME).read_text())
    if change == "preprocessing":
        raw["preprocessing"]["mean"] = raw["preprocessing"]["mean"] + 0.1
    elif change == "crop":
        raw["networks"]["classifier"]["crop"] = None if raw["networks"]["classifier"].get("crop") else "chest"
    else:
        raw["thresholds"]["gate"] = 0.123
    (model / CONFIG_NAME).write_text(json.dumps(raw))
    before = file_digests(model)
    with pytest.raises(OutputError, match="changed since the scores were computed"):
        stale.set_gate(0.1, {"value": 0.1})
    assert file_digests(model) == before


def test_the_rates_at_a_given_gate_count_the_images_the_predictor_flags(study_set, scored, tmp_path, capsys):
    """--gate is a float64 the Predictor applies in float32: a gate a quarter of a float32 step above a
    score rounds to that score there, and the Predictor flags the image; the report's rates count it too."""
    ids, labels, scores = scored
    k = int(np.argsort(scores)[scores.size // 2])
    above = np.nextafter(np.float32(scores[k]), np.float32(1))
    gate = float(scores[k]) + (float(above) - float(scores[k])) / 4
    assert float(np.float32(gate)) == float(scores[k]) and gate > scores[k]
    model = copy_model_dir("classifier", tmp_path / "model")
    assert tune(model, study_set, tmp_path / "out", "--gate", repr(gate)) == 0
    report = json.loads((tmp_path / "out" / "tune.json").read_text())
    preds = Predictor.from_dir(model, thresholds={"gate": gate}).predict(study_set)
    flagged = np.array([p.segmented for p in preds])
    assert flagged[k]
    at = report["at_new_gate"]
    assert (at["tp"], at["fp"]) == (int(np.count_nonzero(flagged & labels)), int(np.count_nonzero(flagged & ~labels)))
    assert report["gate"]["new"] == gate  # recorded as given
    capsys.readouterr()


def test_out_into_the_model_directory_is_refused(study_set, tmp_path, capsys):
    """--out MODEL_DIR --force put tune.json and roc.png into the model directory and relabelled its
    manifest as a tuning folder's, after which a training run's save or an export into it was refused."""
    model = copy_model_dir("classifier", tmp_path / "model")
    before = file_digests(model)
    for out in (model, tmp_path / "." / "model"):
        run_refused(["tune", str(model), "--images", str(study_set), "--truth", str(study_set / "train-rle.csv"),
                     "--sensitivity", "0.9", "--out", str(out), "--force", "--no-progress"], capsys, "model directory")
    assert file_digests(model) == before
    from pneumoseg._fs import OutputKind, check_output_folder

    check_output_folder(model, what=OutputKind.MODEL_DIR)


def test_an_image_is_positive_when_any_of_its_truth_rows_is_an_rle(tmp_path):
    """The Kaggle layout: one row per annotation; an image with a -1 row and an RLE row is positive,
    an empty EncodedPixels reads as -1, whichever row comes first."""
    from pneumoseg.cli.tune import _labels

    csv = tmp_path / "truth.csv"
    csv.write_text("ImageId,EncodedPixels\nA,-1\nA,5 3\nB,5 3\nB,-1\nC,-1\nD,\nD,-1\n")
    assert _labels(read_rle_csv(csv)) == {"A": True, "B": True, "C": False, "D": False}


def test_truth_ids_with_a_dcm_suffix_are_named_as_the_cause(study_set, tmp_path, capsys):
    """A truth CSV written from file names (ImageId 1.2.3.dcm): every image is refused as unlabelled,
    and the message says why instead of only suggesting --name-by uid."""
    truth = read_rle_csv(study_set / "train-rle.csv")
    model = copy_model_dir("classifier", tmp_path / "model")
    csv = tmp_path / "truth.csv"
    csv.write_text("ImageId,EncodedPixels\n" + "".join(f"{i}.dcm,{r}\n" for i, rles in truth.items() for r in rles))
    run_refused(["tune", str(model), "--images", str(study_set), "--truth", str(csv), "--sensitivity", "0.9",
                 "--out", str(tmp_path / "out"), "--no-progress"], capsys, "ImageIds end in .dcm")
