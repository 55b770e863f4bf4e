from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import pneumoseg
from pneumoseg._fs import write_png
from pneumoseg.cli import main
from pneumoseg.samples import pneumothorax_mask


def read_png(path):
    """The pixels of a PNG, read back with Pillow (an independent decoder of what we write)."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img)


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (4, 3, 3), (2, 6, 4)])
def test_png_round_trip(tmp_path, shape):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(read_png(write_png(tmp_path / "a.png", img)), img)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary file left behind


@pytest.mark.parametrize("bad", [np.zeros((3, 3), np.float32), np.zeros((3, 3, 2), np.uint8), np.zeros((0, 3), np.uint8)])
def test_png_rejects_bad_arrays(tmp_path, bad):
    with pytest.raises(pneumoseg.InvalidInputError, match="PNG"):
        write_png(tmp_path / "a.png", bad)
    assert list(tmp_path.iterdir()) == []


def test_demo_runs_on_the_built_in_data(tmp_path, capsys):
    pytest.importorskip("pydicom")
    assert main(["demo", "--n", "6", "--size", "96", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "round trip exact: True" in out and "6 images 96x96" in out
    assert (tmp_path / "siim-synthetic" / "train-rle.csv").is_file()
    picture = read_png(tmp_path / "demo-studies.png")
    assert picture.shape[0] == 96 and picture.shape[2] == 3 and picture.shape[1] % 96 == 0
    red = (picture[..., 0] == 255) & (picture[..., 1] == 40)
    assert red.any()  # the outlines of the annotated regions are drawn


def test_demo_runs_again_on_its_own_output_but_not_on_someone_elses(tmp_path, capsys):
    pytest.importorskip("pydicom")
    args = ["demo", "--n", "3", "--size", "64", "--out", str(tmp_path / "d")]
    assert main(args) == 0
    assert main(args[:2] + ["2"] + args[3:]) == 0  # replaces its earlier output: nothing left of 3 studies
    assert len(list((tmp_path / "d" / "siim-synthetic").rglob("*.dcm"))) == 2
    (tmp_path / "d" / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notes.txt" in err and "--force" in err
    assert main(args + ["--force"]) == 0
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"


def test_sample_mask_rejects_bad_size():
    with pytest.raises(ValueError, match="size must be at least 1"):
        pneumothorax_mask(0)
