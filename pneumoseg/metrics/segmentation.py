"""Mask metrics: per-image Dice and IoU, and their means over images (the SIIM-ACR competition's score).

Every function takes a prediction and a truth as (H, W), (N, H, W) or (N, 1, H, W) NumPy arrays or
torch tensors (CPU or CUDA) of any bool, integer or float dtype. Nonzero is foreground, except that a
prediction with ``threshold=t`` is foreground where ``pred > t`` (compared exactly, as the native
post-processing does, whatever the float type). A float mask without a threshold must hold only 0 and 1
(probabilities without a threshold are an error, not a silent "everything above 0"); a thresholded
float prediction must not hold NaN. On the CPU a violation raises ``InvalidInputError`` naming the
image; on CUDA, where raising would need a host synchronisation, that image's value is NaN instead.

An image whose prediction and truth are both empty scores 1, as in the competition.

On the CPU the work is per image over NumPy's vectorised counters (torch CPU tensors are viewed as
NumPy arrays without a copy); on CUDA it is a handful of batched reductions that stay on the GPU
without synchronising: results come back as tensors on the inputs' device.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..errors import InvalidInputError
from ._inputs import MaskPair, check_real, mask_pair, threshold_below, torch_module

__all__ = ["dice_per_image", "kaggle_dice", "iou", "mean_iou", "overlap_counts"]

# Below this many pixels per image the per-image loop's call overhead outweighs NumPy's (slower)
# row-wise reductions, so small images are counted a chunk of images at a time.
_ROW_LOOP_MIN_PIXELS = 4096


def _row_counts(x: np.ndarray) -> np.ndarray:
    """Nonzero count of each row of a 2-D array. A single row takes NumPy's fast whole-array counter;
    ``count_nonzero(axis=1)`` goes through a slower summing reduction."""
    if x.shape[0] == 1:
        return np.array([np.count_nonzero(x)], dtype=np.int64)
    return np.count_nonzero(x, axis=1).astype(np.int64, copy=False)


def _binary_float_rows(x: np.ndarray, nonzero: np.ndarray) -> np.ndarray:
    """Which rows of a float array hold a value other than 0 and 1 (NaN included)."""
    return nonzero != _row_counts(x == 1)


def _numpy_counts(pair: MaskPair, threshold: Optional[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred, truth = pair.pred, pair.truth
    n = pred.shape[0]
    pixels = pred.shape[1] * pred.shape[2]
    pred_rows = pred.reshape(n, pixels)  # a view where the input is contiguous, else one copy
    truth_rows = truth.reshape(n, pixels)
    cut = None if threshold is None else threshold_below(threshold, pred.dtype)
    pred_float, truth_float = pred.dtype.kind == "f", truth.dtype.kind == "f"
    inter = np.empty(n, np.int64)
    pred_sum = np.empty(n, np.int64)
    truth_sum = np.empty(n, np.int64)
    step = 1 if pixels >= _ROW_LOOP_MIN_PIXELS else max(1, _ROW_LOOP_MIN_PIXELS * 64 // pixels)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        p, t = pred_rows[rows], truth_rows[rows]
        if cut is None:
            fg = p
            pred_sum[rows] = _row_counts(p)
            if pred_float:
                _raise_for_rows(_binary_float_rows(p, pred_sum[rows]), start, "pred",
                                "holds values other than 0 and 1 (probabilities?); pass threshold= to "
                                "binarise it")
        else:
            if pred_float:  # min propagates NaN and reads faster than isnan(...).any()
                _raise_for_rows(np.isnan(p.min(axis=1)), start, "pred", "holds NaN")
            fg = p > cut
            pred_sum[rows] = _row_counts(fg)
        truth_sum[rows] = _row_counts(t)
        if truth_float:
            _raise_for_rows(_binary_float_rows(t, truth_sum[rows]), start, "truth",
                            "holds values other than 0 and 1; a truth mask must be binary")
        if step > 1:
            inter[rows] = _row_counts(np.logical_and(fg, t))
        elif pred_sum[start] and truth_sum[start]:
            inter[start] = np.count_nonzero(np.logical_and(fg, t))
        else:  # most SIIM images have an empty truth: nothing to intersect
            inter[start] = 0
    return inter, pred_sum, truth_sum


def _raise_for_rows(bad: np.ndarray, start: int, name: str, what: str) -> None:
    if bad.any():
        i = start + int(np.flatnonzero(bad)[0])
        raise InvalidInputError(f"{name} image {i} {what}")


def _torch_counts(pair: MaskPair, threshold: Optional[float]) -> tuple[Any, Any, Any, Any]:
    """The same counts as batched reductions on the GPU, plus a per-image flag of invalid input."""
    torch = torch_module()
    pred, truth = pair.pred, pair.truth
    n = pred.shape[0]
    pred, truth = pred.reshape(n, -1), truth.reshape(n, -1)
    invalid = torch.zeros(n, dtype=torch.bool, device=pred.device)
    if threshold is None:
        fg = pred != 0
        if pred.is_floating_point():
            invalid |= ((pred != 0) & (pred != 1)).any(1)
    else:
        cut = threshold
        if pred.is_floating_point():
            cut = float(threshold_below(threshold, np.dtype(str(pred.dtype).replace("torch.", ""))))
            invalid |= torch.isnan(pred).any(1)
        fg = pred > cut
    truth_fg = truth != 0
    if truth.is_floating_point():
        invalid |= ((truth != 0) & (truth != 1)).any(1)
    inter = (fg & truth_fg).sum(1)
    return inter, fg.sum(1), truth_fg.sum(1), invalid


def overlap_counts(pred: Any, truth: Any, *, threshold: Optional[float] = None) -> tuple[Any, Any, Any]:
    """Per-image pixel counts ``(intersection, pred_area, truth_area)`` as int64 vectors of length N,
    from which Dice, IoU, precision and recall follow; on CUDA as tensors on the device (invalid input
    there is not flagged: use the metrics for that)."""
    pair, threshold = _pair(pred, truth, threshold)
    if pair.cuda:
        inter, p, t, _ = _torch_counts(pair, threshold)
        return inter, p, t
    counts = _numpy_counts(pair, threshold)
    if pair.torch_answer:
        torch = torch_module()
        return tuple(torch.from_numpy(c) for c in counts)
    return counts


def _pair(pred: Any, truth: Any, threshold: Any) -> tuple[MaskPair, Optional[float]]:
    if threshold is not None:
        threshold = check_real(threshold, "threshold")
    return mask_pair(pred, truth), threshold


def _per_image(pred: Any, truth: Any, threshold: Optional[float], kind: str) -> tuple[Any, MaskPair]:
    pair, threshold = _pair(pred, truth, threshold)
    if pair.cuda:
        torch = torch_module()
        inter, p, t, invalid = _torch_counts(pair, threshold)
        inter, p, t = inter.double(), p.double(), t.double()
        denom = p + t if kind == "dice" else p + t - inter
        num = 2.0 * inter if kind == "dice" else inter
        value = torch.where(denom == 0, torch.ones_like(num), num / denom.clamp_min(1.0))
        value = torch.where(invalid, torch.full_like(value, float("nan")), value)
        return value, pair
    inter, p, t = _numpy_counts(pair, threshold)
    denom = p + t if kind == "dice" else p + t - inter
    num = 2.0 * inter if kind == "dice" else inter.astype(np.float64)
    value = np.ones(denom.shape, np.float64)
    np.divide(num, denom, out=value, where=denom != 0)
    if pair.torch_answer:
        value = torch_module().from_numpy(value)
    return value, pair


def _answer_per_image(value: Any, pair: MaskPair) -> Any:
    return value[0] if pair.single else value


def _answer_mean(value: Any, pair: MaskPair, name: str) -> Any:
    if value.shape[0] == 0:
        raise InvalidInputError(f"{name} of an empty batch (no images) is undefined")
    if pair.cuda:
        return value.mean()  # a 0-d tensor on the device: no synchronisation
    mean = float(np.mean(np.asarray(value)))
    return torch_module().tensor(mean, dtype=torch_module().float64) if pair.torch_answer else mean


def dice_per_image(pred: Any, truth: Any, *, threshold: Optional[float] = None) -> Any:
    """Dice of each image, ``2 |P & T| / (|P| + |T|)``, and 1 where both masks are empty.

    Returns float64: a NumPy vector of N (a NumPy scalar for one (H, W) pair), or a torch tensor
    where either input is a tensor, on that tensor's device (CUDA: no host synchronisation).
    """
    value, pair = _per_image(pred, truth, threshold, "dice")
    return _answer_per_image(value, pair)


def kaggle_dice(preds: Any, truths: Any, *, threshold: Optional[float] = None) -> Any:
    """The SIIM-ACR competition's score: the mean over images of the per-image Dice (an image with both
    masks empty scores 1). A Python float for NumPy input; a 0-d float64 tensor for torch input (on
    CUDA it stays on the device). An empty batch is an error."""
    value, pair = _per_image(preds, truths, threshold, "dice")
    return _answer_mean(value, pair, "kaggle_dice")


def iou(pred: Any, truth: Any, *, threshold: Optional[float] = None) -> Any:
    """Intersection over union (Jaccard) of each image, ``|P & T| / |P | T|``, and 1 where both masks are
    empty; returned as ``dice_per_image`` returns."""
    value, pair = _per_image(pred, truth, threshold, "iou")
    return _answer_per_image(value, pair)


def mean_iou(preds: Any, truths: Any, *, threshold: Optional[float] = None) -> Any:
    """The mean over images of the per-image IoU; returned as ``kaggle_dice`` returns."""
    value, pair = _per_image(preds, truths, threshold, "iou")
    return _answer_mean(value, pair, "mean_iou")
