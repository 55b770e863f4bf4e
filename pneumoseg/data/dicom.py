"""Reading chest radiographs from DICOM: the SIIM-ACR files (8-bit, MONOCHROME2, JPEG baseline) and
other hospitals' 12-16 bit images (MONOCHROME1, rescale slope/intercept, VOI LUT and windows).

Safe from any number of threads: reading touches no process-wide state. In particular it never uses
``warnings.catch_warnings`` (which swaps the process-wide filters: a reader thread inside it would
swallow or drop other threads' warnings, and threads leaving it out of order would leave its filters
installed). Instead the header values pneumoseg checks itself are read from the raw bytes, without
pydicom's conversion and the validation warnings it issues, and a truncated file is recognised by
its content. What pydicom still warns about (an odd file's pixel data, say) reaches the caller's
warning filters like any library's warning; where those filters turn it into an error, the read
fails with a :class:`pneumoseg.DicomError` naming the file.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import re
import stat
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Optional, Union

import numpy as np

from .. import limits
from .._checks import check_bool, check_path, check_real
from ..errors import DicomError, LimitError, PneumosegError

__all__ = ["DicomImage", "read_dicom", "read_dicom_shape", "read_sop_instance_uid"]

MEDIA_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR
DICOMDIR_REASON = "a DICOMDIR (the index of a DICOM medium's files), not an image"

_DEFLATED = "1.2.840.10008.1.2.1.99"


@dataclass
class DicomImage:
    """One radiograph. ``pixels`` is (H, W): rescaled (slope/intercept) and, for MONOCHROME1, inverted
    so that higher always means brighter (denser); ``window`` turns it into a picture for display."""

    pixels: np.ndarray
    image_id: str
    # left out of repr: age and sex are patient data, and a DicomImage printed or logged would copy them
    meta: dict[str, Any] = field(default_factory=dict, repr=False)
    path: Optional[Path] = None
    _dataset: Any = field(default=None, repr=False)
    # The header's SOPInstanceUID as read with these pixels (None where it has none): unlike image_id,
    # which falls back to the file name, it tells which image the pixels are, e.g. that a file
    # re-read later still holds them. Its text unchecked: a device may have misfilled it.
    sop_instance_uid: Optional[str] = None

    def window(self, center: Optional[float] = None, width: Optional[float] = None) -> np.ndarray:
        """The image through a window or VOI LUT as float32 in [0, 1] (1 = bright), as DICOM displays
        it: the window applies to the rescaled values (the units of the file's WindowCenter and
        WindowWidth, before any MONOCHROME1 inversion) and maps its range onto [0, 1], values below it
        to 0 (1 for MONOCHROME1) and above it to 1 (0). Without arguments the file's own VOI LUT or
        first window is used, or the full range of the pixels when it has none."""
        if (center is None) != (width is None):
            raise DicomError("window needs both center and width, or neither")
        inverted = self.meta.get("photometric_interpretation") == "MONOCHROME1"
        if center is not None and width is not None:
            center = check_real(center, "window center", error=DicomError)
            width = check_real(width, "window width", error=DicomError)
            if width <= 0:
                raise DicomError(f"window width must be positive, got {width}")
            low, high = center - width / 2.0, center + width / 2.0
            img = np.clip((self._rescaled() - low) / (high - low), 0.0, 1.0)
        else:
            ds = self._dataset
            if ds is None or not ("VOILUTSequence" in ds or "WindowCenter" in ds):
                img = self.pixels.astype(np.float64)
                low, high = float(img.min()), float(img.max())
                return ((img - low) / (high - low if high > low else 1.0)).astype(np.float32)
            img = self._file_voi(ds)
        return (1.0 - img if inverted else img).astype(np.float32)

    def _rescaled(self) -> np.ndarray:
        """The rescaled values as float64, MONOCHROME1's inversion (max + min - value) undone."""
        values = self.pixels.astype(np.float64)
        if self.meta.get("photometric_interpretation") == "MONOCHROME1":
            values = values.max() + values.min() - values
        return values

    def _file_voi(self, ds: Any) -> np.ndarray:
        """The rescaled pixels through the file's own VOI LUT or window (pydicom's, which expects the
        modality rescale applied first), scaled from its output range to [0, 1]. A broken one (a
        window width below 1, a LUT shorter than its descriptor says, a NaN centre) is a DicomError
        naming the file: pydicom raises whatever its arithmetic met, or computes NaN."""
        from pydicom.pixels import apply_voi_lut

        where = self.path if self.path is not None else self.image_id
        values = self._rescaled()
        try:
            if ds.get("VOILUTSequence"):  # pydicom prefers the LUT to a window; it indexes by integers
                lut_entries, first_mapped = list(ds.VOILUTSequence[0].LUTDescriptor)[:2]
                every_input = np.arange(first_mapped, first_mapped + (lut_entries or 2**16), dtype=np.int64)
                # clipped to the table here: pydicom's uint16 index would wrap past 65535 entries
                values = np.clip(np.rint(values), every_input[0], every_input[-1]).astype(np.int64)
                img = apply_voi_lut(values, ds).astype(np.float64)
                out_range = apply_voi_lut(every_input, ds).astype(np.float64)
            else:  # a window maps [center - width / 2, center + width / 2] onto its output range
                img = apply_voi_lut(values, ds).astype(np.float64)
                center, width = (float(np.ravel(getattr(ds, k))[0]) for k in ("WindowCenter", "WindowWidth"))
                far = 50.0 * abs(width) + 1.0  # where even a SIGMOID window is flat to float64
                out_range = apply_voi_lut(np.array([center - far, center + far]), ds).astype(np.float64)
        except Exception as exc:  # a Warning too, where the caller's filters make pydicom's warnings errors
            first_line = (str(exc).splitlines() or [""])[0]
            raise DicomError(f"{where}: the file's VOI LUT / window cannot be applied ({type(exc).__name__}: "
                             f"{first_line}); pass window(center=..., width=...)") from exc
        low, high = float(out_range.min()), float(out_range.max())
        if not (np.isfinite(img).all() and math.isfinite(low) and math.isfinite(high)):
            raise DicomError(f"{where}: the file's VOI LUT / window gives values that are not finite "
                             "(WindowCenter or WindowWidth NaN or infinite?); pass window(center=..., width=...)")
        return np.clip((img - low) / (high - low if high > low else 1.0), 0.0, 1.0)


