"""Exceptions raised by pneumoseg. Bad input is always a ``ValueError`` subclass naming what was wrong."""

from __future__ import annotations

__all__ = ["PneumosegError", "InvalidInputError", "RLEError", "NativeError"]


class PneumosegError(Exception):
    """Base class of every error pneumoseg raises on purpose."""


class InvalidInputError(PneumosegError, ValueError):
    """An argument has the wrong shape, dtype, device or value."""


class RLEError(InvalidInputError):
    """A run-length encoding, or an argument of an RLE function, is malformed."""


class NativeError(PneumosegError, RuntimeError):
    """The native core failed for a reason that is not the caller's input (a CUDA error, say)."""
