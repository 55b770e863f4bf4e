"""Predicting DICOM folders as hospitals export them, not only the Kaggle layout: files named IM0001 ...
in every series folder (named by the SOPInstanceUID in their headers with ``name_by="uid"``), files
without the ``.dcm`` suffix, and DICOM media with a DICOMDIR."""

from __future__ import annotations

import gc
import json
import shutil
import warnings
from pathlib import Path

import pytest

pytest.importorskip("torch")

from pneumoseg.cli import main  # noqa: E402
from pneumoseg.data import find_dicoms, read_rle_csv  # noqa: E402
from pneumoseg.data.dicom import read_sop_instance_uid  # noqa: E402
from pneumoseg.data.siim import find_dicom_files  # noqa: E402
from pneumoseg.errors import DataFormatError, DicomError, InvalidInputError  # noqa: E402
from pneumoseg.infer import Predictor  # noqa: E402
from pneumoseg.infer.inputs import collect_inputs  # noqa: E402

from factories import write_dicom  # noqa: E402
from infer_helpers import file_digests, model_dir, phantom_images  # noqa: E402

UIDS = ["1.2.826.0.1.3680043.10.511.1", "1.2.826.0.1.3680043.10.511.22", "1.2.826.0.1.3680043.10.511.3",
        "1.2.826.0.1.3680043.10.511.4"]