_BINARY_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})


def _header_value(ds: Any, keyword: str) -> Any:
    """A header value without pydicom's validation: binary numbers (US, ...) converted, text values
    (IS, DS, CS, UI, ...) as the stripped text of their raw bytes; None when absent or empty.

    Converting a text value makes pydicom validate it and warn through the process-wide warnings
    machinery (a DS of 'NaN', a UID with a leading zero), which under 'error' filters would fail the
    read of a file pneumoseg can read. The values that matter are checked here instead."""
    from pydicom.datadict import dictionary_VR

    elem = ds.get_item(keyword)
    if elem is None:
        return None
    vr = elem.VR
    if vr is None:  # implicit VR: the dictionary's
        try:
            vr = dictionary_VR(keyword)
        except KeyError:
            vr = "UN"
    if vr in _BINARY_VRS:
        value = ds.get(keyword, None)
        return None if value is None or value == "" else value
    value = elem.value
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("latin-1")  # header codes are ASCII; latin-1 never fails
    elif isinstance(value, str):
        text = value
    elif hasattr(value, "__iter__"):  # already converted (a MultiValue)
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return text.strip(" \x00") or None


def _header_text(ds: Any, keyword: str) -> Optional[str]:
    value = _header_value(ds, keyword)
    return None if value is None else str(value)


