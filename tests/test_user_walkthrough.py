"""What a new user meets first, checked against computations written here from the specifications
(not against pneumoseg's own functions): the public API on colour pictures and on DICOMs from other
hospitals (rescaled, MONOCHROME1, windowed), and the competition's own RLE code on the real SIIM files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pneumoseg
from pneumoseg.errors import InvalidInputError

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
