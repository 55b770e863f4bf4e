"""An output folder that is an input of its command, holds one, or lies inside an input that is another
kind of pneumoseg output (a model directory) is refused before anything is written, unless it is the
command's own earlier output."""

from __future__ import annotations

import pytest

from pneumoseg import OutputError
from pneumoseg._fs import OutputKind, check_output_folder, prepare_output_folder, refuse_output_among_inputs


def _everything(folder):
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def model(tmp_path):
    """A folder prepared as a model directory, with one file in it."""
    path = tmp_path / "model"
    with prepare_output_folder(path, what=OutputKind.MODEL_DIR) as folder:
        folder.write_bytes("model.json", data=b"{}")
    return path


def _refused(path, inputs, match, *, what=OutputKind.PREDICTION, overwrite=True, resume=False):
    with pytest.raises(OutputError, match=match) as info:
        check_output_folder(path, overwrite=overwrite, what=what, inputs=inputs, resume=resume)
    assert "\n" not in str(info.value)
    with pytest.raises(OutputError, match=match):
        prepare_output_folder(path, overwrite=overwrite, what=what, inputs=inputs, resume=resume)


def test_the_model_directory_and_folders_inside_it_are_refused(model, tmp_path):
    before = _everything(model)
    _refused(model, (model,), f"{model} is {model}, an input")
    _refused(model / "preds", (model,), "is inside .*model directory")
    _refused(model / "deeper" / "preds", (model,), "is inside .*model directory")
    # the node (pneumoseg listen, whose folder pneumoseg.serve prepares) is refused the same way
    for out in (model, model / "node"):
        with pytest.raises(OutputError, match="an input of this command"):
            refuse_output_among_inputs(out, (model,), OutputKind.DICOM_NODE)
    assert _everything(model) == before
    check_output_folder(model, what=OutputKind.MODEL_DIR)  # still its own: a save into it goes on


def test_an_input_folder_or_one_holding_an_input_is_refused_forced_or_not(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.dcm").write_bytes(b"study")
    before = _everything(tmp_path)
    _refused(images, (images,), "is .*images, an input")
    _refused(tmp_path, (images,), "holds .*images, an input")
    _refused(tmp_path, (images / "a.dcm",), "holds .*a.dcm, an input")
    assert _everything(tmp_path) == before
    # a folder the command did not write, inside an input that is not pneumoseg output: as before
    with prepare_output_folder(images / "preds", what=OutputKind.PREDICTION, inputs=(images,)) as folder:
        folder.write_bytes("submission.csv", data=b"x")


def test_the_commands_own_earlier_output_is_rerun_into(tmp_path):
    out = tmp_path / "eval"
    for _ in range(2):
        with prepare_output_folder(out, what=OutputKind.EVALUATION, inputs=(tmp_path / "pred.csv",)) as folder:
            folder.write_bytes("report.json", data=b"{}")
    # someone's file beside its own output, read by the forced rerun: written beside, not refused
    (out / "truth.csv").write_bytes(b"ImageId,EncodedPixels\n")
    check_output_folder(out, overwrite=True, what=OutputKind.EVALUATION, inputs=(out / "truth.csv",))
    with prepare_output_folder(out, overwrite=True, what=OutputKind.EVALUATION, inputs=(out / "truth.csv",)) as folder:
        folder.write_bytes("report.json", data=b"{}")
    assert (out / "truth.csv").read_bytes() == b"ImageId,EncodedPixels\n"
    # a resumed run's folder and a node's own folder as well
    refuse_output_among_inputs(out, (out / "truth.csv",), OutputKind.EVALUATION)
    with prepare_output_folder(out, what=OutputKind.EVALUATION, resume=True, inputs=(out / "truth.csv",)):
        pass