def _shown(value: Any, limit: int = 64) -> str:
    """A refused header value as a message quotes it: repr, cut to `limit` characters, so a field
    holding kilobytes of text (or whatever a misconfigured system put there) is not copied whole into
    error messages, stderr and summary.json."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}... ({len(text):,} characters)"


def _finite(ds: Any, keyword: str, default: float, path: Path) -> float:
    """A numeric attribute that must be a finite number when present (a NaN RescaleSlope would turn
    the whole image into NaN)."""
    value = _header_value(ds, keyword)
    if value is None:
        return default
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DicomError(f"{path}: {keyword} {_shown(value)} is not a number") from None
    if not math.isfinite(out):
        raise DicomError(f"{path}: {keyword} is {_shown(value)}; it must be a finite number")
    return out


def _positive_int(ds: Any, keyword: str, path: Path, default: Optional[int] = None) -> int:
    value = _header_value(ds, keyword)
    if value is None:
        if default is None:
            raise DicomError(f"{path}: the file has no {keyword}, so its image size is unknown")
        return default
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise DicomError(f"{path}: {keyword} {_shown(value)} is not an integer") from None
    if out < 1:
        raise DicomError(f"{path}: {keyword} must be at least 1, got {out}")
    return out


def _age(value: Any) -> Optional[int]:
    """DICOM ages are '038Y', '10M' ... or, in SIIM, plain numbers; years, None when unknown."""
    if value in (None, ""):
        return None
    text = str(value).strip().upper()
    unit = text[-1] if text and text[-1] in "DWMY" else "Y"
    digits = text[:-1] if text[-1:] in ("D", "W", "M", "Y") else text
    try:
        n = int(digits)
    except ValueError:
        return None
    return {"Y": n, "M": n // 12, "W": n // 52, "D": n // 365}[unit]


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DicomError(f"{path}: no such file")
    _check_kind_and_size(path.stat(), path)


def _check_kind_and_size(st: os.stat_result, path: Path) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise DicomError(f"{path}: is a folder, not a DICOM file")
    if not stat.S_ISREG(st.st_mode):
        raise DicomError(f"{path}: not a regular file")
    try:
        limits.check("max_dicom_bytes", st.st_size, f"{path}: a file of {st.st_size:,} bytes")
    except LimitError as exc:
        raise DicomError(str(exc)) from None


_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_OPEN_FLAGS = os.O_RDONLY | _O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def _open_without_waiting(path: Union[str, Path]) -> int:
    """A read-only descriptor on ``path``, for the caller to ``fstat`` and close. Opened by name, a
    named pipe without a writer makes a blocking open wait forever; this open returns at once
    whatever is there, and ``fstat`` of the descriptor tells what was opened (the file, not the
    name: it may have been swapped since it was listed or checked)."""
    return os.open(path, _OPEN_FLAGS)


@contextlib.contextmanager
def _open_dicom(path: Path) -> Iterator[BinaryIO]:
    """``path`` opened once for everything read from it, its checks made on what was opened. Checked
    by name and then opened by name, a named pipe put in the file's place between the two made
    pydicom's open wait for a writer forever. A non-blocking open returns at once even for a pipe,
    and ``fstat`` of the descriptor then refuses it, as the check by name refuses one that is
    already there. (``_fs.open_for_reading`` waits for a pipe's writer: a DICOM file is never one.)"""
    _check_file(path)  # by name first, so a device or a pipe already there is never opened at all
    try:
        fd = _open_without_waiting(path)
    except FileNotFoundError:
        raise DicomError(f"{path}: no such file") from None
    except OSError as exc:  # permission denied: the message pydicom's own open of the path gave
        raise DicomError(f"{path}: unreadable DICOM header ({type(exc).__name__}: {exc})") from exc
    try:
        _check_kind_and_size(os.fstat(fd), path)
        if _O_NONBLOCK:  # a regular file never blocks; cleared all the same, as pydicom expects
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


# explicit VRs whose value length takes 4 bytes after 2 reserved ones (PS3.5 7.1.2); the others take 2
_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}

