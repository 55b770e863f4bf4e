"""The SIIM-ACR Kaggle layouts: ``train-rle.csv`` / ``stage_2_train.csv`` and the DICOM folders."""

from __future__ import annotations

import csv
import io
from collections import OrderedDict
from pathlib import Path
from typing import Union

from ..errors import DataFormatError

__all__ = ["read_rle_csv", "write_rle_csv", "find_dicoms"]

_HEADERS = {("imageid", "encodedpixels")}


def read_rle_csv(path: Union[str, Path]) -> dict[str, list[str]]:
    """ImageId -> its RLE strings (one per annotation; ``["-1"]`` for a negative image), in file order.

    Reads ``train-rle.csv`` (header ``ImageId, EncodedPixels`` with leading spaces, `` -1``),
    ``stage_2_train.csv`` (``ImageId,EncodedPixels``, ``-1``), either with a UTF-8 BOM, and the
    header-less sample CSV. A malformed row is a :class:`pneumoseg.DataFormatError` naming its line.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DataFormatError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: not UTF-8 text ({exc})") from None
    out: "OrderedDict[str, list[str]]" = OrderedDict()
    reader = csv.reader(io.StringIO(text))
    for line_no, row in enumerate(reader, start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        cells = [cell.strip() for cell in row]
        if line_no == 1 and tuple(c.lower().replace(" ", "") for c in cells) in _HEADERS:
            continue
        if len(cells) != 2:
            raise DataFormatError(f"{path}, line {line_no}: expected 2 columns (ImageId, EncodedPixels), got {len(cells)}")
        image_id, rle = cells
        if not image_id:
            raise DataFormatError(f"{path}, line {line_no}: empty ImageId")
        if line_no == 1 and image_id.lower().replace(" ", "") == "imageid":
            raise DataFormatError(f"{path}, line 1: unexpected header {row!r}; expected ImageId, EncodedPixels")
        tokens = rle.split()
        if tokens != ["-1"] and not all(t.isdigit() for t in tokens):
            bad = next(t for t in tokens if not t.isdigit())
            raise DataFormatError(f"{path}, line {line_no}: EncodedPixels has a bad token {bad!r}")
        if len(tokens) % 2 and tokens != ["-1"]:
            raise DataFormatError(f"{path}, line {line_no}: EncodedPixels has an odd number of values")
        out.setdefault(image_id, []).append(rle if rle else "-1")
    return dict(out)


def write_rle_csv(path: Union[str, Path], rles: dict[str, list[str]]) -> Path:
    """Write in the original ``train-rle.csv`` layout (``ImageId, EncodedPixels``, values with a
    leading space, one row per annotation, `` -1`` for negatives); atomically."""
    path = Path(path)
    lines = ["ImageId, EncodedPixels"]
    for image_id, strings in rles.items():
        for s in strings or ["-1"]:
            lines.append(f"{image_id}, {s}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def find_dicoms(root: Union[str, Path]) -> dict[str, Path]:
    """ImageId -> path for every ``*.dcm`` under ``root``: the Kaggle nested layout
    (``dicom-images-train/<study>/<series>/<ImageId>.dcm``) and flat folders alike. The ImageId is the
    file name (Kaggle names files by SOPInstanceUID); two files with one ImageId are an error."""
    root = Path(root)
    if not root.is_dir():
        raise DataFormatError(f"{root}: not a folder")
    found: dict[str, Path] = {}
    for p in sorted(root.rglob("*.dcm")):
        if p.is_file():
            image_id = p.stem
            if image_id in found:
                raise DataFormatError(f"{root}: ImageId {image_id} appears twice: {found[image_id]} and {p}")
            found[image_id] = p
    return found
