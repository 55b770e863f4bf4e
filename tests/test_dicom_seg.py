"""DICOM Segmentation output (pneumoseg.infer.dicom_seg, `pneumoseg predict --dicom-seg`): each SEG reads
back with highdicom as exactly the mask it was written from, lined up with its source's pixel array,
references its source, carries only the patient and study identity a PACS files it by, and is written
atomically; bad input is refused with a message naming it; without highdicom the flag is refused first."""

from __future__ import annotations

import io
import json
import logging
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

import pydicom  # noqa: E402

from pneumoseg.cli import main  # noqa: E402
from pneumoseg.data import make_synthetic_siim, read_dicom_shape, read_rle_csv  # noqa: E402
from pneumoseg.errors import DicomError, InvalidInputError  # noqa: E402
from pneumoseg.infer import Predictor, build_dicom_seg, write_dicom_seg  # noqa: E402
from pneumoseg.infer.dicom_seg import PATIENT_AND_STUDY, SEGMENTATION_STORAGE  # noqa: E402

from factories import blocky_mask, write_dicom  # noqa: E402
from infer_helpers import model_dir, phantom_images  # noqa: E402
from reference import competition_rle2mask  # noqa: E402


def highdicom():
    return pytest.importorskip("highdicom")


def read_back(seg_or_path, source_uid: str) -> np.ndarray:
    """The (H, W) mask highdicom reads from a SEG (a Dataset or a file) for the source image ``source_uid``."""
    hd = highdicom()
    if isinstance(seg_or_path, pydicom.Dataset):
        buffer = io.BytesIO()
        seg_or_path.save_as(buffer, enforce_file_format=True)
        buffer.seek(0)
        seg_or_path = buffer
    seg = hd.seg.segread(seg_or_path)
    pixels = seg.get_pixels_by_source_instance([source_uid], segment_numbers=[1])
    assert pixels.shape[0] == 1 and pixels.shape[-1] == 1
    return pixels[0, :, :, 0]


def referenced_instance(seg) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the one image the SEG references."""
    series = seg.ReferencedSeriesSequence
    assert len(series) == 1 and len(series[0].ReferencedInstanceSequence) == 1
    return series[0].SeriesInstanceUID, series[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID


def check_references(seg, source) -> None:
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID  # the same study ...
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID  # ... a new series
    assert referenced_instance(seg) == (source.SeriesInstanceUID, source.SOPInstanceUID)
    derived = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert derived.ReferencedSOPInstanceUID == source.SOPInstanceUID


def synthetic_source(path, shape, *, photometric="MONOCHROME2", **attrs):
    raw = (np.arange(shape[0] * shape[1]).reshape(shape) % 4096).astype(np.uint16)
    attrs = {"Modality": "DX", **attrs}
    return write_dicom(path, raw, PhotometricInterpretation=photometric, StudyInstanceUID=pydicom.uid.generate_uid(),
                       SeriesInstanceUID=pydicom.uid.generate_uid(), **attrs)


# --- the real SIIM files ----------------------------------------------------------------------------

def test_siim_truth_masks_read_back_where_the_annotation_is(siim_sample_dir, tmp_path):
    """The organisers' own decoder (column-major RLE, transposed) gives the truth; a SEG written from it
    reads back equal, so it is neither transposed nor flipped (each truth mask differs from its transpose
    and its flips). The SIIM files are Secondary Capture without a frame of reference: pixel for pixel."""
    highdicom()
    rows = read_rle_csv(siim_sample_dir / "train-rle.csv")
    positives = 0
    for uid, rles in rows.items():
        source = pydicom.dcmread(siim_sample_dir / f"{uid}.dcm", stop_before_pixels=True)
        truth = np.zeros((source.Rows, source.Columns), dtype=np.uint8)
        for r in rles:
            truth |= (competition_rle2mask(r, source.Columns, source.Rows).T > 0).astype(np.uint8)
        if not truth.any():
            with pytest.raises(InvalidInputError, match="mask is empty.*allow_empty=True"):
                build_dicom_seg(truth, siim_sample_dir / f"{uid}.dcm")
            seg = build_dicom_seg(truth, siim_sample_dir / f"{uid}.dcm", allow_empty=True)
            assert int(seg.NumberOfFrames) == 1 and not read_back(seg, uid).any()
            continue
        positives += 1
        assert not np.array_equal(truth, truth.T) and not np.array_equal(truth, truth[::-1])
        assert not np.array_equal(truth, truth[:, ::-1])
        path = write_dicom_seg(tmp_path / f"{uid}.dcm", truth, siim_sample_dir / f"{uid}.dcm")
        seg = pydicom.dcmread(path)
        check_references(seg, source)
        assert "FrameOfReferenceUID" not in seg and "PixelMeasuresSequence" not in seg.SharedFunctionalGroupsSequence[0]
        assert (int(seg.Rows), int(seg.Columns)) == (source.Rows, source.Columns)
        np.testing.assert_array_equal(read_back(path, uid), truth)
    assert positives == 2  # the sample's two annotated files were both checked


def test_siim_predicted_masks_read_back_exactly(siim_sample_dir):
    """A Predictor's mask (at the original 1024x1024) over its source file, through a SEG and back."""
    highdicom()
    predictor = Predictor.from_dir(model_dir("plain"), segment="all")
    predictions = predictor.predict(sorted(siim_sample_dir.glob("*.dcm")), return_masks=True)
    positives = [p for p in predictions if p.positive]
    assert positives, "the tiny model found nothing: the round trip would not be tested"
    for p in positives:
        assert p.mask.shape == (1024, 1024)
        np.testing.assert_array_equal(read_back(build_dicom_seg(p.mask, p.path), p.image_id), p.mask)


