"""The SIIM-ACR Kaggle layouts: ``train-rle.csv`` / ``stage_2_train.csv`` and the DICOM folders."""

from __future__ import annotations

import os
import re
import stat
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Union

from .. import limits
from .._checks import check_bool, check_path, check_str_sequence, show
from .._fs import atomic_open, open_for_reading
from ..errors import DataFormatError, InvalidInputError, LimitError, OutputError
from .dicom import (
    DICOMDIR_REASON,
    MEDIA_DIRECTORY_STORAGE,
    _META_HEAD_BYTES,
    _file_meta_elements,
    _open_without_waiting,
    _uid_text,
)

__all__ = ["read_rle_csv", "write_rle_csv", "check_csv_image_ids", "find_dicoms", "DicomIndex", "find_dicom_files",
           "DicomFiles"]

_HEADERS = {("imageid", "encodedpixels")}
# What the native decoder accepts, and nothing else: ASCII digits separated by ASCII whitespace,
# or a lone -1. (str.isdigit and str.split would also take Arabic digits and no-break spaces.)
_RLE_TEXT = re.compile(r"[ \t\n\r\f\v]*(?:-1|[0-9]+(?:[ \t\n\r\f\v]+[0-9]+)*)?[ \t\n\r\f\v]*", re.ASCII)
_RLE_TOKEN = re.compile(r"[^ \t\n\r\f\v]+", re.ASCII)
_LINE_END = re.compile(r"\r\n|\r|\n")


def _bad_id(image_id: str) -> str | None:
    """Why an ImageId cannot be stored in the CSV layout, or None."""
    if not image_id:
        return "it is empty"
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in image_id):
        return "it contains a control character (newline, NUL, ...)"
    if "," in image_id or '"' in image_id:
        return "it contains a comma or a double quote"
    if any(unicodedata.category(ch) == "Cs" for ch in image_id):  # os.fsdecode's escapes of undecodable bytes
        return "it is not valid UTF-8 text (a file name with undecodable bytes?)"
    if image_id != image_id.strip():
        return "it starts or ends with whitespace"
    return None


def check_csv_image_ids(ids: Sequence[str], *, what: str = "ImageId", error: type[Exception] = OutputError) -> None:
    """Refuse, before anything is written, ids a CSV row cannot hold so that it reads back unchanged
    (a comma or a quote would split or shift the row, a line break would start a new one): the rule
    of :func:`write_rle_csv`, for every command that writes ImageIds into a CSV."""
    for image_id in ids:
        if not isinstance(image_id, str):
            raise error(f"{what} {show(image_id)} must be a str, got {type(image_id).__name__}")
        problem = _bad_id(image_id)
        if problem:
            raise error(f"{what} {show(image_id)} cannot be written to a CSV file: {problem}")


def _rle_problem(text: str) -> str | None:
    """Why ``text`` is not an EncodedPixels value the decoder accepts, or None."""
    if _RLE_TEXT.fullmatch(text):
        tokens = text.split()
        if len(tokens) % 2 and tokens != ["-1"]:
            return "EncodedPixels has an odd number of values"
        return None
    odd_space = next((ch for ch in text if ch.isspace() and not ch.isascii()), None)
    if odd_space is not None:  # str.split() would split on it, the decoder does not
        return f"EncodedPixels has a non-ASCII space (U+{ord(odd_space):04X}); use plain spaces"
    for token in _RLE_TOKEN.findall(text):
        if not (token.isascii() and token.isdigit()) and token != "-1":
            return f"EncodedPixels has a bad token {show(token, 30)}"
        if token == "-1":
            return "EncodedPixels has -1 among other values (-1 stands alone, for an empty mask)"
    return "EncodedPixels has characters other than ASCII digits and spaces"  # e.g. a no-break space


def _split_row(line: str, path: Path, line_no: int) -> list[str]:
    """The cells of one CSV line: comma-separated, optionally double-quoted with "" for a quote."""
    if '"' not in line:
        return line.split(",")
    cells: list[str] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] == " ":
            i += 1
        if i < n and line[i] == '"':
            i += 1
            value = []
            while True:
                j = line.find('"', i)
                if j < 0:
                    raise DataFormatError(f"{path}, line {line_no}: unterminated quoted field")
                value.append(line[i:j])
                if j + 1 < n and line[j + 1] == '"':
                    value.append('"')
                    i = j + 2
                    continue
                i = j + 1
                break
            cell = "".join(value)
            j = line.find(",", i)
            rest = line[i:] if j < 0 else line[i:j]
            if rest.strip():
                raise DataFormatError(f"{path}, line {line_no}: text after a closing quote")
        else:
            j = line.find(",", i)
            cell = line[i:] if j < 0 else line[i:j]
        cells.append(cell)
        if j < 0:
            return cells
        i = j + 1


