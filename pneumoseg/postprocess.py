"""Mask post-processing between the segmentation network and the RLE strings: connected components,
small-component removal, the SIIM-ACR winners' "triplet" rule, classifier gating, and all of them fused.

Every function takes (H, W) or (N, H, W) NumPy arrays, torch tensors or CuPy arrays, on the CPU or on
CUDA, and answers in kind on the same device. On the CPU the labelling is a two-pass union-find whose
first pass also counts component areas, so the area filter needs no second labelling; on CUDA it is a
union-find with atomic operations (Playne & Hawick 2018) that counts areas at the roots, and the fused
``postprocess`` stays on the GPU, without host synchronisation, until the RLE strings are made.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any, Optional

import numpy as np

from . import _native, rle
from ._checks import (
    as_numpy_array,
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

# The fused post-processing runs once per image batch, after the networks; at batch 1 on a GPU its
# kernels are a few tiny launches and the host path is most of what a call costs. So arrays are
# described to the native core once each (the bridge checks a plain torch.Tensor without
# FakeTensor's walk), validated numeric arguments are cached per argument tuple, and a few gate
# scores are compared in Python rather than through NumPy's ufuncs.


def _check_area(value: Any, name: str) -> int:
    # Any area above 2**63 - 1 means the same as 2**63 - 1: more pixels than any image has.
    return check_int(value, name, low=0, saturate=True)


def _check_connectivity(connectivity: Any) -> int:
    return check_choice(connectivity, "connectivity", (4, 8))


class _Batch:
    """The input as an (N, H, W) native view, and how to answer in the caller's kind and device.
    Outputs are made in the input's own shape, (H, W) or (N, H, W), and described to the native core
    as a batch of one for an (H, W) input, so nothing is indexed to answer."""

    def __init__(self, x: Any, name: str):
        kind, x = _native.read_array(x, name)  # classified once: the shape is read before the view is made
        ndim = len(x.shape)
        if ndim != 2 and ndim != 3:
            raise InvalidInputError(f"{name} must be (H, W) or (N, H, W), got shape {tuple(x.shape)}")
        self.single = ndim == 2
        self.info = info = _native.view_of(kind, x, name, batch_of_one=self.single)
        self.kind = kind
        self.cuda = info.device == _native.CUDA
        if self.cuda:
            _native.require_cuda_build(name)
        self.shape = tuple(x.shape)  # the caller's: (H, W) or (N, H, W)
        self.n = 1 if self.single else self.shape[0]

    def empty(self, dtype: str, shape: Optional[tuple[int, ...]] = None) -> Any:
        """An uninitialised output of the input's framework and device, of the input's shape by default."""
        shape = self.shape if shape is None else shape
        if self.kind == "torch":
            import torch

            return torch.empty(shape, dtype=getattr(torch, dtype), device=self.info.owner.device)
        if self.kind == "cupy":
            import cupy

            with cupy.cuda.Device(self.info.device_index):
                return cupy.empty(shape, dtype=dtype)
        return np.empty(shape, dtype=dtype)

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
    out = _native.as_view(labels, "labels", batch_of_one=batch.single)
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
    return labels, (areas[0] if batch.single else list(areas))


def _to_input_space(p: float, from_logits: bool) -> float:
    """A probability threshold in the input's space: itself, or its logit (p > t <=> logit > logit(t))."""
    if not from_logits:
        return p
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p / (1.0 - p))


