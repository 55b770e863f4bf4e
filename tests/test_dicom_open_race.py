"""A DICOM file swapped for something else between the check of its path and its read. The readers
checked the path (a regular file, not too big) and then let pydicom open it by name: a named pipe
put in its place in between made the open wait for a writer forever. Now the file is opened once,
without blocking, and the checks are made on what was opened. The swap is planted by wrapping the
check by name; every read that could hang runs in a thread with a time limit."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import pytest

import pneumoseg
from pneumoseg import limits
from pneumoseg.data import dicom

from factories import write_dicom
from isolated import call_with_fifo_limit

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes (os.mkfifo)")

READERS = {"read_dicom": dicom.read_dicom, "read_dicom_shape": dicom.read_dicom_shape,
           "read_sop_instance_uid": dicom.read_sop_instance_uid}


def _swap_after_check(monkeypatch, swap) -> None:
    """The check by name passes on the real file; then ``swap(path)`` replaces it."""
    check_by_name = dicom._check_file

    def check_then_swap(path: Path) -> None:
        check_by_name(path)
        swap(path)

    monkeypatch.setattr(dicom, "_check_file", check_then_swap)


def _to_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@needs_fifo
@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_pipe_swapped_in_after_the_check_is_refused_not_waited_on(tmp_path, monkeypatch, reader):
    path = write_dicom(tmp_path / "img.dcm", np.zeros((8, 8), np.uint16))
    _swap_after_check(monkeypatch, _to_fifo)
    started = time.monotonic()
    _, error = call_with_fifo_limit(lambda: READERS[reader](path), path, 20.0, why="a pipe swapped in after the check")
    assert isinstance(error, pneumoseg.DicomError), error
    assert isinstance(error, ValueError)
    assert str(error) == f"{path}: not a regular file"
    assert time.monotonic() - started < 10


def test_a_folder_swapped_in_after_the_check_is_refused_and_nothing_left_open(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "img.dcm", np.zeros((8, 8), np.uint16))

    def to_folder(p: Path) -> None:
        p.unlink()
        p.mkdir()

    _swap_after_check(monkeypatch, to_folder)
    before = _open_fds() if os.path.isdir("/proc/self/fd") else None
    with pytest.raises(pneumoseg.DicomError) as info:
        dicom.read_dicom(path)
    assert str(info.value) == f"{path}: is a folder, not a DICOM file"
    if before is not None:  # the descriptor opened on the folder was closed
        assert _open_fds() == before


def test_the_size_limit_holds_for_the_file_opened_not_the_one_checked(tmp_path, monkeypatch):
    small = np.zeros((8, 8), np.uint16)
    path = write_dicom(tmp_path / "img.dcm", small)
    big = write_dicom(tmp_path / "big.dcm", np.zeros((64, 64), np.uint16))
    size = big.stat().st_size
    assert size > path.stat().st_size
    _swap_after_check(monkeypatch, lambda p: os.replace(big, p))
    with limits.override(max_dicom_bytes=path.stat().st_size):
        with pytest.raises(pneumoseg.DicomError) as info:
            dicom.read_dicom(path)
    assert str(info.value).startswith(f"{path}: a file of {size:,} bytes")
    assert "max_dicom_bytes" in str(info.value)


def test_the_file_checked_is_the_file_read_when_replaced_after_the_open(tmp_path, monkeypatch):
    # The other side of the gap: replaced after the open, the read still sees the file opened (and
    # checked), never the newcomer, and the name reported is the path given.
    path = write_dicom(tmp_path / "img.dcm", np.full((8, 8), 7, np.uint16), SOPInstanceUID="1.2.3")
    other = write_dicom(tmp_path / "other.dcm", np.full((8, 8), 9, np.uint16), SOPInstanceUID="1.2.4")
    open_dicom = dicom._open_dicom

    @contextlib.contextmanager
    def opened_then_replaced(p: Path):
        with open_dicom(p) as f:
            os.replace(other, p)
            yield f

    monkeypatch.setattr(dicom, "_open_dicom", opened_then_replaced)
    img = dicom.read_dicom(path)
    assert img.image_id == "1.2.3"
    np.testing.assert_array_equal(img.pixels, np.full((8, 8), 7, np.uint16))
    assert img._dataset.filename == os.fspath(path)


# --- the folder scan: a file listed, then swapped for a pipe before its head is read ---------------------


@needs_fifo
@pytest.mark.parametrize("require_suffix", [True, False])
def test_a_scan_passes_over_a_pipe_swapped_in_after_the_listing(tmp_path, monkeypatch, require_suffix):
    # find_dicom_files lists a folder, then opens the files without a .dcm suffix by name to read
    # their first bytes ("DICM", the file meta group): a pipe put in one's place in between made that
    # open wait for a writer, and the whole scan with it.
    from pneumoseg.data import siim

    for name in ("IM0001", "IM0002", "IM0003"):
        write_dicom(tmp_path / name, np.zeros((8, 8), np.uint16))
    swapped = tmp_path / "IM0002"
    list_folder = os.scandir

    def list_then_swap(folder):
        entries = list(list_folder(folder))  # the listing still says IM0002 is a regular file
        if Path(folder) == tmp_path:
            _to_fifo(swapped)
        return iter(entries)

    monkeypatch.setattr(siim.os, "scandir", list_then_swap)
    found: dict = {}
    _, error = call_with_fifo_limit(lambda: found.update(files=siim.find_dicom_files(tmp_path, require_suffix=require_suffix)),
                                    swapped, 20.0, why="a pipe swapped in after the listing")
    assert error is None, error
    files = found["files"]
    if require_suffix:  # DICOM files without the suffix are named in skipped, the pipe is not one
        assert files == []
        assert sorted(p.name for p, _ in files.skipped) == ["IM0001", "IM0003"]
    else:
        assert [p.name for p in files] == ["IM0001", "IM0003"]
        assert files.skipped == []