_BOM = b"\xef\xbb\xbf"


def _read_chunks(path: Path) -> Iterator[str]:
    """The file's text one ``\\n``-ended piece at a time (without a leading UTF-8 BOM), so that memory
    follows the longest line, not the file; at most ``limits.max_csv_bytes``, also from a device or
    a pipe, which has no size."""
    if path.is_dir():
        raise DataFormatError(f"{path}: is a folder, not a CSV file")
    limit = limits.current().max_csv_bytes
    with open_for_reading(path) as f:  # a named pipe without a writer is an error, not a wait forever
        st = os.fstat(f.fileno())
        if stat.S_ISREG(st.st_mode):
            try:
                limits.check("max_csv_bytes", st.st_size, f"{path}: a file of {st.st_size:,} bytes")
            except LimitError as exc:
                raise DataFormatError(str(exc)) from None
        total, pieces = 0, 0
        while True:
            try:
                chunk = f.readline(limit + 1 - total)
            except OSError as exc:
                raise DataFormatError(f"{path}: cannot be read ({exc.strerror or exc})") from None
            if not chunk:
                return
            total += len(chunk)
            if total > limit:
                raise DataFormatError(f"{path}: longer than max_csv_bytes ({limit:,} bytes); raise it with "
                                      "pneumoseg.limits.set_limits(max_csv_bytes=...) if the file is right")
            if pieces == 0 and chunk.startswith(_BOM):
                chunk = chunk[len(_BOM):]
            pieces += 1
            try:
                yield chunk.decode("utf-8")  # a line end byte is never inside a UTF-8 sequence
            except UnicodeDecodeError as exc:
                raise DataFormatError(f"{path}: not UTF-8 text (line {pieces}: {exc})") from None


