"""Cases of the RLE wrappers' checks worked out by hand, each added by the mutation audit (round 2)
where a planted bug passed the RLE tests."""

from __future__ import annotations

import pytest

from pneumoseg import limits, rle
from pneumoseg.errors import RLEError, RLELimitError


def test_an_error_in_a_union_names_the_image_it_belongs_to():
    # item 1 is the union of two strings; its second string is bad: the error names rles[1]
    with pytest.raises(RLEError, match=r"^rles\[1\]: token 1 \('x'\)"):
        rle.decode_batch(["1 1", ["1 2", "1 x"]], (4, 4))


def test_the_image_side_limit_holds_for_a_long_narrow_shape():
    # max_image_side bounds the height *or* the width: 1 x (side + 1) is past it though 1 is not
    with limits.override(max_image_side=100):
        rle.decode("-1", (1, 100))
        with pytest.raises(RLELimitError, match="max_image_side"):
            rle.decode("-1", (1, 101))
        with pytest.raises(RLELimitError, match="max_image_side"):
            rle.decode_batch(["-1"], (101, 1))


def test_the_batch_limit_counts_every_image_of_the_batch():
    # max_batch_bytes bounds the whole (N, H, W) uint8 batch: 5 images of 4 x 4 are 80 bytes
    with limits.override(max_batch_bytes=64):
        assert rle.decode_batch(["-1"] * 4, (4, 4)).shape == (4, 4, 4)  # 64 bytes: at the limit
        with pytest.raises(RLELimitError, match="max_batch_bytes"):
            rle.decode_batch(["-1"] * 5, (4, 4))


def test_the_annotation_limit_holds_for_a_union_in_a_batch():
    with limits.override(max_annotations=3):
        rle.decode_batch([["1 1", "3 1", "5 1"]], (4, 4))
        with pytest.raises(RLELimitError, match="max_annotations"):
            rle.decode_batch([["1 1", "3 1", "5 1", "7 1"]], (4, 4))


def test_the_string_length_limit_holds_for_each_item_of_a_batch():
    with limits.override(max_rle_chars=5):
        rle.decode_batch(["11 12", "-1"], (8, 8))  # 5 characters: at the limit
        with pytest.raises(RLELimitError, match="max_rle_chars"):
            rle.decode_batch(["-1", "11 123"], (8, 8))  # 6 characters
