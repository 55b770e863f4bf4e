"""Exceptions raised by pneumoseg. Bad input is always a ``ValueError`` subclass naming what was wrong."""

from __future__ import annotations

__all__ = ["PneumosegError", "InvalidInputError", "RLEError", "NativeError", "DataFormatError", "DicomError"]


class PneumosegError(Exception):
    """Base class of every error pneumoseg raises on purpose."""


class InvalidInputError(PneumosegError, ValueError):
    """An argument has the wrong shape, dtype, device or value."""


class RLEError(InvalidInputError):
    """A run-length encoding, or an argument of an RLE function, is malformed."""


class NativeError(PneumosegError, RuntimeError):
    """The native core failed for a reason that is not the caller's input (a CUDA error, say)."""


class DataFormatError(PneumosegError, ValueError):
    """A data file (CSV, folder layout) does not have the expected format; the message names the file
    and, for text files, the line."""


class DicomError(DataFormatError):
    """A DICOM file cannot be read: corrupt, truncated, without pixel data, or compressed with a
    transfer syntax whose decoder is not installed. The message names the file and the cause."""
