"""Exceptions raised by pneumoseg. Bad input is always a ``ValueError`` subclass naming what was wrong."""

from __future__ import annotations

from typing import Optional

__all__ = [
    "PneumosegError", "InvalidInputError", "RLEError", "LimitError", "RLELimitError", "NativeError", "DataFormatError", "DicomError",
    "AnotherImageError", "OutputError", "DataWarning",
]


class PneumosegError(Exception):
    """Base class of every error pneumoseg raises on purpose."""


class InvalidInputError(PneumosegError, ValueError):
    """An argument has the wrong type, shape, dtype, device or value."""


class RLEError(InvalidInputError):
    """A run-length encoding, or an argument of an RLE function, is malformed."""


class LimitError(InvalidInputError):
    """An input asks for more than a documented size limit allows (see :mod:`pneumoseg.limits`); the
    message names the limit and how to raise it."""


class RLELimitError(LimitError, RLEError):
    """A size limit exceeded by an argument of an RLE function: both a :class:`LimitError` and an
    :class:`RLEError`, so either ``except`` catches it."""


class NativeError(PneumosegError, RuntimeError):
    """The native core failed for a reason that is not the caller's input (a CUDA error, say)."""


class DataFormatError(PneumosegError, ValueError):
    """A data file (CSV, folder layout) does not have the expected format; the message names the file
    and, for text files, the line."""


class DicomError(DataFormatError):
    """A DICOM file cannot be read: corrupt, truncated, without pixel data, or compressed with a
    transfer syntax whose decoder is not installed. The message names the file and the cause."""


class AnotherImageError(DicomError):
    """A DICOM file no longer holds the image a prediction was made from (its SOPInstanceUID changed), so
    nothing derived from that prediction (a SEG, an overlay) may reference it: told apart from other
    DicomErrors so that a caller can say so in its own words (``pneumoseg predict``, the DICOM node)."""


class OutputError(PneumosegError, ValueError):
    """pneumoseg refuses to write where it was asked: the output folder is a file, not writable, or
    holds someone else's files (pass ``overwrite=True`` / ``--force`` to write into it anyway), or a
    name derived from the data (an ImageId) is not a safe file name."""


class TrainingError(PneumosegError, RuntimeError):
    """Training cannot usefully go on: the loss became NaN or infinite (the run diverged, or the data
    holds non-finite values). The message says where; the run folder keeps its last checkpoint."""


def out_of_memory_line(exc: BaseException) -> Optional[str]:
    """The first line of ``exc``'s message when it is an allocator's failure (Python's, torch's CPU or
    CUDA allocator's, or onnxruntime's, which has exception types of its own), else None (pneumoseg's
    own errors included): for the commands that turn a traceback from deep inside a convolution,
    which told the user nothing they could change, into one line saying what to lower."""
    if isinstance(exc, PneumosegError):
        return None
    text = str(exc)
    if not (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or any(s in text for s in ("can't allocate memory", "Failed to allocate memory", "CUDA out of memory"))):
        return None
    return (text.strip().splitlines() or [type(exc).__name__])[0]


class DataWarning(UserWarning):
    """Something in a data folder deserves a look (images without labels, labels without images,
    files that were skipped)."""
