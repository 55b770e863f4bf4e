"""Patient data stays in the DICOM: pneumoseg runs beside PACS on files that carry names, IDs, dates,
institutions and free-text reports in their headers. Every common PHI field of these test files holds
a canary, ``PHI-CANARY-<field>``; what pneumoseg writes (predict's submission, scores, summary and
overlays, the decoded-image cache, a training run and its model directory), what it prints and what
its errors say must hold none of them. The ImageId (the file name or a valid SOPInstanceUID) and the
paths the user gave are what name an image, and are allowed."""

from __future__ import annotations

import io
import logging
import re
import traceback
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom")
pytest.importorskip("torch")

import pydicom  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402

from pneumoseg.cli import main  # noqa: E402
from pneumoseg.data import make_synthetic_siim, read_dicom, read_dicom_shape  # noqa: E402
from pneumoseg.data.cache import build_cache  # noqa: E402
from pneumoseg.data.dicom import read_sop_instance_uid  # noqa: E402
from pneumoseg.errors import DicomError  # noqa: E402

from factories import TINY_TRAINING, training_config, write_dicom  # noqa: E402
from infer_helpers import exported_model_dir, model_dir, phantom_images  # noqa: E402

MARK = "PHI-CANARY"
BIRTH_DATE = "19370415"  # a valid date, as most files hold: found by its digits
TEXT_FIELDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
    "PatientAddress", "PatientTelephoneNumbers", "MedicalRecordLocator", "IssuerOfPatientID", "AccessionNumber",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy",
    "RequestingPhysician", "StationName", "DeviceSerialNumber", "StudyID", "StudyDescription", "SeriesDescription",
    "ProtocolName", "RequestedProcedureDescription", "PatientComments", "AdditionalPatientHistory", "Occupation",
    "EthnicGroup", "ResponsiblePerson", "PatientAge", "PatientSex",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "PatientBirthTime",
)
_FOUND = re.compile(rb"PHI-CANARY[-A-Za-z0-9]*|" + BIRTH_DATE.encode())


def add_phi(ds: Dataset) -> Dataset:
    """Canaries in every PHI field of ``ds`` (in place): text, dates and times (invalid for their VR, as a
    badly configured system writes them), a free-text report, a sequence, private tags, the file meta."""
    # pydicom would warn and log about the invalid values: its logging is checked for canaries below
    with pydicom.config.disable_value_validation():
        for keyword in TEXT_FIELDS:
            setattr(ds, keyword, f"{MARK}-{keyword}")
        ds.PatientBirthDate = BIRTH_DATE
        ds.ImageComments = f"{MARK}-ImageComments " + "No acute cardiopulmonary process. " * 200  # a report
        item = Dataset()
        item.RequestedProcedureID = f"{MARK}-RequestedProcedureID"
        item.ScheduledProcedureStepDescription = f"{MARK}-ScheduledProcedureStepDescription"
        ds.RequestAttributesSequence = Sequence([item])
        block = ds.private_block(0x0009, f"{MARK}-PrivateCreator", create=True)
        block.add_new(0x01, "LO", f"{MARK}-PrivateLO")
        block.add_new(0x02, "UT", f"{MARK}-PrivateUT " + "x" * 5000)
        ds.add_new(0x00191010, "UN", f"{MARK}-PrivateUN".encode())
        if getattr(ds, "file_meta", None) is not None:
            ds.file_meta.SourceApplicationEntityTitle = f"{MARK}-AE"[:16]
    return ds


def save(ds: Dataset, path: Path) -> Path:
    with pydicom.config.disable_value_validation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=False)
    return path


def canary_dicom(path: Path, raw=None, **attrs) -> Path:
    """An uncompressed 16-bit DICOM (``factories.write_dicom``) with canaries in its PHI fields."""
    with pydicom.config.disable_value_validation():
        write_dicom(path, raw, **attrs)
    return save(add_phi(pydicom.dcmread(path)), path)


def add_phi_to_files(root: Path) -> list[Path]:
    files = sorted(root.rglob("*.dcm"))
    for p in files:
        save(add_phi(pydicom.dcmread(p)), p)
    return files


