"""Two-stage inference (needs torch): :class:`Predictor` over a model directory, with the torch,
onnxruntime and TensorRT backends; :func:`build_dicom_seg` turns a prediction's mask into a DICOM
Segmentation and :func:`build_dicom_overlay` burns it into its radiograph as a DICOM Secondary Capture
(highdicom, the ``pacs`` extra)."""

from .dicom_overlay import build_dicom_overlay, write_dicom_overlay
from .dicom_seg import build_dicom_seg, write_dicom_seg
from .inputs import ImageSource, collect_inputs
from .predictor import STAGES, Prediction, Predictions, PredictionStream, Predictor

__all__ = ["Predictor", "Prediction", "Predictions", "PredictionStream", "STAGES", "ImageSource", "collect_inputs",
           "build_dicom_seg", "write_dicom_seg", "build_dicom_overlay", "write_dicom_overlay"]