def _read_text(path: Path) -> str:
    """The whole text, read as :func:`read_rle_csv` reads (also used for the scores CSV)."""
    return "".join(_read_chunks(path))


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line (``\\n``, ``\\r\\n`` or ``\\r`` ends), one at a time: the
    whole text, its decoded copy and a list of its lines were 3.4 times the file at peak."""
    line_no = 0
    for text in _read_chunks(path):
        lines = _LINE_END.split(text)
        if text.endswith(("\n", "\r")):
            lines.pop()  # the empty start of the next line
        for line in lines:
            line_no += 1
            yield line_no, line


def _paints_nothing(rle: str) -> bool:
    """Whether a checked, non-empty EncodedPixels has only runs of length 0."""
    tokens = rle.split()
    return tokens != ["-1"] and all(not length.strip("0") for length in tokens[1::2])


def read_rle_csv(path: Union[str, Path]) -> dict[str, list[str]]:
    """ImageId -> its RLE strings (one per annotation; ``["-1"]`` for a negative image), in file order.

    Reads ``train-rle.csv`` (header ``ImageId, EncodedPixels`` with leading spaces, `` -1``),
    ``stage_2_train.csv`` (``ImageId,EncodedPixels``, ``-1``), either with a UTF-8 BOM, any line
    ends (``\\n``, ``\\r\\n``, ``\\r``), quoted cells, and the header-less sample CSV. EncodedPixels is
    checked exactly as the decoder will read it; an empty one, or one whose runs all have length 0
    (it paints nothing), is read as ``"-1"``, so that "not -1" always means a positive image.
    Anything malformed is a :class:`pneumoseg.DataFormatError` naming the file and the line; files
    past ``limits.max_csv_bytes`` are refused before they are read, and the file is read line by
    line (memory follows the result).
    """
    path = check_path(path, "path", error=DataFormatError)
    max_chars = limits.current().max_rle_chars
    out: dict[str, list[str]] = {}

    def bad(line_no: int, problem: str) -> DataFormatError:
        hint = "; a header must be 'ImageId, EncodedPixels'" if line_no == 1 else ""
        return DataFormatError(f"{path}, line {line_no}: {problem}{hint}")

    for line_no, line in _read_lines(path):
        if not line.strip():
            continue
        cells = [cell.strip() for cell in _split_row(line, path, line_no)]
        if line_no == 1 and tuple(c.lower().replace(" ", "") for c in cells) in _HEADERS:
            continue
        if len(cells) != 2:
            raise bad(line_no, f"expected 2 columns (ImageId, EncodedPixels), got {len(cells)}")
        image_id, rle = cells
        if line_no == 1 and image_id.lower().replace(" ", "") == "imageid":
            raise DataFormatError(f"{path}, line 1: unexpected header {line!r}; expected ImageId, EncodedPixels")
        if not image_id:
            raise bad(line_no, "empty ImageId")
        problem = _bad_id(image_id)
        if problem:
            raise bad(line_no, f"ImageId {show(image_id)} is not usable: {problem}")
        if len(rle) > max_chars:
            raise DataFormatError(f"{path}, line {line_no}: EncodedPixels of {len(rle):,} characters is past "
                                  f"max_rle_chars ({max_chars:,})")
        problem = _rle_problem(rle)
        if problem:
            raise bad(line_no, problem)
        out.setdefault(image_id, []).append("-1" if not rle or _paints_nothing(rle) else rle)
    return out


def _format_rle_csv(rles: Mapping[str, Union[str, list[str]]]) -> str:
    """The text of an RLE CSV in the original layout, after checking every id and string."""
    if not isinstance(rles, Mapping):
        raise InvalidInputError(f"rles must be a dict ImageId -> list of RLE strings, got {type(rles).__name__}")
    lines = ["ImageId, EncodedPixels"]
    for image_id, strings in rles.items():
        check_csv_image_ids([image_id], error=InvalidInputError)
        if isinstance(strings, str):
            strings = [strings]
        strings = check_str_sequence(strings, f"rles[{image_id!r}]")
        for i, s in enumerate(strings or ["-1"]):
            problem = _rle_problem(s)
            if problem:
                raise InvalidInputError(f"rles[{image_id!r}][{i}]: {problem}")
            lines.append(f"{image_id}, {' '.join(s.split()) or '-1'}")  # one line, whatever spaces it had
    return "\n".join(lines) + "\n"


def write_rle_csv(path: Union[str, Path], rles: Mapping[str, Union[str, list[str]]]) -> Path:
    """Write in the original ``train-rle.csv`` layout (``ImageId, EncodedPixels``, values with a
    leading space, one row per annotation, `` -1`` for negatives), atomically: the file is complete
    or untouched. A value may be a list of strings (one row each) or one string. Ids and strings
    are checked first so that what is written reads back unchanged with :func:`read_rle_csv`
    (no commas, quotes or line breaks in ids; only what the decoder accepts in strings)."""
    path = check_path(path, "path", error=InvalidInputError)
    text = _format_rle_csv(rles)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give the path of the CSV file to write")
    with atomic_open(path, "w") as f:
        f.write(text)
    return path


class DicomIndex(dict):
    """ImageId -> path, as returned by :func:`find_dicoms`, plus ``skipped``: (path, reason) for
    everything under the folder that looked like a DICOM but was not taken (unreadable folders,
    symbolic-link loops, broken links, DICOM files without a ``.dcm`` suffix)."""

    skipped: list[tuple[Path, str]]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skipped = []


class DicomFiles(list):
    """The DICOM files under a folder, in path order, as returned by :func:`find_dicom_files`, plus
    ``skipped``: (path, reason) as in :class:`DicomIndex`."""

    skipped: list[tuple[Path, str]]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skipped = []


def _head(path: Path, size: int) -> bytes:
    """The first ``size`` bytes of the regular file at ``path``; empty for anything else, or if it
    cannot be read. The scan lists a folder and then opens its files by name: a named pipe without a
    writer, there from the start or swapped in after the listing, made a blocking open wait forever.
    Open, fstat, read, close: fewer system calls than ``open()`` makes for a file object."""
    try:
        fd = _open_without_waiting(path)
    except OSError:
        return b""
    try:
        return os.read(fd, size) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    except OSError:
        return b""
    finally:
        os.close(fd)


def _is_dicom_head(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def _is_dicomdir_head(head: bytes) -> bool:
    """Whether a DICOM file not named DICOMDIR (the name PS3.10 gives it) is one all the same, by the
    MediaStorageSOPClassUID (0002,0002) of its file meta group, walked in the file's first bytes."""
    value = _file_meta_elements(head)[0].get(0x0002)
    return value is not None and _uid_text(value) == MEDIA_DIRECTORY_STORAGE