_META_START = 132  # the 128-byte preamble and "DICM"
_META_HEAD_BYTES = 8192  # a file meta group fits in this but for a long (0002,0102) private information
_MAX_META_BYTES = 1 << 20


def _file_meta_elements(data: bytes) -> tuple[dict[int, bytes], int, bool]:
    """The file meta group (0002,eeee) walked from its raw bytes: ``data`` is the start of a DICOM
    file, preamble and "DICM" included. Returns element number -> raw value bytes (the last one for
    an element that repeats, as pydicom keeps), the offset where the walk stopped and whether it
    stopped at the first element of another group, that is at the group's end; otherwise ``data``
    ended first, at that element or inside it. The group is explicit VR little endian (PS3.10 7.1);
    an element whose VR is not two capitals is read as implicit VR, as pydicom reads it. pydicom's
    own reader of the group is private and twenty times slower, and this runs for every file of a
    folder that is scanned."""
    elements: dict[int, bytes] = {}
    at, size = _META_START, len(data)
    while at + 8 <= size:
        group, element = struct.unpack_from("<HH", data, at)
        if group != 0x0002:
            return elements, at, True
        vr = data[at + 4: at + 6]
        if not b"AA" <= vr <= b"ZZ":  # no VR: an implicit VR element, with a 4-byte length
            length, value_at = struct.unpack_from("<I", data, at + 4)[0], at + 8
        elif vr in _LONG_LENGTH_VRS:
            if at + 12 > size:
                break
            length, value_at = struct.unpack_from("<I", data, at + 8)[0], at + 12
        else:
            length, value_at = struct.unpack_from("<H", data, at + 6)[0], at + 8
        if value_at + length > size:  # past the bytes given (an undefined length 0xFFFFFFFF too)
            break
        elements[element] = data[value_at: value_at + length]
        at = value_at + length
    return elements, at, False


def _uid_text(value: bytes) -> str:
    """A raw UI value as text, without the space or NUL that pads it to an even length."""
    return value.decode("latin-1").strip(" \x00")


def _read_file_meta(f: BinaryIO, path: Path) -> tuple[dict[int, bytes], int]:
    """The file meta group of ``f`` and the offset where it ends, where pydicom starts to read the
    dataset. Read from an 8 KB head; a longer group as far as its group length says, then, if that
    was wrong, to 1 MiB at most: beyond, it is refused."""
    f.seek(0)
    data = f.read(_META_HEAD_BYTES)
    elements, at, ended = _file_meta_elements(data)
    if not ended and len(data) == _META_HEAD_BYTES:  # the group goes on past the head
        wants = [_MAX_META_BYTES]
        group_length = elements.get(0x0000)
        if group_length is not None and len(group_length) == 4:  # + 8: the next group's first tag
            wants.insert(0, min(_META_START + 12 + int.from_bytes(group_length, "little") + 8, _MAX_META_BYTES))
        for want in wants:
            if want > len(data):
                data += f.read(want - len(data))
                elements, at, ended = _file_meta_elements(data)
                if ended or len(data) < want:  # the group's end, or the file's
                    break
    if not ended:
        if len(data) >= _MAX_META_BYTES:
            raise DicomError(f"{path}: a file meta group (0002,eeee) of over {_MAX_META_BYTES:,} bytes, "
                             "not a DICOM file pneumoseg reads")
        if at < len(data):  # the file ends inside an element (or its length runs past the end)
            raise DicomError(f"{path}: the file is truncated: it ends inside its file meta group")
    return elements, at


