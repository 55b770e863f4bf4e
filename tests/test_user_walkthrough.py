"""What a new user meets first, checked against computations written here from the specifications
(not against pneumoseg's own functions): the public API on colour pictures and on DICOMs from other
hospitals (rescaled, MONOCHROME1, windowed), and the competition's own RLE code on the real SIIM files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pneumoseg
from pneumoseg.errors import InvalidInputError
from reference import competition_rle2mask

SIIM_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "siim-sample"


# --- Predictor inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [3, 4])
def test_a_colour_picture_is_refused_not_read_as_a_batch_of_narrow_images(channels):
    pytest.importorskip("torch")
    from infer_helpers import model_dir

    predictor = pneumoseg.Predictor.from_dir(model_dir("plain"))
    picture = np.random.default_rng(0).integers(0, 256, (64, 80, channels), dtype=np.uint8)  # np.asarray(PIL image)
    with pytest.raises(InvalidInputError, match=rf"colour \(H, W, {channels}\) picture.*convert\('L'\)"):
        predictor.predict(picture)
    # the grey picture, and a batch of narrow images given as (N, 1, H, W), still go through
    assert len(predictor.predict(picture.mean(axis=-1))) == 1
    assert len(predictor.predict(picture[:, None])) == 64


# --- DICOM display windows (PS3.3 C.11.2: the VOI transform takes the rescaled values) ---------------


def _reference_linear_window(rescaled, center, width):
    """DICOM's LINEAR window (PS3.3 C.11.2.1.2.1) onto [0, 1]."""
    c, w = center - 0.5, width - 1.0
    return np.clip((rescaled - c) / w + 0.5, 0.0, 1.0)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("slope, intercept", [(1.0, 0.0), (2.0, -1024.0), (0.5, 10.0)])
def test_the_files_window_applies_to_rescaled_values_and_keeps_its_output_range(tmp_path, photometric, slope,
                                                                                 intercept):
    from factories import write_dicom

    stored = np.random.default_rng(0).integers(0, 4096, (40, 30)).astype(np.uint16)
    rescaled = stored * slope + intercept
    center, width = float(np.percentile(rescaled, 40)), float(np.ptp(rescaled) / 3)
    path = write_dicom(tmp_path / "w.dcm", stored, PhotometricInterpretation=photometric, RescaleSlope=slope,
                       RescaleIntercept=intercept, WindowCenter=center, WindowWidth=width)
    image = pneumoseg.data.read_dicom(path)
    expected = _reference_linear_window(rescaled, center, width)
    if photometric == "MONOCHROME1":  # displayed inverted: the lowest values are white
        expected = 1.0 - expected
    np.testing.assert_allclose(image.window(), expected, atol=1e-6)
    # an explicit window is in the same (rescaled) units as the file's, MONOCHROME1 or not
    explicit = np.clip((rescaled - (center - width / 2)) / width, 0.0, 1.0)
    np.testing.assert_allclose(image.window(center=center, width=width),
                               1.0 - explicit if photometric == "MONOCHROME1" else explicit, atol=1e-6)


def test_an_image_inside_part_of_its_window_is_not_stretched_to_full_contrast(tmp_path):
    from factories import write_dicom

    stored = np.full((8, 8), 3000, np.uint16)
    stored[:4] = 3500  # everything above the window: white, not "no contrast, so black"
    path = write_dicom(tmp_path / "bright.dcm", stored, WindowCenter=1000, WindowWidth=400)
    np.testing.assert_array_equal(pneumoseg.data.read_dicom(path).window(), np.ones((8, 8), np.float32))
    stored[:] = 1000  # the window's centre, flat: mid-grey
    path = write_dicom(tmp_path / "flat.dcm", stored, WindowCenter=1000, WindowWidth=401)
    np.testing.assert_allclose(pneumoseg.data.read_dicom(path).window(), _reference_linear_window(1000.0, 1000, 401),
                               atol=1e-6)


def test_a_voi_lut_applies_to_rescaled_values_and_is_scaled_by_its_own_range(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from factories import write_dicom

    table = (np.arange(256) * 16).astype(np.uint16)  # a ramp over inputs 100..355, output 0..4080
    item = Dataset()
    item.add_new(0x00283002, "US", [256, 100, 16])  # LUTDescriptor: entries, first mapped input, bits
    item.add_new(0x00283006, "OW", table.tobytes())
    stored = np.array([[0, 50, 100], [150, 200, 300]], np.uint16)
    path = write_dicom(tmp_path / "lut.dcm", stored, RescaleSlope=2, RescaleIntercept=0,
                       VOILUTSequence=Sequence([item]))
    rescaled = stored.astype(np.int64) * 2
    expected = table[np.clip(rescaled - 100, 0, 255)] / 4080.0
    np.testing.assert_allclose(pneumoseg.data.read_dicom(path).window(), expected, atol=1e-6)


# --- the real SIIM-ACR files against the competition's own RLE code ---------------------------------


def _siim_rows():
    if not (SIIM_SAMPLE / "train-rle.csv").is_file():
        pytest.skip("the SIIM sample (shared/data/siim-sample) is not here")
    import csv

    with open(SIIM_SAMPLE / "train-rle.csv", newline="") as f:
        return [(image_id, text.strip()) for image_id, text in list(csv.reader(f))[1:]]


def test_real_siim_rles_decode_as_the_competition_did_over_the_dicoms_own_pixels():
    import pydicom

    from pneumoseg import rle

    rows = _siim_rows()
    files = pneumoseg.data.find_dicoms(SIIM_SAMPLE)
    csv_rows = pneumoseg.data.read_rle_csv(SIIM_SAMPLE / "train-rle.csv")
    assert sum(text != "-1" for _, text in rows) == 2
    for image_id, text in rows:
        ds = pydicom.dcmread(files[image_id])
        expected = (competition_rle2mask(text, ds.Columns, ds.Rows).T > 0).astype(np.uint8)
        np.testing.assert_array_equal(rle.decode_union(csv_rows[image_id], (ds.Rows, ds.Columns)), expected)
        assert rle.encode(expected) == text
        image = pneumoseg.data.read_dicom(files[image_id])
        assert image.image_id == ds.SOPInstanceUID == image_id
        np.testing.assert_array_equal(image.pixels, ds.pixel_array)


def test_predictions_on_real_siim_dicoms_agree_with_their_own_rle_and_the_dicom_grid():
    pytest.importorskip("torch")
    import pydicom

    from infer_helpers import model_dir

    rows = _siim_rows()
    files = pneumoseg.data.find_dicoms(SIIM_SAMPLE)
    preds = pneumoseg.Predictor.from_dir(model_dir("plain")).predict([files[i] for i, _ in rows], return_masks=True)
    assert [p.image_id for p in preds] == [i for i, _ in rows]
    assert any(p.positive for p in preds)
    for p in preds:
        grid = pydicom.dcmread(p.path).pixel_array.shape
        assert p.shape == grid and p.mask.shape == grid and p.mask.dtype == np.uint8
        decoded = (competition_rle2mask(p.rle, grid[1], grid[0]).T > 0).astype(np.uint8)
        np.testing.assert_array_equal(decoded, p.mask)
