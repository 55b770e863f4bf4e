"""Two-stage inference: :class:`Predictor` (needs torch) over a model directory, with the torch,
onnxruntime and TensorRT backends; :func:`build_dicom_seg` turns a prediction's mask into a DICOM
Segmentation and :func:`build_dicom_overlay` burns it into its radiograph as a DICOM Secondary Capture
(highdicom, the ``pacs`` extra)."""

from typing import TYPE_CHECKING, Any

from .dicom_overlay import build_dicom_overlay, write_dicom_overlay
from .dicom_seg import build_dicom_seg, write_dicom_seg
from .inputs import ImageSource, collect_inputs

if TYPE_CHECKING:  # the lazy names' types for type checkers; nothing is imported at run time
    from .predictor import STAGES, Prediction, Predictions, PredictionStream, Predictor

# The predictor (torch) loads on first use, so its torch-free neighbours (evaluation, inputs, the DICOM
# writers) and `pneumoseg evaluate` work with NumPy alone.
_PREDICTOR_NAMES = frozenset({"STAGES", "Prediction", "Predictions", "PredictionStream", "Predictor"})


def __getattr__(name: str) -> Any:
    if name in _PREDICTOR_NAMES:
        from . import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Predictor", "Prediction", "Predictions", "PredictionStream", "STAGES", "ImageSource", "collect_inputs",
           "build_dicom_seg", "write_dicom_seg", "build_dicom_overlay", "write_dicom_overlay"]