# --- synthetic sources ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(37, 53), (64, 48), (1, 7), (97, 1025)])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_odd_and_non_square_sources_round_trip(tmp_path, shape, photometric):
    """MONOCHROME1 changes grey values, not geometry: the SEG still lines up with pydicom's pixel array
    (and a SEG is always MONOCHROME2, so it is not drawn inverted)."""
    highdicom()
    path = synthetic_source(tmp_path / "image.dcm", shape, photometric=photometric)
    source = pydicom.dcmread(path)
    mask = blocky_mask(np.random.default_rng(list(shape)), shape, blocks=3)
    mask[0, -1] = 1  # one corner, so a flip or transpose cannot read back equal
    seg = build_dicom_seg(mask.astype(bool), path)
    check_references(seg, source)
    import torch

    assert build_dicom_seg(torch.from_numpy(mask), path).PixelData == seg.PixelData  # a tensor reads the same
    assert seg.PhotometricInterpretation == "MONOCHROME2"
    np.testing.assert_array_equal(read_back(seg, source.SOPInstanceUID), mask)


def test_a_source_in_a_patient_frame_gives_a_seg_in_that_frame(tmp_path):
    highdicom()
    frame = {"FrameOfReferenceUID": pydicom.uid.generate_uid(), "ImagePositionPatient": [-100.0, -120.0, 30.0],
             "ImageOrientationPatient": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], "PixelSpacing": [0.5, 0.25],
             "SliceThickness": "1.0"}
    path = synthetic_source(tmp_path / "ct.dcm", (40, 56), SOPClassUID="1.2.840.10008.5.1.4.1.1.2", **frame)
    source = pydicom.dcmread(path)
    mask = blocky_mask(np.random.default_rng(5), (40, 56))
    mask[0, -1] = 1
    seg = build_dicom_seg(mask, path)
    check_references(seg, source)
    assert seg.FrameOfReferenceUID == frame["FrameOfReferenceUID"]
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [0.5, 0.25]
    position = seg.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
    assert [float(v) for v in position] == frame["ImagePositionPatient"]
    np.testing.assert_array_equal(read_back(seg, source.SOPInstanceUID), mask)
    # A frame of reference without a position (many DX files): a SEG claiming that frame would need a
    # plane position it cannot have, so it maps pixel for pixel, as for a Secondary Capture.
    partial = synthetic_source(tmp_path / "dx.dcm", (40, 56), FrameOfReferenceUID=frame["FrameOfReferenceUID"],
                               PixelSpacing=[0.5, 0.25])
    seg = build_dicom_seg(mask, partial)
    assert "FrameOfReferenceUID" not in seg
    np.testing.assert_array_equal(read_back(seg, pydicom.dcmread(partial).SOPInstanceUID), mask)