def bad_canary_dicoms(folder: Path) -> list[Path]:
    """Files every error path of the reader refuses, each with canaries in its PHI fields."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    ds = pydicom.dcmread(canary_dicom(folder / "truncated.dcm", raw))
    ds.PixelData = ds.PixelData[:100]
    save(ds, folder / "truncated.dcm")
    ds = pydicom.dcmread(canary_dicom(folder / "nopixels.dcm", raw))
    del ds.PixelData
    save(ds, folder / "nopixels.dcm")
    ds = pydicom.dcmread(canary_dicom(folder / "undecodable.dcm", raw))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"  # JPEG baseline, with data that is not a JPEG
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + f"{MARK}-x".encode() * 50 + b"\xff\xd9"])
    save(ds, folder / "undecodable.dcm")
    canary_dicom(folder / "rgb.dcm", raw, PhotometricInterpretation="RGB")
    canary_dicom(folder / "norows.dcm", raw, Rows=None)
    canary_dicom(folder / "badslope.dcm", raw, RescaleSlope=("DS", "1e999"))
    blob = (folder / "rgb.dcm").read_bytes()
    (folder / "cut-in-header.dcm").write_bytes(blob[: blob.find(f"{MARK}-PatientName".encode()) + 14])
    return sorted(folder.iterdir())


def canaries(data: bytes) -> set[str]:
    """The canaries in ``data``, and in the zip members (torch checkpoints) and compressed PNG text it holds."""
    found = {m.group(0).decode("latin-1") for m in _FOUND.finditer(data)}
    if f"{MARK}-".encode("utf-16-le") in data:
        found.add("(UTF-16)")
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for info in z.infolist():
                found |= canaries(z.read(info)) | canaries(info.filename.encode())
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        for kind, body in png_chunks(data):
            if kind in ("zTXt", "iTXt") and b"\x00" in body:
                rest = body.split(b"\x00", 1)[1]
                rest = rest[1:] if kind == "zTXt" else rest[2:].split(b"\x00", 2)[-1]
                try:
                    found |= canaries(zlib.decompress(rest))
                except zlib.error:
                    pass
    return found


def png_chunks(data: bytes) -> list[tuple[str, bytes]]:
    out, at = [], 8
    while at + 8 <= len(data):
        n = int.from_bytes(data[at: at + 4], "big")
        out.append((data[at + 4: at + 8].decode("latin-1"), data[at + 8: at + 8 + n]))
        at += 12 + n
    return out


def leaks_under(folder: Path) -> dict[str, set[str]]:
    """relative path -> the canaries in that file (or its name), for every file under ``folder``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        found = canaries(p.name.encode())
        if p.is_file():
            found |= canaries(p.read_bytes())
        if found:
            out[str(p.relative_to(folder))] = found
    return out


def error_text(exc: BaseException) -> str:
    """Everything a user sees of an error: its message, its type, the chained causes, the traceback."""
    return "".join(traceback.format_exception(exc)) + repr(exc)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """Readable canary DICOMs (one MONOCHROME1 with a window, as an overlay reads it) beside broken ones."""
    root = tmp_path_factory.mktemp("phi")
    (root / "good").mkdir()
    for i, img in enumerate(phantom_images(3, seed=11)):
        attrs = {"PhotometricInterpretation": "MONOCHROME1", "WindowCenter": "1000", "WindowWidth": "2000"} if i == 0 else {}
        canary_dicom(root / "good" / f"image{i}.dcm", img.astype(np.uint16) * 16, **attrs)
    bad_canary_dicoms(root / "bad")
    (root / "bad" / "notdicom.dcm").write_bytes(f"{MARK}-NotDicom ".encode() * 20)
    assert leaks_under(root)  # the canaries are there to be found
    return root


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_predict_writes_and_prints_no_patient_data(study, tmp_path, capsys, caplog, backend):
    caplog.set_level(logging.DEBUG)  # pneumoseg's, pydicom's and onnxruntime's logging, all of it
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
        model = exported_model_dir("plain")
    else:
        model = model_dir("plain")
    out = tmp_path / "pred"
    assert main(["predict", str(study / "good"), str(study / "bad"), "--model", str(model), "--out", str(out),
                 "--backend", backend, "--segment", "all", "--no-progress"]) == 0
    printed = capsys.readouterr()
    summary = (out / "summary.json").read_text()
    assert summary.count('"reason"') == len(list((study / "bad").iterdir()))  # every error path was taken
    overlays = sorted((out / "overlays").glob("*.png"))
    assert overlays  # the overlay path, which reads the header again for its window, was taken too
    assert leaks_under(out) == {}
    assert canaries((printed.out + printed.err + caplog.text).encode()) == set()
    for png in overlays:  # the picture alone: no text chunk (Pillow writes none unless asked)
        assert {kind for kind, _ in png_chunks(png.read_bytes())} <= {"IHDR", "IDAT", "IEND"}


