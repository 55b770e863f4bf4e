"""What ``Predictor.predict`` accepts, turned into a list of image sources before any work starts:
DICOM files and folders (flat, the Kaggle nested layout, or a PACS export's series folders, with or
without the ``.dcm`` suffix), NumPy arrays and torch tensors, one or many.

Paths are only listed here (and every ImageId checked for duplicates); pixels are read later, in
background threads, one batch ahead of the networks. With ``name_by="uid"`` each file's header (not
its pixels) is read here, as the duplicate check needs every name before any work starts. Nothing
here ever writes to an input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator, Mapping, MappingView, Set as AbstractSet
from typing import Any, Optional, Sequence

import numpy as np

from .._checks import (check_array_object, check_choice, check_readable_tensor, check_str_sequence, check_tensor_memory,
                       show)
from ..errors import DataFormatError, DicomError, InvalidInputError, PneumosegError

__all__ = ["ImageSource", "collect_inputs", "load_image", "load_pixels", "NAME_BY"]

_FLOAT32_MAX = float(np.finfo(np.float32).max)

# How a DICOM file's ImageId is found: "file", its file name (Kaggle names files <SOPInstanceUID>.dcm);
# "uid", the SOPInstanceUID in its header (PACS exports name files IM0001 ... in every series folder).
NAME_BY = ("file", "uid")


@dataclass
class ImageSource:
    """One image to predict: a file to read, or pixels already in memory ((H, W) array or tensor)."""

    image_id: str
    path: Optional[Path] = None
    pixels: Any = None
    # set when the file's pixels are read: the SOPInstanceUID its header held in that same read (None
    # where it held none, and for pixels in memory), the image a prediction is of whatever the ImageId
    sop_instance_uid: Optional[str] = None
    # name_by="uid": the SOPInstanceUID the file held when it was listed (its ImageId). The pixels read
    # later must come with the same one, or the answer would go out under another image's name.
    listed_uid: Optional[str] = None


def _is_tensor(x: Any) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


_ACCEPTED = "predict takes a path, a folder, an array or tensor, or a list of them"


def _refuse_non_array(x: Any, name: str) -> None:
    """Refuse, naming what was given, the containers NumPy would read as an array of one Python
    object (a generator, a dict, a set): its error would be about 'dtype object'."""
    if isinstance(x, Iterator):
        raise InvalidInputError(f"{name} is a {type(x).__name__} (a one-shot iterator); {_ACCEPTED}: "
                                f"pass list(...) of it")
    if isinstance(x, (Mapping, AbstractSet, MappingView)):
        raise InvalidInputError(f"{name} is a {type(x).__name__}; {_ACCEPTED} (a list keeps the images' order)")


def _array_images(x: Any, name: str) -> list[Any]:
    """(H, W) -> [x]; (N, H, W) and (N, 1, H, W) -> N images, each (H, W), without copying."""
    _refuse_non_array(x, name)
    check_array_object(x, name)
    if not _is_tensor(x):
        given = x
        x = np.asarray(x)
        if x.dtype.kind in "US" and not isinstance(given, np.ndarray):
            raise InvalidInputError(f"{name} holds strings: give paths directly in the inputs list, "
                                    "not as a list of lists")
        if x.dtype == object and x.ndim == 0:
            raise InvalidInputError(f"{name} has type {type(given).__name__} ({show(given)}); {_ACCEPTED}")
        if x.dtype.kind not in "biuf":
            raise InvalidInputError(f"{name} must hold numbers, got dtype {x.dtype}")
    else:
        check_readable_tensor(x, name)
        # a FakeTensor reached the networks (an AssertionError from FakeTensorMode), and a freed
        # storage (FSDP, resize_(0)) was read by the native post-processing: a segfault
        check_tensor_memory(x, name)
    shape = tuple(x.shape)
    if len(shape) == 3 and shape[2] in (1, 2, 3, 4) and min(shape[:2]) > 4:
        # np.asarray(PIL.Image.open(png)) of a colour (or grey + alpha, 'LA') picture, or a grey one with
        # its channel last (OpenCV, Keras): read as (N, H, W) it would give one "image" per row, each 1 to
        # 4 pixels wide, and a prediction for every one
        kind = {1: "a grey (H, W, 1) picture with its channel last", 2: "a colour (H, W, 2) picture (grey + alpha)"}
        raise InvalidInputError(
            f"{name} has shape {shape}, {kind.get(shape[2], f'a colour (H, W, {shape[2]}) picture')}, "
            f"not {shape[0]} images {shape[2]} pixels wide; pass the grey image (H, W) (Pillow: image.convert('L'); "
            "NumPy: x.mean(axis=-1)), or a batch of "
            "narrow images as (N, 1, H, W)")
    if len(shape) == 4 and shape[1] == 1:
        x = x[:, 0]
    elif len(shape) not in (2, 3):
        raise InvalidInputError(f"{name} must be an image (H, W) or a batch (N, H, W) / (N, 1, H, W), got shape {shape}")
    images = [x] if x.ndim == 2 else [x[i] for i in range(x.shape[0])]
    for i, img in enumerate(images):
        if img.shape[0] < 1 or img.shape[1] < 1:
            raise InvalidInputError(f"{name}{'' if x.ndim == 2 else f'[{i}]'} has no pixels (shape {tuple(img.shape)})")
    return images


def skip_reason(exc: BaseException, where: str) -> str:
    """The one-line reason an input was skipped, listed beside ``where`` (its path, or an in-memory
    image's ImageId): without the ``where: `` or ``image 'where': `` the error already starts with."""
    text = f"{exc.filename}: {exc.strerror or exc}" if isinstance(exc, OSError) and exc.filename else str(exc)
    text = " ".join((text or type(exc).__name__).split())
    for named in (f"{where}: ", f"image {where!r}: "):
        text = text.removeprefix(named)
    return text


def _where(source: ImageSource) -> str:
    return str(source.path) if source.path is not None else "an in-memory image"


def collect_inputs(inputs: Any, image_ids: Optional[Sequence[str]] = None, *, name_by: str = "file",
                   on_error: str = "raise") -> tuple[list[ImageSource], list[tuple[str, str]]]:
    """(sources, skipped) for ``inputs``: a path (str / PathLike) to a DICOM file or to a folder
    searched recursively for DICOM files (``*.dcm``, and files without that suffix that are DICOM by
    their preamble; not a DICOMDIR), an array or tensor (one image or a batch), or a list/tuple of
    these. ``image_ids`` names the in-memory images in order (default ``image-00000``, ...). Files are
    named by ``name_by``: ``"file"``, the file name without its ``.dcm`` suffix (the Kaggle ImageId),
    or ``"uid"``, the SOPInstanceUID in the file's header; a file whose header cannot be read or holds
    no usable SOPInstanceUID is an error, or with ``on_error="skip"`` listed in ``skipped``.
    ``skipped`` also lists (path, reason) for folders without DICOM files and what
    :func:`pneumoseg.data.siim.find_dicom_files` passed over.

    Two different files or images with one ImageId are an error (a submission has one row per image);
    the same file given twice is predicted once."""
    from ..data.dicom import read_sop_instance_uid
    from ..data.siim import dicom_file_image_id, find_dicom_files

    name_by = check_choice(name_by, "name_by", NAME_BY)
    on_error = check_choice(on_error, "on_error", ("raise", "skip"))
    if isinstance(inputs, (list, tuple)):
        items = list(inputs)
        if not items:
            raise InvalidInputError("inputs is an empty list: nothing to predict")
    elif inputs is None:
        raise InvalidInputError("inputs must be a path, a folder, an array or a tensor (or a list of them), got None")
    else:
        items = [inputs]
    ids = None if image_ids is None else check_str_sequence(image_ids, "image_ids")

    sources: list[ImageSource] = []
    skipped: list[tuple[str, str]] = []
    arrays: list[Any] = []
    seen_paths: set[Path] = set()
    for k, item in enumerate(items):
        name = "inputs" if len(items) == 1 and not isinstance(inputs, (list, tuple)) else f"inputs[{k}]"
        if isinstance(item, (str, os.PathLike)):
            path = Path(os.fspath(item))
            if not str(path) or "\x00" in str(path):
                raise InvalidInputError(f"{name} is not a usable path: {show(item)}")
            if path.is_dir():
                found = find_dicom_files(path, require_suffix=False)
                skipped.extend((str(p), reason) for p, reason in found.skipped)
                if not found:
                    skipped.append((str(path), "a folder without .dcm files"))
                files = list(found)
            elif path.exists():
                files = [path]
            else:
                raise InvalidInputError(f"{name}: {path} does not exist")
            for file in files:
                key = file.resolve()
                if key in seen_paths:
                    continue
                seen_paths.add(key)
                if name_by == "file":
                    image_id = dicom_file_image_id(file)
                else:
                    try:
                        image_id = read_sop_instance_uid(file)
                    except (PneumosegError, OSError) as exc:
                        if on_error == "raise":
                            raise
                        skipped.append((str(file), skip_reason(exc, str(file))))
                        continue
                sources.append(ImageSource(image_id, path=file, listed_uid=image_id if name_by == "uid" else None))
        elif isinstance(item, bytes):
            raise InvalidInputError(f"{name} is bytes; pass a path as str or pathlib.Path, or the pixels as an array")
        else:
            for img in _array_images(item, name):
                arrays.append(img)
                sources.append(ImageSource("", pixels=img))
    if ids is not None and len(ids) != len(arrays):
        raise InvalidInputError(f"image_ids has {len(ids)} names for {len(arrays)} in-memory image(s)")
    k = 0
    for src in sources:
        if src.path is None:
            src.image_id = ids[k] if ids is not None else f"image-{k:05d}"
            k += 1
    owners: dict[str, ImageSource] = {}
    for src in sources:
        if not src.image_id:
            raise InvalidInputError("an ImageId is empty")
        other = owners.get(src.image_id)
        if other is not None:
            message = (f"ImageId {show(src.image_id)} appears twice ({_where(other)} and {_where(src)}); "
                       "a submission has one row per image")
            if other.path is not None and src.path is not None:
                if name_by == "file":
                    # a PACS export names files IM0001 ... in every series folder: the header names the image
                    message += ("; to name each file by the SOPInstanceUID in its header instead, pass "
                                "name_by='uid' (pneumoseg predict --name-by uid)")
                else:
                    message += " (two files hold the same SOPInstanceUID: copies of one image?)"
            raise DataFormatError(message)
        owners[src.image_id] = src
    return sources, skipped


def load_pixels(source: ImageSource) -> Any:
    """The (H, W) pixels of a source, as :func:`load_image`."""
    return load_image(source)[0]


def load_image(source: ImageSource) -> tuple[Any, Optional[str]]:
    """(pixels, SOPInstanceUID) of a source: the (H, W) pixels of the DICOM read from disk (rescaled,
    MONOCHROME1 inverted) with the SOPInstanceUID its header held in the same read (None where it has
    none), or the in-memory array / tensor as it is and None. NumPy floats must be finite (tensors are
    checked on their device, later, without a synchronisation)."""
    from ..data.dicom import read_dicom

    uid = None
    if source.path is not None:
        image = read_dicom(source.path, with_dataset=False)
        pixels, uid = image.pixels, image.sop_instance_uid
        if source.listed_uid is not None and uid != source.listed_uid:
            # not quoted: a header's text is not shown unchecked (tests/test_phi_canary.py)
            raise DicomError(f"{source.path}: the file holds another image than when it was listed (its "
                             f"SOPInstanceUID is no longer {source.listed_uid}): it was replaced while the run went "
                             "on, so it is not predicted under that name")
    else:
        pixels = source.pixels
    if isinstance(pixels, np.ndarray) and pixels.dtype.kind == "f":
        where = source.path if source.path is not None else f"image {source.image_id!r}"
        if not np.isfinite(pixels).all():
            raise InvalidInputError(f"{where}: the pixels contain NaN or infinity")
        if pixels.dtype.itemsize > 4 and pixels.size and np.abs(pixels).max() > _FLOAT32_MAX:
            # the networks take float32: such values would become infinities there
            raise InvalidInputError(f"{where}: pixel values reach {np.abs(pixels).max():.3g}, beyond float32 "
                                    f"(at most {_FLOAT32_MAX:.3g}); rescale the image")
    return pixels, uid