def test_a_dataset_source_and_the_descriptive_fields(tmp_path):
    highdicom()
    from pneumoseg import __version__

    source = pydicom.dcmread(synthetic_source(tmp_path / "image.dcm", (30, 20)))
    mask = np.zeros((30, 20), dtype=np.uint8)
    mask[3:9, 4:7] = 1
    seg = build_dicom_seg(mask, source, series_number=77, instance_number=3, series_description="triage",
                    algorithm_parameters={"model": "run-7"})
    assert (seg.SeriesNumber, seg.InstanceNumber, seg.SeriesDescription) == (77, 3, "triage")
    assert (seg.Manufacturer, seg.ManufacturerModelName, seg.SoftwareVersions) == ("pneumoseg", "pneumoseg", __version__)
    segment = seg.SegmentSequence
    assert len(segment) == 1 and segment[0].SegmentLabel == "Pneumothorax"
    assert segment[0].SegmentAlgorithmType == "AUTOMATIC"
    category = segment[0].SegmentedPropertyCategoryCodeSequence[0]
    kind = segment[0].SegmentedPropertyTypeCodeSequence[0]
    assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "49755003")
    assert (kind.CodingSchemeDesignator, kind.CodeValue) == ("SCT", "36118008")
    algorithm = segment[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("pneumoseg", __version__)
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert "run-7" in algorithm.AlgorithmParameters
    np.testing.assert_array_equal(read_back(seg, source.SOPInstanceUID), mask)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"], ids=["implicit-vr", "explicit-vr"])
@pytest.mark.parametrize("charset", [None, "ISO_IR 100", "ISO_IR 192"])
def test_the_identity_is_copied_as_the_source_holds_it(tmp_path, syntax, charset):
    """Names in the source's character set, from files of either VR encoding, and from a Dataset the
    caller built or already read: the SEG's patient and study fields read back as the source's."""
    highdicom()
    name = "Müller^Jörg" if charset else "Smith^John"
    attrs = {"PatientName": name, "PatientID": "ID-42", "PatientBirthDate": "19500101", "PatientSex": "M",
             "StudyDate": "20260101", "StudyTime": "101010", "AccessionNumber": "ACC1", "StudyID": "7",
             "ReferringPhysicianName": "Who^Doctor", "StudyDescription": "chest", "ImageComments": "report"}
    if charset:
        attrs["SpecificCharacterSet"] = charset
    path = synthetic_source(tmp_path / "image.dcm", (12, 10), syntax=syntax, **attrs)
    mask = np.zeros((12, 10), dtype=np.uint8)
    mask[4:7, 2:9] = 1
    for source in (path, pydicom.dcmread(path)):
        seg = build_dicom_seg(mask, source)
        buffer = io.BytesIO()
        seg.save_as(buffer, enforce_file_format=True)
        back = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
        assert back.get("SpecificCharacterSet") == (charset or None)
        for keyword in PATIENT_AND_STUDY:
            assert str(back.get(keyword, "")) == str(attrs.get(keyword, "")), keyword
        assert "StudyDescription" not in back and "ImageComments" not in back


@pytest.mark.parametrize("charset, name", [
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),
], ids=["japanese", "korean"])
def test_a_multi_valued_iso_2022_character_set_is_kept(tmp_path, charset, name):
    """Japanese and Korean sources write their character set as ISO 2022 with an empty first value (the
    default repertoire), which highdicom refuses: such a source got no SEG at all. The SEG carries the
    source's character set and its name's very bytes."""
    highdicom()
    path = synthetic_source(tmp_path / "image.dcm", (12, 10), SpecificCharacterSet=charset, PatientName=name)
    mask = np.zeros((12, 10), dtype=np.uint8)
    mask[4:7, 2:9] = 1
    buffer = io.BytesIO()
    build_dicom_seg(mask, path).save_as(buffer, enforce_file_format=True)
    back = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert list(back.SpecificCharacterSet) == charset and str(back.PatientName) == name
    raw = pydicom.dcmread(path, stop_before_pixels=True).get_item("PatientName").value  # the undecoded bytes
    assert raw in buffer.getvalue()  # copied as the source's bytes, escape sequences and all
    np.testing.assert_array_equal(read_back(back, back.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
                                            .ReferencedSOPInstanceUID), mask)


