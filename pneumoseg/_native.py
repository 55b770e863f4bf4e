"""The bridge to the native core: loads ``pneumoseg._C`` and turns NumPy arrays, torch tensors and CuPy
arrays into the framework-free ``TensorView`` every kernel takes, with the caller's CUDA stream.

torch and CuPy are never imported here; an array is recognised as theirs only if the caller has
already imported them (``sys.modules``), so ``import pneumoseg`` needs NumPy alone.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._checks import as_numpy_array, check_array_object, check_tensor_memory, torch_names
from .errors import InvalidInputError

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "pneumoseg's native extension (pneumoseg._C) is missing: this is a source tree that was never "
        "built. Install it with `pip install -e .` (or `pip install .` and import it from elsewhere)."
    ) from exc

__all__ = ["ArrayInfo", "as_view", "read_array", "view_of", "kind_of", "data_pointer", "torch_dtype_code", "torch_names", "zeros_uint8", "require_cuda_build", "cuda_available",
           "cuda_memory_reserved", "release_cuda_memory"]

# Codes of pneumoseg::DType (csrc/common/tensor_view.h).
_NUMPY_CODES = {
    np.dtype(np.bool_): 0,
    np.dtype(np.int8): 1,
    np.dtype(np.uint8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.uint16): 4,
    np.dtype(np.int32): 5,
    np.dtype(np.uint32): 6,
    np.dtype(np.int64): 7,
    np.dtype(np.uint64): 8,
    np.dtype(np.float16): 9,
    np.dtype(np.float32): 11,
    np.dtype(np.float64): 12,
}
_TORCH_NAMES = {
    "bool": 0, "int8": 1, "uint8": 2, "int16": 3, "uint16": 4, "int32": 5, "uint32": 6, "int64": 7,
    "uint64": 8, "float16": 9, "bfloat16": 10, "float32": 11, "float64": 12,
}
CPU, CUDA = 0, 1


def cuda_available() -> bool:
    """True when pneumoseg was built with CUDA and a CUDA device is present."""
    return bool(_C.built_with_cuda()) and _C.cuda_device_count() > 0


def cuda_memory_reserved() -> int:
    """Bytes of GPU memory that pneumoseg's own scratch pools hold, in use or cached (0 without CUDA).

    The CUDA ops (labelling, post-processing, RLE, the fused loss) take their scratch memory from one
    stream-ordered pool per device, separate from PyTorch's and CuPy's allocators, so
    ``torch.cuda.memory_reserved()`` does not count it and ``torch.cuda.empty_cache()`` does not free it.
    Freed scratch stays cached for the next call, up to an eighth of the device's memory and at most
    2 GiB (labelling or post-processing a batch of 64 1024x1024 masks uses 512 MiB).
    """
    return int(_C.cuda_scratch_reserved_bytes())


def release_cuda_memory() -> int:
    """Give the GPU memory cached by pneumoseg's scratch pools back to the driver (as
    ``torch.cuda.empty_cache()`` does for PyTorch's); returns the bytes given back.

    It waits for the work queued on each device that has a pool. A no-op returning 0 without CUDA;
    imports nothing. The next CUDA op simply allocates again.
    """
    return int(_C.cuda_release_scratch())


@dataclass
class ArrayInfo:
    """A native view of an array plus what is needed to keep it alive and answer in kind."""

    view: Any  # _C.TensorView
    kind: str  # "numpy", "torch" or "cupy"
    device: int  # CPU or CUDA
    device_index: int
    stream: int  # the caller's current CUDA stream (0 on CPU)
    owner: Any  # the array whose memory the view points into


def _torch():
    return sys.modules.get("torch")


def _cupy():
    return sys.modules.get("cupy")


def kind_of(x: Any) -> str:
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    cupy = _cupy()
    if cupy is not None and isinstance(x, cupy.ndarray):
        return "cupy"
    return "numpy"


def read_array(x: Any, name: str, error: type[Exception] = InvalidInputError) -> tuple[str, Any]:
    """``(kind, x)``: the framework of ``x`` ("torch", "numpy" or "cupy") and ``x`` itself, as a NumPy
    array when it is anything else NumPy reads (a list); raise ``error`` naming ``name`` for what the
    native core cannot read (:func:`check_array_object`). Callers that need the shape before
    describing ``x`` (postprocess's batches, RLE's encode) classify it here once, then call
    :func:`view_of`."""
    torch = torch_names()
    if torch is not None and type(x) is torch.tensor:  # the common case: check_array_object's torch part inline
        if x.layout is not torch.strided or x.is_nested:
            check_array_object(x, name, error=error)
        return "torch", x
    if type(x) is np.ndarray:  # nothing check_array_object refuses is an exact ndarray
        return "numpy", x
    check_array_object(x, name, error=error)
    kind = kind_of(x)
    if kind == "numpy":
        x = as_numpy_array(x, name, error=error)
    return kind, x


def view_of(kind: str, x: Any, name: str, error: type[Exception] = InvalidInputError, *,
            batch_of_one: bool = False) -> ArrayInfo:
    """:func:`as_view` of what :func:`read_array` returned."""
    return _VIEWS[kind](x, name, error, batch_of_one)


def as_view(x: Any, name: str, error: type[Exception] = InvalidInputError, *, batch_of_one: bool = False) -> ArrayInfo:
    """Describe ``x`` for the native core; raise ``error`` naming ``name`` for unsupported input.
    ``batch_of_one=True`` describes ``x`` with a leading dimension of size 1, as ``x[None]`` would,
    without making that view."""
    kind, x = read_array(x, name, error)
    return _VIEWS[kind](x, name, error, batch_of_one)


_MAX_DIMS = 4  # kMaxDims of csrc/common/tensor_view.h


def _check_ndim(ndim: int, name: str, error: type[Exception]) -> None:
    if ndim > _MAX_DIMS:  # the native view's own message named no argument
        raise error(f"{name} has {ndim} dimensions; pneumoseg's native ops take at most {_MAX_DIMS}")


def _numpy_view(arr: np.ndarray, name: str, error: type[Exception], batch_of_one: bool = False) -> ArrayInfo:
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    code = _NUMPY_CODES.get(arr.dtype)
    if code is None:
        raise error(f"{name} has unsupported dtype {arr.dtype}; use bool, an integer or a float type")
    _check_ndim(arr.ndim + int(batch_of_one), name, error)
    itemsize = arr.itemsize
    flags = arr.flags
    if not flags.c_contiguous and any(s % itemsize for s in arr.strides):
        arr = np.ascontiguousarray(arr)
        flags = arr.flags
    if not flags.aligned:  # np.frombuffer(..., offset=1): the kernels read typed, aligned memory
        arr = arr.copy(order="C")
    shape, strides = list(arr.shape), [s // itemsize for s in arr.strides]
    if batch_of_one:
        _prepend_unit_dim(shape, strides)
    view = _C.TensorView(arr.ctypes.data, code, CPU, 0, shape, strides)  # the address, faster than __array_interface__
    return ArrayInfo(view, "numpy", CPU, 0, 0, arr)


def _prepend_unit_dim(shape: list[int], strides: list[int]) -> None:
    """A leading dimension of size 1, with the stride torch's ``x[None]`` gives it (the next
    dimension's extent: what the native core expects of a contiguous output)."""
    strides.insert(0, shape[0] * strides[0] if shape else 1)
    shape.insert(0, 1)


