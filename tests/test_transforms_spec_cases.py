"""Cases of the augmentations and the chest crop worked out by hand from their documented rules,
each added by the mutation audit (round 2) where a planted bug passed the data tests."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pneumoseg.data.transforms import Augment, chest_crop, crop_to_chest  # noqa: E402


def _body_image() -> np.ndarray:
    # a body (100) over rows 10..29 and columns 5..44 of a 64 x 64 image; 0 elsewhere
    img = np.zeros((64, 64), np.float32)
    img[10:30, 5:45] = 100
    return img


def test_chest_box_ends_one_past_the_last_body_row_and_column():
    # every row 10..29 is 40/64 body, every column 5..44 is 20/64 body (> 5%); margin 0: the box is
    # (10, 30, 5, 45) in Python's half-open slices
    assert chest_crop(_body_image(), margin=0.0) == (10, 30, 5, 45)
    # a margin of 1/64 adds one row / column on every side
    assert chest_crop(_body_image(), margin=1 / 64) == (9, 31, 4, 46)


def test_pixels_in_the_darkest_histogram_bin_are_background():
    # Otsu over 256 bins of [0, 100]: background 0 and 0.3 share bin 0, the body 100 is bin 255; the
    # split is after bin 0, so the threshold is that bin's upper edge (100 / 256) and the faint
    # 0.3 stripe (rows 50..59) is not body.
    img = _body_image()
    img[50:60, :] = 0.3
    assert chest_crop(img, margin=0.0) == (10, 30, 5, 45)


def test_crop_to_chest_takes_rows_then_columns():
    # crop_to_chest uses chest_crop's default margin, 2% (1 px of 64): the box (9, 31, 4, 46), rows
    # then columns, resized (bilinear, antialiased) to the size asked for
    import torch.nn.functional as F

    images = torch.from_numpy(_body_image())[None, None]
    out = crop_to_chest(images, (20, 40))
    want = F.interpolate(images[:, :, 9:31, 4:46], size=(20, 40), mode="bilinear", align_corners=False,
                         antialias=True)
    torch.testing.assert_close(out, want)


def test_shift_reaches_its_documented_fraction_of_the_image():
    # shift=0.25 moves each image by up to a quarter of its width and height (a uniform draw in
    # [-0.25, 0.25] of the size); image and mask move together. An 8 x 8 square at the centre of a
    # 64 x 64 mask: over 64 draws the largest move nears 16 px and none passes it.
    aug = Augment(hflip=0.0, shift=0.25, scale=0.0, rotate_degrees=0.0, affine_p=1.0, intensity_p=0.0, seed=3)
    n = 64
    masks = torch.zeros(n, 1, 64, 64)
    masks[:, :, 28:36, 28:36] = 1
    images = masks * 200 + 10
    out, moved = aug(images, masks)
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    area = moved.sum(dim=(1, 2, 3))
    assert bool((area > 0).all())
    dy = (moved[:, 0] * ys).sum(dim=(1, 2)) / area - 31.5
    dx = (moved[:, 0] * xs).sum(dim=(1, 2)) / area - 31.5
    shifts = torch.cat([dy.abs(), dx.abs()])
    assert float(shifts.max()) <= 16 + 1  # a pixel of rounding (nearest resampling)
    assert float(shifts.max()) > 12
    # the image moved with its mask (bilinear for the image, nearest for the mask: within a pixel)
    bright = out[:, 0] - 10
    total = bright.sum(dim=(1, 2))
    torch.testing.assert_close((bright * ys).sum(dim=(1, 2)) / total - 31.5, dy, rtol=0, atol=1.0)
    torch.testing.assert_close((bright * xs).sum(dim=(1, 2)) / total - 31.5, dx, rtol=0, atol=1.0)
