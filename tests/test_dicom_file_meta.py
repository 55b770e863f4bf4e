"""The file meta group (0002,eeee) read from the raw bytes, no longer with pydicom's private
``_read_file_meta_info``: the deflate check finds the transfer syntax and where the deflated data
starts in it, and the folder scan recognises a DICOMDIR by it. The files here are pydicom's own,
their meta group rewritten by hand (explicit VR little endian, PS3.10 7.1); each deflated variant is
read whole within the default limits, so pydicom takes it as deflated too, and refused once the limit
is below what it inflates to."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pytest

import pneumoseg
from pneumoseg import limits
from pneumoseg.data import dicom, read_dicom
from pneumoseg.data.siim import find_dicom_files

from factories import write_dicom

_DEFLATED = b"1.2.840.10008.1.2.1.99"  # 22 characters: no padding needed
_EXPLICIT_LE = b"1.2.840.10008.1.2.1\x00"
_LONG_VRS = (b"OB", b"UN", b"UT", b"SQ")


def _element(element: int, vr: Optional[bytes], value: bytes) -> bytes:
    """One (0002,element) element; ``vr`` None writes it implicit VR (a 4-byte length, no VR)."""
    if vr is None:
        return struct.pack("<HHI", 2, element, len(value)) + value
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", 2, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 2, element, vr, len(value)) + value


def _ui(text: str) -> bytes:
    value = text.encode()
    return value + b"\x00" * (len(value) % 2)


def _standard_meta(path: Path, syntax: bytes = _DEFLATED) -> list[tuple[int, Optional[bytes], bytes]]:
    from pydicom.filereader import read_file_meta_info

    meta = read_file_meta_info(path)
    return [(0x0001, b"OB", b"\x00\x01"), (0x0002, b"UI", _ui(meta.MediaStorageSOPClassUID)),
            (0x0003, b"UI", _ui(meta.MediaStorageSOPInstanceUID)), (0x0010, b"UI", syntax),
            (0x0012, b"UI", _ui(meta.ImplementationClassUID))]


def _with_file_meta(path: Path, elements, group_length: Union[str, int, None] = "actual") -> Path:
    """``path`` rewritten with the meta group ``elements``, after the group length element:
    ``group_length`` "actual" (the length of the rest of the group), a number, or None for none."""
    from pydicom.filereader import read_file_meta_info

    data = path.read_bytes()
    dataset = data[132 + 12 + read_file_meta_info(path).FileMetaInformationGroupLength:]
    body = b"".join(_element(*e) for e in elements)
    length = len(body) if group_length == "actual" else group_length
    head = b"" if length is None else _element(0x0000, b"UL", struct.pack("<I", length))
    path.write_bytes(data[:132] + head + body + dataset)
    return path


def _deflated(tmp_path: Path) -> Path:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    # 512 KiB of pixels in about a kilobyte
    return write_dicom(tmp_path / "bomb.dcm", np.zeros((512, 512), np.uint16), syntax=DeflatedExplicitVRLittleEndian)


def _long_private(n: int) -> list[tuple[int, Optional[bytes], bytes]]:
    """(0002,0100) and (0002,0102): private information of ``n`` bytes, a group past the 8 KB head."""
    return [(0x0100, b"UI", _ui("1.2.3.4")), (0x0102, b"OB", b"\x01" * n)]


def _variant(name: str, meta: list) -> tuple[list, Union[str, int, None]]:
    if name == "as written":
        return meta, "actual"
    if name == "group length past the file":
        return meta, 0xFFFFFF00
    if name == "group length too short":
        return meta, 10
    if name == "syntax padded with a space":
        return [(e, vr, _DEFLATED + b"  " if e == 0x0010 else v) for e, vr, v in meta], "actual"
    if name == "syntax padded with NULs":
        return [(e, vr, _DEFLATED + b"\x00\x00" if e == 0x0010 else v) for e, vr, v in meta], "actual"
    if name == "syntax written implicit VR":
        return [(e, None if e == 0x0010 else vr, v) for e, vr, v in meta], "actual"
    if name == "a group longer than the 8 KB head":
        return meta + _long_private(20_000), "actual"
    if name == "a long group, its length wrong":
        return meta + _long_private(20_000), 100
    if name == "deflated said again past the 8 KB head":
        # pydicom keeps the last of a repeated element: the first, explicit little endian, is not the one
        first = [(e, vr, _EXPLICIT_LE if e == 0x0010 else v) for e, vr, v in meta]
        return first + _long_private(20_000) + [(0x0010, b"UI", _DEFLATED)], "actual"
    raise AssertionError(name)


VARIANTS = ["as written", "group length past the file", "group length too short", "syntax padded with a space",
            "syntax padded with NULs", "syntax written implicit VR", "a group longer than the 8 KB head",
            "a long group, its length wrong", "deflated said again past the 8 KB head"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_deflated_data_is_inflated_in_bounded_steps_whatever_the_meta_group(tmp_path, variant):
    # A group length pointing past the file made the old check inflate nothing while pydicom went on
    # to inflate everything: the check now starts where the group walked ends, where pydicom starts.
    path = _deflated(tmp_path)
    _with_file_meta(path, *_variant(variant, _standard_meta(path)))
    assert read_dicom(path).pixels.shape == (512, 512)  # pydicom reads it as deflated
    with limits.override(max_dicom_bytes=100_000):
        with pytest.raises(pneumoseg.DicomError, match="inflates past max_dicom_bytes"):
            read_dicom(path)


def test_a_deflated_file_without_a_group_length_is_refused_as_before(tmp_path):
    path = _deflated(tmp_path)
    _with_file_meta(path, _standard_meta(path), group_length=None)
    with pytest.raises(pneumoseg.DicomError) as info:
        read_dicom(path)
    assert str(info.value) == f"{path}: a deflated file without FileMetaInformationGroupLength"


def test_a_deflated_file_with_a_group_length_of_two_bytes_is_refused(tmp_path):
    path = _deflated(tmp_path)
    meta = _standard_meta(path)
    _with_file_meta(path, [(0x0000, b"UL", b"\x10\x00")] + meta, group_length=None)
    with pytest.raises(pneumoseg.DicomError) as info:
        read_dicom(path)
    assert str(info.value) == f"{path}: a deflated file whose FileMetaInformationGroupLength is 2 bytes long, not 4"


@pytest.mark.parametrize("group_length", ["actual", None, 0xFFFFFFFF])
def test_a_long_meta_group_is_read_whatever_its_group_length(tmp_path, group_length):
    path = write_dicom(tmp_path / "img.dcm", np.full((8, 8), 5, np.uint16))
    _with_file_meta(path, _standard_meta(path, _EXPLICIT_LE) + _long_private(50_000), group_length)
    np.testing.assert_array_equal(read_dicom(path).pixels, np.full((8, 8), 5))


def test_a_meta_group_over_a_mebibyte_is_refused(tmp_path):
    path = write_dicom(tmp_path / "img.dcm", np.zeros((8, 8), np.uint16))
    _with_file_meta(path, _standard_meta(path, _EXPLICIT_LE) + _long_private(1 << 20))
    with pytest.raises(pneumoseg.DicomError) as info:
        read_dicom(path)
    assert str(info.value) == (f"{path}: a file meta group (0002,eeee) of over 1,048,576 bytes, not a DICOM file "
                               "pneumoseg reads")


@pytest.mark.parametrize("cut", [140, 150, 200])
def test_a_file_cut_off_inside_its_meta_group_is_refused(tmp_path, cut):
    path = write_dicom(tmp_path / "img.dcm", np.zeros((8, 8), np.uint16))
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(pneumoseg.DicomError, match=f"^{path}: the file is truncated"):
        read_dicom(path)


def test_an_element_longer_than_the_file_is_refused(tmp_path):
    path = write_dicom(tmp_path / "img.dcm", np.zeros((8, 8), np.uint16))
    _with_file_meta(path, _standard_meta(path, _EXPLICIT_LE))
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 132 + 12 + 4 + 4, 0x7FFFFFF0)  # (0002,0001) OB: its 4-byte length
    path.write_bytes(bytes(data))
    with pytest.raises(pneumoseg.DicomError) as info:
        read_dicom(path)
    assert str(info.value) == f"{path}: the file is truncated: it ends inside its file meta group"


def test_a_file_without_dicm_keeps_its_message(tmp_path):
    path = write_dicom(tmp_path / "img.dcm", np.zeros((8, 8), np.uint16))
    data = bytearray(path.read_bytes())
    data[128:132] = b"DICN"
    path.write_bytes(bytes(data))
    with pytest.raises(pneumoseg.DicomError) as info:
        read_dicom(path)
    assert str(info.value) == (f"{path}: not a DICOM file (File is missing DICOM File Meta Information header or the "
                               "'DICM' prefix is missing from the header.)")


@pytest.mark.parametrize("padding", [b"\x00", b" "])
def test_the_scan_tells_a_dicomdir_by_its_padded_sop_class(tmp_path, padding):
    path = write_dicom(tmp_path / "IM0001", np.zeros((8, 8), np.uint16))
    meta = [(e, vr, b"1.2.840.10008.1.3.10" + padding if e == 0x0002 else v)
            for e, vr, v in _standard_meta(path, _EXPLICIT_LE)]
    _with_file_meta(path, meta)
    write_dicom(tmp_path / "IM0002", np.zeros((8, 8), np.uint16))
    files = find_dicom_files(tmp_path, require_suffix=False)
    assert [p.name for p in files] == ["IM0002"]
    assert files.skipped == [(path, dicom.DICOMDIR_REASON)]


def test_the_walk_stops_at_the_first_element_of_another_group():
    group = _element(0x0000, b"UL", struct.pack("<I", 14)) + _element(0x0010, b"UI", _EXPLICIT_LE)
    data = b"\x00" * 128 + b"DICM" + group + struct.pack("<HH2sH", 8, 0x16, b"UI", 0)
    elements, end, ended = dicom._file_meta_elements(data)
    assert elements == {0x0000: struct.pack("<I", 14), 0x0010: _EXPLICIT_LE}
    assert (end, ended) == (132 + len(group), True)
    # cut inside the second element: the walk stops at its start, the group not ended
    assert dicom._file_meta_elements(data[:132 + 12 + 10]) == ({0x0000: struct.pack("<I", 14)}, 132 + 12, False)
