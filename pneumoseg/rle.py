"""Run-length encoding of masks in the SIIM-ACR format (and the 1-based "absolute" Kaggle format).

Pixels are numbered in column-major order (the flattening of ``mask.T``), 0-based.

``style="siim"`` (default)
    ``start length`` pairs; the first start is the index of the first foreground pixel, every later
    start counts the background pixels since the end of the previous run; ``"-1"`` is an empty mask.
    ``"1 2 2 1"`` on a 4x4 mask is foreground at (row, col) (1, 0), (2, 0) and (1, 1).
``style="absolute"``
    1-based absolute ``start length`` pairs in the same pixel order, as most other Kaggle segmentation
    competitions use; an empty mask is ``""``.

Decoding accepts ``"-1"``, ``""`` and surrounding whitespace as empty in both styles. Everything runs
in the native core: NumPy arrays and CPU tensors on the CPU, CUDA tensors and CuPy arrays on their GPU
on the caller's current stream.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal, Union

import numpy as np

from . import _native, limits
from ._checks import (
    INT64_MAX,
    check_choice,
    check_image_shape,
    check_str_sequence,
    show,
)
from ._native import _C
from .errors import LimitError, RLEError, RLELimitError

__all__ = ["encode", "encode_batch", "decode", "decode_union", "decode_batch", "Style"]

Style = Literal["siim", "absolute"]
_STYLES = {"siim": 0, "absolute": 1}
DEFAULT_SHAPE = (1024, 1024)


def _style_code(style: str) -> int:
    if type(style) is str:  # the common call, by one lookup
        code = _STYLES.get(style)
        if code is not None:
            return code
    return _STYLES[check_choice(style, "style", tuple(_STYLES), error=RLEError)]


def _check_shape(shape: Any) -> tuple[int, int]:
    if type(shape) is tuple and len(shape) == 2:  # the common call: a pair of plain ints within the limits
        h, w = shape
        if type(h) is int and type(w) is int and 0 <= h <= INT64_MAX and 0 <= w <= INT64_MAX:
            current = limits.current()
            if max(h, w) <= current.max_image_side and h * w <= current.max_image_pixels:
                return h, w
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, np.ndarray)) or len(shape) != 2:
        raise RLEError(f"shape must be a pair of non-negative integers (height, width), got {show(shape)}")
    try:
        return check_image_shape(shape, "shape", error=RLEError)
    except LimitError as exc:
        raise RLELimitError(str(exc)) from None


def _check_limit(name: str, value: int, what: str) -> None:
    try:
        limits.check(name, value, what)
    except LimitError as exc:
        raise RLELimitError(str(exc)) from None


def _check_text(text: Any, name: str) -> None:
    if not isinstance(text, (str, bytes)):
        raise RLEError(f"{name} must be a str, got {type(text).__name__}")
    _check_limit("max_rle_chars", len(text), f"{name} of {len(text):,} characters")


def _check_item_text(text: Any, i: int, max_chars: int) -> None:
    """decode_batch's check of item ``i``, a str or bytes: its message is only made when it fails."""
    if len(text) > max_chars:
        _check_text(text, f"rles[{i}]")


_ASCII_SPACE = re.compile(rb"[ \t\n\r\f\v]+")


def _non_ascii_error(texts: list[Any], slots: list[int]) -> RLEError:
    """The error for the first string holding a non-ASCII token (no RLE token may), worded as the
    native decoder words a bad token."""
    for text, slot in zip(texts, slots):
        data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
        if data.isascii():
            continue
        tokens = [t for t in _ASCII_SPACE.split(data) if t]
        index, token = next((i, t) for i, t in enumerate(tokens) if not t.isascii())
        shown = token[:24].decode("utf-8", "backslashreplace") + ("..." if len(token) > 24 else "")
        where = f"rles[{slot}]: " if slot >= 0 else ""
        return RLEError(f"{where}token {index} ('{shown}') is not a non-negative integer (it is not ASCII)")
    return RLEError("an RLE string is not text the decoder can read")


