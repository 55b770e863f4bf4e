"""Mask post-processing between the segmentation network and the RLE strings: connected components,
small-component removal, the SIIM-ACR winners' "triplet" rule, classifier gating, and all of them fused.

Every function takes (H, W) or (N, H, W) NumPy arrays, torch tensors or CuPy arrays, on the CPU or on
CUDA, and answers in kind on the same device. On the CPU the labelling is a two-pass union-find whose
first pass also counts component areas, so the area filter needs no second labelling; on CUDA it is a
union-find with atomic operations (Playne & Hawick 2018) that counts areas at the roots, and the fused
``postprocess`` stays on the GPU, without host synchronisation, until the RLE strings are made.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from . import _native
from ._checks import (
    check_array_object,
    check_bool,
    check_choice,
    check_int,
    check_probability,
    check_readable_tensor,
    check_tensor_memory,
)
from ._native import _C
from .errors import InvalidInputError

__all__ = ["label_components", "remove_small_components", "triplet_threshold", "gate", "postprocess"]


def _check_area(value: Any, name: str) -> int:
    # Any area above 2**63 - 1 means the same as 2**63 - 1: more pixels than any image has.
    return check_int(value, name, low=0, saturate=True)


def _check_connectivity(connectivity: Any) -> int:
    return check_choice(connectivity, "connectivity", (4, 8))


class _Batch:
    """The input as an (N, H, W) native view, and how to answer in the caller's kind and device."""

    def __init__(self, x: Any, name: str):
        check_array_object(x, name)
        kind = _native.kind_of(x)
        if kind == "numpy":
            x = np.asarray(x)
        elif kind == "torch" and x.device.type in ("cpu", "cuda"):
            check_tensor_memory(x, name)  # before x[None], which torch refuses unclearly
        if len(x.shape) not in (2, 3):
            raise InvalidInputError(f"{name} must be (H, W) or (N, H, W), got shape {tuple(x.shape)}")
        self.single = len(x.shape) == 2
        self.info = _native.as_view(x[None] if self.single else x, name)
        self.kind = kind
        self.cuda = self.info.device == _native.CUDA
        if self.cuda:
            _native.require_cuda_build(name)

    @property
    def n(self) -> int:
        return self.info.view.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.info.view.shape)

    def empty(self, dtype: str) -> Any:
        """An uninitialised output of the input's framework and device."""
        if self.kind == "torch":
            import torch

            return torch.empty(self.shape, dtype=getattr(torch, dtype), device=self.info.owner.device)
        if self.kind == "cupy":
            import cupy

            with cupy.cuda.Device(self.info.device_index):
                return cupy.empty(self.shape, dtype=dtype)
        return np.empty(self.shape, dtype=dtype)

    def device_array(self, dtype: str, length: int) -> Any:
        """An uninitialised 1-D array of the (CUDA) input's framework and device."""
        if self.kind == "torch":
            import torch

            return torch.empty(length, dtype=getattr(torch, dtype), device=self.info.owner.device)
        import cupy

        with cupy.cuda.Device(self.info.device_index):
            return cupy.empty(length, dtype=dtype)

    def in_kind(self, values: np.ndarray) -> Any:
        """A host NumPy result as the (CPU) input's framework: a torch tensor for torch input."""
        if self.kind == "torch":
            import torch

            return torch.from_numpy(values)
        return values

    def split(self, flat: Any, counts: list[int]) -> list[Any]:
        """Consecutive pieces of ``flat`` with ``counts`` elements each, as views."""
        if self.kind == "torch":
            return list(flat.split(counts))
        ends = np.cumsum(counts)
        return [flat[end - count:end] for count, end in zip(counts, ends)]

    def answer(self, out: Any) -> Any:
        return out[0] if self.single else out


