"""Reading chest radiographs from DICOM: the SIIM-ACR files (8-bit, MONOCHROME2, JPEG baseline) and
other hospitals' 12-16 bit images (MONOCHROME1, rescale slope/intercept, VOI LUT and windows)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..errors import DicomError

__all__ = ["DicomImage", "read_dicom"]


@dataclass
class DicomImage:
    """One radiograph. ``pixels`` is (H, W): rescaled (slope/intercept) and, for MONOCHROME1, inverted
    so that higher always means brighter (denser); ``raw`` holds the stored values for ``window``."""

    pixels: np.ndarray
    image_id: str
    meta: dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None
    _dataset: Any = field(default=None, repr=False)

    def window(self, center: Optional[float] = None, width: Optional[float] = None) -> np.ndarray:
        """The image through its VOI LUT or window as float32 in [0, 1] (1 = bright). Without arguments
        the file's own VOI LUT / first window is used, or the full range when it has none."""
        if center is not None and width is not None:
            if width <= 0:
                raise ValueError(f"window width must be positive, got {width}")
            low, high = center - width / 2.0, center + width / 2.0
            img = np.clip((self.pixels.astype(np.float64) - low) / (high - low), 0.0, 1.0)
            return img.astype(np.float32)
        ds = self._dataset
        if ds is not None and ("VOILUTSequence" in ds or "WindowCenter" in ds):
            from pydicom.pixels import apply_voi_lut

            raw = ds.pixel_array
            img = apply_voi_lut(raw, ds).astype(np.float64)
            if self.meta.get("photometric_interpretation") == "MONOCHROME1":
                img = img.max() - img
        else:
            img = self.pixels.astype(np.float64)
        low, high = float(img.min()), float(img.max())
        return ((img - low) / (high - low if high > low else 1.0)).astype(np.float32)


def _number(value: Any) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


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


def read_dicom(path: Union[str, Path], *, with_dataset: bool = True) -> DicomImage:
    """Read one DICOM file. Decodes uncompressed files and JPEG baseline (the SIIM files) with the
    installed dependencies, JPEG 2000 / JPEG-LS where their pydicom handler is installed. Any failure
    is a :class:`pneumoseg.DicomError` naming the file and the cause."""
    path = Path(path)
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise DicomError(f"{path}: pydicom is not installed") from exc
    if not path.is_file():
        raise DicomError(f"{path}: no such file")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path)
        for w in caught:  # pydicom reads a cut-off file with a warning; for us it is an error
            if "end of file" in str(w.message).lower():
                raise DicomError(f"{path}: the file is truncated ({w.message})")
    except DicomError:
        raise
    except InvalidDicomError as exc:
        raise DicomError(f"{path}: not a DICOM file ({exc})") from exc
    except Exception as exc:  # truncated headers and the like
        raise DicomError(f"{path}: unreadable DICOM header ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds:
        raise DicomError(f"{path}: the file has no pixel data")
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown"))
    try:
        raw = ds.pixel_array
    except Exception as exc:
        # pydicom's message says whether a decoder plugin is missing or the data is damaged.
        first_line = (str(exc).splitlines() or [""])[0]
        raise DicomError(
            f"{path}: pixel data could not be decoded (transfer syntax {syntax}): {type(exc).__name__}: {first_line}"
        ) from exc
    if raw.ndim != 2:
        raise DicomError(f"{path}: expected a single 2-D image, got pixel data of shape {raw.shape}")
    slope = _number(ds.get("RescaleSlope", 1.0)) or 1.0
    intercept = _number(ds.get("RescaleIntercept", 0.0)) or 0.0
    pixels = raw
    if slope != 1.0 or intercept != 0.0:
        pixels = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric == "MONOCHROME1":  # stored inverted: make high values bright like MONOCHROME2
        pixels = pixels.max() + pixels.min() - pixels
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    meta = {
        "age": _age(ds.get("PatientAge")),
        "sex": str(ds.get("PatientSex", "")).strip() or None,
        "view_position": str(ds.get("ViewPosition", "")).strip() or None,
        "pixel_spacing": tuple(float(v) for v in spacing) if spacing else None,
        "modality": str(ds.get("Modality", "")).strip() or None,
        "body_part": str(ds.get("BodyPartExamined", "")).strip() or None,
        "photometric_interpretation": photometric,
        "bits_stored": int(ds.get("BitsStored", raw.dtype.itemsize * 8)),
        "transfer_syntax": syntax,
        "rescale": (slope, intercept),
    }
    image_id = str(ds.get("SOPInstanceUID", "")) or path.stem
    return DicomImage(pixels=pixels, image_id=image_id, meta=meta, path=path, _dataset=ds if with_dataset else None)