def _decode_into(texts: list[Any], images: list[int], slots: list[int], out: Any, code: int, stream: int) -> None:
    try:
        _C.rle_decode(texts, images, slots, out, code, stream)
    except UnicodeEncodeError:
        # A str with a lone surrogate has no bytes to pass in; it is a non-ASCII token, which the
        # decoder refuses anyway. (The decoder's own messages escape every non-printable byte.)
        raise _non_ascii_error(texts, slots) from None


def _encode_view(info: _native.ArrayInfo, code: int = 0) -> list[str]:
    """The strings of an (N, H, W) native view (also postprocess's ``to_rle``, on its own output)."""
    if info.device == _native.CUDA:
        _native.require_cuda_build("masks", RLEError)
    return _C.rle_encode(info.view, code, info.stream)


def encode(mask: Any, *, style: Style = "siim") -> str:
    """Encode one (H, W) mask of any dtype (nonzero is foreground). An empty mask gives ``"-1"``
    (``""`` in the absolute style)."""
    code = _style_code(style)
    kind, mask = _native.read_array(mask, "mask", RLEError)
    if len(mask.shape) != 2:
        raise RLEError(f"mask must be 2-D (height, width), got shape {tuple(mask.shape)}")
    # The shape is checked on the input itself, and the view describes it as a batch of one.
    return _encode_view(_native.view_of(kind, mask, "mask", RLEError, batch_of_one=True), code)[0]


def encode_batch(masks: Any, *, style: Style = "siim") -> list[str]:
    """Encode a batch of masks (N, H, W) into N strings.

    CUDA input is encoded on the GPU: the strings are formatted there and fetched with one
    device-to-host copy for the batch (a second one only when the text outgrows 16 KB per mask).
    A list of 2-D masks of different shapes is also accepted.
    """
    code = _style_code(style)
    if (isinstance(masks, (list, tuple)) and masks and not np.isscalar(masks[0])
            and all(hasattr(m, "shape") for m in masks) and len({tuple(m.shape) for m in masks}) > 1):
        return [encode(m, style=style) for m in masks]
    info = _native.as_view(masks, "masks", RLEError)  # refuses what check_array_object refuses
    if info.view.ndim != 3:
        raise RLEError(f"masks must be 3-D (batch, height, width), got shape {tuple(info.view.shape)}")
    return _encode_view(info, code)


RleItem = Union[str, bytes, Sequence[str]]


def _flatten(items: list[Any]) -> tuple[list[Any], list[int]]:
    """Strings and their image indices; an item that is a list of strings is the union of them."""
    texts: list[Any] = []
    images: list[int] = []
    max_chars = limits.current().max_rle_chars
    for i, item in enumerate(items):
        if isinstance(item, (str, bytes)):
            _check_item_text(item, i, max_chars)
            texts.append(item)
            images.append(i)
            continue
        union = check_str_sequence(item, f"rles[{i}]", allow_bytes=True, error=RLEError)
        _check_limit("max_annotations", len(union), f"rles[{i}] with {len(union):,} strings")
        for j, text in enumerate(union):
            _check_text(text, f"rles[{i}][{j}]")
        texts.extend(union)
        images.extend([i] * len(union))
    return texts, images


def check_str_sequence_or_unions(rles: Any) -> list[Any]:
    """The items of decode_batch's ``rles``: a list (or tuple, or 1-D array) whose items are strings
    or lists of strings; generators and None are refused with a hint."""
    if isinstance(rles, (str, bytes)):
        raise RLEError("rles must be a list of strings; use decode() for a single string")
    if rles is None or not isinstance(rles, (Sequence, np.ndarray)):
        kind = type(rles).__name__
        hint = " (a one-shot iterator; pass list(...) of it)" if hasattr(rles, "__next__") else ""
        raise RLEError(f"rles must be a list of strings (or of lists of strings), got {kind}{hint}")
    if isinstance(rles, np.ndarray) and rles.ndim != 1:
        # tolist() of a table gives a list per row, which would silently read as unions, and of a
        # 0-d array a single string, whose characters would read as images.
        raise RLEError(f"rles must be a 1-D list of strings (or of lists of strings for unions), got an array of "
                       f"shape {rles.shape}; pass rles.ravel() for one image per string, or a list of lists for unions")
    items = rles.tolist() if isinstance(rles, np.ndarray) else list(rles)
    for i, item in enumerate(items):
        if not isinstance(item, (str, bytes, list, tuple)):
            raise RLEError(f"rles[{i}] must be a str (or a list of str for a union), got {type(item).__name__}")
    return items


