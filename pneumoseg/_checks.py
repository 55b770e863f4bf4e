"""Argument checks shared by every public function: one place that decides what a number, a flag, a
shape, a list of strings, a path or an array argument may be, and words the error.

Each ``check_*`` returns the value in its plain Python form (``float``, ``int``, ``bool``, ``tuple``,
``list``, ``Path``) or raises ``error`` (default :class:`pneumoseg.InvalidInputError`, a ``ValueError``)
with a message that names the argument, says what was expected and shows what was given::

    top = check_probability(top, "top")                 # real in [0, 1]; no bool, str or NaN
    min_area = check_int(min_area, "min_area", low=0, saturate=True)
    from_logits = check_bool(from_logits, "from_logits")
    height, width = check_image_shape(shape, "shape")   # also checks pneumoseg.limits
    texts = check_str_sequence(rles, "rles")            # a list/tuple of str, not a generator or None

Rules, everywhere: ``bool`` is never a number (``True`` is not 1 here); strings are never numbers;
NaN and infinities are refused unless ``finite=False``; integer arguments never silently accept
floats; upper bounds default to what the native core can hold (``2**63 - 1``), so a huge integer is
a clear error instead of an ``OverflowError`` or a pybind ``TypeError`` further down.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, overload

import numpy as np

from . import limits
from .errors import InvalidInputError

__all__ = [
    "INT64_MAX", "show", "check_real", "check_probability", "check_int", "check_bool", "check_choice",
    "check_shape", "check_image_shape", "check_image_size", "check_str_sequence", "check_path",
    "check_array_object", "check_tensor_memory", "is_plain_tensor", "torch_names", "as_numpy_array",
]

INT64_MAX = 2**63 - 1
_Error = type[Exception]


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about arbitrary input."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str() (sys.get_int_max_str_digits), or holding one
        if isinstance(value, int):
            return f"{'a negative' if value < 0 else 'an'} integer of {value.bit_length():,} bits"
        return f"<a {_type_name(value)} too large to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: Any) -> str:
    return type(value).__name__


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _scalar_of(value: Any, name: str, error: _Error) -> Any:
    """A 0-d NumPy array or one-element torch tensor as its Python scalar; anything else unchanged."""
    if isinstance(value, np.ndarray):
        if value.ndim != 0:
            raise error(f"{name} must be a single number, got an array of shape {value.shape}")
        if value.dtype.kind not in "iuf":
            raise error(f"{name} must be a number, got an array of dtype {value.dtype}")
        return value.item()
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise error(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise error(f"{name} must be a real number, got a {value.dtype} tensor")
        return value.item()
    return value


def check_real(
    value: Any,
    name: str,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
    error: _Error = InvalidInputError,
) -> float:
    """A real number (int, float, NumPy scalar, 0-d array, one-element tensor) as ``float``, within
    ``[low, high]`` (an end is excluded with ``low_open`` / ``high_open``; ``None`` is unbounded)."""
    v = _scalar_of(value, name, error)
    if _is_bool(v) or not isinstance(v, numbers.Real):
        raise error(f"{name} must be a real number, got {_type_name(value)} {show(value)}")
    try:
        out = float(v)
    except (OverflowError, ValueError, TypeError):
        raise error(f"{name} must be a real number that fits a float, got {show(value)}") from None
    if math.isnan(out) or (finite and math.isinf(out)):
        raise error(f"{name} must be a finite number, got {show(value)}")
    below = low is not None and (out <= low if low_open else out < low)
    above = high is not None and (out >= high if high_open else out > high)
    if below or above:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = ("(" if low_open or low is None else "[") + f"{lo}, {hi}" + (")" if high_open or high is None else "]")
        raise error(f"{name} must be in {interval}, got {show(value)}")
    return out


def check_probability(value: Any, name: str, *, error: _Error = InvalidInputError) -> float:
    """A real number in [0, 1] (thresholds, probabilities, fractions)."""
    return check_real(value, name, low=0.0, high=1.0, error=error)


def check_int(
    value: Any,
    name: str,
    *,
    low: Optional[int] = None,
    high: Optional[int] = INT64_MAX,
    saturate: bool = False,
    error: _Error = InvalidInputError,
) -> int:
    """An integer (int, NumPy integer, integer 0-d array or tensor; never bool or float) in
    ``[low, high]``. With ``saturate=True`` values above ``high`` become ``high``: for thresholds
    such as a minimum area, where anything larger than every possible count means the same."""
    v = _scalar_of(value, name, error)
    if _is_bool(v) or isinstance(v, (float, np.floating)):
        raise error(f"{name} must be an integer, got {_type_name(value)} {show(value)}")
    try:
        out = operator.index(v)
    except TypeError:
        raise error(f"{name} must be an integer, got {_type_name(value)} {show(value)}") from None
    if low is not None and out < low:
        raise error(f"{name} must be at least {low}, got {show(value)}")
    if high is not None and out > high:
        if saturate:
            return high
        raise error(f"{name} must be at most {high}, got {show(value)}")
    return out


@overload
def check_bool(value: Any, name: str, *, allow_none: Literal[False] = False, error: _Error = ...) -> bool: ...
@overload
def check_bool(value: Any, name: str, *, allow_none: bool, error: _Error = ...) -> Optional[bool]: ...
def check_bool(value: Any, name: str, *, allow_none: bool = False, error: _Error = InvalidInputError) -> Optional[bool]:
    """``True`` or ``False`` (or NumPy's), never 0/1, strings or arrays (``"false"`` is truthy)."""
    if value is None and allow_none:
        return None
    if not _is_bool(value):
        expected = "True, False or None" if allow_none else "True or False"
        raise error(f"{name} must be {expected}, got {_type_name(value)} {show(value)}")
    return bool(value)


def check_choice(value: Any, name: str, choices: Sequence[Any], *, error: _Error = InvalidInputError) -> Any:
    """One of ``choices``, compared by type and value (``4.0`` and ``True`` are not ``4`` or ``1``)."""
    for c in choices:
        if type(value) is type(c) and value == c:
            return c
        if isinstance(c, int) and not _is_bool(value) and isinstance(value, np.integer) and value == c:
            return c
    options = ", ".join(repr(c) for c in choices)
    raise error(f"{name} must be one of {options}; got {show(value)}")


def check_shape(value: Any, name: str, ndim: int = 2, *, low: int = 0, error: _Error = InvalidInputError) -> tuple[int, ...]:
    """A tuple of ``ndim`` integers (list, tuple or NumPy array of them), each at least ``low``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise error(f"{name} must be a sequence of {ndim} integers, got {_type_name(value)} {show(value)}")
    if len(value) != ndim:
        raise error(f"{name} must have {ndim} values, got {len(value)}: {show(value)}")
    return tuple(check_int(v, f"{name}[{i}]", low=low, error=error) for i, v in enumerate(value))


def check_image_shape(value: Any, name: str, *, low: int = 0, error: _Error = InvalidInputError) -> tuple[int, int]:
    """A (height, width) pair pneumoseg will allocate: integers >= ``low`` within
    ``limits.max_image_side`` and ``limits.max_image_pixels``."""
    h, w = check_shape(value, name, 2, low=low, error=error)
    limits.check_image(h, w, f"{name}={(h, w)}")
    return h, w


def check_image_size(value: Any, name: str, *, low: int = 1, error: _Error = InvalidInputError) -> tuple[int, int]:
    """An output size given as one integer (a square) or a (height, width) pair, each at least
    ``low``, within the image limits."""
    if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes)):
        return check_image_shape(value, name, low=low, error=error)
    side = check_int(value, name, low=low, error=error)
    limits.check_image(side, side, f"{name}={side}")
    return side, side


def check_str_sequence(
    value: Any,
    name: str,
    *,
    allow_bytes: bool = False,
    count_limit: Optional[str] = None,
    error: _Error = InvalidInputError,
) -> list:
    """A list of ``str`` (and ``bytes`` with ``allow_bytes``) from a list, tuple or 1-D array.
    Generators and other one-shot iterables are refused rather than consumed, so a caller never
    finds them silently emptied; ``None`` and a lone string are refused with a hint. ``count_limit``
    names a :mod:`pneumoseg.limits` limit on the number of items."""
    kinds = "str or bytes" if allow_bytes else "str"
    if value is None:
        raise error(f"{name} must be a list of {kinds}, got None")
    if isinstance(value, (str, bytes)):
        raise error(f"{name} must be a list of {kinds}, got a single {_type_name(value)}; wrap it in a list")
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise error(f"{name} must be a 1-D list of {kinds}, got an array of shape {value.shape}")
        items = value.tolist()
    elif isinstance(value, Sequence):
        items = list(value)
    elif isinstance(value, Iterator):
        raise error(f"{name} must be a list or tuple of {kinds}, got a {_type_name(value)} "
                    "(a one-shot iterator; pass list(...) of it)")
    else:
        raise error(f"{name} must be a list of {kinds}, got {_type_name(value)} {show(value)}")
    if count_limit is not None:
        limits.check(count_limit, len(items), f"{name} with {len(items):,} strings")
    allowed = (str, bytes) if allow_bytes else (str,)
    for i, item in enumerate(items):
        if not isinstance(item, allowed):
            raise error(f"{name}[{i}] must be a {kinds}, got {_type_name(item)} {show(item)}")
    return items


def check_path(value: Any, name: str, *, error: _Error = InvalidInputError) -> Path:
    """A file-system path (``str`` or ``os.PathLike``), non-empty and without NUL characters."""
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise error(f"{name} must be a path (str or pathlib.Path), got {_type_name(value)} {show(value)}")
    text = os.fspath(value)
    if not isinstance(text, str):
        raise error(f"{name} must be a text path, got {show(value)}")
    if not text:
        raise error(f"{name} must not be empty")
    if "\x00" in text:
        raise error(f"{name} contains a NUL character: {show(text)}")
    return Path(text)


def as_numpy_array(value: Any, name: str, *, what: str = "an array", error: _Error = InvalidInputError) -> np.ndarray:
    """``np.asarray(value)``, or ``error`` saying that ``name`` could not be read as ``what`` where
    NumPy cannot read it (a ragged list, a CuPy array, which refuses implicit copies) instead of
    NumPy's own ValueError or TypeError."""
    try:
        return np.asarray(value)
    except Exception as exc:  # noqa: BLE001 - whatever NumPy raises, named after the argument
        raise error(f"{name} could not be read as {what}: {exc}") from exc


def check_readable_tensor(x: Any, name: str, *, error: _Error = InvalidInputError) -> None:
    """Refuse torch tensors whose values cannot be read as real numbers where they are: complex,
    quantised, or on a device other than the CPU and CUDA (meta tensors have no data at all)."""
    if x.is_complex():
        raise error(f"{name} must be real, got {x.dtype}")
    if x.is_quantized:
        raise error(f"{name} is a quantized tensor ({x.dtype}); pass {name}.dequantize()")
    if not (x.is_cpu or x.is_cuda):  # what x.device.type says, without building a torch.device
        raise error(f"{name} is on device {x.device}; pneumoseg runs on CPU and CUDA tensors")


class _TorchNames:
    """What pneumoseg asks of torch on every call, looked up once torch has been imported (by the
    caller: never here): the tensor type and strided layout (the bridge's dispatch), the raw
    current-stream query (the bridge and the loss), and the cheap type tests of ``is_plain_tensor``."""

    tensor: Any = None
    strided: Any = None
    current_stream: Any = None
    is_functional: Any = None
    is_functorch_wrapped: Any = None
    is_compiling: Any = None

    @classmethod
    def ready(cls) -> Any:
        """This class once torch is imported, else None: torch's per-call names (``.tensor``:
        ``torch.Tensor``, ``.strided``, ``.current_stream(index)``, the type tests)."""
        if cls.tensor is None:
            torch = sys.modules.get("torch")
            if torch is None:
                return None
            functorch = getattr(torch._C, "_functorch", None)
            cls.strided = torch.strided
            # the raw handle, without building a torch.cuda.Stream (a measurable cost per call on small
            # batches); an older torch without the query builds one
            raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
            cls.current_stream = raw_stream or (lambda index: torch.cuda.current_stream(index).cuda_stream)
            cls.is_functional = getattr(torch, "_is_functional_tensor", None)
            cls.is_functorch_wrapped = getattr(functorch, "is_functorch_wrapped_tensor", None)
            cls.is_compiling = torch.compiler.is_compiling
            cls.tensor = torch.Tensor  # last: a set tensor means every name is set
        return cls


# one call on the hot path (a function around ready() would be two)
torch_names = _TorchNames.ready


def is_plain_tensor(x: Any) -> bool:
    """True for an exact ``torch.Tensor`` that wraps nothing, which therefore holds its own data or
    none at all (never fake). False for every subclass (FakeTensor, FunctionalTensor, nn.Parameter,
    wrapper subclasses) and for the functionalization and torch.func wrappers, which are plain
    ``torch.Tensor`` objects around another tensor: those take ``is_fake``'s full walk. About a
    tenth of the cost of ``is_fake`` on a plain tensor."""
    names = _TorchNames
    if names.tensor is None and names.ready() is None:
        return False
    if type(x) is not names.tensor or names.is_functional is None or names.is_functorch_wrapped is None:
        return False
    if names.is_compiling():  # Dynamo's tensors are fake, and it cannot trace the probes (a graph break)
        return False
    return not names.is_functional(x) and not names.is_functorch_wrapped(x)


def _wrapped_by_a_transform(x: Any) -> bool:
    names = _TorchNames.ready()
    if names is None or names.is_functional is None or names.is_functorch_wrapped is None:
        return False
    try:
        return bool(names.is_functional(x) or names.is_functorch_wrapped(x))
    except (RuntimeError, TypeError):  # not a tensor these probes understand
        return False


def check_tensor_memory(x: Any, name: str, *, error: _Error = InvalidInputError) -> None:
    """Refuse a torch tensor whose elements are not all in memory it owns, before anything reads
    them through its data pointer (the native core, or NumPy through ``.numpy()``): a FakeTensor
    (FakeTensorMode, make_fx, torch.compile's tracing: a shape without data, its pointer null) and
    a tensor whose storage is smaller than its shape and strides reach (a storage resized to 0, as
    FSDP frees parameters, or an ``as_strided`` view past its end). Either was a segfault or a read
    of freed memory."""
    if not is_plain_tensor(x):  # a plain tensor cannot be fake: is_fake's walk is skipped for it
        fake = sys.modules.get("torch._subclasses.fake_tensor")
        if fake is not None and fake.is_fake(x):
            raise error(f"{name} is a FakeTensor (FakeTensorMode, make_fx or torch.compile tracing) and holds no "
                        "data; pass a real CPU or CUDA tensor")
        if _wrapped_by_a_transform(x):  # its own storage is a placeholder: the data is in the tensor it wraps
            raise error(f"{name} is a tensor inside a torch.func transform (functionalize, vmap, grad, jvp), whose "
                        "data pneumoseg's native ops cannot read; call them outside the transform")
    numel = x.numel()
    if numel == 0:
        return
    try:
        if x.is_contiguous():  # its last element is numel - 1 past its first
            reach = x.storage_offset() + numel
        else:
            reach = x.storage_offset() + 1 + sum((size - 1) * stride for size, stride in zip(x.shape, x.stride()))
        have = x.untyped_storage().nbytes()
        pointer = x.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError) as exc:  # tensor subclasses without a storage
        raise error(f"{name} has no storage pneumoseg can read ({type(x).__name__}: {exc})") from None
    if not pointer or have < reach * x.element_size():
        raise error(f"{name} reaches {reach * x.element_size():,} bytes of a storage of {have:,} bytes (a storage "
                    "freed or resized, e.g. by FSDP, or a view past its end); pass a tensor with its data")


