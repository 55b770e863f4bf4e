"""DICOM Secondary Capture overlays (pneumoseg.infer.dicom_overlay, `pneumoseg predict --dicom-overlay`):
each reads back with pydicom as an RGB Secondary Capture of its source's size, showing the source's
pixels as the PNG overlays do, the mask's outline red exactly where the outline is, a caption at the
top left; it is a new series of the source's study that references the source, carries only the
patient and study identity a PACS files it by, passes dciodvfy, and is written atomically; bad input
is refused with a message naming it."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

import pydicom  # noqa: E402

import pneumoseg  # noqa: E402
from pneumoseg.cli import main  # noqa: E402
from pneumoseg.data import make_synthetic_siim, read_dicom, read_dicom_shape, read_rle_csv  # noqa: E402
from pneumoseg.errors import DicomError, InvalidInputError  # noqa: E402
from pneumoseg.infer import Predictor, build_dicom_overlay, write_dicom_overlay  # noqa: E402
from pneumoseg.infer.dicom_overlay import PATIENT_AND_STUDY, SECONDARY_CAPTURE_STORAGE  # noqa: E402

from factories import blocky_mask, write_dicom  # noqa: E402
from infer_helpers import model_dir, phantom_images  # noqa: E402
from reference import competition_rle2mask  # noqa: E402

RED = (255, 40, 40)


def highdicom():
    return pytest.importorskip("highdicom")


def read_back(sc_or_path) -> pydicom.Dataset:
    """The overlay as a PACS receives it: written to bytes (or read from its file) and read by pydicom."""
    if isinstance(sc_or_path, pydicom.Dataset):
        buffer = io.BytesIO()
        sc_or_path.save_as(buffer, enforce_file_format=True)
        return pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    return pydicom.dcmread(sc_or_path)


def outline_from_the_definition(mask) -> np.ndarray:
    """A mask pixel with a 4-neighbour inside the image that is not in the mask (pixels beyond the
    image's edge do not make an outline there)."""
    m = np.pad(np.asarray(mask).astype(bool), 1, constant_values=True)
    centre = m[1:-1, 1:-1]
    return centre & ~(m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:])


def min_max_grey(values) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return np.round((v - v.min()) / (v.max() - v.min()) * 255).astype(np.uint8)