def _check_deflated(f: BinaryIO, path: Path) -> None:
    """A deflated dataset is inflated whole by pydicom before anything in it can be read: inflate it
    here first, in bounded steps, so a small file cannot expand past max_dicom_bytes."""
    from pydicom.filereader import read_preamble

    f.seek(0)
    read_preamble(f, False)  # InvalidDicomError without the 128-byte preamble and "DICM"
    meta, meta_end = _read_file_meta(f, path)
    if _uid_text(meta.get(0x0010, b"")) != _DEFLATED:
        return
    group_length = meta.get(0x0000)
    if group_length is None:
        raise DicomError(f"{path}: a deflated file without FileMetaInformationGroupLength")
    if len(group_length) != 4:
        raise DicomError(f"{path}: a deflated file whose FileMetaInformationGroupLength is {len(group_length)} "
                         "bytes long, not 4")
    limit = limits.current().max_dicom_bytes
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    produced = 0
    # Where pydicom starts to inflate: the end of the group walked, which is 128-byte preamble, "DICM",
    # the group length element (12 bytes) and the group length, unless the group length is wrong.
    f.seek(meta_end)
    while not inflater.eof:
        chunk = f.read(1 << 20)
        if not chunk:
            break
        pending = chunk
        while pending and not inflater.eof:
            out = inflater.decompress(pending, 1 << 24)
            produced += len(out)
            if produced > limit:
                raise DicomError(f"{path}: the deflated data inflates past max_dicom_bytes ({limit:,} bytes); "
                                 "raise it with pneumoseg.limits.set_limits(max_dicom_bytes=...) to read it")
            if not out and inflater.unconsumed_tail == pending:
                break  # no progress: zlib wants more input than this chunk has left
            pending = inflater.unconsumed_tail


def _warning_error(path: Path, warning: Warning) -> DicomError:
    """The error for a pydicom warning that the caller's filters turned into an exception."""
    text = str(warning)
    if "end of file" in text.lower():
        return DicomError(f"{path}: the file is truncated ({text})")
    return DicomError(f"{path}: pydicom: {type(warning).__name__}: {text}")


