"""Two-stage inference (needs torch): :class:`Predictor` over a model directory, with the torch,
onnxruntime and TensorRT backends."""

from .inputs import ImageSource, collect_inputs
from .predictor import STAGES, Prediction, Predictions, PredictionStream, Predictor

__all__ = ["Predictor", "Prediction", "Predictions", "PredictionStream", "STAGES", "ImageSource", "collect_inputs"]
