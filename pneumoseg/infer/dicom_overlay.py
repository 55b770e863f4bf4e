"""A predicted mask burned into its radiograph as a DICOM Secondary Capture image, for the PACS viewers
that do not draw DICOM Segmentations: the picture pneumoseg's PNG overlays show (the source's pixels
through its own window, the mask tinted and outlined in red) with a caption at the top left, in a new
series of the source's study, so that any viewer shows it. Built with highdicom (the ``pacs`` extra).

RGB, 8 bits: a red outline stays apart from bright anatomy, where a white one (MONOCHROME2) is lost on
ribs, the diaphragm and the lung edge it follows; and it is the PNG overlay's own picture, pixel for
pixel. Uncompressed (Explicit VR Little Endian), which every PACS accepts: a lossy syntax would smear
the one-pixel outline.

Privacy: as the Segmentation (see :mod:`._dicom_derived`), highdicom is given no patient data and only
:data:`PATIENT_AND_STUDY` is copied, as the source's bytes. The picture itself holds the source's
pixels, and whatever the source had burned into them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .._checks import check_path, check_probability, show
from ..errors import DicomError, InvalidInputError
from ._dicom_derived import (PATIENT_AND_STUDY, check_common_arguments, check_expected_uid, check_image, check_mask,
                             copy_identity, copy_raw, highdicom_error, require_highdicom, save_dicom, write_atomically)

__all__ = ["build_dicom_overlay", "write_dicom_overlay", "default_caption", "PATIENT_AND_STUDY",
           "SECONDARY_CAPTURE_STORAGE", "NOT_FOR_DIAGNOSTIC_USE"]

SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"

# A lossy-compressed source makes its derived image lossy too (General Image: once "01", never reset)
_LOSSY = ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod")
_CAPTION_LIMIT = 400  # characters: a caption, not a report
_WHAT = "a Secondary Capture overlay"


def default_caption(score: Optional[float] = None, version: Optional[str] = None) -> str:
    """"pneumoseg <version>: pneumothorax, score 0.93" and, on a second line, "NOT FOR DIAGNOSTIC USE"."""
    from .. import __version__

    first = f"pneumoseg {__version__ if version is None else version}: pneumothorax"
    if score is not None:
        first += f", score {check_probability(score, 'score'):.2f}"
    return f"{first}\n{NOT_FOR_DIAGNOSTIC_USE}"


def build_dicom_overlay(mask: Any, source: Any, *, score: Optional[float] = None, caption: Optional[str] = None,
                        allow_empty: bool = False, series_number: int = 9001, instance_number: int = 1,
                        series_description: str = "pneumoseg overlay", manufacturer: str = "pneumoseg",
                        manufacturer_model_name: str = "pneumoseg", software_versions: Optional[str] = None,
                        device_serial_number: str = "0", series_instance_uid: Optional[str] = None,
                        sop_instance_uid: Optional[str] = None, expect_sop_instance_uid: Optional[str] = None) -> Any:
    """``mask`` burned into ``source`` as a DICOM Secondary Capture image (a ``highdicom.sc.SCImage``,
    a pydicom Dataset ready for ``save_as``); :func:`write_dicom_overlay` writes one.

    ``mask`` is a (H, W) array of 0 and 1 at the source's size, lined up with its pixel array (a
    :class:`Prediction`'s ``mask``). ``source`` is the DICOM it was predicted from: a path, or a
    :class:`pneumoseg.data.DicomImage` read with its dataset (``read_dicom(path)``), whose pixels are
    then not read again.

    The image is RGB, 8 bits, Rows x Columns of the source: the source's pixels through its own VOI LUT
    or window (the full range where it has none or a broken one), the mask tinted and outlined in red
    exactly as the PNG overlays of ``pneumoseg predict`` (:func:`pneumoseg.infer.overlay.overlay`), and
    ``caption`` burned in at the top left in Pillow's default font, white on black; by default
    :func:`default_caption` of ``score`` (a probability, or None for no score), which says NOT FOR
    DIAGNOSTIC USE: a caption given replaces it whole, that line included. The caption is drawn into
    the pixels for anyone who opens the study to read: it must hold no patient data.

    It is a new series of the source's study (``series_description``, a new SeriesInstanceUID unless
    given), ImageType DERIVED\\SECONDARY, BurnedInAnnotation YES, ConversionType WSD (workstation),
    referencing the source as the image it was derived from (SourceImageSequence) and in its Common
    Instance Reference. Of the source's description of the image it keeps PatientOrientation,
    BodyPartExamined, Laterality and its lossy-compression history; of the patient and study, the
    identity a PACS files it by (:data:`PATIENT_AND_STUDY`), nothing more.

    An empty mask is refused unless ``allow_empty=True``. Bad arguments are an
    :class:`pneumoseg.InvalidInputError`; a source that cannot be read or is not a single grey-level
    image is a :class:`pneumoseg.DicomError` naming it, as is one whose SOPInstanceUID is not
    ``expect_sop_instance_uid`` when given (a Prediction's ``source_uid``: the file re-read now holds
    another image than the one predicted), as :func:`pneumoseg.infer.dicom_seg.build_dicom_seg`."""
    hd = require_highdicom("DICOM overlay output")
    from pydicom.dataset import Dataset

    from ..data.dicom import _damaged_header_errors, _header_text
    from .overlay import display_grey, overlay

    allow_empty, series_number, instance_number, texts = check_common_arguments(
        allow_empty=allow_empty, series_number=series_number, instance_number=instance_number,
        series_instance_uid=series_instance_uid, sop_instance_uid=sop_instance_uid,
        series_description=series_description, manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name, device_serial_number=device_serial_number,
        software_versions=software_versions)
    score = None if score is None else check_probability(score, "score")  # checked with a caption given too
    lines = _caption_lines(default_caption(score, texts["software_versions"]) if caption is None else caption)
    image, where = _source_image(source)
    header = image._dataset
    # identity first: another image in the file is that, whatever its size or header
    check_expected_uid(header, where, expect_sop_instance_uid, _WHAT)
    rows, columns = check_image(header, where, _WHAT)
    m = check_mask(mask, (rows, columns), where, allow_empty, "an overlay without a finding")
    if tuple(image.pixels.shape) != (rows, columns):  # a DicomImage whose pixels are not its header's
        raise InvalidInputError(f"{where}: its pixels are {image.pixels.shape}, its header says {rows}x{columns}")

    grey, _ = display_grey(image)  # a broken window: the full range, as the PNG overlays
    rgb = overlay(grey, m)
    _burn_caption(rgb, lines)
    with _damaged_header_errors(Path(where)):
        uids = {k: _header_text(header, k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                                      "SeriesInstanceUID")}
    try:
        sc = hd.sc.SCImage(
            pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
            # PATIENT needs an orientation, which highdicom checks against its letters; the source's own
            # (any, or none) replaces this one below
            coordinate_system="PATIENT", patient_orientation=("L", "F"),
            study_instance_uid=uids["StudyInstanceUID"], series_instance_uid=series_instance_uid or hd.UID(),
            series_number=series_number, sop_instance_uid=sop_instance_uid or hd.UID(),
            instance_number=instance_number, manufacturer=texts["manufacturer"],
            manufacturer_model_name=texts["manufacturer_model_name"], software_versions=texts["software_versions"],
            device_serial_number=texts["device_serial_number"], series_description=texts["series_description"],
            transfer_syntax_uid="1.2.840.10008.1.2.1")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise highdicom_error(exc, where, _WHAT) from None
    if not copy_raw(header, sc, "PatientOrientation"):  # General Image, Type 2C: the source's rows and columns
        sc.PatientOrientation = None
    sc.ConversionType = "WSD"  # made on a workstation from another image, not digitised (highdicom's DI)
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = ("pneumothorax outline and caption by pneumoseg "
                                f"{texts['software_versions']} burned into the source")
    for keyword in _LOSSY:
        copy_raw(header, sc, keyword)
    # General Series' Laterality (Type 2C) is required unless the body part is known to be unpaired:
    # the source's body part and laterality, else empty (unknown)
    if not (copy_raw(header, sc, "BodyPartExamined") | copy_raw(header, sc, "Laterality")):
        sc.Laterality = None
    # The source: the image this one is derived from (General Reference) and, as an instance this one
    # references, in the Common Instance Reference module (Type 1C: required once anything is referenced)
    purpose = hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")
    source_item = Dataset()
    source_item.ReferencedSOPClassUID = uids["SOPClassUID"]
    source_item.ReferencedSOPInstanceUID = uids["SOPInstanceUID"]
    source_item.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [source_item]
    instance = Dataset()
    instance.ReferencedSOPClassUID = uids["SOPClassUID"]
    instance.ReferencedSOPInstanceUID = uids["SOPInstanceUID"]
    series = Dataset()
    series.SeriesInstanceUID = uids["SeriesInstanceUID"]
    series.ReferencedInstanceSequence = [instance]
    sc.ReferencedSeriesSequence = [series]
    copy_identity(header, sc)  # last: it settles how the raw elements copied above are written
    return sc


def write_dicom_overlay(path: Union[str, Path], mask: Any, source: Any, **options: Any) -> Path:
    """:func:`build_dicom_overlay` written to ``path`` atomically: a failure leaves no partial file, and
    an existing file is replaced only by a complete one."""
    return write_atomically(path, lambda: build_dicom_overlay(mask, source, **options), save_dicom_overlay)


#: Write an overlay (from :func:`build_dicom_overlay`) to an open binary file as a DICOM file.
save_dicom_overlay = save_dicom


def _source_image(source: Any) -> tuple[Any, str]:
    """(the source as a DicomImage with its dataset, how messages name it)."""
    from ..data.dicom import DicomImage, read_dicom

    if isinstance(source, DicomImage):
        if source._dataset is None:
            raise InvalidInputError("source is a DicomImage read without its dataset (with_dataset=False): the "
                                    "overlay needs its header; read it with read_dicom(path)")
        return source, str(source.path) if source.path is not None else f"source image {source.image_id}"
    if not isinstance(source, (str, Path)):
        raise InvalidInputError(f"source must be a DICOM file's path or a DicomImage (read_dicom), got "
                                f"{type(source).__name__}")
    path = check_path(source, "source", error=DicomError)
    return read_dicom(path), str(path)


def _caption_lines(caption: Any) -> list[str]:
    if not isinstance(caption, str) or not caption.strip() or len(caption) > _CAPTION_LIMIT:
        raise InvalidInputError(f"caption must be a non-empty str of at most {_CAPTION_LIMIT} characters, "
                                f"got {show(caption)}")
    lines = caption.split("\n")
    if not all(line.isprintable() for line in lines):
        raise InvalidInputError(f"caption must be printable text (lines separated by '\\n'), got {show(caption)}")
    return lines


def _burn_caption(rgb: np.ndarray, lines: list[str]) -> None:
    """``lines`` drawn into ``rgb`` (H, W, 3 uint8) at the top left, white on a black box, in Pillow's
    default font at a size that follows the image (about 18 px at 1024 x 1024)."""
    from PIL import Image, ImageDraw, ImageFont

    rows, columns = rgb.shape[:2]
    size = max(8, round(min(rows, columns) / 56))
    font: Any
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow before 10.1 or without FreeType: its bitmap font
        font = ImageFont.load_default()
    picture = Image.fromarray(rgb)
    draw = ImageDraw.Draw(picture)
    pad = max(2, size // 3)
    text = "\n".join(lines)
    _, _, right, bottom = draw.multiline_textbbox((pad, pad), text, font=font, spacing=pad)
    draw.rectangle((0, 0, right + pad, bottom + pad), fill=(0, 0, 0))
    draw.multiline_text((pad, pad), text, font=font, fill=(255, 255, 255), spacing=pad)
    rgb[...] = np.asarray(picture)