def test_type_2_attributes_are_present_even_where_the_source_lacks_them(tmp_path):
    """A SEG from a source without patient fields still has them, empty (Type 2), and a SEG placed pixel for
    pixel has General Image's PatientOrientation (Type 2C), the source's: dciodvfy found both missing."""
    highdicom()
    plain = synthetic_source(tmp_path / "plain.dcm", (12, 10))
    oriented = synthetic_source(tmp_path / "dx.dcm", (12, 10), PatientOrientation=["P", "F"])
    mask = np.zeros((12, 10), dtype=np.uint8)
    mask[2:5, 3:6] = 1
    for source, orientation in ((plain, ""), (oriented, ["P", "F"])):
        buffer = io.BytesIO()
        build_dicom_seg(mask, source).save_as(buffer, enforce_file_format=True)
        back = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "ReferringPhysicianName", "StudyID", "AccessionNumber"):
            assert keyword in back and not back[keyword].value, keyword
        assert "IssuerOfPatientID" not in back  # Type 3: not made up
        assert back.PatientOrientation == orientation


def test_dciodvfy_finds_no_error_in_the_segs(siim_sample_dir, tmp_path):
    """dicom3tools' IOD checker, where installed (apt install dicom3tools), over a SEG of a SIIM file (no frame
    of reference), of a source in a patient frame, and of a DX with a frame of reference but no position."""
    import shutil
    import subprocess

    highdicom()
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    uid = "1.2.276.0.7230010.3.1.4.8323329.1314.1517875167.222290"
    frame = {"FrameOfReferenceUID": pydicom.uid.generate_uid(), "ImagePositionPatient": [0.0, 0.0, 0.0],
             "ImageOrientationPatient": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], "PixelSpacing": [0.5, 0.5], "SliceThickness": "1"}
    sources = [siim_sample_dir / f"{uid}.dcm",
               synthetic_source(tmp_path / "ct.dcm", (40, 56), SOPClassUID="1.2.840.10008.5.1.4.1.1.2", Modality="CT",
                                **frame),
               synthetic_source(tmp_path / "dx.dcm", (40, 56), SOPClassUID="1.2.840.10008.5.1.4.1.1.1.1",
                                FrameOfReferenceUID=frame["FrameOfReferenceUID"], PatientOrientation=["P", "F"])]
    for i, source in enumerate(sources):
        shape = read_dicom_shape(source)
        mask = np.zeros(shape, dtype=np.uint8)
        mask[shape[0] // 4: shape[0] // 2, shape[1] // 3: shape[1] // 2] = 1
        path = write_dicom_seg(tmp_path / f"seg{i}.dcm", mask, source)
        report = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True).stderr
        assert "Segmentation" in report, report  # it recognised the IOD it checked
        assert [line for line in report.splitlines() if line.startswith("Error")] == [], (source, report)


# --- refusals and atomic writing --------------------------------------------------------------------