def _read_dataset(f: BinaryIO, path: Path, *, stop_before_pixels: bool, specific_tags: Optional[list] = None):
    """The dataset in ``f``, opened from ``path`` by :func:`_open_dicom`."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise DicomError(f"{path}: pydicom is not installed") from exc
    try:
        _check_deflated(f, path)
        f.seek(0)
        ds = pydicom.dcmread(f, stop_before_pixels=stop_before_pixels, specific_tags=specific_tags)
        ds.filename = os.fspath(path)  # the name, as when pydicom opened it, not the descriptor's number
    except DicomError:
        raise
    except InvalidDicomError as exc:
        # pydicom's advice to pass force=True names an option of its own, not one of pneumoseg's
        reason = str(exc).replace(" Use force=True to force reading.", "").strip()
        raise DicomError(f"{path}: not a DICOM file ({reason})") from exc
    except zlib.error as exc:
        raise DicomError(f"{path}: the deflated data is corrupt ({exc})") from exc
    except Warning as exc:
        raise _warning_error(path, exc) from exc
    except Exception as exc:  # truncated headers and the like
        raise DicomError(f"{path}: unreadable DICOM header ({type(exc).__name__}: {exc})") from exc
    return ds


@contextlib.contextmanager
def _damaged_header_errors(path: Path) -> Iterator[None]:
    """pydicom converts a header element only when it is first read, so a damaged one (a length that
    does not fit its VR, an unknown VR, a TransferSyntaxUID that is not a transfer syntax) fails
    after dcmread has returned, with pydicom's own error types: they become a DicomError naming the
    file, as damage found by dcmread itself does."""
    try:
        yield
    except (PneumosegError, MemoryError):
        raise
    except Exception as exc:  # a Warning too, where the caller's filters make pydicom's warnings errors
        first_line = (str(exc).splitlines() or [""])[0][:200]
        raise DicomError(f"{path}: unreadable DICOM header ({type(exc).__name__}: {first_line})") from exc


_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # (7FE0,0010), little and big endian


def _holds_pixel_data_tag(f: BinaryIO) -> bool:
    """Whether the file's bytes hold the Pixel Data tag: a dataset read without it was cut off inside
    its pixel data (pydicom stops there, with at most a warning). Only on that error path."""
    try:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return any(data.find(tag, 132) >= 0 for tag in _PIXEL_DATA_TAGS)
    except (OSError, ValueError):
        return False


_GREY_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")


def _check_photometric(ds: Any, path: Path) -> str:
    """The PhotometricInterpretation, which must be a grey level one. Any other is refused before
    decoding: PALETTE COLOR stores one index per pixel into a colour table, which would read as a grey
    image that is not the picture, and a colour one (RGB, YBR_*) would too where its header claims one
    sample per pixel."""
    photometric = _header_text(ds, "PhotometricInterpretation")
    if photometric is None:
        raise DicomError(f"{path}: the file has no PhotometricInterpretation, so how to read its pixels is unknown")
    if photometric not in _GREY_PHOTOMETRICS:
        raise DicomError(f"{path}: PhotometricInterpretation {_shown(photometric)} is not supported; pneumoseg reads grey "
                         "level radiographs (MONOCHROME1 or MONOCHROME2)")
    return photometric


def _declared_shape(ds: Any, path: Path) -> tuple[int, int]:
    """(rows, columns) from the header, checked against the limits before any pixel is decoded:
    the image size, and the decoded bytes Rows x Columns x frames x samples x BitsAllocated / 8."""
    _check_photometric(ds, path)
    rows = _positive_int(ds, "Rows", path)
    columns = _positive_int(ds, "Columns", path)
    frames = _positive_int(ds, "NumberOfFrames", path, default=1)
    samples = _positive_int(ds, "SamplesPerPixel", path, default=1)
    bits = _positive_int(ds, "BitsAllocated", path, default=8)
    decoded = rows * columns * frames * samples * ((bits + 7) // 8)
    try:
        limits.check_image(rows, columns, f"{path}: an image of {rows}x{columns}")
        limits.check("max_dicom_bytes", decoded,
                     f"{path}: pixel data of {rows}x{columns}x{frames} frames x {samples} samples x {bits} bits")
    except LimitError as exc:
        raise DicomError(str(exc)) from None
    if frames != 1:
        raise DicomError(f"{path}: expected a single 2-D image, the file holds {frames} frames")
    if samples != 1:
        raise DicomError(f"{path}: expected a grey-level image, the file has {samples} samples per pixel")
    return rows, columns


def read_dicom_shape(path: Union[str, Path]) -> tuple[int, int]:
    """(rows, columns) of a DICOM image from its header alone (no pixel data is read), with the same
    checks as :func:`read_dicom`; any problem is a :class:`pneumoseg.DicomError` naming the file."""
    path = check_path(path, "path", error=DicomError)
    with _open_dicom(path) as f:
        ds = _read_dataset(f, path, stop_before_pixels=True)
    with _damaged_header_errors(path):
        return _declared_shape(ds, path)


# A UID as DICOM writes it (PS3.5 9.1): digits in dot-separated components, at most 64 characters.
# Leading zeros, which the standard forbids but some devices write, are let through: the UID only
# has to name the image, and must be safe as a CSV field and a file name.
_UID_TEXT = re.compile(r"[0-9]+(?:\.[0-9]+)*", re.ASCII)


def read_sop_instance_uid(path: Union[str, Path]) -> str:
    """The SOPInstanceUID in a DICOM file's header (the image's own name, whatever the file is
    called), read without the pixel data. A file that cannot be read, or whose SOPInstanceUID is
    missing, empty or not a UID, is a :class:`pneumoseg.DicomError` naming the file."""
    path = check_path(path, "path", error=DicomError)
    with _open_dicom(path) as f:
        ds = _read_dataset(f, path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    with _damaged_header_errors(path):
        _refuse_dicomdir(ds, path)
        uid = _header_text(ds, "SOPInstanceUID")
    if uid is None:
        raise DicomError(f"{path}: the file has no SOPInstanceUID (or an empty one), so it cannot be named by it")
    if len(uid) > 64 or not _UID_TEXT.fullmatch(uid):
        raise DicomError(f"{path}: its SOPInstanceUID is not a UID ({_uid_problem(uid)}; a UID is digits separated "
                         "by dots, at most 64 characters)")
    return uid


def _uid_problem(uid: str) -> str:
    """What is wrong with a SOPInstanceUID that is not a UID, without quoting it: the element may
    hold anything (an accession number or a name where a system misfilled it), and this reason goes
    to stderr and summary.json. The file's path, beside it, is what names the image."""
    if len(uid) > 64:
        return f"{len(uid)} characters"
    if any(c not in "0123456789." for c in uid):
        return "it holds characters other than digits and dots"
    return "an empty component (a dot at either end, or two together)"


