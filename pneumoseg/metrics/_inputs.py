"""Input checking and conversion shared by the metrics: masks as (N, H, W) batches, labels and scores
as 1-D NumPy vectors, thresholds in the input's own precision.

torch is never imported here; a tensor is recognised only if the caller has already imported torch
(``sys.modules``), so the metrics need NumPy alone for NumPy input.
"""

from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .. import _checks
from .._checks import as_numpy_array, check_tensor_memory
from ..errors import InvalidInputError


def torch_module() -> Any:
    return sys.modules.get("torch")


def is_tensor(x: Any) -> bool:
    torch = torch_module()
    return torch is not None and isinstance(x, torch.Tensor)


def check_real(value: Any, name: str) -> float:
    """A finite real number (also a 0-d array or one-element tensor, as the post-processing takes)."""
    return _checks.check_real(value, name)


def check_unit(value: Any, name: str) -> float:
    value = check_real(value, name)
    if not 0.0 <= value <= 1.0:
        raise InvalidInputError(f"{name} must be in [0, 1], got {value!r}")
    return value


_INT64_MAX = 2**63 - 1


def check_count(value: Any, name: str) -> int:
    """A non-negative integer; values above 2**63 - 1 become 2**63 - 1 (a pixel count no image
    reaches, so the same answer), since the counts are compared as int64."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 0:
        raise InvalidInputError(f"{name} must be a non-negative integer, got {_checks.show(value)}")
    return min(int(value), _INT64_MAX)


def threshold_below(threshold: float, dtype: np.dtype) -> Any:
    """The largest value of ``dtype`` not above ``threshold``: for an array ``x`` of that dtype,
    ``x > threshold_below(t)`` in ``x``'s own precision equals ``x > t`` in exact arithmetic, which is
    how the native post-processing compares (a float32 0.3f is above the double 0.3)."""
    if dtype.kind != "f":
        return threshold  # integers compare exactly with a Python float
    t = np.asarray(threshold, dtype=dtype)
    if float(t) > threshold:
        t = np.nextafter(t, np.asarray(-np.inf, dtype=dtype))
    return t[()]


# ----------------------------------------------------------------------------------------------- masks

_MASK_KINDS = "biuf"  # bool, signed, unsigned, float


@dataclass
class MaskPair:
    """A prediction and a truth as (N, H, W) batches of the same shape, either both NumPy arrays (CPU
    work, including torch CPU tensors viewed without a copy) or both CUDA tensors on one device."""

    pred: Any
    truth: Any
    single: bool  # both came as one (H, W) image
    cuda: bool
    torch_answer: bool  # some input was a torch tensor: answer with torch tensors
    device: Any  # the torch device of the answer, or None


def _as_images(x: Any, name: str) -> tuple[Any, bool]:
    """``x`` as (N, H, W): (H, W) is one image, (N, 1, H, W) a network's one-channel output."""
    shape = tuple(x.shape)
    if len(shape) == 2:
        return x[None], True
    if len(shape) == 3:
        return x, False
    if len(shape) == 4 and shape[1] == 1:
        return x[:, 0], False
    if len(shape) == 4:
        raise InvalidInputError(
            f"{name} has {shape[1]} channels (shape {shape}); the metrics take one mask per image: "
            "pass each class's channel separately"
        )
    raise InvalidInputError(f"{name} must be (H, W), (N, H, W) or (N, 1, H, W), got shape {shape}")


def _refuse_masked(x: Any, name: str) -> None:
    if isinstance(x, np.ma.MaskedArray):  # np.asarray would drop its mask without a word
        raise InvalidInputError(f"{name} is a masked array; pass {name}.filled(0)")


def _numpy_mask(x: Any, name: str) -> np.ndarray:
    _refuse_masked(x, name)
    arr = as_numpy_array(x, name, what="a NumPy array or torch tensor")
    if arr.dtype.kind not in _MASK_KINDS:
        raise InvalidInputError(f"{name} has dtype {arr.dtype}; masks are bool, integer or float arrays")
    return arr


_TORCH_NUMBER_DTYPES = ("bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
                        "float16", "bfloat16", "float32", "float64")


def _torch_number_dtype(x: Any) -> bool:
    """Whether a tensor's dtype is one NumPy (or float32, for bfloat16) can hold: not complex,
    quantised or float8."""
    return str(x.dtype).replace("torch.", "") in _TORCH_NUMBER_DTYPES


def _readable_tensor(x: Any, name: str, expected: str) -> Any:
    """A tensor the metrics can read, detached: a NumPy-holdable dtype (else the error says
    ``expected``), on the CPU or CUDA, dense, and with any lazy negation resolved (a negated view holds
    -x in memory)."""
    torch = torch_module()
    if not _torch_number_dtype(x):
        raise InvalidInputError(f"{name} has dtype {x.dtype}; {expected}")
    if x.device.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"{name} is on device {x.device}; the metrics run on CPU and CUDA tensors")
    if x.layout != torch.strided:
        raise InvalidInputError(f"{name} is a {x.layout} tensor; pass a dense one ({name}.to_dense())")
    check_tensor_memory(x, name)
    return x.detach().resolve_neg()


def _torch_mask(x: Any, name: str) -> Any:
    torch = torch_module()
    x = _readable_tensor(x, name, "masks are bool, integer or float tensors")
    if x.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds every bfloat16 exactly
        x = x.float()
    return x