def check_array_object(x: Any, name: str, *, error: _Error = InvalidInputError) -> None:
    """Refuse array-likes the native core cannot read as dense memory, with a hint: sparse torch
    tensors and SciPy matrices, nested tensors, NumPy masked arrays, and None."""
    if x is None:
        raise error(f"{name} must be an array, got None")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if x.layout != torch.strided:
            raise error(f"{name} is a {x.layout} tensor; pass a dense one ({name}.to_dense())")
        if getattr(x, "is_nested", False):
            raise error(f"{name} is a nested tensor; pass a dense one")
        return
    if isinstance(x, np.ma.MaskedArray):
        raise error(f"{name} is a masked array; pass {name}.filled(0) (its mask would be ignored)")
    cupy = sys.modules.get("cupy")
    if hasattr(x, "__cuda_array_interface__") and not (cupy is not None and isinstance(x, cupy.ndarray)):
        # NumPy wraps such an object (Numba, PyCUDA, JAX) as one Python object: "got shape ()" followed
        raise error(f"{name} is a GPU array of type {type(x).__name__} (the CUDA array interface), which pneumoseg "
                    f"reads from torch and CuPy only: pass torch.as_tensor({name}, device='cuda') or "
                    f"cupy.asarray({name})")
    if hasattr(x, "tocoo") and hasattr(x, "nnz"):
        raise error(f"{name} is a SciPy sparse matrix; pass a dense array ({name}.toarray())")


def nesting_excess(value: Any, max_depth: int, max_values: float = math.inf) -> Optional[str]:
    """Whether nested mappings, lists and tuples (a parsed description, an unpickled checkpoint) pass
    a bound: ``"depth"`` when they nest deeper than ``max_depth``, ``"values"`` when they hold more
    than ``max_values`` values (containers and leaves, a shared one counted each time it is reached,
    so a structure sharing itself 2**20 ways is caught), else None. Iterative, and stops at the bound:
    a recursive walk raised RecursionError at a few thousand levels."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > max_values:
            return "values"
        if depth > max_depth:
            return "depth"
        if isinstance(node, Mapping):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)
    return None
