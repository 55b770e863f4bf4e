"""Metrics for both stages: the segmenter's per-image Dice and IoU (and the SIIM-ACR competition's
score, their mean with 1 for an image whose masks are both empty), the classifier's ROC / PR metrics,
and the grid search for the winners' triplet post-processing.

NumPy arrays and torch tensors (CPU or CUDA) are taken as they are; torch is never imported here.
"""

from .classification import (
    average_precision,
    confusion_matrix,
    precision_recall_curve,
    roc_auc,
    roc_curve,
    sensitivity_specificity,
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
    "best_triplet",
    "TripletSearch",
    "TripletChoice",
]