def decode(rle: str, shape: tuple[int, int] = DEFAULT_SHAPE, *, style: Style = "siim") -> np.ndarray:
    """Decode one string to a (H, W) uint8 NumPy array of 0 and 1."""
    if not isinstance(rle, (str, bytes)):
        raise RLEError(f"rle must be a str, got {type(rle).__name__}")
    h, w = _check_shape(shape)
    code = _style_code(style)
    _check_text(rle, "rle")
    out = np.zeros((1, h, w), dtype=np.uint8)
    _decode_into([rle], [0], [-1], _native.as_view(out, "out").view, code, 0)
    return out[0]


def decode_union(rles: Sequence[str], shape: tuple[int, int] = DEFAULT_SHAPE, *, style: Style = "siim") -> np.ndarray:
    """The union of several annotations of one image (train-rle.csv repeats an ImageId once per
    annotation) as a (H, W) uint8 NumPy array. Memory follows the size of the union, however many
    annotations overlap."""
    if isinstance(rles, (str, bytes)):
        rles = [rles]
    texts = check_str_sequence(rles, "rles", allow_bytes=True, error=RLEError)
    _check_limit("max_annotations", len(texts), f"rles with {len(texts):,} strings")
    h, w = _check_shape(shape)
    code = _style_code(style)
    for i, t in enumerate(texts):
        _check_text(t, f"rles[{i}]")
    out = np.zeros((1, h, w), dtype=np.uint8)
    _decode_into(texts, [0] * len(texts), list(range(len(texts))), _native.as_view(out, "out").view, code, 0)
    return out[0]


def decode_batch(
    rles: Sequence[RleItem],
    shape: tuple[int, int] = DEFAULT_SHAPE,
    *,
    device: Any = "cpu",
    style: Style = "siim",
) -> Any:
    """Decode N strings into a (N, H, W) uint8 batch of 0 and 1.

    ``device="cpu"`` returns NumPy. A CUDA device (``"cuda"``, ``"cuda:1"``, a ``torch.device``) returns
    a torch tensor on it when torch is installed, else a CuPy array; the runs are parsed on the host
    and painted on the GPU. An item may be a list of strings: that image is their union.
    """
    items = check_str_sequence_or_unions(rles)
    h, w = _check_shape(shape)
    code = _style_code(style)
    texts, images = _flatten(items)
    n = len(items)
    if n * h * w > limits.current().max_batch_bytes:
        _check_limit("max_batch_bytes", n * h * w, f"a batch of {n:,} images of {h}x{w}")
    is_cuda, index = _parse_device(device)
    if is_cuda:
        _native.require_cuda_build("device", RLEError)
        if not _native.cuda_available():
            raise RLEError(f"device={device!r}, but no CUDA device is available (pneumoseg.cuda_available() is False)")
        kind = "torch" if _torch_importable() else "cupy"
        out = _native.zeros_uint8(kind, (n, h, w), index, cuda=True)
    else:
        out = np.zeros((n, h, w), dtype=np.uint8)
    info = _native.as_view(out, "out")
    _decode_into(texts, images, images, info.view, code, info.stream)
    return out


def _torch_importable() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _parse_device(device: Any) -> tuple[bool, int]:
    text = str(device)
    if text == "cpu":
        return False, 0
    if text == "cuda":
        return True, 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return True, int(text[5:])
    raise RLEError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