def test_bad_input_is_refused_with_a_message_naming_it(tmp_path):
    highdicom()
    path = synthetic_source(tmp_path / "image.dcm", (30, 20))
    good = np.zeros((30, 20), dtype=np.uint8)
    good[2:5, 2:5] = 1
    cases = [
        (good.T, path, InvalidInputError, r"shape \(20, 30\).*30x20"),
        (np.zeros((30, 20, 1), np.uint8), path, InvalidInputError, "shape"),
        (good * 2, path, InvalidInputError, "binary"),
        (good - 1, path, InvalidInputError, "binary"),
        (good.astype(np.float32), path, InvalidInputError, "float32.*threshold"),
        ("1 2", path, InvalidInputError, "array"),
        (None, path, InvalidInputError, "array"),
        (np.ma.masked_array(good), path, InvalidInputError, "masked array"),
        (good, np.zeros((30, 20)), InvalidInputError, "path or a pydicom Dataset"),
        (good, tmp_path / "missing.dcm", DicomError, "no such file"),
    ]
    (tmp_path / "notes.dcm").write_text("not a DICOM file at all, " * 20)
    cases.append((good, tmp_path / "notes.dcm", DicomError, "not a DICOM file"))
    report = pydicom.dcmread(path)  # a structured report: a DICOM without an image
    for keyword in ("Rows", "Columns", "PixelData", "PhotometricInterpretation", "BitsAllocated"):
        delattr(report, keyword)
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    report.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    cases.append((good, tmp_path / "sr.dcm", DicomError, "not an image"))
    cases.append((good, synthetic_source(tmp_path / "rgb.dcm", (30, 20), photometric="RGB"), DicomError,
                  "PhotometricInterpretation"))
    for mask, source, error, message in cases:
        with pytest.raises(error, match=message) as info:
            write_dicom_seg(tmp_path / "out" / "seg.dcm", mask, source)
        if isinstance(source, type(path)) and source.exists() and error is DicomError:
            assert str(source) in str(info.value)
    assert issubclass(DicomError, ValueError) and issubclass(InvalidInputError, ValueError)
    for name, value in [("series_description", "x" * 65), ("manufacturer", ""), ("software_versions", 1)]:
        with pytest.raises(InvalidInputError, match=name):
            build_dicom_seg(good, path, **{name: value})
    with pytest.raises(InvalidInputError, match="algorithm_parameters"):
        build_dicom_seg(good, path, algorithm_parameters={"threshold": 0.5})
    with pytest.raises(InvalidInputError, match="series_instance_uid"):
        build_dicom_seg(good, path, series_instance_uid="1.2.x")