def caption_box(rgb, picture) -> tuple[int, int]:
    """(rows, columns) of the top-left box where ``rgb`` differs from ``picture`` (the overlay without
    its caption); every difference must lie inside it."""
    differs = (rgb != picture).any(axis=2)
    assert differs.any(), "no caption was drawn"
    rows, columns = np.nonzero(differs)
    box = (int(rows.max()) + 1, int(columns.max()) + 1)
    assert differs[0, 0] or differs[: box[0] // 2, : box[1] // 2].any()  # it starts at the top left
    return box


def check_caption(rgb, box) -> None:
    """Inside the box: a black ground with white text, the caption's two lines."""
    inside = rgb[: box[0], : box[1]]
    black = (inside == 0).all(axis=2).mean()
    white = (inside >= 200).all(axis=2) & (np.ptp(inside, axis=2) < 30)
    assert black > 0.5 and white.sum() > 20, (black, white.sum())
    text_rows = np.nonzero(white.any(axis=1))[0]
    assert len(np.split(text_rows, np.nonzero(np.diff(text_rows) > 1)[0] + 1)) >= 2  # two lines at least


def check_references(sc, source) -> None:
    assert sc.SOPClassUID == sc.file_meta.MediaStorageSOPClassUID == SECONDARY_CAPTURE_STORAGE
    assert sc.StudyInstanceUID == source.StudyInstanceUID  # the same study ...
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID  # ... a new series
    assert sc.SOPInstanceUID != source.SOPInstanceUID
    assert sc.SeriesDescription == "pneumoseg overlay"
    derived = sc.SourceImageSequence
    assert len(derived) == 1 and derived[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert derived[0].ReferencedSOPClassUID == source.SOPClassUID
    assert derived[0].PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    series = sc.ReferencedSeriesSequence
    assert len(series) == 1 and series[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert series[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert (sc.BurnedInAnnotation, sc.ConversionType) == ("YES", "WSD")


def check_picture(sc, mask, grey) -> tuple[int, int]:
    """RGB, 8 bits, the source's size; outside the caption: the outline red exactly where the definition
    puts it, the rest of the mask tinted, everything else the source's grey. Returns the caption box."""
    from pneumoseg.infer.overlay import overlay

    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsAllocated) == ("RGB", 3, 8)
    rgb = sc.pixel_array
    assert rgb.shape == (*grey.shape, 3) and rgb.dtype == np.uint8
    box = caption_box(rgb, overlay(grey, mask))  # the PNG overlay's own function: the same picture
    check_caption(rgb, box)
    below = np.zeros(grey.shape, dtype=bool)
    below[box[0]:] = True
    below[:, box[1]:] = True  # outside the caption box
    edge = outline_from_the_definition(mask)
    assert (edge & below).any(), "the outline is all under the caption: nothing checked"
    red = (rgb == RED).all(axis=2)
    np.testing.assert_array_equal(red & below & mask.astype(bool), edge & below)
    outside = below & ~mask.astype(bool)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c][outside], grey[outside])
    tinted = below & mask.astype(bool) & ~edge
    assert (rgb[..., 0][tinted].astype(int) >= rgb[..., 1][tinted]).all()
    return box


def synthetic_source(path, shape, *, photometric="MONOCHROME2", bits=12, **attrs):
    raw = (np.arange(shape[0] * shape[1]).reshape(shape) * 7 % (2**bits)).astype(np.uint16)
    attrs = {"Modality": "DX", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1", **attrs}
    return write_dicom(path, raw, PhotometricInterpretation=photometric, StudyInstanceUID=pydicom.uid.generate_uid(),
                       SeriesInstanceUID=pydicom.uid.generate_uid(), BitsStored=bits, HighBit=bits - 1, **attrs)


def away_from_the_caption(shape, seed=0) -> np.ndarray:
    """A blocky mask in the lower right half, where the caption is not."""
    mask = np.zeros(shape, dtype=np.uint8)
    h, w = shape
    mask[h // 2:, w // 2:] = blocky_mask(np.random.default_rng(seed), (h - h // 2, w - w // 2), blocks=3)
    mask[-1, -1] = 1  # a corner: flipped or transposed, the outline would not match
    return mask


# --- the real SIIM files ----------------------------------------------------------------------------

def test_siim_truth_masks_are_burned_in_where_the_annotation_is(siim_sample_dir, tmp_path):
    """The organisers' decoder gives the truth; the SIIM files are 8-bit without a window, so the grey is
    the min-max scaled pixel array; the outline is red exactly on the truth's outline."""
    highdicom()
    rows = read_rle_csv(siim_sample_dir / "train-rle.csv")
    positives = 0
    for uid, rles in rows.items():
        source = pydicom.dcmread(siim_sample_dir / f"{uid}.dcm")
        truth = np.zeros((source.Rows, source.Columns), dtype=np.uint8)
        for r in rles:
            truth |= (competition_rle2mask(r, source.Columns, source.Rows).T > 0).astype(np.uint8)
        if not truth.any():
            with pytest.raises(InvalidInputError, match="mask is empty.*allow_empty=True"):
                build_dicom_overlay(truth, siim_sample_dir / f"{uid}.dcm")
            continue
        positives += 1
        path = write_dicom_overlay(tmp_path / f"{uid}.dcm", truth, siim_sample_dir / f"{uid}.dcm", score=0.93)
        sc = read_back(path)
        check_references(sc, source)
        assert (sc.Rows, sc.Columns) == (source.Rows, source.Columns) == (1024, 1024)
        check_picture(sc, truth, min_max_grey(source.pixel_array))
        assert sc.LossyImageCompression == "01"  # the source was JPEG: so is the overlay's history
        assert sc.PatientID == source.PatientID and sc.PatientSex == source.PatientSex
    assert positives == 2


def test_the_caption_says_score_and_not_for_diagnostic_use():
    from pneumoseg import __version__
    from pneumoseg.infer.dicom_overlay import default_caption

    assert default_caption(0.934) == f"pneumoseg {__version__}: pneumothorax, score 0.93\nNOT FOR DIAGNOSTIC USE"
    assert default_caption() == f"pneumoseg {__version__}: pneumothorax\nNOT FOR DIAGNOSTIC USE"


# --- synthetic sources ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(300, 200), (97, 1025), (512, 384)])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_odd_sizes_16_bit_and_monochrome1_sources(tmp_path, shape, photometric):
    """16-bit pixels scaled to 8 bits over their range; MONOCHROME1 shown inverted (its highest values
    dark), as a viewer shows it; the overlay is Rows x Columns of the source, not transposed."""
    highdicom()
    path = synthetic_source(tmp_path / "image.dcm", shape, photometric=photometric, bits=16)
    source = pydicom.dcmread(path)
    raw = source.pixel_array.astype(np.float64)
    grey = min_max_grey(-raw if photometric == "MONOCHROME1" else raw)
    mask = away_from_the_caption(shape, seed=shape[0])
    sc = read_back(build_dicom_overlay(mask.astype(bool), path, score=0.5))
    check_references(sc, source)
    check_picture(sc, mask, grey)
    import torch

    same = build_dicom_overlay(torch.from_numpy(mask), read_dicom(path), score=0.5)  # a tensor, a DicomImage
    np.testing.assert_array_equal(same.pixel_array, sc.pixel_array)


def test_the_source_window_is_the_picture_window(tmp_path):
    """A 12-bit source with a window shows the window, as the PNG overlay does; a broken window (width 0)
    falls back to the full range instead of failing."""
    highdicom()
    shape = (256, 320)
    path = synthetic_source(tmp_path / "windowed.dcm", shape, WindowCenter=1200, WindowWidth=800)
    source = pydicom.dcmread(path)
    from pydicom.pixels import apply_voi_lut

    windowed = apply_voi_lut(source.pixel_array.astype(np.float64), source)  # the file's window, by pydicom
    grey = min_max_grey(windowed)  # the window's output range is reached inside this image
    mask = away_from_the_caption(shape, seed=2)
    sc = read_back(build_dicom_overlay(mask, path))
    check_picture(sc, mask, grey)
    broken = synthetic_source(tmp_path / "broken.dcm", shape, WindowCenter=1200, WindowWidth=0)
    check_picture(read_back(build_dicom_overlay(mask, broken)), mask, min_max_grey(pydicom.dcmread(broken).pixel_array))


def test_a_caption_given_replaces_the_default_and_the_descriptive_fields(tmp_path):
    highdicom()
    from pneumoseg import __version__

    shape = (256, 256)
    path = synthetic_source(tmp_path / "image.dcm", shape, PatientOrientation=["P", "F"], BodyPartExamined="CHEST")
    mask = away_from_the_caption(shape)
    default = read_back(build_dicom_overlay(mask, path, score=0.9))
    mine = read_back(build_dicom_overlay(mask, path, caption="triage: look at this\nNOT FOR DIAGNOSTIC USE",
                                         series_number=12, instance_number=3, series_description="AI triage"))
    assert not np.array_equal(default.pixel_array, mine.pixel_array)
    assert (mine.SeriesNumber, mine.InstanceNumber, mine.SeriesDescription) == (12, 3, "AI triage")
    assert (mine.Manufacturer, mine.SoftwareVersions) == ("pneumoseg", __version__)
    assert __version__ in mine.DerivationDescription
    assert list(mine.PatientOrientation) == ["P", "F"] and mine.BodyPartExamined == "CHEST"
    sc_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    fixed = build_dicom_overlay(mask, path, sop_instance_uid=sc_uid, series_instance_uid=series_uid)
    assert (fixed.SOPInstanceUID, fixed.SeriesInstanceUID) == (sc_uid, series_uid)


def test_only_the_patient_and_study_identity_is_copied(tmp_path):
    """The PHI canary file: the overlay carries the canaries of PATIENT_AND_STUDY and no other (no study
    description, report, institution, physicians, private tags, the source's series description)."""
    highdicom()
    from test_phi_canary import BIRTH_DATE, MARK, TEXT_FIELDS, canaries, canary_dicom

    shape = (128, 160)
    raw = (np.arange(shape[0] * shape[1]).reshape(shape) % 4000).astype(np.uint16)
    path = canary_dicom(tmp_path / "canary.dcm", raw, StudyInstanceUID=pydicom.uid.generate_uid(),
                        SeriesInstanceUID=pydicom.uid.generate_uid())
    buffer = io.BytesIO()
    build_dicom_overlay(away_from_the_caption(shape), path, score=0.7).save_as(buffer, enforce_file_format=True)
    copied = {f"{MARK}-{k}" for k in PATIENT_AND_STUDY if k in TEXT_FIELDS} | {BIRTH_DATE}
    assert canaries(buffer.getvalue()) == copied


@pytest.mark.parametrize("charset, name", [
    (None, "Smith^John"), ("ISO_IR 100", "Müller^Jörg"),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
], ids=["default", "latin1", "japanese"])
def test_the_identity_keeps_the_source_character_set_and_bytes(tmp_path, charset, name):
    highdicom()
    attrs = {"SpecificCharacterSet": charset} if charset else {}
    path = synthetic_source(tmp_path / "image.dcm", (64, 64), PatientName=name, PatientID="ID-42", **attrs)
    buffer = io.BytesIO()
    build_dicom_overlay(away_from_the_caption((64, 64)), path).save_as(buffer, enforce_file_format=True)
    back = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert str(back.PatientName) == name and back.PatientID == "ID-42"
    assert back.get("SpecificCharacterSet") == charset or list(back.SpecificCharacterSet) == charset
    raw = pydicom.dcmread(path, stop_before_pixels=True).get_item("PatientName").value
    assert raw in buffer.getvalue()  # the source's very bytes


def test_dciodvfy_finds_no_error_in_the_overlays(siim_sample_dir, tmp_path):
    """dicom3tools' IOD checker, where installed, over overlays of a SIIM file, of a 16-bit MONOCHROME1 DX
    with its orientation and body part, and of a source with neither."""
    highdicom()
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    sources = [siim_sample_dir / "1.2.276.0.7230010.3.1.4.8323329.1314.1517875167.222290.dcm",
               synthetic_source(tmp_path / "dx.dcm", (200, 160), photometric="MONOCHROME1", bits=16,
                                PatientOrientation=["P", "F"], BodyPartExamined="CHEST"),
               synthetic_source(tmp_path / "bare.dcm", (120, 90))]
    for i, source in enumerate(sources):
        path = write_dicom_overlay(tmp_path / f"sc{i}.dcm", away_from_the_caption(read_dicom_shape(source)), source,
                                   score=0.8)
        report = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True).stderr
        assert "SCImage" in report, report  # it recognised the IOD it checked
        assert [line for line in report.splitlines() if line.startswith("Error")] == [], (source, report)


# --- refusals and atomic writing --------------------------------------------------------------------

def test_bad_input_is_refused_with_a_message_naming_it(tmp_path):
    highdicom()
    path = synthetic_source(tmp_path / "image.dcm", (30, 20))
    good = np.zeros((30, 20), dtype=np.uint8)
    good[20:25, 12:18] = 1
    cases = [
        (good.T, path, InvalidInputError, r"shape \(20, 30\).*30x20"),
        (good * 2, path, InvalidInputError, "binary"),
        (good.astype(np.float32), path, InvalidInputError, "float32.*threshold"),
        (None, path, InvalidInputError, "array"),
        (good, pydicom.dcmread(path), InvalidInputError, "path or a DicomImage"),
        (good, tmp_path / "missing.dcm", DicomError, "no such file"),
        (good, read_dicom(path, with_dataset=False), InvalidInputError, "without its dataset"),
    ]
    (tmp_path / "notes.dcm").write_text("not a DICOM file at all, " * 20)
    cases.append((good, tmp_path / "notes.dcm", DicomError, "not a DICOM file"))
    cases.append((good, synthetic_source(tmp_path / "rgb.dcm", (30, 20), photometric="RGB"), DicomError,
                  "PhotometricInterpretation"))
    for mask, source, error, message in cases:
        with pytest.raises(error, match=message):
            write_dicom_overlay(tmp_path / "out" / "sc.dcm", mask, source)
    with pytest.raises(InvalidInputError, match="score"):  # checked with a caption of one's own too
        build_dicom_overlay(good, path, score=-0.1, caption="mine")
    for name, value, message in [
        ("score", 1.5, "score"), ("score", float("nan"), "score"), ("score", True, "score"), ("score", "0.9", "score"),
        ("caption", "", "caption"), ("caption", 7, "caption"), ("caption", "x" * 401, "caption"),
        ("caption", "bell\a", "printable"), ("series_description", "x" * 65, "series_description"),
        ("manufacturer", "a\\b", "manufacturer"), ("series_instance_uid", "1.2.x", "series_instance_uid"),
        ("series_number", 0, "series_number"), ("allow_empty", "yes", "allow_empty"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            build_dicom_overlay(good, path, **{name: value})
    assert not (tmp_path / "out").exists()
    empty = build_dicom_overlay(good * 0, path, allow_empty=True)  # captioned, nothing outlined
    assert not (empty.pixel_array == RED).all(axis=2).any()


def test_a_source_that_is_not_the_expected_image_is_refused_whatever_its_size(tmp_path):
    """expect_sop_instance_uid (a Prediction's source_uid): the overlay is built only over that image, as
    build_dicom_seg; another image in the file is refused as that (not as a size mismatch) whether it
    is read from its path or given as a DicomImage, and nothing is written."""
    highdicom()
    path = synthetic_source(tmp_path / "image.dcm", (30, 20))
    uid = pydicom.dcmread(path).SOPInstanceUID
    mask = np.zeros((30, 20), dtype=np.uint8)
    mask[20:25, 12:18] = 1
    sc = build_dicom_overlay(mask, read_dicom(path), expect_sop_instance_uid=uid)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == uid
    for shape in ((30, 20), (8, 8)):  # the same size, and another: the identity is checked first
        synthetic_source(path, shape, PatientName="Other^Patient")  # another image (a new SOPInstanceUID)
        for source in (path, read_dicom(path)):
            with pytest.raises(DicomError, match="image.dcm: the file holds another image than the one expected") as caught:
                write_dicom_overlay(tmp_path / "out" / "sc.dcm", mask, source, expect_sop_instance_uid=uid)
            assert isinstance(caught.value, pneumoseg.AnotherImageError)  # public, so callers can tell it apart
    assert not (tmp_path / "out").exists()
    with pytest.raises(InvalidInputError, match="expect_sop_instance_uid must be a str"):
        build_dicom_overlay(np.ones((8, 8), np.uint8), path, expect_sop_instance_uid=123)


def test_a_failed_write_leaves_no_partial_file_and_the_old_one_in_place(tmp_path, monkeypatch):
    highdicom()
    from pneumoseg.infer import dicom_overlay as module

    path = synthetic_source(tmp_path / "image.dcm", (64, 48))
    mask = away_from_the_caption((64, 48))
    out = tmp_path / "out"
    out.mkdir()
    target = write_dicom_overlay(out / "sc.dcm", mask, path)
    before = target.read_bytes()

    def half_then_fail(sc, f):
        f.write(b"\0" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "save_dicom_overlay", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        write_dicom_overlay(out / "sc.dcm", mask, path, score=0.1)
    with pytest.raises(OSError):
        write_dicom_overlay(out / "new.dcm", mask, path)
    assert sorted(p.name for p in out.iterdir()) == ["sc.dcm"] and target.read_bytes() == before


def test_without_highdicom_the_function_and_the_flag_say_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom now raises ImportError
    with pytest.raises(InvalidInputError, match=r"DICOM overlay output needs highdicom.*pneumoseg\[pacs\]"):
        build_dicom_overlay(np.ones((2, 2), np.uint8), tmp_path / "any.dcm")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before highdicom was checked")

    monkeypatch.setattr(Predictor, "from_dir", no_model)
    out = tmp_path / "pred"
    assert main(["predict", str(tmp_path), "--model", str(tmp_path), "--out", str(out), "--dicom-overlay"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DICOM overlay output needs highdicom" in err and "pneumoseg[pacs]" in err
    assert not out.exists()


# --- the command --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def study_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("siim")
    make_synthetic_siim(root, n_images=6, size=80, positive_fraction=0.5, seed=3)
    return root


def test_predict_dicom_overlay_writes_one_per_positive_image_as_its_png(study_set, tmp_path, capsys):
    """dicom-overlay/<ImageId>.dcm per positive, the PNG overlay's very picture outside the caption, the
    score in the caption; listed in the manifest, counted in summary.json, replaced under --force."""
    highdicom()
    from PIL import Image

    out = tmp_path / "pred"
    model = model_dir("classifier")
    assert main(["predict", str(study_set), "--model", str(model), "--out", str(out), "--dicom-overlay",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    positives = [p for p in Predictor.from_dir(model).predict(study_set, return_masks=True) if p.positive]
    assert positives and f"{len(positives)} DICOM overlays in dicom-overlay/" in printed
    names = sorted(f"{p.image_id}.dcm" for p in positives)
    assert sorted(p.name for p in (out / "dicom-overlay").iterdir()) == names
    assert not (out / "seg").exists()
    for p in positives:
        sc = pydicom.dcmread(out / "dicom-overlay" / f"{p.image_id}.dcm")
        check_references(sc, pydicom.dcmread(p.path, stop_before_pixels=True))
        png = np.asarray(Image.open(out / "overlays" / f"{p.image_id}.png").convert("RGB"))
        check_caption(sc.pixel_array, caption_box(sc.pixel_array, png))  # elsewhere the PNG's very pixels
        alone = build_dicom_overlay(p.mask, p.path, score=p.score)  # the caption gives this image's score
        np.testing.assert_array_equal(alone.pixel_array, sc.pixel_array)
    summary = json.loads((out / "summary.json").read_text())
    outputs = summary["outputs"]
    assert (outputs["dicom_overlay"], outputs["dicom_overlay_count"], outputs["dicom_overlay_missing"]) == (
        "dicom-overlay", len(positives), [])
    assert not any(k.startswith("dicom_seg") for k in outputs)
    manifest = (out / ".pneumoseg-manifest").read_text()
    assert all(f"dicom-overlay/{name}" in manifest for name in names)
    before = {n: (out / "dicom-overlay" / n).read_bytes() for n in names}
    assert main(["predict", str(study_set), "--model", str(model), "--out", str(out), "--dicom-overlay", "--dicom-seg",
                 "--no-overlays", "--force", "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "dicom-overlay").iterdir()) == names
    assert all((out / "dicom-overlay" / n).read_bytes() != before[n] for n in names)  # new UIDs: replaced
    assert sorted(p.name for p in (out / "seg").iterdir()) == names and not (out / "overlays").exists()


def test_predict_without_the_flag_writes_none_and_help_says_why_it_is_opt_in(study_set, tmp_path, capsys):
    out = tmp_path / "pred"
    assert main(["predict", str(study_set), "--model", str(model_dir("classifier")), "--out", str(out),
                 "--no-progress"]) == 0
    assert not (out / "dicom-overlay").exists()
    assert not any(k.startswith("dicom_overlay") for k in json.loads((out / "summary.json").read_text())["outputs"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    flag = text[text.index("--dicom-overlay "):]
    assert "NOT FOR DIAGNOSTIC USE" in flag and "patient and study identity" in flag and "pneumoseg[pacs]" in flag


@pytest.mark.parametrize("how, name_by", [("resized", "uid"), ("replaced", "uid"), ("replaced", "file"),
                                          ("replaced by another size", "file")])
def test_a_source_that_changed_since_it_was_predicted_costs_its_overlay_only(study_set, tmp_path, capsys,
                                                                              monkeypatch, how, name_by):
    """A file resized after its pixels were read (the same image: its SOPInstanceUID kept) gets no
    overlays; one replaced by another image (another patient's), of its size or not, gets no DICOM
    overlay either, named by file or by SOPInstanceUID, and is reported as another image (not as a
    size change): this mask would be filed under the other image. The other positives get theirs."""
    highdicom()
    from pneumoseg.cli import predict as command

    real = command.read_for_display
    changed = []

    def change_first_then_read(pred):
        if not changed:
            shape = read_dicom_shape(pred.path) if how == "replaced" else (8, 8)
            same = {"SOPInstanceUID": pred.source_uid} if how == "resized" else {}
            synthetic_source(pred.path, shape, PatientName="Other^Patient", **same)
            changed.append(pred.image_id)
        return real(pred)

    studies = tmp_path / "studies"
    shutil.copytree(study_set, studies)
    monkeypatch.setattr(command, "read_for_display", change_first_then_read)
    out = tmp_path / "pred"
    assert main(["predict", str(studies), "--model", str(model_dir("classifier")), "--out", str(out), "--name-by",
                 name_by, "--dicom-overlay", "--no-progress"]) == 0
    assert "no DICOM overlay for" in capsys.readouterr().err
    outputs = json.loads((out / "summary.json").read_text())["outputs"]
    missing = outputs["dicom_overlay_missing"]
    assert [m["image_id"] for m in missing] == changed
    assert ("8x8" if how == "resized" else "SOPInstanceUID changed") in missing[0]["reason"]
    assert outputs["dicom_overlay_count"] == json.loads((out / "summary.json").read_text())["positives"] - 1
    assert not (out / "dicom-overlay" / f"{changed[0]}.dcm").exists()
    for sc in (out / "dicom-overlay").glob("*.dcm"):
        assert b"Other^Patient" not in sc.read_bytes()


def test_with_the_flag_patient_data_reaches_only_the_dicom_overlays(tmp_path, capsys, caplog):
    """The PHI canary study through --dicom-overlay: the canaries appear in dicom-overlay/*.dcm and nowhere
    else (not the submission, summary, PNG overlays, stdout, stderr or logs), and there only those of
    the identity pneumoseg copies on purpose."""
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
                 "--dicom-overlay", "--no-progress"]) == 0
    printed = capsys.readouterr()
    overlays = sorted((out / "dicom-overlay").glob("*.dcm"))
    assert overlays  # the tiny model found something in the phantoms
    leaks = leaks_under(out)
    assert set(leaks) == {f"dicom-overlay/{p.name}" for p in overlays}
    copied = {f"{MARK}-{k}" for k in PATIENT_AND_STUDY if k in TEXT_FIELDS} | {BIRTH_DATE}
    assert all(leaks[f"dicom-overlay/{p.name}"] == copied for p in overlays)
    assert canaries((printed.out + printed.err + caplog.text).encode()) == set()