_TORCH_CODES: dict = {}  # torch.dtype -> code, filled on first use (torch is never imported here)


def torch_dtype_code(dtype: Any) -> Any:
    """The native dtype code of a torch dtype (None if unsupported)."""
    code = _TORCH_CODES.get(dtype)
    if code is None:
        code = _TORCH_NAMES.get(str(dtype).replace("torch.", ""))
        if code is not None:
            _TORCH_CODES[dtype] = code
    return code


def _torch_view(x: Any, name: str, error: type[Exception], batch_of_one: bool = False) -> ArrayInfo:
    code = _TORCH_CODES.get(x.dtype)
    if code is None:
        code = torch_dtype_code(x.dtype)
        if code is None:
            raise error(f"{name} has unsupported dtype {x.dtype}; use bool, an integer or a float type")
    if x.is_cuda:
        device, index = CUDA, x.get_device()  # an int, without building a torch.device
        stream = torch_names().current_stream(index)
    elif x.is_cpu:
        device, index, stream = CPU, 0, 0
    else:
        raise error(f"{name} is on device {x.device}; pneumoseg runs on CPU and CUDA tensors")
    _check_ndim(x.dim() + int(batch_of_one), name, error)
    check_tensor_memory(x, name, error=error)
    if x.is_neg() or x.is_conj():
        x = x.resolve_conj().resolve_neg()
    if x.data_ptr() % x.element_size():  # torch.frombuffer(..., offset=1): see _numpy_view
        x = x.clone(memory_format=_torch().contiguous_format)
    shape, strides = list(x.shape), list(x.stride())
    if batch_of_one:
        _prepend_unit_dim(shape, strides)
    view = _C.TensorView(x.data_ptr(), code, device, index, shape, strides)
    return ArrayInfo(view, "torch", device, index, stream, x)


def _cupy_view(x: Any, name: str, error: type[Exception], batch_of_one: bool = False) -> ArrayInfo:
    cupy = _cupy()
    code = _NUMPY_CODES.get(np.dtype(x.dtype))
    if code is None:
        raise error(f"{name} has unsupported dtype {x.dtype}; use bool, an integer or a float type")
    _check_ndim(x.ndim + int(batch_of_one), name, error)
    itemsize = x.dtype.itemsize
    if any(s % itemsize for s in x.strides):
        x = cupy.ascontiguousarray(x)
    stream = cupy.cuda.get_current_stream().ptr
    shape, strides = list(x.shape), [s // itemsize for s in x.strides]
    if batch_of_one:
        _prepend_unit_dim(shape, strides)
    view = _C.TensorView(x.data.ptr, code, CUDA, x.device.id, shape, strides)
    return ArrayInfo(view, "cupy", CUDA, x.device.id, stream, x)


_VIEWS = {"torch": _torch_view, "numpy": _numpy_view, "cupy": _cupy_view}


def data_pointer(x: Any) -> int:
    """The address of a torch tensor's or CuPy array's first element."""
    if kind_of(x) == "torch":
        return x.data_ptr()
    return x.data.ptr


def require_cuda_build(name: str, error: type[Exception] = InvalidInputError) -> None:
    if not _C.built_with_cuda():
        raise error(
            f"{name}: CUDA was asked for, but this pneumoseg was built without CUDA support "
            "(rebuild with nvcc on PATH, or -Ccmake.define.PNEUMOSEG_CUDA=ON)"
        )


def zeros_uint8(kind: str, shape: tuple[int, ...], device_index: int = 0, cuda: bool = False) -> Any:
    """A zeroed uint8 array of the given framework, on the CPU or on CUDA device ``device_index``."""
    if kind == "torch":
        torch = _torch()
        dev = torch.device("cuda", device_index) if cuda else torch.device("cpu")
        return torch.zeros(shape, dtype=torch.uint8, device=dev)
    if kind == "cupy":
        cupy = _cupy()
        with cupy.cuda.Device(device_index):
            return cupy.zeros(shape, dtype=cupy.uint8)
    return np.zeros(shape, dtype=np.uint8)