def label_components(mask: Any, connectivity: int = 8) -> tuple[Any, Any]:
    """Label the connected components of a mask (nonzero is foreground).

    Returns ``(labels, areas)``: int32 labels 1..K in raster order of each component's first pixel
    (as ``scipy.ndimage.label``), 0 for background, and each component's pixel count: an int64 array
    of K for one (H, W) mask, a list of N such arrays for an (N, H, W) batch. On CUDA everything stays on
    the GPU (each image's areas are a view of one device array); learning the number of components
    costs one synchronisation.
    """
    connectivity = _check_connectivity(connectivity)
    batch = _Batch(mask, "mask")
    labels = batch.empty("int32")
    out = _native.as_view(labels, "labels")
    if batch.cuda:
        # The areas stay on the GPU: the native call asks for one flat device array once it knows the
        # number of components, fills it, and each image's areas are a view of it.
        flat: list = []

        def allocate_areas(k: int) -> int:
            flat.append(batch.device_array("int64", k))
            return _native.data_pointer(flat[0])

        counts = _C.label_components(batch.info.view, False, 0.0, connectivity, out.view, batch.info.stream,
                                     allocate_areas)
        areas = batch.split(flat[0], counts)
    else:
        areas = [batch.in_kind(a) for a in
                 _C.label_components(batch.info.view, False, 0.0, connectivity, out.view, batch.info.stream)]
    return batch.answer(labels), (areas[0] if batch.single else list(areas))


def _run(
    batch: _Batch,
    *,
    threshold: Optional[float],
    from_logits: bool = False,
    triplet: Optional[tuple[float, int]] = None,
    min_component_area: int = 0,
    connectivity: int = 8,
    keep: Any = None,
    components: bool = False,
) -> Any:
    """The post-processed masks, and with ``components`` also (N,) int32 counts of the connected
    components in each (on the input's device: no synchronisation on CUDA)."""
    def to_input_space(p: float) -> float:
        if not from_logits:
            return p
        if p <= 0.0:
            return -math.inf
        if p >= 1.0:
            return math.inf
        return math.log(p / (1.0 - p))  # p > t  <=>  logit > logit(t)

    out = batch.empty("uint8")
    out_view = _native.as_view(out, "out").view
    use_threshold = threshold is not None
    params = _C.PostprocessParams(
        use_threshold,
        to_input_space(threshold) if use_threshold else 0.0,
        triplet is not None,
        to_input_space(triplet[0]) if triplet else 0.0,
        triplet[1] if triplet else 0,
        min_component_area,
        connectivity,
    )
    if batch.cuda:
        keep_ptr = 0 if keep is None else _device_ptr(keep)
        counts = batch.device_array("int32", batch.n) if components else None
        _C.postprocess_masks_cuda(batch.info.view, params, keep_ptr, out_view,
                                  0 if counts is None else _device_ptr(counts), batch.info.stream)
    else:
        keep_image = [1] * batch.n if keep is None else [int(k) for k in np.asarray(keep).reshape(-1)]
        counts = np.zeros(batch.n, np.int32) if components else None
        _C.postprocess_masks(batch.info.view, params, keep_image, out_view, 0 if counts is None else counts.ctypes.data)
        counts = None if counts is None else batch.in_kind(counts)
    return (out, counts) if components else out


def _device_ptr(x: Any) -> int:
    return x.data_ptr() if _native.kind_of(x) == "torch" else x.data.ptr


def remove_small_components(mask: Any, min_area: int, connectivity: int = 8) -> Any:
    """The mask (nonzero is foreground) as uint8 0/1 without components of fewer than ``min_area`` pixels."""
    min_area = _check_area(min_area, "min_area")
    connectivity = _check_connectivity(connectivity)
    batch = _Batch(mask, "mask")
    return batch.answer(_run(batch, threshold=None, min_component_area=min_area, connectivity=connectivity))


def triplet_threshold(probs: Any, top: float = 0.75, min_area: int = 2000, bottom: float = 0.3) -> Any:
    """The SIIM-ACR winners' rule, per image: positive only if at least ``min_area`` pixels have
    probability above ``top``; a positive image's mask is ``probs > bottom``, a negative one is empty."""
    top, bottom = check_probability(top, "top"), check_probability(bottom, "bottom")
    min_area = _check_area(min_area, "min_area")
    batch = _Batch(probs, "probs")
    return batch.answer(_run(batch, threshold=bottom, triplet=(top, min_area)))