def _compiling() -> bool:
    """Whether Dynamo is tracing: it warns on every lru_cache-wrapped call and traces the wrapped
    function anyway, so the caches below are bypassed while it traces."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


def _make_native_params(threshold: Optional[float], from_logits: bool, triplet: Optional[tuple[float, int]],
                        min_component_area: int, connectivity: int) -> Any:
    """The native parameters of one validated setting (immutable, so shared between calls)."""
    return _C.PostprocessParams(
        threshold is not None,
        _to_input_space(threshold, from_logits) if threshold is not None else 0.0,
        triplet is not None,
        _to_input_space(triplet[0], from_logits) if triplet else 0.0,
        triplet[1] if triplet else 0,
        min_component_area,
        connectivity,
    )


_native_params_cached = functools.lru_cache(maxsize=256)(_make_native_params)


def _native_params(threshold: Optional[float], from_logits: bool, triplet: Optional[tuple[float, int]],
                   min_component_area: int, connectivity: int) -> Any:
    args = (threshold, from_logits, triplet, min_component_area, connectivity)
    return _make_native_params(*args) if _compiling() else _native_params_cached(*args)


def _run(batch: _Batch, params: Any, keep: Any = None, components: bool = False) -> tuple[Any, Any, Any]:
    """``(masks, native view of the masks, counts)``: the post-processed masks in the input's shape, and
    with ``components`` the number of connected components in each (an int32 array of the input's kind
    and device, a 0-d one for one 2-D input; no synchronisation on CUDA), else None. ``keep`` is None
    (keep every image), a list of 0/1 per image on the CPU, or a device uint8/bool array on CUDA."""
    out = batch.empty("uint8")
    out_info = _native.as_view(out, "out", batch_of_one=batch.single)
    counts = None
    count_shape = () if batch.single else (batch.n,)
    if batch.cuda:
        keep_ptr = 0 if keep is None else _device_ptr(keep)
        if components:
            counts = batch.empty("int32", count_shape)
        _C.postprocess_masks_cuda(batch.info.view, params, keep_ptr, out_info.view,
                                  0 if counts is None else _device_ptr(counts), batch.info.stream)
        return out, out_info, counts
    keep_image = [1] * batch.n if keep is None else keep
    if not components:
        _C.postprocess_masks(batch.info.view, params, keep_image, out_info.view, 0)
    elif batch.kind == "torch":
        import torch

        # The device always named: under torch.set_default_device / a device context a tensor made
        # without one lands there, and the CPU kernel would write through a pointer it cannot use.
        counts = torch.zeros(count_shape, dtype=torch.int32, device=batch.info.owner.device)
        _C.postprocess_masks(batch.info.view, params, keep_image, out_info.view, counts.data_ptr())
    else:
        host = np.zeros(batch.n, np.int32)
        _C.postprocess_masks(batch.info.view, params, keep_image, out_info.view, host.ctypes.data)
        counts = host[0] if batch.single else host  # a NumPy scalar for one 2-D input, as before
    return out, out_info, counts


def _device_ptr(x: Any) -> int:
    return x.data_ptr() if _native.kind_of(x) == "torch" else x.data.ptr


def remove_small_components(mask: Any, min_area: int, connectivity: int = 8) -> Any:
    """The mask (nonzero is foreground) as uint8 0/1 without components of fewer than ``min_area`` pixels."""
    min_area = _check_area(min_area, "min_area")
    connectivity = _check_connectivity(connectivity)
    batch = _Batch(mask, "mask")
    return _run(batch, _native_params(None, False, None, min_area, connectivity))[0]


def triplet_threshold(probs: Any, top: float = 0.75, min_area: int = 2000, bottom: float = 0.3) -> Any:
    """The SIIM-ACR winners' rule, per image: positive only if at least ``min_area`` pixels have
    probability above ``top``; a positive image's mask is ``probs > bottom``, a negative one is empty."""
    top, bottom = check_probability(top, "top"), check_probability(bottom, "bottom")
    min_area = _check_area(min_area, "min_area")
    batch = _Batch(probs, "probs")
    return _run(batch, _native_params(bottom, False, (top, min_area), 0, 8))[0]


def _scores_keep(scores: Any, batch: _Batch, threshold: float) -> Any:
    """Per-image keep flags where the score reaches the threshold: on the batch's device for CUDA
    batches (one byte per image, no synchronisation: a NaN score simply gates its image out), else
    a list of 0/1 (NaN is an error).

    Floating scores are compared in their own dtype on every device: the threshold is first rounded
    to the scores' dtype (to nearest, as torch.ge, CuPy and NumPy's ``array >= float`` do), so a
    threshold between two representable scores (0.7 for float32, a quarter step above a score) keeps
    the same images on the CPU as on CUDA. Integer scores are compared exactly (for a threshold in
    [0, 1] that is the same answer as comparing in float32, as torch does on CUDA)."""
    check_array_object(scores, "scores")
    is_tensor = _native.kind_of(scores) == "torch"
    if is_tensor:
        check_readable_tensor(scores, "scores")
        check_tensor_memory(scores, "scores")
    if batch.cuda:
        if batch.kind == "torch":
            import torch

            s = torch.as_tensor(scores, device=batch.info.owner.device).reshape(-1)
            if s.dtype == torch.bool or s.is_complex() or not (s.is_floating_point() or s.dtype.is_signed or s.dtype == torch.uint8):
                raise InvalidInputError(f"scores must be real numbers, got {s.dtype}")
            # A fresh bool tensor is one byte of 0 or 1 per image: the uint8 flags the kernel reads,
            # without a second kernel to convert them.
            flags = torch.ge(s, threshold)
        else:
            import cupy

            with cupy.cuda.Device(batch.info.device_index):
                s = cupy.asarray(scores).reshape(-1)
                flags = cupy.ascontiguousarray((s >= threshold).astype(cupy.uint8))
        if flags.shape[0] != batch.n:
            raise InvalidInputError(f"scores has {flags.shape[0]} values for a batch of {batch.n} images")
        return flags
    if is_tensor:
        import torch

        if scores.dtype == torch.bool:
            raise InvalidInputError("scores must be real numbers, got dtype bool")
        # tolist reads the values as Python numbers (bfloat16 and float8 exactly, a negated view as
        # its values), without NumPy's small-array overhead.
        values = (scores if scores.dim() == 1 else scores.reshape(-1)).tolist()
        if scores.is_floating_point():
            # The threshold in the scores' dtype, as torch.ge(scores, threshold) casts it (made on
            # the CPU: under torch.set_default_device a tensor lands there, a meta one has no value).
            threshold = torch.tensor(threshold, dtype=scores.dtype, device="cpu").item()
    else:
        if _native.kind_of(scores) == "cupy":
            scores = scores.get()
        array = as_numpy_array(scores, "scores")
        if array.dtype.kind not in "iuf":
            raise InvalidInputError(f"scores must be real numbers, got dtype {array.dtype}")
        values = array.reshape(-1).tolist()
        if array.dtype.kind == "f":
            # The threshold in the scores' dtype, as NumPy (NEP 50) compares array >= float.
            threshold = float(array.dtype.type(threshold))
    if len(values) != batch.n:
        raise InvalidInputError(f"scores has {len(values)} values for a batch of {batch.n} images")
    keep = [1 if v >= threshold else 0 for v in values]
    if any(map(math.isnan, values)):
        raise InvalidInputError("scores contains NaN")
    return keep


