"""The SIIM dataset's masks on an image that is not square, where a (height, width) swap or a
row-major reading of the column-major SIIM RLE shows (the Kaggle images are all 1024 x 1024, where
neither does). Found by planting bugs in pneumoseg/data and seeing which survived."""

from __future__ import annotations

import numpy as np
import pytest

from factories import write_dicom
from reference import ref_encode

torch = pytest.importorskip("torch")
pytest.importorskip("pydicom")

from pneumoseg.data import SIIMDataset  # noqa: E402


def test_a_tall_and_a_wide_image_get_their_annotation_union_the_right_way_up(tmp_path):
    # Each image's truth is its top half, written as two annotation rows (its left and right
    # quarters of the top half), whose union the dataset must take. Resized to 16 x 16 the top half
    # stays rows 0-7 exactly: the vertical scale of the wide image is 1, and the tall image's halves
    # meet on a row boundary of the resized grid.
    rows = ["ImageId, EncodedPixels"]
    for name, (h, w) in {"wide": (16, 32), "tall": (32, 16)}.items():
        write_dicom(tmp_path / f"{name}.dcm", np.arange(h * w, dtype=np.uint16).reshape(h, w) % 4000)
        left, right = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
        left[: h // 2, : w // 2] = 1
        right[: h // 2, w // 2:] = 1
        rows += [f"{name}, {ref_encode(left)}", f"{name}, {ref_encode(right)}"]
    csv = tmp_path / "train-rle.csv"
    csv.write_text("\n".join(rows) + "\n")
    dataset = SIIMDataset(tmp_path, csv, image_size=16)
    expected = np.zeros((1, 16, 16), np.float32)
    expected[:, :8] = 1
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["label"] == 1
        np.testing.assert_array_equal(item["mask"].numpy(), expected, err_msg=item["image_id"])