def _write(path, pixels, **attrs):
    """A grey 8-bit DICOM of ``pixels`` (all bits stored) with the header fields in ``attrs``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_dicom(path, pixels, BitsAllocated=8, BitsStored=8, HighBit=7, PixelData=pixels.tobytes(), **attrs)


@pytest.fixture(scope="module")
def images():
    return phantom_images(4, seed=11)


@pytest.fixture(scope="module")
def predictor():
    return Predictor.from_dir(model_dir("classifier"))


@pytest.fixture(scope="module")
def expected(predictor, images):
    """The predictions for the pixels themselves, named by their UIDs."""
    return predictor.predict(images, image_ids=UIDS)


@pytest.fixture
def pacs_export(tmp_path, images):
    """A PACS export: two studies, each series folder holding IM0001.dcm (and the second IM0002.dcm)."""
    root = tmp_path / "export"
    names = ["S01/SE01/IM0001.dcm", "S01/SE02/IM0001.dcm", "S02/SE01/IM0001.dcm", "S02/SE01/IM0002.dcm"]
    for name, img, uid in zip(names, images, UIDS):
        _write(root / name, img, SOPInstanceUID=uid)
    return root


def _same(got, expected):
    assert [p.image_id for p in got] == [p.image_id for p in expected]
    assert [p.rle for p in got] == [p.rle for p in expected]
    assert [p.score for p in got] == pytest.approx([p.score for p in expected], abs=1e-6)


def test_repeated_file_names_are_refused_by_file_name_with_the_option_that_names_them(predictor, pacs_export):
    with pytest.raises(DataFormatError, match="appears twice") as info:
        predictor.predict(pacs_export)
    message = str(info.value)
    assert "IM0001" in message and "name_by='uid'" in message and "--name-by uid" in message
    assert str(pacs_export / "S01/SE01/IM0001.dcm") in message and str(pacs_export / "S01/SE02/IM0001.dcm") in message
    # given as separate files too
    with pytest.raises(DataFormatError, match="name_by='uid'"):
        predictor.predict([pacs_export / "S01/SE01/IM0001.dcm", pacs_export / "S02/SE01/IM0001.dcm"])


def test_name_by_uid_names_each_image_by_the_sop_instance_uid_in_its_header(predictor, pacs_export, expected):
    before = file_digests(pacs_export)
    got = predictor.predict(pacs_export, name_by="uid")
    _same(got, expected)  # path order here is the UIDs' order
    assert got.skipped == [] and got[0].path == str(pacs_export / "S01/SE01/IM0001.dcm")
    # files given one by one, and the stream, name them alike
    files = [pacs_export / "S02/SE01/IM0002.dcm", pacs_export / "S01/SE02/IM0001.dcm"]
    assert [p.image_id for p in predictor.predict(files, name_by="uid")] == [UIDS[3], UIDS[1]]
    assert [p.image_id for p in predictor.predict_iter(pacs_export, name_by="uid")] == UIDS
    assert file_digests(pacs_export) == before  # headers are read, nothing is written


def test_name_by_is_checked(predictor, pacs_export):
    with pytest.raises(InvalidInputError, match="name_by must be one of 'file', 'uid'"):
        predictor.predict(pacs_export, name_by="SOPInstanceUID")


def test_the_same_uid_in_two_files_is_refused_under_uid(predictor, tmp_path, images):
    _write(tmp_path / "a" / "IM0001.dcm", images[0], SOPInstanceUID=UIDS[0])
    _write(tmp_path / "b" / "IM0001.dcm", images[1], SOPInstanceUID=UIDS[0])
    with pytest.raises(DataFormatError, match="appears twice.*same SOPInstanceUID"):
        predictor.predict(tmp_path, name_by="uid")


def test_files_without_the_dcm_suffix_are_predicted_and_named_by_their_file_name(predictor, tmp_path, images,
                                                                                expected):
    folder = tmp_path / "media"
    names = ["A/00000001", "A/00000002", "B/IM0003", f"C/{UIDS[3]}"]  # the last: named by its UID, dots and all
    for name, img, uid in zip(names, images, UIDS):
        _write(folder / name, img, SOPInstanceUID=uid)
    (folder / "A" / "README").write_text("not a DICOM file")  # not DICOM: passed over in silence
    (folder / "B" / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    by_name = predictor.predict(folder)
    assert [p.image_id for p in by_name] == ["00000001", "00000002", "IM0003", UIDS[3]]
    assert [p.rle for p in by_name] == [p.rle for p in expected] and by_name.skipped == []
    _same(predictor.predict(folder, name_by="uid"), expected)
    # training keeps to the Kaggle rule: the ImageIds must match train-rle.csv
    kaggle = find_dicoms(folder)
    assert dict(kaggle) == {} and {r for _, r in kaggle.skipped} == {"a DICOM file without the .dcm suffix"}
    assert list(find_dicoms(folder, require_suffix=False)) == ["00000001", "00000002", "IM0003", UIDS[3]]


def test_a_dicomdir_is_skipped_by_its_name_or_its_sop_class(predictor, tmp_path, images):
    from pydicom import dcmread
    from pydicom.fileset import FileSet

    # DICOM media as pydicom's FileSet writes them: DICOMDIR + PT000000/ST000000/SE000000/IM000000
    sources = []
    for i, img in enumerate(images[:2]):
        ds = dcmread(_write(tmp_path / "src" / f"{i}.dcm", img, SOPInstanceUID=UIDS[i]))
        ds.PatientID, ds.PatientName, ds.StudyDate, ds.StudyTime, ds.StudyID = "P1", "Test^Patient", "20240101", "120000", "1"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3.4", f"1.2.3.4.{i}", "CR"
        ds.SeriesNumber, ds.InstanceNumber = i + 1, 1
        sources.append(ds)
    media = tmp_path / "media"
    with warnings.catch_warnings():
        # pydicom's FileSet stages in TemporaryDirectory objects it leaves to be cleaned up when collected
        warnings.simplefilter("ignore", ResourceWarning)
        fileset = FileSet()
        for ds in sources:
            fileset.add(ds)
        fileset.write(media)
        del fileset
        gc.collect()
    files = sorted(p for p in media.rglob("*") if p.is_file() and p.name != "DICOMDIR")
    assert len(files) == 2 and all(not p.suffix for p in files)

    got = predictor.predict(media, name_by="uid")
    assert [p.image_id for p in got] == UIDS[:2]
    assert [where for where, _ in got.skipped] == [str(media / "DICOMDIR")]
    assert got.skipped[0][1].startswith("a DICOMDIR")
    # each series folder holds an IM000000: by file name they collide
    assert [p.name for p in files] == ["IM000000", "IM000000"]
    with pytest.raises(DataFormatError, match="IM000000.*appears twice.*name_by='uid'"):
        predictor.predict(media)

    # renamed, it is still told from an image by its MediaStorageSOPClassUID
    (media / "DICOMDIR").rename(media / "INDEX")
    got = predictor.predict(media, name_by="uid")
    assert [p.image_id for p in got] == UIDS[:2] and [w for w, _ in got.skipped] == [str(media / "INDEX")]
    assert len(find_dicom_files(media, require_suffix=False)) == 2
    # renamed to *.dcm it is listed as an image (by name alone), and reading it says what it is
    (media / "INDEX").rename(media / "INDEX.dcm")
    got = predictor.predict(media, name_by="uid", on_error="skip")
    assert [p.image_id for p in got] == UIDS[:2] and [w for w, _ in got.skipped] == [str(media / "INDEX.dcm")]
    assert got.skipped[0][1].startswith("a DICOMDIR")
    with pytest.raises(DicomError, match="INDEX.dcm: a DICOMDIR"):
        predictor.predict(media / "INDEX.dcm")


@pytest.mark.parametrize("attrs, reason", [
    ({"SOPInstanceUID": None}, "no SOPInstanceUID"),
    ({"SOPInstanceUID": ""}, "no SOPInstanceUID"),
    ({"SOPInstanceUID": "1.2.abc.4"}, "is not a UID"),
    ({"SOPInstanceUID": "1.2/../../x"}, "is not a UID"),
    ({"SOPInstanceUID": "1." + "2" * 70}, "is not a UID"),
])
def test_a_file_without_a_usable_uid_is_an_error_or_a_reported_skip(predictor, tmp_path, images, expected,
                                                                     attrs, reason):
    for i, img in enumerate(images[:2]):
        _write(tmp_path / f"SE0{i}" / "IM0001.dcm", img, SOPInstanceUID=UIDS[i])
    bad = _write(tmp_path / "SE09" / "IM0001.dcm", images[2], **attrs)
    with pytest.raises(DicomError, match=reason) as info:
        predictor.predict(tmp_path, name_by="uid")
    assert str(bad) in str(info.value)
    with pytest.raises(DicomError, match=reason):
        read_sop_instance_uid(bad)
    got = predictor.predict(tmp_path, name_by="uid", on_error="skip")
    _same(got, expected[:2])
    assert len(got.skipped) == 1 and got.skipped[0][0] == str(bad) and reason in got.skipped[0][1]
    assert not got.skipped[0][1].startswith(str(bad))  # the path is listed beside the reason, not in it


def test_unreadable_files_are_handled_under_uid_as_under_file_names(predictor, tmp_path, images, expected):
    good = _write(tmp_path / "SE01" / "IM0001.dcm", images[0], SOPInstanceUID=UIDS[0])
    (tmp_path / "SE02").mkdir()
    (tmp_path / "SE02" / "IM0001.dcm").write_text("not a DICOM file")
    (tmp_path / "SE03").mkdir()
    (tmp_path / "SE03" / "IM0001.dcm").write_bytes(good.read_bytes()[:100])
    with pytest.raises(DicomError, match="SE02"):
        predictor.predict(tmp_path, name_by="uid")
    got = predictor.predict(tmp_path, name_by="uid", on_error="skip")
    _same(got, expected[:1])
    reasons = dict(got.skipped)
    assert "not a DICOM file" in reasons[str(tmp_path / "SE02" / "IM0001.dcm")]
    assert str(tmp_path / "SE03" / "IM0001.dcm") in reasons


def test_cli_predict_names_a_pacs_export_by_uid(pacs_export, tmp_path, capsys, expected):
    model = str(model_dir("classifier"))
    out = tmp_path / "pred"
    assert main(["predict", str(pacs_export), "--model", model, "--out", str(out), "--no-overlays"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "appears twice" in err and "--name-by uid" in err
    assert not out.exists() or not (out / "submission.csv").exists()

    assert main(["predict", str(pacs_export), "--model", model, "--out", str(out), "--name-by", "uid"]) == 0
    submission = read_rle_csv(out / "submission.csv")
    assert list(submission) == UIDS  # one row per image, in path order
    assert [submission[p.image_id] for p in expected] == [[p.rle] for p in expected]
    lines = (out / "submission.csv").read_text().splitlines()
    assert len(lines) == 1 + len(UIDS)
    summary = json.loads((out / "summary.json").read_text())
    assert [d["image_id"] for d in summary["images_detail"]] == UIDS and summary["skipped"] == []
    overlays = sorted(p.name for p in (out / "overlays").iterdir()) if (out / "overlays").exists() else []
    assert overlays == sorted(f"{p.image_id}.png" for p in expected if p.positive)
    assert any(p.positive for p in expected) and not all(p.positive for p in expected)


def test_cli_predict_takes_files_without_the_suffix_and_reports_a_bad_uid(tmp_path, images, capsys, expected):
    folder = tmp_path / "in"
    for i, img in enumerate(images[:2]):
        _write(folder / f"SE0{i}" / "IM0001", img, SOPInstanceUID=UIDS[i])
    _write(folder / "SE09" / "IM0001", images[2], SOPInstanceUID=None)
    out = tmp_path / "pred"
    assert main(["predict", str(folder), "--model", str(model_dir("classifier")), "--out", str(out),
                 "--name-by", "uid", "--no-overlays"]) == 0
    err = capsys.readouterr().err
    assert f"skipped {folder / 'SE09' / 'IM0001'}" in err and "no SOPInstanceUID" in err
    assert read_rle_csv(out / "submission.csv") == {p.image_id: [p.rle] for p in expected[:2]}
    capsys.readouterr()
    assert main(["predict", str(folder), "--model", str(model_dir("classifier")), "--out", str(tmp_path / "x"),
                 "--name-by", "header"]) == 2
    assert "--name-by" in capsys.readouterr().err


def test_on_the_kaggle_files_both_namings_agree_and_renamed_copies_get_their_uids_back(tmp_path):
    sample = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "siim-sample"
    if not sample.is_dir() or not any(sample.glob("*.dcm")):
        pytest.skip("the SIIM sample (shared/data/siim-sample) is not here")
    kaggle = list(find_dicoms(sample))
    assert [s.image_id for s in collect_inputs(sample, name_by="uid")[0]] == kaggle
    # exported from a PACS: IM0001 in a folder per image, no suffix
    for i, uid in enumerate(kaggle):
        (tmp_path / f"SE{i:02d}").mkdir()
        shutil.copyfile(sample / f"{uid}.dcm", tmp_path / f"SE{i:02d}" / "IM0001")
    sources, skipped = collect_inputs(tmp_path, name_by="uid")
    assert [s.image_id for s in sources] == kaggle and skipped == []
