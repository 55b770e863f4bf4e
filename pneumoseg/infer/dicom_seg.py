"""A predicted mask as a DICOM Segmentation (SEG, binary) that a PACS files beside its source image and
a viewer (OHIF, 3D Slicer) draws over it, built with highdicom (the ``pacs`` extra).

Privacy: a SEG must carry its source's patient and study identity, or no PACS can file it. highdicom,
given the source, copies the whole Patient and Study modules (free text such as StudyDescription,
physicians, patient history) and quotes a name it finds odd in a warning. So highdicom is given a
header without any patient data (UIDs, size, geometry), and the identity a SEG needs is then copied
here, element for element and unconverted: :data:`PATIENT_AND_STUDY` names all of it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .._checks import as_numpy_array, check_array_object, check_bool, check_int, check_path, show
from ..errors import DicomError, InvalidInputError

__all__ = ["build_dicom_seg", "write_dicom_seg", "require_highdicom", "PATIENT_AND_STUDY", "SEGMENTATION_STORAGE"]

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

#: What a SEG copies of its source's patient and study: the Type 1 and 2 attributes of the Patient and
#: General Study modules (what files it into the study), and IssuerOfPatientID, which says whose
#: PatientID it is. Nothing else of the source's patient, study or free text reaches the SEG.
PATIENT_AND_STUDY = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)

# The Type 2 ones highdicom reads from the source itself: present and empty in the header it is given.
_EMPTY_FOR_HIGHDICOM = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "ReferringPhysicianName", "StudyID", "AccessionNumber")

# Where the source sits in a patient frame of reference: all of these or the SEG is placed pixel for pixel.
_PATIENT_FRAME = ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                  "SliceThickness")
_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# No SpecificCharacterSet: the skeleton holds no text that needs one, and highdicom refuses the
# multi-valued ISO 2022 form (an empty first value, as Japanese and Korean sources write it); the
# source's is set with the identity it describes (_copy_identity).
_HEADER = ("Modality", "Rows", "Columns", "LossyImageCompression", "LossyImageCompressionRatio",
           "LossyImageCompressionMethod")
_FRAME_EXTRA = ("PositionReferenceIndicator", "SpacingBetweenSlices")

_INSTALL = "pip install 'pneumoseg[pacs]'"


def require_highdicom() -> Any:
    """The highdicom module, or an :class:`pneumoseg.InvalidInputError` saying how to install it."""
    try:
        import highdicom
    except ImportError:
        raise InvalidInputError(f"DICOM Segmentation output needs highdicom, which is not installed: {_INSTALL}") from None
    return highdicom


def build_dicom_seg(mask: Any, source: Any, *, allow_empty: bool = False, series_number: int = 9000,
                    instance_number: int = 1, series_description: str = "pneumoseg pneumothorax",
                    manufacturer: str = "pneumoseg", manufacturer_model_name: str = "pneumoseg",
                    software_versions: Optional[str] = None, device_serial_number: str = "0",
                    algorithm_parameters: Optional[Mapping[str, str]] = None,
                    series_instance_uid: Optional[str] = None, sop_instance_uid: Optional[str] = None) -> Any:
    """A binary DICOM Segmentation of ``mask`` over ``source``, as a pydicom Dataset (a
    ``highdicom.seg.Segmentation``) ready for ``save_as``; :func:`write_dicom_seg` writes one.

    ``mask`` is a (H, W) array of 0 and 1 (bool or integers) at the source's size, lined up with its
    pixel array as pydicom gives it (rows = Rows): a :class:`Prediction`'s ``mask``. ``source`` is the
    DICOM it was predicted from: a path or a pydicom Dataset (its header is enough).

    The SEG is a new series of the source's study (a new SeriesInstanceUID unless given) with one
    segment, "Pneumothorax" (SNOMED CT 49755003 Morphologically abnormal structure / 36118008
    Pneumothorax), AUTOMATIC, by algorithm "pneumoseg" (family Artificial Intelligence, version
    ``software_versions``, default pneumoseg's version, with ``algorithm_parameters``). It references
    the source image; where the source has a patient frame of reference (FrameOfReferenceUID, image
    position and orientation, PixelSpacing, SliceThickness) the SEG is placed in it, otherwise (the
    SIIM files: Secondary Capture, no frame of reference) it maps pixel for pixel onto the source.
    It copies the source's patient and study identity (:data:`PATIENT_AND_STUDY`), nothing more.

    An empty mask is refused unless ``allow_empty=True``, which writes a SEG whose one segment is
    empty (a "looked, found nothing" record). A mask of the wrong shape or with values other than 0
    and 1 is an :class:`pneumoseg.InvalidInputError`; a source that cannot be read or is not a single
    grey-level image is a :class:`pneumoseg.DicomError` naming it."""
    hd = require_highdicom()
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes

    from .. import __version__
    from ..data.dicom import _damaged_header_errors

    allow_empty = check_bool(allow_empty, "allow_empty")
    series_number = check_int(series_number, "series_number", low=1, high=2**31 - 1)
    instance_number = check_int(instance_number, "instance_number", low=1, high=2**31 - 1)
    texts = {"series_description": series_description, "manufacturer": manufacturer,
             "manufacturer_model_name": manufacturer_model_name, "device_serial_number": device_serial_number,
             "software_versions": __version__ if software_versions is None else software_versions}
    for name, text in texts.items():  # LO: at most 64 characters, no backslash (a value separator)
        if not isinstance(text, str) or not text or len(text) > 64 or "\\" in text:
            raise InvalidInputError(f"{name} must be a non-empty str of at most 64 characters without '\\', got {show(text)}")
    parameters = _parameters(algorithm_parameters)
    for name, uid in (("series_instance_uid", series_instance_uid), ("sop_instance_uid", sop_instance_uid)):
        if uid is not None and not _is_uid(uid):
            raise InvalidInputError(f"{name} must be a UID (digits separated by dots, at most 64 characters), "
                                    f"got {show(uid)}")
    header, where = _source_header(source)
    rows, columns = _check_image(header, where)
    pixels = _check_mask(mask, (rows, columns), where, allow_empty)

    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Pneumothorax",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Pneumothorax,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="pneumoseg", family=codes.cid7162.ArtificialIntelligence, version=texts["software_versions"],
            parameters=parameters))
    # What highdicom is given of the source: no patient data (see the module's docstring)
    skeleton = Dataset()
    patient_frame = all(_present(header, k) for k in _PATIENT_FRAME)
    with _damaged_header_errors(Path(where)):
        for keyword in (*_UIDS, *_HEADER, *((*_PATIENT_FRAME, *_FRAME_EXTRA) if patient_frame else ())):
            if keyword in header:
                skeleton[keyword] = header[keyword]
    for keyword in _EMPTY_FOR_HIGHDICOM:
        setattr(skeleton, keyword, None)
    try:
        seg = hd.seg.Segmentation(
            source_images=[skeleton], pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description],
            series_instance_uid=series_instance_uid or hd.UID(), series_number=series_number,
            sop_instance_uid=sop_instance_uid or hd.UID(), instance_number=instance_number,
            manufacturer=texts["manufacturer"], manufacturer_model_name=texts["manufacturer_model_name"],
            software_versions=texts["software_versions"], device_serial_number=texts["device_serial_number"],
            series_description=texts["series_description"], content_label="PNEUMOTHORAX",
            content_description="pneumothorax predicted by pneumoseg",
            omit_empty_frames=not allow_empty)  # with allow_empty, the one frame is written empty on purpose
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        # highdicom saw no patient data, so its message quotes none
        first = (str(exc).splitlines() or [""])[0][:200]
        raise DicomError(f"{where}: highdicom cannot derive a Segmentation from it ({type(exc).__name__}: {first})") from None
    if not patient_frame:
        # General Image's PatientOrientation (Type 2C) is required of a SEG without a plane orientation;
        # pixel for pixel on its source, the source's row and column directions are the SEG's
        with _damaged_header_errors(Path(where)):
            seg.PatientOrientation = header.get("PatientOrientation") or None
    _copy_identity(header, seg)
    return seg


def _copy_identity(header: Any, seg: Any) -> None:
    """:data:`PATIENT_AND_STUDY` from ``header`` into ``seg``, in place of highdicom's empty values. An
    element read from a file is copied as its bytes and written as they are: converted, pydicom would
    validate it and warn, quoting the value (a name, a date) in the warning, and the caller's filters
    may make that an error. Its bytes are in the source's character set, which the SEG has too."""
    from pydicom.charset import convert_encodings, default_encoding
    from pydicom.datadict import dictionary_VR
    from pydicom.filewriter import correct_ambiguous_vr

    for keyword in PATIENT_AND_STUDY:
        if keyword in seg:
            del seg[keyword]
        elem = header.get_item(keyword)
        if elem is None:
            if keyword in _EMPTY_FOR_HIGHDICOM:  # Type 2: present, empty, where the source has none
                setattr(seg, keyword, None)
            continue
        if elem.is_raw and elem.VR in (None, "UN"):  # read with implicit VR: the SEG's explicit VR needs one
            elem = elem._replace(VR=dictionary_VR(elem.tag))
        seg[elem.tag] = elem
    if "SpecificCharacterSet" in header:  # the bytes' own
        seg.SpecificCharacterSet = header.SpecificCharacterSet
    # Told it was read in the encoding it is written in, pydicom writes raw elements as they are instead
    # of converting every element; the one thing it did on that path is then done here: settling
    # highdicom's 'OB or OW' pixel data.
    charset = seg.get("SpecificCharacterSet")
    syntax = seg.file_meta.TransferSyntaxUID
    correct_ambiguous_vr(seg, syntax.is_little_endian)
    seg.set_original_encoding(syntax.is_implicit_VR, syntax.is_little_endian,
                              convert_encodings(charset) if charset else default_encoding)


def write_dicom_seg(path: Union[str, Path], mask: Any, source: Any, **options: Any) -> Path:
    """:func:`build_dicom_seg` written to ``path`` atomically: a failure leaves no partial file, and an
    existing file is replaced only by a complete one."""
    from .._fs import atomic_open

    target = check_path(path, "path")
    seg = build_dicom_seg(mask, source, **options)
    with atomic_open(target, "wb") as f:
        save_dicom_seg(seg, f)
    return target


def save_dicom_seg(seg: Any, f: Any) -> None:
    """Write ``seg`` (from :func:`build_dicom_seg`) to the open binary file ``f`` as a DICOM file."""
    seg.save_as(f, enforce_file_format=True)


def _parameters(parameters: Optional[Mapping[str, str]]) -> Optional[dict[str, str]]:
    if parameters is None:
        return None
    if not isinstance(parameters, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in parameters.items()):
        raise InvalidInputError(f"algorithm_parameters must be a mapping of str to str, got {show(parameters)}")
    return dict(parameters) or None


def _source_header(source: Any) -> tuple[Any, str]:
    """(the source's header as a pydicom Dataset, how messages name it)."""
    from pydicom.dataset import Dataset

    if isinstance(source, Dataset):
        where = f"source dataset {source.filename}" if isinstance(getattr(source, "filename", None), str) else "source dataset"
        return source, where
    if not isinstance(source, (str, Path)):
        raise InvalidInputError(f"source must be a DICOM file's path or a pydicom Dataset, got {type(source).__name__}")
    from ..data.dicom import _open_dicom, _read_dataset

    path = check_path(source, "source", error=DicomError)
    with _open_dicom(path) as f:
        return _read_dataset(f, path, stop_before_pixels=True), str(path)


def _check_image(header: Any, where: str) -> tuple[int, int]:
    """(Rows, Columns) of a single grey-level image with the UIDs a SEG references; else a DicomError."""
    from ..data.dicom import _damaged_header_errors, _declared_shape, _header_text, _refuse_dicomdir

    label = Path(where)
    with _damaged_header_errors(label):
        _refuse_dicomdir(header, label)
        if not _present(header, "Rows") or not _present(header, "Columns"):
            sop_class = _header_text(header, "SOPClassUID") or "none given"
            raise DicomError(f"{where}: not an image (no Rows and Columns; SOP class {sop_class}), so a "
                             "Segmentation cannot be drawn over it")
        rows, columns = _declared_shape(header, label)
        for keyword in _UIDS:
            uid = _header_text(header, keyword)
            if uid is None or not _is_uid(uid):
                raise DicomError(f"{where}: its {keyword} is missing or not a UID, so a Segmentation cannot "
                                 "reference it")
    return rows, columns


def _check_mask(mask: Any, shape: tuple[int, int], where: str, allow_empty: bool) -> np.ndarray:
    """``mask`` as a (H, W) uint8 array of 0 and 1 of the source's shape."""
    if isinstance(mask, (str, bytes)):
        raise InvalidInputError(f"mask must be a (H, W) array of 0 and 1, got {type(mask).__name__}")
    check_array_object(mask, "mask")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(mask, torch.Tensor):  # a mask still on the GPU is read back
        mask = mask.detach().cpu()
    m = as_numpy_array(mask, "mask")
    if m.dtype != np.bool_ and m.dtype.kind not in "iu":
        raise InvalidInputError(f"mask must hold 0 and 1 (bool or integers), got dtype {m.dtype}; threshold "
                                "probabilities first")
    if m.shape != shape:
        raise InvalidInputError(f"mask has shape {m.shape}, the source {where} is {shape[0]}x{shape[1]} "
                                "(Rows x Columns): give the mask at the image's original size")
    if m.dtype != np.bool_ and ((m < 0) | (m > 1)).any():
        raise InvalidInputError(f"mask must be binary (0 and 1), it holds values from {m.min()} to {m.max()}")
    if not allow_empty and not m.any():
        raise InvalidInputError(f"mask is empty (no pneumothorax) for {where}; pass allow_empty=True to write a "
                                "Segmentation with an empty segment")
    return m.astype(np.uint8)


def _is_uid(uid: Any) -> bool:
    from ..data.dicom import _UID_TEXT

    return isinstance(uid, str) and len(uid) <= 64 and _UID_TEXT.fullmatch(uid) is not None


def _present(header: Any, keyword: str) -> bool:
    elem = header.get_item(keyword)
    return elem is not None and elem.value not in (None, b"", "")
