"""A predicted mask as a DICOM Segmentation (SEG, binary) that a PACS files beside its source image and
a viewer (OHIF, 3D Slicer) draws over it, built with highdicom (the ``pacs`` extra).

Privacy: highdicom is given a header without any patient data (UIDs, size, geometry), and the identity
a SEG needs is then copied element for element and unconverted: :data:`PATIENT_AND_STUDY` names all of
it (see :mod:`._dicom_derived`, shared with the Secondary Capture overlay).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

from .._checks import show
from ..errors import InvalidInputError
from ._dicom_derived import (EMPTY_FOR_HIGHDICOM, PATIENT_AND_STUDY, UIDS, check_common_arguments, check_expected_uid,
                             check_image, check_mask, copy_identity, highdicom_error, present, require_highdicom, save_dicom,
                             source_header, write_atomically)

__all__ = ["build_dicom_seg", "write_dicom_seg", "require_highdicom", "PATIENT_AND_STUDY", "SEGMENTATION_STORAGE"]

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

# Where the source sits in a patient frame of reference: all of these or the SEG is placed pixel for pixel.
_PATIENT_FRAME = ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                  "SliceThickness")
# No SpecificCharacterSet: the skeleton holds no text that needs one, and highdicom refuses the
# multi-valued ISO 2022 form (an empty first value, as Japanese and Korean sources write it); the
# source's is set with the identity it describes (copy_identity).
_HEADER = ("Modality", "Rows", "Columns", "LossyImageCompression", "LossyImageCompressionRatio",
           "LossyImageCompressionMethod")
_FRAME_EXTRA = ("PositionReferenceIndicator", "SpacingBetweenSlices")


def build_dicom_seg(mask: Any, source: Any, *, allow_empty: bool = False, series_number: int = 9000,
                    instance_number: int = 1, series_description: str = "pneumoseg pneumothorax",
                    manufacturer: str = "pneumoseg", manufacturer_model_name: str = "pneumoseg",
                    software_versions: Optional[str] = None, device_serial_number: str = "0",
                    algorithm_parameters: Optional[Mapping[str, str]] = None,
                    series_instance_uid: Optional[str] = None, sop_instance_uid: Optional[str] = None,
                    expect_sop_instance_uid: Optional[str] = None) -> Any:
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
    grey-level image is a :class:`pneumoseg.DicomError` naming it, as is one whose SOPInstanceUID is not
    ``expect_sop_instance_uid`` when given (a Prediction's ``source_uid``: the file re-read now holds
    another image than the one predicted)."""
    hd = require_highdicom()
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes

    from ..data.dicom import _damaged_header_errors

    allow_empty, series_number, instance_number, texts = check_common_arguments(
        allow_empty=allow_empty, series_number=series_number, instance_number=instance_number,
        series_instance_uid=series_instance_uid, sop_instance_uid=sop_instance_uid,
        series_description=series_description, manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name, device_serial_number=device_serial_number,
        software_versions=software_versions)
    parameters = _parameters(algorithm_parameters)
    header, where = source_header(source)
    # identity first: another image in the file is that, whatever its size or header
    check_expected_uid(header, where, expect_sop_instance_uid, "a Segmentation")
    rows, columns = check_image(header, where, "a Segmentation")
    pixels = check_mask(mask, (rows, columns), where, allow_empty, "a Segmentation with an empty segment")

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
    patient_frame = all(present(header, k) for k in _PATIENT_FRAME)
    with _damaged_header_errors(Path(where)):
        for keyword in (*UIDS, *_HEADER, *((*_PATIENT_FRAME, *_FRAME_EXTRA) if patient_frame else ())):
            if keyword in header:
                skeleton[keyword] = header[keyword]
    for keyword in EMPTY_FOR_HIGHDICOM:
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
        raise highdicom_error(exc, where, "a Segmentation") from None
    if not patient_frame:
        # General Image's PatientOrientation (Type 2C) is required of a SEG without a plane orientation;
        # pixel for pixel on its source, the source's row and column directions are the SEG's
        with _damaged_header_errors(Path(where)):
            seg.PatientOrientation = header.get("PatientOrientation") or None
    copy_identity(header, seg)
    return seg


def write_dicom_seg(path: Union[str, Path], mask: Any, source: Any, **options: Any) -> Path:
    """:func:`build_dicom_seg` written to ``path`` atomically: a failure leaves no partial file, and an
    existing file is replaced only by a complete one."""
    return write_atomically(path, lambda: build_dicom_seg(mask, source, **options), save_dicom_seg)


#: Write a SEG (from :func:`build_dicom_seg`) to an open binary file as a DICOM file.
save_dicom_seg = save_dicom


def _parameters(parameters: Optional[Mapping[str, str]]) -> Optional[dict[str, str]]:
    if parameters is None:
        return None
    if not isinstance(parameters, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in parameters.items()):
        raise InvalidInputError(f"algorithm_parameters must be a mapping of str to str, got {show(parameters)}")
    return dict(parameters) or None