def test_a_failed_write_leaves_no_partial_file_and_the_old_one_in_place(tmp_path, monkeypatch):
    highdicom()
    from pneumoseg.infer import dicom_seg as module

    path = synthetic_source(tmp_path / "image.dcm", (30, 20))
    mask = np.zeros((30, 20), dtype=np.uint8)
    mask[1:4, 1:4] = 1
    out = tmp_path / "out"
    out.mkdir()
    target = write_dicom_seg(out / "seg.dcm", mask, path)
    before = target.read_bytes()

    def half_then_fail(seg, f):
        f.write(b"\0" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "save_dicom_seg", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        write_dicom_seg(out / "seg.dcm", mask * 0 + 1, path)
    with pytest.raises(OSError):
        write_dicom_seg(out / "new.dcm", mask, path)
    assert sorted(p.name for p in out.iterdir()) == ["seg.dcm"] and target.read_bytes() == before


def test_without_highdicom_the_function_and_the_flag_say_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom now raises ImportError

    with pytest.raises(InvalidInputError, match=r"pneumoseg\[pacs\]"):
        build_dicom_seg(np.ones((2, 2), np.uint8), tmp_path / "any.dcm")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before highdicom was checked")

    monkeypatch.setattr(Predictor, "from_dir", no_model)
    out = tmp_path / "pred"
    assert main(["predict", str(tmp_path), "--model", str(tmp_path), "--out", str(out), "--dicom-seg"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "highdicom" in err and "pip install 'pneumoseg[pacs]'" in err
    assert not out.exists()


def test_highdicom_is_imported_only_when_a_seg_is_made():
    import subprocess

    code = ("import sys, pneumoseg, pneumoseg.infer, pneumoseg.cli.predict; "
            "assert 'highdicom' not in sys.modules, 'highdicom was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# --- the command --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def study_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("siim")
    make_synthetic_siim(root, n_images=6, size=80, positive_fraction=0.5, seed=3)
    return root


def test_predict_dicom_seg_writes_one_seg_per_positive_image(study_set, tmp_path, capsys):
    highdicom()
    out = tmp_path / "pred"
    model = model_dir("classifier")
    assert main(["predict", str(study_set), "--model", str(model), "--out", str(out), "--dicom-seg",
                 "--no-overlays", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    want = Predictor.from_dir(model).predict(study_set, return_masks=True)
    positives = [p for p in want if p.positive]
    assert positives and len(positives) < len(want)
    assert sorted(p.name for p in (out / "seg").iterdir()) == sorted(f"{p.image_id}.dcm" for p in positives)
    assert not (out / "overlays").exists() and f"{len(positives)} DICOM SEGs in seg/" in printed
    for p in positives:
        seg = pydicom.dcmread(out / "seg" / f"{p.image_id}.dcm")
        check_references(seg, pydicom.dcmread(p.path, stop_before_pixels=True))
        assert f"model={model.name}" in seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
        np.testing.assert_array_equal(read_back(out / "seg" / f"{p.image_id}.dcm", seg.ReferencedSeriesSequence[0]
                                                .ReferencedInstanceSequence[0].ReferencedSOPInstanceUID), p.mask)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs"]["dicom_seg"] == "seg" and summary["outputs"]["dicom_seg_count"] == len(positives)
    assert summary["outputs"]["dicom_seg_missing"] == []
    manifest = (out / ".pneumoseg-manifest").read_text()
    assert all(f"seg/{p.image_id}.dcm" in manifest for p in positives)  # listed as the folder's own
    # forced again into its own folder, with overlays this time: the SEGs are replaced, not refused
    assert main(["predict", str(study_set), "--model", str(model), "--out", str(out), "--dicom-seg", "--force",
                 "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "seg").iterdir()) == sorted(f"{p.image_id}.dcm" for p in positives)
    assert len(list((out / "overlays").iterdir())) == len(positives)


def test_predict_without_the_flag_writes_no_seg_and_says_so_in_help(study_set, tmp_path, capsys):
    out = tmp_path / "pred"
    assert main(["predict", str(study_set), "--model", str(model_dir("classifier")), "--out", str(out),
                 "--no-progress"]) == 0
    assert not (out / "seg").exists()
    outputs = json.loads((out / "summary.json").read_text())["outputs"]
    assert not any(k.startswith("dicom_seg") for k in outputs)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--dicom-seg" in text and "patient and study identity" in text and "pneumoseg[pacs]" in text


def test_a_source_that_changed_since_it_was_predicted_costs_its_seg_only(study_set, tmp_path, capsys, monkeypatch):
    highdicom()
    from pneumoseg.cli import predict as command

    real = command.write_segmentation
    shrunk = []

    def shrink_first_then_write(folder, name, pred, predictor, *rest):
        if not shrunk:  # the same image (its SOPInstanceUID kept), smaller, after its pixels were read
            synthetic_source(pred.path, (8, 8), SOPInstanceUID=pred.source_uid)
            shrunk.append(pred.image_id)
        return real(folder, name, pred, predictor, *rest)

    import shutil

    studies = tmp_path / "studies"
    shutil.copytree(study_set, studies)
    monkeypatch.setattr(command, "write_segmentation", shrink_first_then_write)
    out = tmp_path / "pred"
    assert main(["predict", str(studies), "--model", str(model_dir("classifier")), "--out", str(out),
                 "--dicom-seg", "--no-overlays", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "no DICOM SEG for" in err and "8x8" in err
    summary = json.loads((out / "summary.json").read_text())
    missing = summary["outputs"]["dicom_seg_missing"]
    assert [m["image_id"] for m in missing] == shrunk and "8x8" in missing[0]["reason"]
    assert summary["outputs"]["dicom_seg_count"] == summary["positives"] - 1
    assert not (out / "seg" / f"{shrunk[0]}.dcm").exists()


@pytest.mark.parametrize("name_by, other_size", [("file", False), ("uid", False), ("file", True)])
def test_a_source_replaced_by_another_image_of_its_size_gets_no_seg(study_set, tmp_path, capsys, monkeypatch,
                                                                    name_by, other_size):
    """Named by its file (the default) or by SOPInstanceUID, an image whose file holds another image of
    the same size by the time its SEG is made (another patient's, say) gets none: the SEG would file this
    mask under the other image and its patient. The other positives get theirs. With file naming nothing
    but the SOPInstanceUID read with the pixels (Prediction.source_uid) tells the two apart. Another
    image of another size is reported as another image too, not as a size change."""
    highdicom()
    import shutil

    from pneumoseg.cli import predict as command

    real = command.write_segmentation
    replaced = []

    def replace_first_then_write(folder, name, pred, predictor, *rest):
        if not replaced:
            shape = (8, 8) if other_size else read_dicom_shape(pred.path)
            synthetic_source(pred.path, shape, PatientName="Other^Patient")  # a new SOPInstanceUID
            replaced.append(pred.image_id)
        return real(folder, name, pred, predictor, *rest)

    studies = tmp_path / "studies"
    shutil.copytree(study_set, studies)
    monkeypatch.setattr(command, "write_segmentation", replace_first_then_write)
    out = tmp_path / "pred"
    assert main(["predict", str(studies), "--model", str(model_dir("classifier")), "--out", str(out), "--name-by",
                 name_by, "--dicom-seg", "--no-overlays", "--no-progress"]) == 0
    assert "no DICOM SEG for" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    missing = summary["outputs"]["dicom_seg_missing"]
    assert [m["image_id"] for m in missing] == replaced and "SOPInstanceUID changed" in missing[0]["reason"]
    assert summary["outputs"]["dicom_seg_count"] == summary["positives"] - 1
    assert not (out / "seg" / f"{replaced[0]}.dcm").exists()
    for seg in (out / "seg").glob("*.dcm"):
        assert b"Other^Patient" not in seg.read_bytes()


def test_a_source_that_is_not_the_expected_image_is_refused_before_its_size_is_compared(tmp_path):
    """build_dicom_seg(expect_sop_instance_uid=): another image in the file is refused as that, whatever
    its size (a mask of the predicted image's size is not reported as the wrong shape for it)."""
    highdicom()
    path = synthetic_source(tmp_path / "src.dcm", (30, 20))
    uid = pydicom.dcmread(path).SOPInstanceUID
    mask = np.zeros((30, 20), dtype=np.uint8)
    mask[5:9, 4:8] = 1
    assert referenced_instance(build_dicom_seg(mask, path, expect_sop_instance_uid=uid))[1] == uid
    synthetic_source(path, (8, 8), PatientName="Other^Patient")
    with pytest.raises(DicomError, match="src.dcm: the file holds another image than the one expected"):
        write_dicom_seg(tmp_path / "out" / "seg.dcm", mask, path, expect_sop_instance_uid=uid)
    with pytest.raises(InvalidInputError, match=r"shape \(30, 20\)"):  # without the expectation: the size
        build_dicom_seg(mask, path)
    assert not (tmp_path / "out").exists()


def test_with_the_flag_patient_data_reaches_only_the_segs(tmp_path, capsys, caplog):
    """The PHI canary study through --dicom-seg: the canaries appear in seg/*.dcm and nowhere else (not in
    the submission, summary, overlays, stdout, stderr or logs), and the SEGs hold only the identity
    fields pneumoseg copies on purpose (PATIENT_AND_STUDY): no study description, report, institution,
    other physicians, private tags or anything else the source carried."""
    highdicom()
    from test_phi_canary import BIRTH_DATE, MARK, TEXT_FIELDS, canaries, canary_dicom, leaks_under

    caplog.set_level(logging.DEBUG)
    folder = tmp_path / "study"
    folder.mkdir()
    for i, img in enumerate(phantom_images(3, seed=11)):
        attrs = {"PhotometricInterpretation": "MONOCHROME1"} if i == 0 else {}
        canary_dicom(folder / f"image{i}.dcm", img.astype(np.uint16) * 16, StudyInstanceUID=pydicom.uid.generate_uid(),
                     SeriesInstanceUID=pydicom.uid.generate_uid(), **attrs)
    out = tmp_path / "pred"
    assert main(["predict", str(folder), "--model", str(model_dir("plain")), "--out", str(out), "--segment", "all",
                 "--dicom-seg", "--no-progress"]) == 0
    printed = capsys.readouterr()
    segs = sorted((out / "seg").glob("*.dcm"))
    assert segs  # the tiny model found something in the phantoms
    leaks = leaks_under(out)
    assert set(leaks) == {f"seg/{p.name}" for p in segs}
    copied = {f"{MARK}-{k}" for k in PATIENT_AND_STUDY if k in TEXT_FIELDS} | {BIRTH_DATE}
    for p in segs:
        assert leaks[f"seg/{p.name}"] == copied
    assert canaries((printed.out + printed.err + caplog.text).encode()) == set()
