"""Size limits: the largest inputs pneumoseg accepts before it allocates memory for them.

Every limit is checked *before* the memory it protects is allocated, and going past one raises
:class:`pneumoseg.LimitError` (a ``ValueError``) that names the limit, the value asked for and how to
raise it. The defaults are far above anything a chest radiograph needs (a SIIM image is 1024 x 1024,
a large detector image about 4300 x 4300 at 16 bits) and far below what would exhaust a machine.

=========================  ===========================  =====================================================
limit                      default                      what it bounds
=========================  ===========================  =====================================================
``max_image_side``         65 536                       height or width of an image or mask pneumoseg is
                                                        asked to *make* (``rle.decode`` shapes, DICOM
                                                        Rows/Columns, ``size=`` / ``image_size=`` arguments)
``max_image_pixels``       2**28 (16384 x 16384)        height x width of one such image or mask
``max_batch_bytes``        2**33 (8 GiB)                bytes of one array pneumoseg allocates for a whole
                                                        batch (``rle.decode_batch``)
``max_dicom_bytes``        2**30 (1 GiB)                a DICOM file's size, its deflated data once inflated,
                                                        and its declared decoded pixel data
                                                        (Rows x Columns x frames x samples x BitsAllocated)
``max_rle_chars``          2**28 (256 Mi characters)    one RLE string given to a decoder or read from a CSV
``max_csv_bytes``          2**30 (1 GiB)                an RLE CSV file (``read_rle_csv``)
``max_annotations``        2**20                        RLE strings painted into one image (a union)
``max_network_pixels``     2**24 (4096 x 4096)          height x width of a network's input in a model
                                                        directory (``input_size`` in ``pneumoseg.json``):
                                                        every image is resized to it, and a U-Net's
                                                        activations take hundreds of bytes per input pixel
=========================  ===========================  =====================================================

Arrays the caller already holds (a mask to encode, probabilities to post-process) are not limited:
their memory is already spent, and pneumoseg's work on them grows in proportion.

Raising a limit, in order of precedence:

- for a block of code: ``with pneumoseg.limits.override(max_image_pixels=2**30): ...``
- for the process: ``pneumoseg.limits.set_limits(max_dicom_bytes=4 * 2**30)``
- from the environment, read once at first use: ``PNEUMOSEG_MAX_IMAGE_PIXELS=1073741824`` (the limit's
  name in capitals with a ``PNEUMOSEG_`` prefix; plain integers, ``_`` separators allowed).

Limits are process-wide (one setting for all threads, so worker threads see a block's limits too);
``override`` blocks in several threads may end in any order and each removes only its own change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import InvalidInputError, LimitError

__all__ = ["Limits", "current", "set_limits", "override", "reset", "check", "check_image", "ENVIRONMENT_PREFIX"]

ENVIRONMENT_PREFIX = "PNEUMOSEG_"
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    """One set of limits (see the module documentation for what each bounds)."""

    max_image_side: int = 2**16
    max_image_pixels: int = 2**28
    max_batch_bytes: int = 2**33
    max_dicom_bytes: int = 2**30
    max_rle_chars: int = 2**28
    max_csv_bytes: int = 2**30
    max_annotations: int = 2**20
    max_network_pixels: int = 2**24

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _INT64_MAX:
                from ._checks import show  # _checks imports this module

                raise InvalidInputError(f"limit {f.name} must be an integer in [1, 2**63 - 1], got {show(value)}")


_NAMES = tuple(f.name for f in dataclasses.fields(Limits))
_lock = threading.Lock()
_base: Limits | None = None  # the defaults, the environment and set_limits
# The override blocks now open, oldest first, each (token, changes): a block that ends removes its own
# layer, so blocks in several threads may end in any order and still leave the right limits behind.
_layers: list[tuple[int, dict[str, int]]] = []
_tokens = itertools.count()
_current: Limits | None = None  # _base with the layers applied


def _from_environment() -> Limits:
    values = {}
    for name in _NAMES:
        variable = ENVIRONMENT_PREFIX + name.upper()
        text = os.environ.get(variable)
        if text is None or not text.strip():
            continue
        try:
            values[name] = int(text.strip())
        except ValueError:
            raise InvalidInputError(f"environment variable {variable} must be a positive integer, got {text!r}") from None
        if not 1 <= values[name] <= _INT64_MAX:
            raise InvalidInputError(f"environment variable {variable} must be in [1, 2**63 - 1], got {text!r}")
    return Limits(**values)


def _refresh_locked() -> Limits:
    global _base, _current
    if _base is None:
        _base = _from_environment()
    merged: dict[str, int] = {}
    for _, changes in _layers:
        merged.update(changes)
    _current = dataclasses.replace(_base, **merged) if merged else _base
    return _current


def current() -> Limits:
    """The limits in force (the environment is read on the first call)."""
    limits = _current
    if limits is None:
        with _lock:
            limits = _current if _current is not None else _refresh_locked()
    return limits


def _check_names(changes: dict[str, int]) -> None:
    unknown = sorted(set(changes) - set(_NAMES))
    if unknown:
        raise InvalidInputError(f"unknown limit(s) {', '.join(unknown)}; the limits are {', '.join(_NAMES)}")
    dataclasses.replace(Limits(), **changes)  # each value checked before anything changes


def set_limits(**changes: int) -> Limits:
    """Change some limits for the whole process; returns the previous limits, so
    ``set_limits(**dataclasses.asdict(previous))`` restores them. An open :func:`override` block keeps
    its own values until it ends."""
    global _base
    _check_names(changes)
    with _lock:
        previous = _current if _current is not None else _refresh_locked()
        # _refresh_locked has set _base, and reset() replaces it only with a successfully read one
        assert _base is not None
        _base = dataclasses.replace(_base, **changes)
        _refresh_locked()
    return previous


@contextlib.contextmanager
def override(**changes: int) -> Iterator[Limits]:
    """Change some limits inside a ``with`` block (for the whole process, worker threads included),
    restoring them after it. Blocks may nest and may end in any order, in any thread: each ending
    block removes only its own changes."""
    _check_names(changes)
    with _lock:
        token = next(_tokens)
        _layers.append((token, dict(changes)))
        limits = _refresh_locked()
    try:
        yield limits
    finally:
        with _lock:
            _layers[:] = [layer for layer in _layers if layer[0] != token]
            _refresh_locked()


def reset() -> Limits:
    """Back to the defaults and the environment (re-read now); returns the new limits. Open
    :func:`override` blocks keep their values until they end."""
    global _base
    with _lock:
        # Read before anything changes: a bad variable raises and leaves the limits as they were. It
        # used to leave _base None beside the old _current, so the next set_limits raised TypeError.
        _base = _from_environment()
        return _refresh_locked()


def exceeded(name: str, value: int, what: str) -> LimitError:
    """The error for ``what`` (e.g. "shape (70000, 70000)") needing ``value`` where limit ``name`` allows
    less; says how to raise the limit."""
    allowed = getattr(current(), name)
    return LimitError(
        f"{what} needs {name} >= {value:,}, above the limit of {allowed:,}; raise it with "
        f"pneumoseg.limits.set_limits({name}=...) or the environment variable {ENVIRONMENT_PREFIX}{name.upper()}"
    )


def check(name: str, value: int, what: str) -> None:
    """Raise :class:`pneumoseg.LimitError` when ``value`` is above limit ``name``."""
    if value > getattr(current(), name):
        raise exceeded(name, value, what)


def check_image(height: int, width: int, what: str) -> None:
    """Raise :class:`pneumoseg.LimitError` when an image of ``height`` x ``width`` that pneumoseg is
    about to allocate is past ``max_image_side`` or ``max_image_pixels``."""
    check("max_image_side", max(height, width), what)
    check("max_image_pixels", height * width, what)
