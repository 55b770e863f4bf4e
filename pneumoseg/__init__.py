"""pneumoseg: pneumothorax classification and segmentation on chest radiographs, with a C++/CUDA core."""

from typing import TYPE_CHECKING

from . import limits, postprocess, rle
from ._native import cuda_available, cuda_memory_reserved, release_cuda_memory
from .errors import (
    AnotherImageError, DataFormatError, DataWarning, DicomError, InvalidInputError, LimitError, NativeError, OutputError, PneumosegError,
    RLEError, TrainingError,
)

__version__ = "0.1.0"

# Modules that need torch load on first use, so `import pneumoseg` needs NumPy alone.
_LAZY = {"losses", "data", "models", "metrics"}

if TYPE_CHECKING:  # the lazy names' types for type checkers (py.typed); nothing is imported at run time
    from . import data, losses, metrics, models
    from .infer import Predictor


def __getattr__(name: str):
    if name == "Predictor":
        from .infer import Predictor

        return Predictor
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Predictor",
    "losses",
    "data",
    "models",
    "metrics",
    "postprocess",
    "__version__",
    "cuda_available",
    "cuda_memory_reserved",
    "release_cuda_memory",
    "rle",
    "PneumosegError",
    "InvalidInputError",
    "RLEError",
    "NativeError",
    "DataFormatError",
    "DicomError",
    "AnotherImageError",
    "LimitError",
    "OutputError",
    "TrainingError",
    "DataWarning",
    "limits",
]
