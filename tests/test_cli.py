from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from pneumoseg._png import write_png
from pneumoseg.cli import main
from pneumoseg.samples import pneumothorax_mask


def read_png(path):
    """A reader for the PNGs we write (8-bit, filter 0): enough to check pixels independently."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + body)
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    w, h, _, color, *_ = header
    channels = 3 if color == 2 else 1
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * channels)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape((h, w, 3) if channels == 3 else (h, w))


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (4, 3, 3)])
def test_png_round_trip(tmp_path, shape):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(read_png(write_png(tmp_path / "a.png", img)), img)


def test_png_rejects_bad_arrays(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "a.png", np.zeros((3, 3), np.float32))
    assert not (tmp_path / "a.png").exists()


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


def test_sample_mask_rejects_bad_size():
    with pytest.raises(ValueError, match="size must be positive"):
        pneumothorax_mask(0)
