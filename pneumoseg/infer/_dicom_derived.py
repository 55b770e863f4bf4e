"""What pneumoseg's DICOM outputs (the Segmentation in :mod:`.dicom_seg`, the Secondary Capture overlay
in :mod:`.dicom_overlay`) share: reading and checking the source and the mask, the descriptive texts,
and copying the source's patient and study identity.

Privacy: an object derived from a source image must carry the source's patient and study identity, or
no PACS can file it. highdicom, given the source, copies the whole Patient and Study modules (free text
such as StudyDescription, physicians, patient history) and quotes a name it finds odd in a warning. So
highdicom is given no patient data at all, and the identity an object needs is then copied here,
element for element and unconverted (:func:`copy_identity`): :data:`PATIENT_AND_STUDY` names all of it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union

import numpy as np

from .._checks import as_numpy_array, check_array_object, check_bool, check_int, check_path, show
from ..errors import AnotherImageError, DicomError, InvalidInputError

#: What a derived object copies of its source's patient and study: the Type 1 and 2 attributes of the
#: Patient and General Study modules (what files it into the study), and IssuerOfPatientID, which says
#: whose PatientID it is. Nothing else of the source's patient, study or free text reaches it.
PATIENT_AND_STUDY = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)

# The Type 2 ones: present and empty where the source has none (and in what highdicom is given).
EMPTY_FOR_HIGHDICOM = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyID", "AccessionNumber")

# What a derived object references its source by.
UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

_INSTALL = "pip install 'pneumoseg[pacs]'"


def require_highdicom(what: str = "DICOM Segmentation output") -> Any:
    """The highdicom module, or an :class:`pneumoseg.InvalidInputError` saying how to install it (or,
    where it is installed and fails to import, why)."""
    from .._optional import import_optional

    return import_optional("highdicom", needed_for=what, install=_INSTALL)


def check_common_arguments(*, allow_empty: Any, series_number: Any, instance_number: Any,
                           series_instance_uid: Any, sop_instance_uid: Any,
                           **texts: Any) -> tuple[bool, int, int, dict[str, str]]:
    """(allow_empty, series_number, instance_number, texts) of what every builder takes, checked: each
    text a DICOM LO (a non-empty str of at most 64 characters without a backslash, a value separator),
    ``software_versions`` None meaning pneumoseg's version; the UIDs None or UIDs. Else an
    InvalidInputError naming the argument."""
    from .. import __version__

    allow_empty = check_bool(allow_empty, "allow_empty")
    series_number = check_int(series_number, "series_number", low=1, high=2**31 - 1)
    instance_number = check_int(instance_number, "instance_number", low=1, high=2**31 - 1)
    if texts.get("software_versions", "") is None:
        texts["software_versions"] = __version__
    for name, text in texts.items():
        if not isinstance(text, str) or not text or len(text) > 64 or "\\" in text:
            raise InvalidInputError(f"{name} must be a non-empty str of at most 64 characters without '\\', got {show(text)}")
    for name, uid in (("series_instance_uid", series_instance_uid), ("sop_instance_uid", sop_instance_uid)):
        if uid is not None and not is_uid(uid):
            raise InvalidInputError(f"{name} must be a UID (digits separated by dots, at most 64 characters), "
                                    f"got {show(uid)}")
    return allow_empty, series_number, instance_number, texts


def source_header(source: Any) -> tuple[Any, str]:
    """(the source's header as a pydicom Dataset, how messages name it) from a path or a Dataset."""
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


def check_image(header: Any, where: str, what: str) -> tuple[int, int]:
    """(Rows, Columns) of a single grey-level image with the UIDs ``what`` (e.g. "a Segmentation")
    references; else a DicomError."""
    from ..data.dicom import _damaged_header_errors, _declared_shape, _header_text, _refuse_dicomdir

    label = Path(where)
    with _damaged_header_errors(label):
        _refuse_dicomdir(header, label)
        if not present(header, "Rows") or not present(header, "Columns"):
            sop_class = _header_text(header, "SOPClassUID") or "none given"
            raise DicomError(f"{where}: not an image (no Rows and Columns; SOP class {sop_class}), so {what} "
                             "cannot be drawn over it")
        rows, columns = _declared_shape(header, label)
        for keyword in UIDS:
            uid = _header_text(header, keyword)
            if uid is None or not is_uid(uid):
                raise DicomError(f"{where}: its {keyword} is missing or not a UID, so {what} cannot "
                                 "reference it")
    return rows, columns


def check_expected_uid(header: Any, where: str, expected: Any, what: str) -> None:
    """Refuse (AnotherImageError, a DicomError) a source whose SOPInstanceUID is not ``expected`` (unless None): the file
    holds another image than the one the mask was predicted from (a Prediction's ``source_uid``), and
    ``what`` made from it would file the mask under that image, perhaps another patient's."""
    from ..data.dicom import _damaged_header_errors, _header_text

    if expected is None:
        return
    if not isinstance(expected, str):
        raise InvalidInputError(f"expect_sop_instance_uid must be a str or None, got {type(expected).__name__}")
    with _damaged_header_errors(Path(where)):
        uid = _header_text(header, "SOPInstanceUID")
    if uid != expected:  # neither UID quoted: the path names the image
        raise AnotherImageError(f"{where}: the file holds another image than the one expected (its SOPInstanceUID is "
                         f"not expect_sop_instance_uid), so {what} would be filed under it")


def check_mask(mask: Any, shape: tuple[int, int], where: str, allow_empty: bool, what: str) -> np.ndarray:
    """``mask`` as a (H, W) uint8 array of 0 and 1 of the source's shape; empty only with ``allow_empty``
    (``what`` names what an empty mask would write)."""
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
        raise InvalidInputError(f"mask is empty (no pneumothorax) for {where}; pass allow_empty=True to write {what}")
    return m.astype(np.uint8)


def copy_identity(header: Any, ds: Any) -> None:
    """:data:`PATIENT_AND_STUDY` from ``header`` into ``ds`` (built by highdicom without them), in place
    of highdicom's empty values. An element read from a file is copied as its bytes and written as they
    are: converted, pydicom would validate it and warn, quoting the value (a name, a date) in the
    warning, and the caller's filters may make that an error. Its bytes are in the source's character
    set, which ``ds`` gets too."""
    from pydicom.charset import convert_encodings, default_encoding
    from pydicom.filewriter import correct_ambiguous_vr

    for keyword in PATIENT_AND_STUDY:
        if keyword in ds:
            del ds[keyword]
        if not copy_raw(header, ds, keyword) and keyword in EMPTY_FOR_HIGHDICOM:
            setattr(ds, keyword, None)  # Type 2: present, empty, where the source has none
    if "SpecificCharacterSet" in header:  # the bytes' own
        ds.SpecificCharacterSet = header.SpecificCharacterSet
    # Told it was read in the encoding it is written in, pydicom writes raw elements as they are instead
    # of converting every element; the one thing it did on that path is then done here: settling
    # highdicom's 'OB or OW' pixel data.
    charset = ds.get("SpecificCharacterSet")
    syntax = ds.file_meta.TransferSyntaxUID
    correct_ambiguous_vr(ds, syntax.is_little_endian)
    ds.set_original_encoding(syntax.is_implicit_VR, syntax.is_little_endian,
                             convert_encodings(charset) if charset else default_encoding)


def copy_raw(header: Any, ds: Any, keyword: str) -> bool:
    """``header``'s element ``keyword`` into ``ds`` as it was read (unconverted: see
    :func:`copy_identity`, which must follow); False where ``header`` has none."""
    from pydicom.datadict import dictionary_VR

    elem = header.get_item(keyword)
    if elem is None:
        return False
    if elem.is_raw and elem.VR in (None, "UN"):  # read with implicit VR: an explicit VR needs one
        elem = elem._replace(VR=dictionary_VR(elem.tag))
    ds[elem.tag] = elem
    return True


def highdicom_error(exc: Exception, where: str, what: str) -> DicomError:
    """highdicom's refusal as a DicomError naming the source. highdicom saw no patient data, so its
    message quotes none."""
    first = (str(exc).splitlines() or [""])[0][:200]
    return DicomError(f"{where}: highdicom cannot derive {what} from it ({type(exc).__name__}: {first})")


def write_atomically(path: Union[str, Path], build: Callable[[], Any], save: Callable[[Any, Any], None]) -> Path:
    """``build()`` written to ``path`` by ``save(ds, f)``, atomically: a failure leaves no partial file,
    and an existing file is replaced only by a complete one."""
    from .._fs import atomic_open

    target = check_path(path, "path")
    ds = build()
    with atomic_open(target, "wb") as f:
        save(ds, f)
    return target


def save_dicom(ds: Any, f: Any) -> None:
    """Write ``ds`` to the open binary file ``f`` as a DICOM file (with its file meta information)."""
    ds.save_as(f, enforce_file_format=True)


def is_uid(uid: Any) -> bool:
    from ..data.dicom import _UID_TEXT

    return isinstance(uid, str) and len(uid) <= 64 and _UID_TEXT.fullmatch(uid) is not None


def present(header: Any, keyword: str) -> bool:
    elem = header.get_item(keyword)
    return elem is not None and elem.value not in (None, b"", "")
