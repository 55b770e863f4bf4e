from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import pneumoseg
from pneumoseg._fs import write_png
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


# `pneumoseg demo` (train, export, predict) is tested in test_cli_demo.py.


def test_sample_mask_rejects_bad_size():
    with pytest.raises(ValueError, match="size must be at least 1"):
        pneumothorax_mask(0)


@pytest.mark.parametrize("stop, line", [(KeyboardInterrupt, "pneumoseg: interrupted"),
                                        (pneumoseg.DataFormatError("bad file"), "pneumoseg: error: bad file")])
def test_a_command_stopped_inside_a_progress_bar_prints_its_message_on_its_own_line(monkeypatch, capsys, stop, line):
    # `pneumoseg demo` stopped during training printed '...9.67batch/s]pneumoseg: interrupted' on one line.
    from tqdm import tqdm

    from pneumoseg.cli import evaluate, main

    def run(args):
        bar = tqdm(total=10, desc="work", leave=False)
        bar.update(3)
        raise stop

    monkeypatch.setattr(evaluate, "run", run)
    code = main(["evaluate", "--pred", "p.csv", "--truth", "t.csv"])
    assert code == (130 if stop is KeyboardInterrupt else 2)
    err = capsys.readouterr().err
    assert line in err.replace("\r", "\n").split("\n"), repr(err)  # a line (or a bar's \r-ended segment) of its own
    assert not tqdm._instances  # the bar was closed before the message


def test_data_warnings_print_as_one_line(tmp_path):
    """pneumoseg's own DataWarnings (here: DICOMs without a CSV row, left out of a cache) read as
    'pneumoseg: warning: ...' like its errors, not as Python's 'file.py:94: DataWarning:' followed by
    the source line of the call."""
    import subprocess
    import sys

    pytest.importorskip("torch")
    from pneumoseg.data import make_synthetic_siim

    csv = make_synthetic_siim(tmp_path / "s", n_images=4, size=32, seed=0)
    partial = tmp_path / "partial.csv"
    partial.write_text("\n".join(csv.read_text().splitlines()[:-1]) + "\n")
    proc = subprocess.run([sys.executable, "-m", "pneumoseg", "data", "cache", "--root", str(tmp_path / "s"),
                           "--csv", str(partial), "--size", "16", "--out", str(tmp_path / "c"), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines == [f"pneumoseg: warning: 1 DICOMs under {tmp_path / 's'} have no row in {partial}; "
                     "they are left out of the cache"], proc.stderr


def test_not_a_dicom_message_names_no_pydicom_option(tmp_path):
    """pydicom ends its message with 'Use force=True to force reading.', an option of pydicom's that
    no pneumoseg command or function has."""
    from pneumoseg.data import read_dicom

    path = tmp_path / "x.dcm"
    path.write_text("not a DICOM")
    with pytest.raises(pneumoseg.DicomError, match="not a DICOM file") as info:
        read_dicom(path)
    assert "force" not in str(info.value)


def test_version_prints_the_package_version(capsys):
    from pneumoseg.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"pneumoseg {pneumoseg.__version__}"
