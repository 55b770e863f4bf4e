"""DICOM reading rules checked against values worked out from the standard (PS3.3 C.7.6.3.1.2 for
MONOCHROME1, C.11.1.1.2 for the modality rescale) and from ``DicomImage.window``'s documented linear
mapping, where the existing tests only bounded the result (found by planting bugs in
pneumoseg/data/dicom.py and seeing which survived)."""

from __future__ import annotations

import numpy as np
import pytest

from factories import write_dicom
from pneumoseg.data import read_dicom

RAW = np.random.default_rng(7).integers(0, 4096, (6, 9)).astype(np.uint16)


@pytest.mark.parametrize("slope, intercept", [(1.0, -1024.0), (2.5, 0.0), (0.5, 30.0)])
def test_rescale_is_slope_times_stored_plus_intercept_each_alone_too(tmp_path, slope, intercept):
    # PS3.3 C.11.1.1.2: output units = m * SV + b. An intercept with slope 1 (CT-style -1024) must
    # apply as much as a slope does.
    img = read_dicom(write_dicom(tmp_path / "r.dcm", RAW, RescaleSlope=slope, RescaleIntercept=intercept))
    np.testing.assert_allclose(img.pixels, RAW.astype(np.float64) * slope + intercept, rtol=0, atol=1e-3)
    assert img.meta["rescale"] == (slope, intercept)


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """window()'s documented mapping: [center - width / 2, center + width / 2] onto [0, 1], clipped."""
    return np.clip((values - (center - width / 2.0)) / width, 0.0, 1.0)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_explicit_window_maps_its_range_on_the_rescaled_values(tmp_path, photometric):
    slope, intercept = 2.0, -100.0
    img = read_dicom(write_dicom(tmp_path / "w.dcm", RAW, PhotometricInterpretation=photometric,
                                 RescaleSlope=slope, RescaleIntercept=intercept))
    rescaled = RAW.astype(np.float64) * slope + intercept  # the window's units: before any inversion
    center, width = 3000.0, 2000.0  # covers [2000, 4000]: the values of this image fall on both sides
    expected = _linear_window(rescaled, center, width)
    if photometric == "MONOCHROME1":  # displayed inverted: a high stored value is dark
        expected = 1.0 - expected
    got = img.window(center=center, width=width)
    assert 0 < np.count_nonzero((got > 0) & (got < 1)) < got.size  # some pixels inside the window
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_monochrome1_pixels_are_max_plus_min_minus_value_with_an_offset_range(tmp_path):
    # A range that does not start at 0 (stored 1000..1000 + 53): "max - value" alone would shift
    # every pixel by the minimum.
    raw = (1000 + np.arange(54, dtype=np.uint16)).reshape(6, 9)
    img = read_dicom(write_dicom(tmp_path / "m1.dcm", raw, PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_array_equal(img.pixels, 2053 - raw.astype(np.int64))
    assert img.pixels.min() == 1000 and img.pixels.max() == 1053