def read_dicom(path: Union[str, Path], *, with_dataset: bool = True) -> DicomImage:
    """Read one DICOM file. Decodes uncompressed files and JPEG baseline (the SIIM files) with the
    installed dependencies, JPEG 2000 / JPEG-LS where their pydicom handler is installed. The size
    the header declares is checked against :mod:`pneumoseg.limits` before anything is decoded. Any
    failure is a :class:`pneumoseg.DicomError` naming the file and the cause."""
    path = check_path(path, "path", error=DicomError)
    with_dataset = check_bool(with_dataset, "with_dataset")
    with _open_dicom(path) as f:  # open while decoding: a file cut off in its pixel data is told from it
        ds = _read_dataset(f, path, stop_before_pixels=False)
        with _damaged_header_errors(path):
            return _decode(ds, path, with_dataset, f)


def _refuse_dicomdir(ds: Any, path: Path) -> None:
    # A DICOMDIR renamed to *.dcm is listed as an image (telling it by its header would cost a read
    # of every .dcm file while listing); here the header has been read anyway.
    if str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")) == MEDIA_DIRECTORY_STORAGE:
        raise DicomError(f"{path}: {DICOMDIR_REASON}")


def _decode(ds: Any, path: Path, with_dataset: bool, f: BinaryIO) -> DicomImage:
    if "PixelData" not in ds:
        _refuse_dicomdir(ds, path)
        if _holds_pixel_data_tag(f):
            raise DicomError(f"{path}: the file is truncated: it ends inside its pixel data")
        raise DicomError(f"{path}: the file has no pixel data")
    rows, columns = _declared_shape(ds, path)
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown"))
    sizes = _native_pixel_bytes(ds, rows, columns)
    if sizes is not None and sizes[0] >= 2 * sizes[1]:
        # refused before decoding: pydicom would decode every whole extra frame (a small deflated
        # file can hold hundreds of them) only for the single-image check below to refuse them
        raise DicomError(f"{path}: expected a single 2-D image, the pixel data holds {sizes[0]:,} bytes, "
                         f"{sizes[0] // sizes[1]} images of the declared {rows}x{columns}")
    if sizes is not None and sizes[0] > sizes[1] + 1 and any(memoryview(ds.PixelData)[sizes[1]:]):
        # Data beyond the image that is not zero padding: the header lies about its size. pydicom
        # warned of "excess padding" and cut the data to the header's size, giving a cropped or
        # sheared image (an error only where the caller's filters made its warning one).
        raise DicomError(f"{path}: the pixel data holds {sizes[0]:,} bytes, {sizes[0] - sizes[1]:,} more than the "
                         f"declared {rows}x{columns} image needs, and they are not padding: its Rows, Columns or "
                         "BitsAllocated do not describe it")
    try:
        raw = ds.pixel_array
    except Exception as exc:  # a Warning too, where the caller's filters make pydicom's warnings errors
        if sizes is not None and sizes[0] < sizes[1]:
            raise DicomError(f"{path}: the file is truncated: its pixel data has {sizes[0]:,} of {sizes[1]:,} "
                             "bytes") from exc
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        if lines and "missing dependencies" in lines[0]:
            # pydicom lists what each decoder plugin needs on the lines after its first
            raise DicomError(
                f"{path}: pixel data could not be decoded (transfer syntax {syntax}): no decoder for it is installed: "
                f"pip install 'pneumoseg[dicom-codecs]' (pydicom's plugins: {'; '.join(lines[1:]) or 'none listed'})"
            ) from exc
        # pydicom's message says whether the data is damaged.
        first_line = (lines or [""])[0]
        raise DicomError(
            f"{path}: pixel data could not be decoded (transfer syntax {syntax}): {type(exc).__name__}: {first_line}"
        ) from exc
    if raw.ndim != 2:
        raise DicomError(f"{path}: expected a single 2-D image, got pixel data of shape {raw.shape}")
    if raw.shape != (rows, columns):
        raise DicomError(f"{path}: decoded pixel data is {raw.shape[0]}x{raw.shape[1]}, the header says {rows}x{columns}")
    if not raw.dtype.isnative:  # a big-endian file: torch and the native core read native byte order only
        raw = raw.astype(raw.dtype.newbyteorder("="))
    slope = _finite(ds, "RescaleSlope", 1.0, path)
    intercept = _finite(ds, "RescaleIntercept", 0.0, path)
    if slope == 0.0:
        raise DicomError(f"{path}: RescaleSlope is 0, which would erase the image")
    pixels = raw
    if slope != 1.0 or intercept != 0.0:
        if max(abs(slope), abs(intercept)) > float(np.finfo(np.float32).max):  # np.float32() would warn
            raise DicomError(f"{path}: RescaleSlope {slope} and RescaleIntercept {intercept} overflow float32")
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is the error below, not a warning
            pixels = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        if not np.isfinite(pixels).all():
            raise DicomError(f"{path}: RescaleSlope {slope} and RescaleIntercept {intercept} overflow float32")
    photometric = _check_photometric(ds, path)
    if photometric == "MONOCHROME1":  # stored inverted: make high values bright like MONOCHROME2
        lo, hi = pixels.min(), pixels.max()
        if pixels.dtype.kind in "iu":  # max + min overflows a 16-bit image: add in int64 (the result fits)
            pixels = (int(hi) + int(lo) - pixels.astype(np.int64)).astype(pixels.dtype)
        else:
            pixels = hi + lo - pixels
    meta = {
        "age": _age(_header_text(ds, "PatientAge")),
        "sex": _header_text(ds, "PatientSex"),
        "view_position": _header_text(ds, "ViewPosition"),
        "pixel_spacing": _spacing(ds, path),
        "modality": _header_text(ds, "Modality"),
        "body_part": _header_text(ds, "BodyPartExamined"),
        "photometric_interpretation": photometric,
        "bits_stored": _positive_int(ds, "BitsStored", path, default=raw.dtype.itemsize * 8),
        "transfer_syntax": syntax,
        "rescale": (slope, intercept),
    }
    uid = _header_text(ds, "SOPInstanceUID")
    return DicomImage(pixels=pixels, image_id=uid or path.stem, meta=meta, path=path,
                      _dataset=ds if with_dataset else None, sop_instance_uid=uid)


def _native_pixel_bytes(ds: Any, rows: int, columns: int) -> Optional[tuple[int, int]]:
    """(bytes present, bytes one image needs) for uncompressed pixel data; None when compressed."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or getattr(syntax, "is_compressed", True) or not isinstance(ds.PixelData, bytes):
        return None
    bits = _positive_int(ds, "BitsAllocated", Path(), default=8)
    return len(ds.PixelData), max(1, (rows * columns * bits + 7) // 8)


def _spacing(ds: Any, path: Path) -> Optional[tuple[float, float]]:
    """PixelSpacing (or ImagerPixelSpacing) in mm as (row, column), or None when the file has none."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = _header_text(ds, keyword)
        if value is None:
            continue
        values = value.split("\\")
        try:
            numbers = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            raise DicomError(f"{path}: {keyword} {_shown(values)} is not a pair of numbers") from None
        if len(numbers) != 2 or not all(math.isfinite(v) and v > 0 for v in numbers):
            raise DicomError(f"{path}: {keyword} {_shown(values)} must be two positive numbers (mm)")
        return numbers
    return None