def gate(masks: Any, scores: Any, threshold: float) -> Any:
    """Empty the masks of the images whose classifier score is below ``threshold`` (uint8 0/1 out).

    Floating scores are compared with ``threshold`` rounded to their dtype, on the CPU as on CUDA
    (``scores >= threshold`` as torch and NumPy evaluate it); integer scores exactly."""
    threshold = check_probability(threshold, "threshold")
    batch = _Batch(masks, "masks")
    keep = _scores_keep(scores, batch, threshold)
    return _run(batch, _native_params(None, False, None, 0, 8), keep)[0]


def _checked_settings(from_logits: Any, top: Any, min_area: Any, bottom: Any, min_component_area: Any,
                      connectivity: Any) -> Any:
    """postprocess's numeric settings, validated, as native parameters."""
    bottom = check_probability(bottom, "bottom")
    triplet = None
    if top is not None:
        triplet = (check_probability(top, "top"), _check_area(min_area, "min_area"))
    min_component_area = _check_area(min_component_area, "min_component_area")
    connectivity = _check_connectivity(connectivity)
    return _native_params(bottom, from_logits, triplet, min_component_area, connectivity)


# Plain Python numbers validate the same way every time, so their validated settings are cached per
# argument tuple (typed: 1, 1.0 and True are different keys; errors are never cached).
_cached_settings = functools.lru_cache(maxsize=256, typed=True)(_checked_settings)
def _check_gate_threshold(value: Any) -> float:
    return check_probability(value, "gate_threshold")


_cached_gate_threshold = functools.lru_cache(maxsize=64, typed=True)(_check_gate_threshold)
_PLAIN_PROBABILITY = frozenset((float, int))
_PLAIN_OPTIONAL_PROBABILITY = frozenset((float, int, type(None)))


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
    (a scalar for one 2-D input), counted in the same pass, so the masks need no second labelling.

    An image is kept where ``scores >= gate_threshold`` as torch / NumPy evaluate it: floating
    scores are compared with the threshold rounded to their dtype on every device (0.7 is
    0.699999988 for float32 scores), integer scores exactly."""
    if (type(from_logits) is bool and type(bottom) in _PLAIN_PROBABILITY and type(top) in _PLAIN_OPTIONAL_PROBABILITY
            and type(min_area) is int and type(min_component_area) is int and type(connectivity) is int):
        settings = _checked_settings if _compiling() else _cached_settings
        params = settings(from_logits, top, min_area, bottom, min_component_area, connectivity)
        batch = _Batch(probs, "probs")
    else:
        # The order of the checks, and so which of several bad arguments is named, as always.
        given = (top, min_area, bottom, min_component_area, connectivity)
        _checked_settings(False, *given)
        batch = _Batch(probs, "probs")
        params = _checked_settings(check_bool(from_logits, "from_logits"), *given)
    if type(to_rle) is not bool:
        to_rle = check_bool(to_rle, "to_rle")
    if type(return_components) is not bool:
        return_components = check_bool(return_components, "return_components")
    keep = None
    if scores is not None:
        if type(gate_threshold) in _PLAIN_PROBABILITY:
            threshold = (_check_gate_threshold if _compiling() else _cached_gate_threshold)(gate_threshold)
        else:
            threshold = check_probability(gate_threshold, "gate_threshold")
        keep = _scores_keep(scores, batch, threshold)
    out, out_info, components = _run(batch, params, keep, return_components)
    if to_rle:
        # Encoded from the view already made (on CUDA: on the GPU, one copy for the batch).
        strings = rle._encode_view(out_info)
        result: Any = strings[0] if batch.single else strings
    else:
        result = out
    return (result, components) if return_components else result
