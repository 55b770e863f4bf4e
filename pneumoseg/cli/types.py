"""argparse argument types built on :mod:`pneumoseg._checks`: a bad value becomes argparse's one-line
``argument --n: ...`` usage error, with the same wording as the library's own errors.

    parser.add_argument("--n", type=int_in(1, 10**6))
    parser.add_argument("--size", type=image_side(minimum=32))
    parser.add_argument("--positive-fraction", type=probability)
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional, TypeVar

from .. import limits
from .._checks import check_int, check_path, check_probability, check_real
from ..errors import PneumosegError

__all__ = ["int_in", "real_in", "probability", "image_side", "path", "add_backend_options", "add_no_progress"]


def _parse_int(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


_T = TypeVar("_T")


def _wrap(check: Callable[[], _T]) -> _T:
    try:
        return check()
    except PneumosegError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def int_in(low: Optional[int] = None, high: Optional[int] = None, name: str = "the value") -> Callable[[str], int]:
    """An integer in [low, high] (either end may be None)."""

    def parse(text: str) -> int:
        return _wrap(lambda: check_int(_parse_int(text), name, low=low, high=high if high is not None else 2**63 - 1))

    parse.__name__ = "integer"
    return parse


def real_in(low: Optional[float] = None, high: Optional[float] = None, name: str = "the value") -> Callable[[str], float]:
    """A finite number in [low, high]."""

    def parse(text: str) -> float:
        return _wrap(lambda: check_real(_parse_float(text), name, low=low, high=high))

    parse.__name__ = "number"
    return parse


def probability(text: str) -> float:
    """A number in [0, 1]."""
    return _wrap(lambda: check_probability(_parse_float(text), "the value"))


def image_side(minimum: int = 1) -> Callable[[str], int]:
    """An image height, width or size: an integer from ``minimum`` up to ``limits.max_image_side``."""

    def parse(text: str) -> int:
        return _wrap(lambda: check_int(_parse_int(text), "the size", low=minimum, high=limits.current().max_image_side))

    parse.__name__ = "size"
    return parse


def path(text: str):
    """A non-empty path without NUL characters."""
    return _wrap(lambda: check_path(text, "the path"))


def add_no_progress(parser: argparse.ArgumentParser) -> None:
    """The ``--no-progress`` flag of every command that draws progress bars: none, for logs and scripts
    (tqdm draws them to stderr whether or not it is a terminal)."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and scripts)")


def add_backend_options(parser: argparse.ArgumentParser, *, batch_size_help: str) -> None:
    """``--backend``, ``--device``, ``--precision`` and ``--batch-size``, as ``Predictor.from_dir`` takes
    them, for every command that loads a model to predict (predict, listen): one definition, so their
    choices and defaults cannot drift apart. ``batch_size_help`` says what a batch is in that command."""
    parser.add_argument("--backend", choices=("auto", "torch", "onnxruntime", "tensorrt"), default="auto",
                        help="default auto: torch on CUDA; on a CPU onnxruntime when the model has been exported "
                             "(`pneumoseg export MODEL --format onnx`), else torch")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None,
                        help="default: fp16 on CUDA, fp32 on a CPU")
    parser.add_argument("--batch-size", type=int_in(1, 4096), default=8, help=batch_size_help)
