"""Mask post-processing between the segmentation network and the RLE strings: connected components,
small-component removal, the SIIM-ACR winners' "triplet" rule, classifier gating, and all of them fused.

Every function takes (H, W) or (N, H, W) NumPy arrays or torch tensors and answers in kind. The
labelling is native (a two-pass union-find whose first pass also counts component areas, so the area
filter needs no second labelling). CUDA inputs are currently processed on the host and returned on
their device: the CUDA kernels for this op are not written yet.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence, Union

import numpy as np

from . import _native
from ._native import _C
from .errors import InvalidInputError

__all__ = ["label_components", "remove_small_components", "triplet_threshold", "gate", "postprocess"]


def _check_unit(value: Any, name: str) -> float:
    if not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise InvalidInputError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_area(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise InvalidInputError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_connectivity(connectivity: Any) -> int:
    if connectivity not in (4, 8):
        raise InvalidInputError(f"connectivity must be 4 or 8, got {connectivity!r}")
    return int(connectivity)


class _Batch:
    """The input as a host (N, H, W) array plus how to answer in the caller's kind and device."""

    def __init__(self, x: Any, name: str):
        kind = _native.kind_of(x)
        self.kind, self.device = kind, None
        if kind == "torch":
            self.device = x.device
            if x.device.type not in ("cpu", "cuda"):
                raise InvalidInputError(f"{name} is on {x.device}; pneumoseg runs on CPU and CUDA tensors")
            if str(x.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
                x = x.float()
            x = x.detach().cpu().numpy()
        elif kind == "cupy":
            self.device = x.device
            x = x.get()
        arr = np.asarray(x)
        if arr.ndim not in (2, 3):
            raise InvalidInputError(f"{name} must be (H, W) or (N, H, W), got shape {arr.shape}")
        self.single = arr.ndim == 2
        self.array = arr[None] if self.single else arr

    @property
    def n(self) -> int:
        return self.array.shape[0]

    def answer(self, out: np.ndarray) -> Any:
        out = out[0] if self.single else out
        if self.kind == "torch":
            import torch

            return torch.from_numpy(np.ascontiguousarray(out)).to(self.device)
        if self.kind == "cupy":
            import cupy

            with cupy.cuda.Device(self.device.id):
                return cupy.asarray(out)
        return out


def label_components(mask: Any, connectivity: int = 8) -> tuple[Any, Any]:
    """Label the connected components of a mask (nonzero is foreground).

    Returns ``(labels, areas)``: int32 labels 1..K in raster order of each component's first pixel
    (as ``scipy.ndimage.label``), 0 for background, and each component's pixel count: an int64 array
    of K for one (H, W) mask, a list of N such arrays for an (N, H, W) batch.
    """
    connectivity = _check_connectivity(connectivity)
    batch = _Batch(mask, "mask")
    labels = np.empty(batch.array.shape, dtype=np.int32)
    view = _native.as_view(batch.array, "mask")
    areas = _C.label_components(view.view, False, 0.0, connectivity, _native.as_view(labels, "labels").view)
    return batch.answer(labels), (areas[0] if batch.single else areas)


def _run(
    batch: _Batch,
    *,
    threshold: Optional[float],
    from_logits: bool = False,
    triplet: Optional[tuple[float, int]] = None,
    min_component_area: int = 0,
    connectivity: int = 8,
    keep: Optional[np.ndarray] = None,
) -> np.ndarray:
    def to_input_space(p: float) -> float:
        if not from_logits:
            return p
        if p <= 0.0:
            return -math.inf
        if p >= 1.0:
            return math.inf
        return math.log(p / (1.0 - p))  # p > t  <=>  logit > logit(t)

    out = np.empty(batch.array.shape, dtype=np.uint8)
    keep_image = [1] * batch.n if keep is None else [int(k) for k in keep]
    use_threshold = threshold is not None
    _C.postprocess_masks(
        _native.as_view(batch.array, "probs").view,
        use_threshold,
        to_input_space(threshold) if use_threshold else 0.0,
        triplet is not None,
        to_input_space(triplet[0]) if triplet else 0.0,
        triplet[1] if triplet else 0,
        min_component_area,
        connectivity,
        keep_image,
        _native.as_view(out, "out").view,
    )
    return out


def remove_small_components(mask: Any, min_area: int, connectivity: int = 8) -> Any:
    """The mask (nonzero is foreground) as uint8 0/1 without components of fewer than ``min_area`` pixels."""
    min_area = _check_area(min_area, "min_area")
    connectivity = _check_connectivity(connectivity)
    batch = _Batch(mask, "mask")
    return batch.answer(_run(batch, threshold=None, min_component_area=min_area, connectivity=connectivity))


def triplet_threshold(probs: Any, top: float = 0.75, min_area: int = 2000, bottom: float = 0.3) -> Any:
    """The SIIM-ACR winners' rule, per image: positive only if at least ``min_area`` pixels have
    probability above ``top``; a positive image's mask is ``probs > bottom``, a negative one is empty."""
    top, bottom = _check_unit(top, "top"), _check_unit(bottom, "bottom")
    min_area = _check_area(min_area, "min_area")
    batch = _Batch(probs, "probs")
    return batch.answer(_run(batch, threshold=bottom, triplet=(top, min_area)))


def _scores_keep(scores: Any, n: int, threshold: float) -> np.ndarray:
    if _native.kind_of(scores) == "torch":
        scores = scores.detach().cpu().numpy()
    elif _native.kind_of(scores) == "cupy":
        scores = scores.get()
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape[0] != n:
        raise InvalidInputError(f"scores has {s.shape[0]} values for a batch of {n} images")
    if np.isnan(s).any():
        raise InvalidInputError("scores contains NaN")
    return s >= threshold


def gate(masks: Any, scores: Any, threshold: float) -> Any:
    """Empty the masks of the images whose classifier score is below ``threshold``."""
    threshold = _check_unit(threshold, "threshold")
    batch = _Batch(masks, "masks")
    keep = _scores_keep(scores, batch.n, threshold)
    out = (batch.array != 0).astype(np.uint8)
    out[~keep] = 0
    return batch.answer(out)


def postprocess(
    probs: Any,
    scores: Any = None,
    *,
    from_logits: bool = False,
    top: Optional[float] = 0.75,
    min_area: int = 2000,
    bottom: float = 0.3,
    gate_threshold: float = 0.5,
    min_component_area: int = 0,
    connectivity: int = 8,
    to_rle: bool = False,
) -> Union[Any, list[str]]:
    """All of the above in one native pass per image: gating by ``scores`` (if given), the triplet rule
    (skipped with ``top=None``), ``probs > bottom``, and removal of components smaller than
    ``min_component_area``. ``from_logits=True`` compares logits against the thresholds' logits, so no
    sigmoid is computed. With ``to_rle=True`` it returns the SIIM RLE strings instead of masks."""
    bottom = _check_unit(bottom, "bottom")
    triplet = None
    if top is not None:
        triplet = (_check_unit(top, "top"), _check_area(min_area, "min_area"))
    min_component_area = _check_area(min_component_area, "min_component_area")
    connectivity = _check_connectivity(connectivity)
    batch = _Batch(probs, "probs")
    keep = None
    if scores is not None:
        keep = _scores_keep(scores, batch.n, _check_unit(gate_threshold, "gate_threshold"))
    out = _run(batch, threshold=bottom, from_logits=from_logits, triplet=triplet,
               min_component_area=min_component_area, connectivity=connectivity, keep=keep)
    if to_rle:
        from . import rle

        return rle.encode_batch(out)
    return batch.answer(out)