def find_dicom_files(root: Union[str, Path], *, require_suffix: bool = True) -> DicomFiles:
    """Every ``*.dcm`` file (any case: ``.DCM`` too) under ``root``, at any depth, in path order;
    with ``require_suffix=False`` also every other file that is DICOM by its ``DICM`` preamble
    (``IM0001``, ``00000001``, ``1.2.840....``: PACS exports and DICOM media name files so), except
    a DICOMDIR, which is listed in ``skipped``. Files that are not DICOM are passed over in silence.

    Symbolic links to folders are followed, each real folder visited once (so link loops end), and
    each real file taken once. What was passed over is listed in the result's ``skipped``: folders
    that could not be read, link loops and repeats, broken links, ``*.dcm`` entries that are not
    regular files (pipes, sockets, devices) and, with ``require_suffix=True``, files that are DICOM
    but lack the ``.dcm`` suffix."""
    root = check_path(root, "root", error=DataFormatError)
    if not root.is_dir():
        raise DataFormatError(f"{root}: not a folder")
    files = DicomFiles()
    seen_files: dict[tuple[int, int], Path] = {}
    visited: dict[tuple[int, int], Path] = {}

    stack: list[Iterator[os.DirEntry]] = []  # an explicit stack: a deep folder cannot exhaust recursion

    def enter(folder: Path) -> None:
        try:
            st = folder.stat()
        except OSError as exc:
            files.skipped.append((folder, f"cannot be read ({exc.strerror or exc})"))
            return
        key = (st.st_dev, st.st_ino)
        if key in visited:
            files.skipped.append((folder, f"the same folder as {visited[key]} (a symbolic link), scanned once"))
            return
        visited[key] = folder
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            files.skipped.append((folder, f"cannot be read ({exc.strerror or exc})"))
            return
        stack.append(iter(entries))

    enter(root)
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        p = Path(entry.path)
        try:
            is_dir = entry.is_dir()  # follows links
            is_file = entry.is_file()
        except OSError as exc:
            files.skipped.append((p, f"cannot be read ({exc.strerror or exc})"))
            continue
        if is_dir:
            enter(p)
        elif is_file:
            if p.suffix.lower() != ".dcm":
                if require_suffix and p.suffix:
                    continue
                # one read for both questions: a DICOMDIR is told by its file meta group only here
                head = _head(p, 132 if require_suffix else _META_HEAD_BYTES)
                if not _is_dicom_head(head):
                    continue
                if p.name.upper() == "DICOMDIR" or (not require_suffix and _is_dicomdir_head(head)):
                    files.skipped.append((p, DICOMDIR_REASON))
                    continue
                if require_suffix:
                    files.skipped.append((p, "a DICOM file without the .dcm suffix"))
                    continue
            file_st = entry.stat()
            file_key = (file_st.st_dev, file_st.st_ino)
            if file_key in seen_files:
                files.skipped.append((p, f"the same file as {seen_files[file_key]} (a link)"))
                continue
            seen_files[file_key] = p
            files.append(p)
        elif entry.is_symlink() and not p.exists():
            files.skipped.append((p, "a broken symbolic link"))
        elif p.suffix.lower() == ".dcm":
            files.skipped.append((p, "not a regular file (a pipe, socket or device)"))
    files.sort()
    return files


def dicom_file_image_id(path: Path) -> str:
    """The ImageId a DICOM file's name gives: without the ``.dcm`` suffix (Kaggle names files
    ``<SOPInstanceUID>.dcm``), or the whole name of a file without it (``IM0001``)."""
    return path.stem if path.suffix.lower() == ".dcm" else path.name


def find_dicoms(root: Union[str, Path], *, require_suffix: bool = True) -> DicomIndex:
    """ImageId -> path for every ``*.dcm`` file (any case: ``.DCM`` too) under ``root``: the Kaggle
    nested layout (``dicom-images-train/<study>/<series>/<ImageId>.dcm``) and flat folders alike.

    The ImageId is the file name without its suffix (Kaggle names files by SOPInstanceUID), and two
    different files with one ImageId are an error. ``require_suffix=False`` also takes DICOM files
    without the suffix, named by their whole file name. The folders are walked, and what was passed
    over listed in ``skipped``, as :func:`find_dicom_files` does.
    """
    files = find_dicom_files(root, require_suffix=check_bool(require_suffix, "require_suffix"))
    root = Path(os.fspath(root))
    index = DicomIndex()
    index.skipped = files.skipped
    for p in files:
        image_id = dicom_file_image_id(p)
        if image_id in index:
            raise DataFormatError(f"{root}: ImageId {image_id} appears twice: {index[image_id]} and {p}")
        index[image_id] = p
    return index