def mask_pair(pred: Any, truth: Any) -> MaskPair:
    """Check and align a prediction and a truth: same (N, H, W) shape, non-empty images, one device."""
    torch = torch_module()
    tensors = [x for x in (pred, truth) if is_tensor(x)]
    devices = {x.device for x in tensors}
    if len(devices) > 1:
        raise InvalidInputError(f"pred and truth are on different devices ({', '.join(map(str, devices))})")
    device = devices.pop() if devices else None
    cuda = device is not None and device.type == "cuda"

    def prepare(x: Any, name: str) -> Any:
        if is_tensor(x):
            x = _torch_mask(x, name)
            return x if cuda else x.numpy()
        arr = _numpy_mask(x, name)
        if cuda:
            return torch.as_tensor(arr, device=device)
        return arr

    p, single_p = _as_images(prepare(pred, "pred"), "pred")
    t, single_t = _as_images(prepare(truth, "truth"), "truth")
    if tuple(p.shape) != tuple(t.shape):
        raise InvalidInputError(
            f"pred and truth differ in shape: {tuple(p.shape)} and {tuple(t.shape)} as (N, H, W) batches"
        )
    if p.shape[1] == 0 or p.shape[2] == 0:
        raise InvalidInputError(f"the masks have no pixels (shape {tuple(p.shape)} as (N, H, W))")
    return MaskPair(p, t, single_p and single_t, cuda, bool(tensors), device)


# --------------------------------------------------------------------------------- labels and scores


def _vector(x: Any, name: str) -> np.ndarray:
    """``x`` as a 1-D NumPy array: a list, array or tensor (CUDA tensors are copied to the host)
    of shape (N,) or (N, 1)."""
    _refuse_masked(x, name)
    if is_tensor(x):
        torch = torch_module()
        x = _readable_tensor(x, name, "expected numbers")
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        x = x.cpu().numpy()
    arr = as_numpy_array(x, name, what="a 1-D array")
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise InvalidInputError(f"{name} must be 1-D, (N,) or (N, 1), got shape {arr.shape}")
    if arr.size == 0:
        raise InvalidInputError(f"{name} is empty")
    if arr.dtype.kind not in _MASK_KINDS:
        raise InvalidInputError(f"{name} has dtype {arr.dtype}; expected numbers")
    return arr


def binary_vector(x: Any, name: str) -> np.ndarray:
    """0/1 values (bool, integers or floats) as a bool vector; anything else is an error."""
    arr = _vector(x, name)
    if arr.dtype.kind == "b":
        return arr
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidInputError(
            f"{name} must hold only 0 and 1 (binary classification); {name}[{i}] is {arr[i].item()!r}"
            f" ({int(bad.sum())} such values)"
        )
    return arr != 0


def score_vector(x: Any, name: str) -> np.ndarray:
    """Finite numbers as a float64 vector (probabilities, logits or any monotone score)."""
    arr = _vector(x, name).astype(np.float64, copy=False)
    finite = np.isfinite(arr)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise InvalidInputError(
            f"{name} must be finite; {name}[{i}] is {arr[i].item()!r} ({int((~finite).sum())} non-finite values)"
        )
    return arr


def ranking_vector(x: Any, name: str) -> np.ndarray:
    """Finite numbers to rank or threshold: floats as float64 (longer floats as they are), integers
    as int64 or uint64, never as float64, which merges integers above 2**53 into ties."""
    arr = _vector(x, name)
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8)
    if arr.dtype.kind in "iu":
        return arr.astype(np.uint64 if arr.dtype.kind == "u" else np.int64, copy=False)
    return score_vector(arr if arr.dtype.itemsize > 8 else arr.astype(np.float64, copy=False), name)


def labels_and_scores(labels: Any, scores: Any, scores_name: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    y = binary_vector(labels, "labels")
    s = ranking_vector(scores, scores_name)
    if y.shape != s.shape:
        raise InvalidInputError(f"labels has {y.shape[0]} values but {scores_name} has {s.shape[0]}")
    return y, s


def _at_least(s: np.ndarray, threshold: Any) -> np.ndarray:
    """``s >= threshold``, exactly for integer scores (an int threshold kept whole, a float one
    rounded up to the next integer) where float64 would round both."""
    if s.dtype.kind not in "iu":
        return s >= float(threshold)
    cut = threshold if isinstance(threshold, int) else math.ceil(threshold)
    info = np.iinfo(s.dtype)
    if cut > info.max:
        return np.zeros(s.shape, bool)
    return s >= s.dtype.type(max(cut, info.min))


def predictions(labels: Any, predicted: Any, threshold: Optional[float]) -> tuple[np.ndarray, np.ndarray]:
    """Labels and predicted classes as bool vectors: ``predicted`` holds 0/1 classes, or scores that are
    positive where they reach ``threshold`` (``score >= threshold``, as ``roc_curve``'s thresholds)."""
    if threshold is None:
        y = binary_vector(labels, "labels")
        try:
            p = binary_vector(predicted, "predictions")
        except InvalidInputError as exc:
            raise InvalidInputError(f"{exc}; pass threshold= to turn scores into classes") from None
        if y.shape != p.shape:
            raise InvalidInputError(f"labels has {y.shape[0]} values but predictions has {p.shape[0]}")
        return y, p
    cut = _checks._scalar_of(threshold, "threshold", InvalidInputError)
    whole = isinstance(cut, numbers.Integral) and not isinstance(cut, (bool, np.bool_))
    y, s = labels_and_scores(labels, predicted, "predictions")
    if whole and s.dtype.kind in "iu":
        return y, _at_least(s, int(cut))
    return y, _at_least(s, check_real(cut, "threshold"))
