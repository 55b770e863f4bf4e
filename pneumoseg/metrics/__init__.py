"""Metrics for both stages: the segmenter's per-image Dice and IoU (and the SIIM-ACR competition's
score, their mean with 1 for an image whose masks are both empty), the classifier's ROC / PR metrics,
its clinical operating points, confidence intervals (seeded bootstrap, DeLong for AUC, Wilson and
Clopper-Pearson for a rate at a fixed threshold) and calibration, and the grid search for the
winners' triplet post-processing.

NumPy arrays and torch tensors (CPU or CUDA) are taken as they are; torch is never imported here.
"""

from .calibration import brier_score, calibration_curve, expected_calibration_error
from .classification import (
    average_precision,
    confusion_matrix,
    precision_recall_curve,
    roc_auc,
    roc_curve,
    sensitivity_specificity,
)
from .intervals import ConfidenceInterval, average_precision_ci, bootstrap_ci, proportion_ci, roc_auc_ci
from .operating_point import (
    OperatingPoint,
    OperatingPointInterval,
    RatesAtThreshold,
    operating_point,
    operating_point_ci,
    rates_at_threshold,
)
from .segmentation import dice_per_image, iou, kaggle_dice, mean_iou, overlap_counts
from .triplet import TripletChoice, TripletSearch, best_triplet

__all__ = [
    "dice_per_image",
    "kaggle_dice",
    "iou",
    "mean_iou",
    "overlap_counts",
    "roc_auc",
    "roc_curve",
    "average_precision",
    "precision_recall_curve",
    "confusion_matrix",
    "sensitivity_specificity",
    "operating_point",
    "OperatingPoint",
    "operating_point_ci",
    "OperatingPointInterval",
    "rates_at_threshold",
    "RatesAtThreshold",
    "roc_auc_ci",
    "average_precision_ci",
    "bootstrap_ci",
    "proportion_ci",
    "ConfidenceInterval",
    "brier_score",
    "calibration_curve",
    "expected_calibration_error",
    "best_triplet",
    "TripletSearch",
    "TripletChoice",
]
