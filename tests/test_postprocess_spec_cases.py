"""postprocess's thresholds at the ends of [0, 1], where a falsy 0.0 or a logit of 0 or 1 needs care:
``top=0.0`` is a triplet rule (pixels above 0), not "no triplet"; a threshold of 0 is the logit
-inf and of 1 the logit +inf. Found by planting bugs in pneumoseg/postprocess.py's parameter handling
and seeing which survived."""

from __future__ import annotations

import numpy as np
import pytest

from pneumoseg import postprocess as pp
from reference import ref_triplet


def _probs_with_sparse_images():
    """Image 0: two pixels at .9, the rest exactly 0 (fewer than 5 pixels above 0). Image 1: eight
    pixels at .6 and .05 elsewhere (every pixel above 0). Image 2: all 0."""
    probs = np.zeros((3, 6, 7), np.float32)
    probs[0, 1, 1:3] = 0.9
    probs[1] = 0.05
    probs[1, 2:4, 1:5] = 0.6
    return probs


@pytest.mark.parametrize("from_logits", [False, True])
def test_top_zero_is_a_triplet_rule_not_none(from_logits):
    # top=0, min_area=5: image 0 has only 2 pixels above 0, so it is negative and empty although two
    # of its pixels pass bottom; image 1 has 42 above 0: its mask is the 8 pixels above .3.
    probs = _probs_with_sparse_images()
    expected = ref_triplet(probs, 0.0, 5, 0.3)
    assert expected[0].sum() == 0 and expected[1].sum() == 8 and expected[2].sum() == 0
    with np.errstate(divide="ignore"):  # probability 0 is the logit -inf
        x = np.log(probs / (1 - probs)) if from_logits else probs
    got = pp.postprocess(x, from_logits=from_logits, top=0.0, min_area=5, bottom=0.3)
    np.testing.assert_array_equal(got, expected)


def test_bottom_zero_on_logits_keeps_every_finite_logit():
    # bottom 0 keeps probability > 0, which every finite logit has (its logit threshold is -inf, not
    # the logit 0 of probability .5).
    logits = np.random.default_rng(3).uniform(-8, 8, (2, 5, 9)).astype(np.float32)
    got = pp.postprocess(logits, from_logits=True, top=None, bottom=0.0)
    np.testing.assert_array_equal(got, np.ones(logits.shape, np.uint8))
    np.testing.assert_array_equal(got, pp.postprocess(1 / (1 + np.exp(-logits.astype(np.float64))), top=None, bottom=0.0))


@pytest.mark.parametrize("from_logits", [False, True])
def test_top_one_makes_every_image_negative_unless_min_area_is_zero(from_logits):
    # no probability is above 1 (no logit above +inf): with min_area 1 nothing is positive, with
    # min_area 0 every image is, and its mask is probs > bottom
    probs = np.clip(np.random.default_rng(4).random((3, 4, 4)), 0.01, 0.99).astype(np.float32)
    x = np.log(probs / (1 - probs)) if from_logits else probs
    np.testing.assert_array_equal(pp.postprocess(x, from_logits=from_logits, top=1.0, min_area=1, bottom=0.3),
                                  np.zeros(probs.shape, np.uint8))
    np.testing.assert_array_equal(pp.postprocess(x, from_logits=from_logits, top=1.0, min_area=0, bottom=0.3),
                                  ref_triplet(probs, 1.0, 0, 0.3))
