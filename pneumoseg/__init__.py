"""pneumoseg: pneumothorax classification and segmentation on chest radiographs, with a C++/CUDA core."""

from . import rle
from ._native import cuda_available
from .errors import InvalidInputError, NativeError, PneumosegError, RLEError

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "cuda_available",
    "rle",
    "PneumosegError",
    "InvalidInputError",
    "RLEError",
    "NativeError",
]
