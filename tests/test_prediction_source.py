"""Which image a prediction came from: ``Prediction.source_uid`` is the SOPInstanceUID read with the
pixels (None for arrays and tensors), so a SEG or overlay made later from the file can be checked to
reference that image (``build_dicom_seg(..., expect_sop_instance_uid=)``); and the backend options that
``predict`` and ``listen`` share are one definition."""

from __future__ import annotations

import pydicom
import pytest

torch = pytest.importorskip("torch")

from pneumoseg.cli import UsageError, build_parser  # noqa: E402
from pneumoseg.data import read_dicom  # noqa: E402
from pneumoseg.errors import DicomError, InvalidInputError  # noqa: E402
from pneumoseg.infer import Predictor  # noqa: E402

from factories import write_dicom  # noqa: E402
from infer_helpers import model_dir, phantom_images  # noqa: E402


def _dicoms(folder, n=3, seed=11):
    folder.mkdir()
    paths = []
    for i, img in enumerate(phantom_images(n, seed=seed)):
        paths.append(write_dicom(folder / f"img{i}.dcm", img, BitsAllocated=8, BitsStored=8, HighBit=7,
                                 PixelData=img.tobytes()))
    return paths


def _uid(path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_read_dicom_keeps_the_header_uid_apart_from_the_image_id(tmp_path):
    with_uid = write_dicom(tmp_path / "a.dcm")
    without = write_dicom(tmp_path / "b.dcm", SOPInstanceUID=None)
    image = read_dicom(with_uid, with_dataset=False)
    assert image.sop_instance_uid == image.image_id == _uid(with_uid)
    image = read_dicom(without, with_dataset=False)
    assert image.sop_instance_uid is None and image.image_id == "b"  # the file name stands in for the ImageId only


@pytest.mark.parametrize("batch_size", [1, 2])  # read inline and on the reader threads
def test_source_uid_is_the_header_read_with_the_pixels_and_none_in_memory(tmp_path, batch_size):
    paths = _dicoms(tmp_path / "in")
    no_uid = write_dicom(tmp_path / "in" / "nouid.dcm", SOPInstanceUID=None)
    predictor = Predictor.from_dir(model_dir("classifier"))
    preds = predictor.predict(tmp_path / "in", batch_size=batch_size)
    by_id = {p.image_id: p for p in preds}
    assert [by_id[p.stem].source_uid for p in paths] == [_uid(p) for p in paths]
    assert by_id["nouid"].path == str(no_uid) and by_id["nouid"].source_uid is None
    assert predictor.predict(paths[0])[0].source_uid == _uid(paths[0])  # one file: read on the calling thread
    images = phantom_images(2, seed=3)
    assert [p.source_uid for p in predictor.predict(images)] == [None, None]
    assert predictor.predict(torch.from_numpy(images[0]))[0].source_uid is None
    # summary.json and other to_dict users are as they were: the ImageId names the image
    assert "source_uid" not in preds[0].to_dict() and "source_uid=" not in repr(preds[0])


def test_a_file_replaced_after_it_was_listed_by_uid_is_not_predicted_under_the_listed_name(tmp_path):
    """Named by SOPInstanceUID, the ImageId is read when the inputs are listed; a file replaced by another
    image before its pixels are read would have gone out under the listed image's name (a submission row,
    a score, with another image's answer). It is an error now, or a reported skip, and the file named."""
    paths = _dicoms(tmp_path / "in", n=2)
    listed = [_uid(p) for p in paths]
    predictor = Predictor.from_dir(model_dir("classifier"))
    stream = predictor.predict_iter(paths, name_by="uid", on_error="skip")
    write_dicom(paths[0], phantom_images(1, seed=5)[0].astype("uint16"))  # another image: a new SOPInstanceUID
    preds = list(stream)
    assert [p.image_id for p in preds] == [listed[1]] and preds[0].source_uid == listed[1]
    ((where, reason),) = stream.skipped
    assert where == str(paths[0]) and "holds another image than when it was listed" in reason
    stream = predictor.predict_iter(paths[1], name_by="uid")
    write_dicom(paths[1], phantom_images(1, seed=6)[0].astype("uint16"))
    with pytest.raises(DicomError, match="holds another image than when it was listed"):
        list(stream)


def test_build_dicom_seg_refuses_a_source_that_is_not_the_expected_image(tmp_path):
    pytest.importorskip("highdicom")
    from pneumoseg.infer import build_dicom_seg

    img = phantom_images(1, seed=2)[0]
    path = write_dicom(tmp_path / "src.dcm", img.astype("uint16"), Modality="DX",
                       StudyInstanceUID=pydicom.uid.generate_uid(), SeriesInstanceUID=pydicom.uid.generate_uid())
    mask = (img > img.mean()).astype("uint8")
    seg = build_dicom_seg(mask, path, expect_sop_instance_uid=_uid(path))
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == _uid(path)
    with pytest.raises(DicomError, match="src.dcm: the file holds another image"):
        build_dicom_seg(mask, path, expect_sop_instance_uid="1.2.3")
    with pytest.raises(InvalidInputError, match="expect_sop_instance_uid must be a str"):
        build_dicom_seg(mask, path, expect_sop_instance_uid=123)


def test_predict_and_listen_take_the_same_backend_options():
    parser = build_parser()
    predict = parser.parse_args(["predict", "x.dcm", "--model", "m", "--out", "o"])
    listen = parser.parse_args(["listen", "--model", "m", "--out", "o"])
    keys = ("backend", "device", "precision", "batch_size")
    assert [getattr(predict, k) for k in keys] == [getattr(listen, k) for k in keys] == ["auto", "auto", None, 8]
    given = ["--backend", "onnxruntime", "--device", "cpu", "--precision", "int8", "--batch-size", "3"]
    predict = parser.parse_args(["predict", "x.dcm", "--model", "m", "--out", "o", *given])
    listen = parser.parse_args(["listen", "--model", "m", "--out", "o", *given])
    assert [getattr(predict, k) for k in keys] == [getattr(listen, k) for k in keys] == ["onnxruntime", "cpu", "int8", 3]
    for command in (["predict", "x.dcm"], ["listen"]):
        with pytest.raises(UsageError, match="--backend: invalid choice: 'openvino'"):
            parser.parse_args([*command, "--model", "m", "--out", "o", "--backend", "openvino"])
