"""`pneumoseg export`: ONNX parts recorded in the model directory; clear errors otherwise."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from pneumoseg.cli import main  # noqa: E402
from pneumoseg.infer import Predictor  # noqa: E402
from pneumoseg.models.model_dir import load_model_dir  # noqa: E402

from infer_helpers import copy_model_dir, model_dir, phantom_images  # noqa: E402


def test_export_onnx_then_predict_with_onnxruntime(tmp_path, capsys):
    path = copy_model_dir("aux", tmp_path / "m")
    assert main(["export", str(path), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "encoder: " in out and "decoder: " in out and "mask Dice 1.0000" in out
    md = load_model_dir(path)
    assert {"encoder-onnx-fp32", "decoder-onnx-fp32"} <= set(md.artefacts)
    images = phantom_images(4, seed=9)
    a = Predictor.from_dir(path).predict(images)
    b = Predictor.from_dir(path, backend="onnxruntime").predict(images)
    assert [p.rle for p in a] == [p.rle for p in b]


@pytest.mark.parametrize("args, message", [
    (["--precision", "int8"], "--calibrate DIR"),
    (["--batch", "1,8,32"], "--batch applies to --format tensorrt"),
    # options of the TensorRT export were silently ignored by the ONNX one
    (["--device", "cuda:1"], "--device applies to --format tensorrt"),
    (["--engine-cache", "cache"], "--engine-cache applies to --format tensorrt"),
    (["--format", "pdf"], "invalid choice"),
    # a bad profile was reported only as 'TensorRT is not installed' where it is absent
    (["--format", "tensorrt", "--batch", "0"], "batch profile opt must be at least 1, got 0"),
    (["--format", "tensorrt", "--batch", "-1"], "batch profile must be MIN,OPT,MAX"),
    (["--format", "tensorrt", "--batch", "1,,2"], "batch profile must be MIN,OPT,MAX (e.g. 1,8,32) or one size, got '1,,2'"),
    (["--format", "tensorrt", "--batch", "4,2"], "batch profile must be MIN,OPT,MAX"),
    (["--format", "tensorrt", "--batch", "8,4,32"], "needs min <= opt <= max, got 8, 4, 32"),
    (["--format", "tensorrt", "--batch", "1,2,99999999999999999999"], "batch profile max must be at most 65536"),
    (["--format", "tensorrt", "--batch", "1_0"], "batch profile must be MIN,OPT,MAX"),
])
def test_export_usage_errors(args, message, capsys):
    assert main(["export", str(model_dir("aux")), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_export_needs_a_model_directory(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "not a model directory" in capsys.readouterr().err


def test_export_tensorrt_without_tensorrt(capsys):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert main(["export", str(model_dir("aux")), "--format", "tensorrt"]) == 2
        assert "needs tensorrt, which is not installed: pip install 'pneumoseg[tensorrt]'" in capsys.readouterr().err
    else:
        pytest.skip("TensorRT is installed (the engine tests cover it)")


def test_export_onnx_checks_against_the_calibration_images_when_given(tmp_path, capsys):
    # --calibrate at fp32 was ignored (the export was checked on synthetic phantoms only)
    import numpy as np

    from factories import write_dicom

    images = tmp_path / "mine"
    images.mkdir()
    for i, img in enumerate(phantom_images(5, seed=4)):
        write_dicom(images / f"{i}.dcm", np.asarray(img).astype(np.uint16) * 16)
    path = copy_model_dir("aux", tmp_path / "m")
    assert main(["export", str(path), "--calibrate", str(images)]) == 0
    md = load_model_dir(path)
    assert {md.artefacts[k].meta["validation"]["images"] for k in ("encoder-onnx-fp32", "decoder-onnx-fp32")} == {5}
