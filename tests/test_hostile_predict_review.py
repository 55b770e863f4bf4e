"""Hostile and unlucky inputs to inference and the predict / evaluate / export commands, found in a
review that attacked them as a user, a radiology-IT engineer and a numerical reviewer. Each test is a
reproducer that failed before its fix (crash cases run in a child process: tests/isolated.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import pneumoseg
from pneumoseg.cli import main
from pneumoseg.errors import InvalidInputError

from factories import write_dicom
from infer_helpers import model_dir, phantom_images
from isolated import run_isolated

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def plain_predictor():
    pytest.importorskip("torch")
    return pneumoseg.Predictor.from_dir(model_dir("plain"))


def _answers(predictions):
    return [(p.score, p.rle, p.n_components, p.shape) for p in predictions]


@pytest.mark.parametrize("make", ["fake", "freed", "freed_batch"])
def test_tensors_without_data_are_refused_before_the_networks(make):
    # A FakeTensor reached the networks (an AssertionError from inside FakeTensorMode); a tensor whose
    # storage was freed (resize_(0), as FSDP frees parameters) reached the native post-processing:
    # a segfault. Both are now an InvalidInputError naming the input.
    pytest.importorskip("torch")
    code = f"""
    import sys
    sys.path.insert(0, {str(TESTS)!r})
    import torch
    import pneumoseg
    from infer_helpers import model_dir
    predictor = pneumoseg.Predictor.from_dir(model_dir("plain"))
    make = {make!r}
    if make == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode():
            x = torch.zeros(64, 64)
    else:
        x = torch.rand(3, 64, 64) if make == "freed_batch" else torch.rand(64, 64)
        x.untyped_storage().resize_(0)
    try:
        predictor.predict(x)
    except pneumoseg.errors.InvalidInputError as exc:
        print("REFUSED", exc)
    """
    result = run_isolated(code, timeout=300)
    assert result.returncode == 0, result.describe()
    assert "REFUSED inputs" in result.stdout, result.describe()
    assert ("FakeTensor" if make == "fake" else "storage") in result.stdout


@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_float32_pixels_spanning_more_than_float32_allows_predict_as_the_same_image(plain_predictor, kind):
    # Finite float32 pixels from -3e38 to 3e38: max - min overflowed to inf in the min-max scaling, the
    # image became NaN, and the error blamed the network's weights ("the network's score is NaN").
    import torch

    image = phantom_images(1)[0].astype(np.float32)
    wide = (image / 255 * 2 - 1) * np.float32(3e38)
    with np.errstate(over="ignore"):
        assert np.isfinite(wide).all() and not np.isfinite(wide.max() - wide.min())
    wide = torch.from_numpy(wide) if kind == "tensor" else wide
    assert _answers(plain_predictor.predict(wide)) == _answers(plain_predictor.predict(image))


def test_a_grey_picture_with_its_channel_last_is_refused_not_read_as_one_pixel_wide_images(plain_predictor):
    # (H, W, 1), as OpenCV's IMREAD_UNCHANGED of some PNGs or a Keras-style array gives it, was read as
    # H images one pixel wide: 80 predictions for one radiograph, without a word.
    image = phantom_images(1)[0]
    with pytest.raises(InvalidInputError, match=r"\(80, 96, 1\), a grey \(H, W, 1\) picture.*pass the grey image"):
        plain_predictor.predict(image[:, :, None])
    # a batch of narrow images given as (N, 1, H, W) is still taken
    assert len(plain_predictor.predict(image[:, None, :, None])) == 80


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system taking any bytes as a file name")
def test_a_file_name_that_is_not_utf8_is_one_line_before_any_work(tmp_path, capsys):
    # A Latin-1 file name reaches Python as surrogate escapes: every image was predicted, then writing
    # submission.csv (UTF-8) raised UnicodeEncodeError with a traceback.
    pytest.importorskip("torch")
    folder = tmp_path / "latin1"
    folder.mkdir()
    raw = (phantom_images(1)[0].astype(np.uint16) * 16)
    write_dicom(os.fsdecode(os.fsencode(folder) + b"/caf\xe9.dcm"), raw)
    write_dicom(folder / "plain.dcm", raw)
    out = tmp_path / "out"
    code = main(["predict", str(folder), "--model", str(model_dir("plain")), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "is not valid UTF-8" in err and "--name-by uid" in err, err
    assert not out.exists()
    # named by their headers, the same files predict
    code = main(["predict", str(folder), "--model", str(model_dir("plain")), "--out", str(out), "--no-progress",
                 "--name-by", "uid"])
    assert code == 0
    assert len((out / "submission.csv").read_text().splitlines()) == 3


def test_int8_calibration_reads_a_pacs_export_as_predict_does(tmp_path):
    # A PACS export (IM0001 in every series folder, no .dcm suffix) predicts with `pneumoseg predict`, but
    # `pneumoseg export --precision int8 --calibrate` on it said "no readable DICOM images to calibrate
    # with" (suffix-less files were passed over) and, with suffixes, refused the repeated file names.
    from pneumoseg.export.onnx import load_calibration_images

    images = phantom_images(2)
    for series, image in zip(("s1", "s2"), images):
        (tmp_path / series).mkdir()
        write_dicom(tmp_path / series / "IM0001", image.astype(np.uint16))
    got, skipped = load_calibration_images(tmp_path)
    assert [g.shape for g in got] == [i.shape for i in images] and skipped == []


def test_int8_calibration_without_readable_images_says_why(tmp_path):
    from pneumoseg.export.onnx import load_calibration_images

    (tmp_path / "notes.dcm").write_text("not a DICOM")
    with pytest.raises(InvalidInputError, match=r"no readable DICOM images to calibrate with \(.*notes\.dcm: "):
        load_calibration_images(tmp_path)


@pytest.mark.parametrize("images, match", [
    ([], "the list is empty"),
    (["a.dcm", "b.dcm"], r"calibration image 0 must be a grey \(H, W\) array of numbers.*<U5"),
    ([np.zeros((64, 64)), np.zeros((64, 64, 3))], r"calibration image 1 .* shape \(64, 64, 3\)"),
    ([np.zeros((0, 64))], r"calibration image 0 .* shape \(0, 64\)"),
])
def test_int8_calibration_images_given_as_a_list_are_checked(images, match):
    # A list was taken as it came: [] calibrated on nothing, and strings or colour pictures failed deep
    # inside the export.
    from pneumoseg.export.onnx import load_calibration_images

    with pytest.raises(InvalidInputError, match=match):
        load_calibration_images(images)


@pytest.mark.parametrize("flip", ["rows", "columns"])
def test_a_flipped_view_of_a_one_pixel_high_or_wide_image_predicts(plain_predictor, flip):
    # x[::-1] of a (1, W) image (or x[:, ::-1] of an (H, 1) one) keeps its negative step: NumPy calls
    # the view contiguous, as a length-1 axis's step does not count, and torch.from_numpy refused it
    # with a bare ValueError ("At least one stride in the given numpy array is negative").
    line = np.arange(40, dtype=np.uint8).reshape((1, 40) if flip == "rows" else (40, 1)).copy()
    view = np.flipud(line) if flip == "rows" else np.fliplr(line)
    assert min(view.strides) < 0
    assert _answers(plain_predictor.predict(view)) == _answers(plain_predictor.predict(line.copy()))


@pytest.mark.parametrize("field, value", [("std", 1e-300), ("std", 1e-39), ("std", 1e300), ("mean", 1e300),
                                          ("mean", -1e39)])
def test_normalisation_outside_float32_is_a_format_error_not_a_network_blamed_for_nan(tmp_path, field, value):
    # A hand-edited std of 1e-300 is 0 in float32: every image became inf / NaN and the error said "the
    # network's score is NaN ... check the model's weights"; a mean of 1e300 did the same.
    pytest.importorskip("torch")
    import json

    from pneumoseg.models.model_dir import Preprocessing
    from pneumoseg.errors import DataFormatError
    from infer_helpers import copy_model_dir

    folder = copy_model_dir("plain", tmp_path / "model")
    raw = json.loads((folder / "pneumoseg.json").read_text())
    raw["preprocessing"][field] = value
    (folder / "pneumoseg.json").write_text(json.dumps(raw))
    with pytest.raises(DataFormatError, match=rf"preprocessing\.{field} .*float32"):
        pneumoseg.Predictor.from_dir(folder)
    # ordinary normalisations, small and large, still load
    for mean, std in ((0.5, 0.25), (0.0, 1e-6), (-1e6, 1e3)):
        Preprocessing(mean=mean, std=std)


@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_a_file_that_changes_after_its_prediction_costs_its_overlay_not_the_run(tmp_path, capsys, monkeypatch,
                                                                                 change):
    # The overlay reads the DICOM again (for its display window). A file deleted while the run went on
    # (a PACS export being cleaned up) was an OSError there: exit 2 and no submission for any image,
    # though every image had been predicted; one replaced by an image of another size was an
    # IndexError traceback in the overlay.
    pytest.importorskip("torch")
    from pneumoseg.infer.predictor import Predictor

    folder = tmp_path / "dicoms"
    folder.mkdir()
    for i, image in enumerate(phantom_images(4)):
        write_dicom(folder / f"img{i}.dcm", image.astype(np.uint16) * 16)
    run_batch = Predictor._predict_batch

    def predict_then_delete(self, loaded, *args, **kwargs):
        out = run_batch(self, loaded, *args, **kwargs)
        for source, _, _ in loaded:
            source.path.unlink()
            if change == "replaced":
                write_dicom(source.path, np.zeros((50, 70), np.uint16))
        return out

    monkeypatch.setattr(Predictor, "_predict_batch", predict_then_delete)
    out = tmp_path / "out"
    # a model with no gate and sharp logits: every phantom has a mask, so every image wants an overlay
    code = main(["predict", str(folder), "--model", str(model_dir("plain")), "--out", str(out), "--no-progress",
                 "--batch-size", "2"])
    err = capsys.readouterr().err
    assert code == 0, err
    rows = (out / "submission.csv").read_text().splitlines()
    assert len(rows) == 5 and all(not row.endswith(",-1") for row in rows[1:])
    assert err.count("no overlay for") == 4
    assert ("no such file" if change == "deleted" else "the file changed since it was predicted") in err.lower()
    summary = __import__("json").loads((out / "summary.json").read_text())
    assert summary["outputs"]["overlay_count"] == 0


@pytest.mark.parametrize("threads, match", [(-3, "must be at least 0"), ("4", "must be an integer"), (2.5, "must be an integer"),
                                            (True, "must be an integer"), (10**6, "must be at most 1024")])
def test_onnxruntime_thread_counts_are_checked_before_a_session_exists(threads, match):
    # threads=-3 was accepted and reported as -3, "4" and 2.5 were a TypeError from onnxruntime's
    # bindings, True was one thread, and 10**6 made onnxruntime allocate 20 GB before anything ran.
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    with pytest.raises(InvalidInputError, match=rf"threads {match}"):
        pneumoseg.Predictor.from_dir(model_dir("plain"), backend="onnxruntime", threads=threads)


@pytest.mark.parametrize("threads, match", [(-1, "must be at least 0"), (1025, "must be at most 1024"),
                                            (2.5, "must be an integer"), (True, "must be an integer")])
def test_thread_counts_are_checked_for_the_torch_backend_too(threads, match):
    # the torch backend does not use threads, and took -1, 1025, 2.5 and True without a word: a caller
    # switching backends by a flag learned of the bad value only once onnxruntime ran
    pytest.importorskip("torch")
    with pytest.raises(InvalidInputError, match=rf"threads {match}"):
        pneumoseg.Predictor.from_dir(model_dir("plain"), backend="torch", threads=threads)
    assert pneumoseg.Predictor.from_dir(model_dir("plain"), backend="torch", threads=0).backend.name == "torch"


def test_scores_csv_keeps_every_score_exactly(tmp_path):
    # scores.csv held 6 decimals: the gate's 0.49999997 (it rejected the image) was written as 0.500000,
    # which `pneumoseg evaluate --scores` at --threshold 0.5 counted as a positive call, and scores of a
    # confident classifier (0.9999996, 0.9999999) became ties, changing its AUC.
    pytest.importorskip("torch")
    from pneumoseg._fs import prepare_output_folder
    from pneumoseg.cli.predict import write_predictions
    from pneumoseg.infer.evaluation import read_scores_csv
    from pneumoseg.infer.predictor import Prediction

    below_gate = float(np.nextafter(np.float32(0.5), np.float32(0)))
    scores = {"a": below_gate, "b": float(np.float32(0.9999996)), "c": float(np.float32(0.9999999)), "d": 1e-30}
    predictions = [Prediction(image_id=k, score=v, rle="-1", n_components=0, shape=(4, 4), segmented=False)
                   for k, v in scores.items()]

    class _Backend:
        name, precision, device = "torch", "fp32", "cpu"

    class _Predictor:
        backend = _Backend()

        def describe(self):
            return {}

    with prepare_output_folder(tmp_path / "out", what="prediction output folder") as folder:
        write_predictions(folder, predictions, [], _Predictor(), 1.0, 0)
    assert read_scores_csv(tmp_path / "out" / "scores.csv") == scores


@pytest.mark.parametrize("batch_size", [1, 8])
def test_a_tensor_with_nan_pixels_is_skipped_like_an_array_with_them(plain_predictor, batch_size):
    # With on_error="skip" a NumPy image holding NaN was a reported skip, but the same pixels as a
    # tensor (checked on the device, after the networks) raised, and the other images of its batch
    # were lost with it.
    import torch

    images = phantom_images(3)
    bad = torch.full((20, 20), float("nan"))
    got = plain_predictor.predict([images[0], bad, images[1], bad.clone()], on_error="skip", batch_size=batch_size)
    assert [p.image_id for p in got] == ["image-00000", "image-00002"]
    assert _answers(got) == _answers(plain_predictor.predict([images[0], images[1]]))
    assert got.skipped == [("image-00001", "the pixels contain NaN or infinity"),
                           ("image-00003", "the pixels contain NaN or infinity")]
    with pytest.raises(InvalidInputError, match="image 'image-00001': the pixels contain NaN"):
        plain_predictor.predict([images[0], bad], batch_size=batch_size)


@pytest.mark.parametrize("profile, match", [
    ({"min": 1, "opt": 8, "max": 32, "extra": 1}, "must have min, opt and max"),
    ({"min": 1, "opt": 8}, "must have min, opt and max"),
    ({"min": 4, "opt": 2, "max": 1}, "min <= opt <= max"),
    ({"min": "1", "opt": 8, "max": 32}, "batch profile min"),
])
def test_a_hand_edited_engine_profile_is_a_data_format_error(profile, match):
    # The TensorRT backend rebuilt the recorded profile with BatchProfile(**profile): an unknown or
    # missing field was a bare TypeError (reasoned here; TensorRT itself cannot run on this machine)
    pytest.importorskip("torch")
    from pneumoseg.errors import DataFormatError
    from pneumoseg.export.tensorrt import BatchProfile
    from pneumoseg.infer.tensorrt import _recorded_profile

    with pytest.raises(DataFormatError, match=match):
        _recorded_profile(profile, "model", "tensorrt/segmenter-fp16")
    assert _recorded_profile({"min": 1, "opt": 8, "max": 32}, "model", "k") == BatchProfile(1, 8, 32)
    assert _recorded_profile(None, "model", "k") is None


def test_an_int8_classifier_missing_names_both_artefacts_it_would_take(tmp_path):
    # With no int8 classifier the backend takes the fp32 one (export keeps it fp32 where int8 was
    # slower); with neither, the message named only 'classifier-onnx-fp32' though int8 was asked for.
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from pneumoseg.infer.backends import OnnxRuntimeBackend
    from pneumoseg.models.model_dir import load_model_dir

    md = load_model_dir(model_dir("plain"))
    with pytest.raises(pneumoseg.DataFormatError,
                       match=r"no exported classifier for onnxruntime int8 \(artefact 'classifier-onnx-int8', or "
                             r"'classifier-onnx-fp32' where export kept it fp32\); run `pneumoseg export .* "
                             r"--precision int8 --calibrate IMAGES` first"):
        OnnxRuntimeBackend(md, ["classifier"], precision="int8")