def test_a_sop_instance_uid_that_is_not_a_uid_is_not_quoted(study, tmp_path, capsys):
    """Named by header (PACS exports), a file whose SOPInstanceUID holds something else (a system that
    misfiled an accession number or a name there) is skipped; the reason says what is wrong with the
    value without quoting it, and its path names the file."""
    folder = tmp_path / "series"
    folder.mkdir()
    canary_dicom(folder / "IM0001", phantom_images(1)[0])
    bad = canary_dicom(folder / "IM0002", phantom_images(1)[0], SOPInstanceUID=("UI", f"{MARK}-SOPInstanceUID"))
    long = canary_dicom(folder / "IM0003", phantom_images(1)[0], SOPInstanceUID=("UI", "1." + "2" * 70))
    out = tmp_path / "pred"
    assert main(["predict", str(folder), "--model", str(model_dir("plain")), "--out", str(out), "--name-by", "uid",
                 "--no-overlays", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert f"skipped {bad}: its SOPInstanceUID is not a UID (it holds characters other than digits and dots" in printed.err
    assert f"skipped {long}: its SOPInstanceUID is not a UID (72 characters" in printed.err
    assert "2" * 70 not in printed.err
    assert leaks_under(out) == {} and canaries(printed.err.encode()) == set()
    with pytest.raises(DicomError, match="is not a UID") as info:
        read_sop_instance_uid(bad)
    assert str(bad) in str(info.value) and canaries(error_text(info.value).encode()) == set()


@pytest.mark.parametrize("warnings_as_errors", [False, True], ids=["default", "warnings-as-errors"])
def test_dicom_errors_quote_no_patient_data(study, caplog, warnings_as_errors):
    """Each refusal names the file and the technical reason; pydicom's own messages, warnings and log
    records, chained or turned into errors by the caller's filters, quote no PHI field either."""
    caplog.set_level(logging.DEBUG)
    refused = 0
    for path in sorted((study / "bad").iterdir()):
        for read in (read_dicom, read_dicom_shape, read_sop_instance_uid):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("error" if warnings_as_errors else "always")
                try:
                    read(path)
                except DicomError as exc:
                    refused += 1
                    assert str(path) in str(exc)
                    assert canaries(error_text(exc).encode()) == set(), (read.__name__, path.name)
            assert canaries("".join(str(w.message) for w in caught).encode()) == set()
    assert refused >= len(list((study / "bad").iterdir()))  # read_dicom refuses every one of them
    assert canaries(caplog.text.encode()) == set()


def test_a_dicom_image_prints_no_patient_data(study):
    image = read_dicom(study / "good" / "image1.dcm")
    assert image.meta["sex"] == f"{MARK}-PatientSex"  # still read, for whoever asks for it
    assert canaries(repr(image).encode()) == set() and canaries(str(image).encode()) == set()
    assert canaries(repr(image.window()).encode()) == set()


def test_the_cache_holds_pixels_and_image_ids_but_no_header(study, tmp_path):
    out = tmp_path / "cache"
    with pytest.warns(Warning, match="could not be read"):
        build_cache(study, size=16, out=out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".pneumoseg-manifest", "images.npy", "index.json"]
    assert leaks_under(out) == {}


def test_a_training_run_and_its_model_directory_hold_no_patient_data(tmp_path, capsys):
    from pneumoseg.train.engine import train

    root = tmp_path / "siim"
    make_synthetic_siim(root, n_images=8, size=64, positive_fraction=0.5, seed=2, progress=False)
    assert add_phi_to_files(root) and leaks_under(root)
    cfg = training_config(TINY_TRAINING, root, log={"progress": True, "tensorboard": True, "plots": True})
    run = tmp_path / "run"
    train(cfg, run, progress=True)
    printed = capsys.readouterr()
    assert (run / "pneumoseg.json").is_file() and list((run / "checkpoints").glob("*.pt"))
    assert leaks_under(run) == {}  # checkpoints, weights, pneumoseg.json, metrics, plots, TensorBoard
    assert canaries((printed.out + printed.err).encode()) == set()