def _scores_keep(scores: Any, batch: _Batch, threshold: float) -> Any:
    """Per-image keep flags (uint8, one per image) where the score reaches the threshold: on the
    batch's device for CUDA batches (no synchronisation: a NaN score simply gates its image out),
    else a NumPy array (NaN is an error)."""
    check_array_object(scores, "scores")
    if _native.kind_of(scores) == "torch":
        check_readable_tensor(scores, "scores")
        check_tensor_memory(scores, "scores")
    if batch.cuda:
        if batch.kind == "torch":
            import torch

            s = torch.as_tensor(scores, device=batch.info.owner.device).reshape(-1)
            if s.dtype == torch.bool or s.is_complex() or not (s.is_floating_point() or s.dtype.is_signed or s.dtype == torch.uint8):
                raise InvalidInputError(f"scores must be real numbers, got {s.dtype}")
            flags = (s >= threshold).to(torch.uint8).contiguous()
        else:
            import cupy

            with cupy.cuda.Device(batch.info.device_index):
                s = cupy.asarray(scores).reshape(-1)
                flags = cupy.ascontiguousarray((s >= threshold).astype(cupy.uint8))
        if flags.shape[0] != batch.n:
            raise InvalidInputError(f"scores has {flags.shape[0]} values for a batch of {batch.n} images")
        return flags
    kind = _native.kind_of(scores)
    if kind == "torch":
        import torch

        scores = scores.detach().resolve_neg().cpu()
        if scores.is_floating_point() and scores.dtype not in (torch.float16, torch.float32, torch.float64):
            scores = scores.float()  # bfloat16, float8: NumPy cannot hold them; float32 holds them exactly
        scores = scores.numpy()
    elif kind == "cupy":
        scores = scores.get()
    try:
        s = np.asarray(scores)
    except Exception as exc:  # ragged lists and the like
        raise InvalidInputError(f"scores could not be read as an array: {exc}") from exc
    if s.dtype.kind not in "iuf":
        raise InvalidInputError(f"scores must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64).reshape(-1)
    if s.shape[0] != batch.n:
        raise InvalidInputError(f"scores has {s.shape[0]} values for a batch of {batch.n} images")
    if np.isnan(s).any():
        raise InvalidInputError("scores contains NaN")
    return (s >= threshold).astype(np.uint8)


def gate(masks: Any, scores: Any, threshold: float) -> Any:
    """Empty the masks of the images whose classifier score is below ``threshold`` (uint8 0/1 out)."""
    threshold = check_probability(threshold, "threshold")
    batch = _Batch(masks, "masks")
    keep = _scores_keep(scores, batch, threshold)
    return batch.answer(_run(batch, threshold=None, keep=keep))


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
    return_components: bool = False,
) -> Any:
    """All of the above in one native pass per image: gating by ``scores`` (if given), the triplet rule
    (skipped with ``top=None``), ``probs > bottom``, and removal of components smaller than
    ``min_component_area``. ``from_logits=True`` compares logits against the thresholds' logits, so no
    sigmoid is computed. With ``to_rle=True`` it returns the SIIM RLE strings instead of masks (a list
    for an (N, H, W) batch, one string for one (H, W) image). A NaN
    value is above no threshold, so its pixel is background (checking would cost a synchronisation on
    CUDA; the Predictor checks its networks' outputs).

    ``return_components=True`` returns ``(result, n_components)``: the number of connected components
    (at ``connectivity``) left in each output mask, an int32 array of the input's kind and device
    (a scalar for one 2-D input), counted in the same pass, so the masks need no second labelling."""
    bottom = check_probability(bottom, "bottom")
    triplet = None
    if top is not None:
        triplet = (check_probability(top, "top"), _check_area(min_area, "min_area"))
    min_component_area = _check_area(min_component_area, "min_component_area")
    connectivity = _check_connectivity(connectivity)
    batch = _Batch(probs, "probs")
    from_logits = check_bool(from_logits, "from_logits")
    to_rle = check_bool(to_rle, "to_rle")
    return_components = check_bool(return_components, "return_components")
    keep = None
    if scores is not None:
        keep = _scores_keep(scores, batch, check_probability(gate_threshold, "gate_threshold"))
    ran = _run(batch, threshold=bottom, from_logits=from_logits, triplet=triplet,
               min_component_area=min_component_area, connectivity=connectivity, keep=keep,
               components=return_components)
    out, components = ran if return_components else (ran, None)
    if to_rle:
        from . import rle

        result: Any = batch.answer(rle.encode_batch(out))  # on CUDA: encoded on the GPU, one copy for the batch
    else:
        result = batch.answer(out)
    return (result, batch.answer(components)) if return_components else result
