"""Image preparation and augmentation in plain torch, batched, on whatever device the batch is on."""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from .._checks import (
    as_numpy_array,
    check_array_object,
    check_image_size,
    check_int,
    check_probability,
    check_readable_tensor,
    check_real,
)
from ..errors import InvalidInputError

__all__ = ["preprocess", "chest_crop", "crop_to_chest", "classifier_input", "Augment", "NORMALISE_MEAN", "NORMALISE_STD"]

# Network inputs are (x - 0.5) / 0.25 for x in [0, 1]: centred, unit-ish spread, the same for every
# bit depth because x is the image scaled by its own range first.
NORMALISE_MEAN, NORMALISE_STD = 0.5, 0.25


def torch_ready(arr: np.ndarray) -> np.ndarray:
    """``arr`` as ``torch.from_numpy`` takes it: native byte order and at most float64 (it refuses
    another byte order and long double), writable (it warns about read-only arrays), contiguous with
    no negative step."""
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 8:
        arr = arr.astype(np.float64)
    if not arr.flags.writeable:
        arr = arr.copy()
    arr = np.ascontiguousarray(arr)
    if any(step < 0 for step in arr.strides):
        # x[::-1] of a one-row image: NumPy calls it contiguous (a length-1 axis's step does not count)
        # and keeps the negative step, which torch.from_numpy refuses with a bare ValueError
        arr = arr.copy()
    return arr


def _as_batch(pixels: Any, name: str = "pixels") -> torch.Tensor:
    check_array_object(pixels, name)
    if isinstance(pixels, torch.Tensor):
        t = pixels
    else:
        arr = as_numpy_array(pixels, name)
        if arr.dtype.kind not in "biuf":
            raise InvalidInputError(f"{name} must be numeric, got dtype {arr.dtype}")
        if arr.ndim == 0:
            raise InvalidInputError(f"{name} must be (H, W), (N, H, W) or (N, 1, H, W), got a single number")
        t = torch.from_numpy(torch_ready(arr))
    check_readable_tensor(t, name)
    if t.dim() == 2:
        t = t[None]
    if t.dim() == 3:
        t = t[:, None]
    if t.dim() != 4 or t.shape[1] != 1:
        raise InvalidInputError(f"{name} must be (H, W), (N, H, W) or (N, 1, H, W), got {tuple(t.shape)}")
    return t


def scale_to_unit(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) float32 images, each scaled to [0, 1] by its own min and max (a constant image to 0):
    the scaling of :func:`preprocess` and of the Predictor."""
    # one pass over the pixels for both extremes, and few ops on the (N, 1, 1, 1) ones: on CUDA each
    # is a kernel launch of a batch-1 request
    lo, hi = torch.aminmax(x.flatten(1), dim=1)
    lo, hi = lo.view(-1, 1, 1, 1), hi.view(-1, 1, 1, 1)
    span = hi - lo
    # float32 pixels from -3e38 to 3e38 are finite, but hi - lo is not: the image became NaN. Such
    # images are halved first (exact), the others scaled by 1: on CUDA always (a host check would
    # synchronise), on a CPU only when a batch holds one.
    span_finite = torch.isfinite(span)
    if x.is_cuda or not bool(span_finite.all()):
        half = torch.where(span_finite, 1.0, 0.5).to(x.dtype)
        x, lo, hi = x * half, lo * half, hi * half
        span = hi - lo
    return (x - lo) / torch.where(hi > lo, span, 1.0)


def preprocess(pixels: Any, size: Union[int, tuple[int, int]] = 512) -> torch.Tensor:
    """(H, W) / (N, H, W) / (N, 1, H, W) images of any numeric dtype -> (N, 1, S, S) float32 network
    input: each image scaled to [0, 1] by its own min and max, resized (bilinear, antialiased) and
    normalised with NORMALISE_MEAN / NORMALISE_STD. Runs on the input's device."""
    size = check_image_size(size, "size")
    x = _as_batch(pixels).float()
    if x.numel() == 0:
        raise InvalidInputError(f"pixels has no pixels, shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise InvalidInputError("pixels contains NaN or infinity (or values beyond float32)")
    x = scale_to_unit(x)
    if tuple(x.shape[2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return (x - NORMALISE_MEAN) / NORMALISE_STD


def resize_mask(mask: Any, size: Union[int, tuple[int, int]]) -> torch.Tensor:
    """(N, 1, H, W) or (H, W) 0/1 masks resized to float32 0/1 (N, 1, S, S) masks: resized as
    ``preprocess`` resizes the image (bilinear, antialiased, about pixel centres), then 1 where that
    reaches one half, so each mask lies exactly on its image.

    A nearest-neighbour pick cannot: torch's plain ``nearest`` takes each output pixel's top-left
    source pixel, (s - 1) / 2 source pixels up and left for a resize by 1/s (1.5 px at 1024 -> 256),
    and ``nearest-exact`` the one just below and right of its centre, still half a source pixel up
    and left at even scales (1024 -> 512, 256, 128). A network learns the offset and the bilinear
    upsampling of its output keeps it: a perfect network's Kaggle Dice at 256 px, upsampled to 1024,
    0.9903 (nearest), 0.9942 (nearest-exact), 0.9947 (this)."""
    size = check_image_size(size, "size")
    m = _as_batch(mask, "mask")
    if m.numel() == 0:
        raise InvalidInputError(f"mask has no pixels, shape {tuple(m.shape)}")
    if m.is_floating_point() and not bool(torch.isfinite(m).all()):  # integer and bool masks need no pass
        raise InvalidInputError("mask contains NaN or infinity")
    if tuple(m.shape[2:]) == tuple(size):
        return m.float()
    # empty masks (most SIIM images) stay empty: skip their antialiased resize, 8x a nearest pick's cost
    nonempty = m.flatten(1).any(dim=1).bool()  # uint8 for uint8 masks

    def resized(rows: torch.Tensor) -> torch.Tensor:
        return (F.interpolate(rows.float(), size=size, mode="bilinear", align_corners=False, antialias=True) >= 0.5).float()

    if bool(nonempty.all()):
        return resized(m)
    out = torch.zeros((m.shape[0], 1, *size), dtype=torch.float32, device=m.device)
    if bool(nonempty.any()):
        out[nonempty] = resized(m[nonempty])
    return out


def chest_crop(pixels: np.ndarray, margin: float = 0.02) -> tuple[int, int, int, int]:
    """The bounding box (row0, row1, col0, col1) of the chest in a radiograph, dropping the empty
    border around the body. Computed from the image itself: pixels brighter than an Otsu threshold of
    the image are body; rows and columns where more than 5% of the pixels are body are kept, plus a
    ``margin`` (fraction of the size) on every side. Falls back to the whole image when nothing is found."""
    margin = check_real(margin, "margin", low=0.0, high=0.5)
    check_array_object(pixels, "pixels")
    if isinstance(pixels, torch.Tensor):
        check_readable_tensor(pixels, "pixels")
        pixels = pixels.detach().resolve_neg().cpu()
        if pixels.dtype == torch.bfloat16:  # NumPy has no bfloat16
            pixels = pixels.float()
    img = as_numpy_array(pixels, "pixels")
    if img.dtype.kind not in "biuf":
        raise InvalidInputError(f"pixels must be numeric, got dtype {img.dtype}")
    img = img.astype(np.float64)
    if img.ndim != 2 or img.size == 0:
        raise InvalidInputError(f"pixels must be a non-empty (H, W) image, got shape {img.shape}")
    if not np.isfinite(img).all():
        raise InvalidInputError("pixels contains NaN or infinity")
    h, w = img.shape
    lo, hi = img.min(), img.max()
    if hi <= lo:
        return 0, h, 0, w
    hist, edges = np.histogram(img, bins=256, range=(lo, hi))
    p = hist / hist.sum()
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    between = (mu[-1] * omega - mu) ** 2 / np.maximum(omega * (1 - omega), 1e-12)
    threshold = edges[int(np.argmax(between)) + 1]
    body = img > threshold
    rows = np.nonzero(body.mean(axis=1) > 0.05)[0]
    cols = np.nonzero(body.mean(axis=0) > 0.05)[0]
    if rows.size == 0 or cols.size == 0:
        return 0, h, 0, w
    mr, mc = int(round(margin * h)), int(round(margin * w))
    # Python ints, as annotated: NumPy's int64 from np.nonzero would not go into JSON (a crop log, a config)
    return (int(max(0, rows[0] - mr)), int(min(h, rows[-1] + 1 + mr)), int(max(0, cols[0] - mc)),
            int(min(w, cols[-1] + 1 + mc)))


def crop_to_chest(images: torch.Tensor, size: Union[int, tuple[int, int]]) -> torch.Tensor:
    """Each image of an (N, C, H, W) batch cropped to its chest box (:func:`chest_crop` of its first
    channel; reads the pixels on the host) and resized to ``size`` (bilinear, antialiased): the input of
    a classifier trained with ``data.chest_crop``, the same at training, validation and inference."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    parts = []
    for image in images:
        r0, r1, c0, c1 = chest_crop(image[0])
        parts.append(F.interpolate(image[None, :, r0:r1, c0:c1], size=hw, mode="bilinear", align_corners=False,
                                   antialias=True))
    return torch.cat(parts) if parts else images.new_empty((0, images.shape[1], *hw))


def classifier_input(x: torch.Tensor, size: Union[int, tuple[int, int]], crop: Optional[str] = None) -> torch.Tensor:
    """(N, 1, h, w) normalised network input -> the stage-1 classifier's (N, 1, S, S) input, made the
    same way by the Predictor and by segmenter training's validation gate, so a gate threshold chosen
    on validation is applied to the kind of input it was chosen on: resized to ``size`` (bilinear,
    antialiased) unless already there, then, for a classifier trained on chest crops
    (``crop == "chest"``), each image cropped to its chest at that size and resized back, as the
    classifier's own training crops its ``data.image_size`` images. Cropping first at another size
    gave the classifier sharper crops than it meets at prediction (probabilities 0.02-0.03 apart
    with a tiny random classifier, 256 px images, gate 128 or 96 px)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) != hw:
        x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
    if crop == "chest":
        x = crop_to_chest(x, size)  # reads the pixels on the host
    return x


def to_device_async(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on ``device`` without waiting for the device: CUDA copies go from pinned
    memory (torch's caching host allocator keeps the block until the copy has run)."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


class Augment:
    """Random augmentations applied identically to a batch of images and masks, on their device:
    horizontal flip, shift-scale-rotate (one affine warp: bilinear for images, nearest for masks), and
    brightness / contrast / gamma on the images only.

    ``augment(images, masks)`` takes (N, 1, H, W) tensors (masks may be None) and returns both.

    ``seed`` makes the draws reproducible; ``None`` seeds from fresh entropy (different every run).
    Inside a DataLoader worker (an ``Augment`` used as a dataset's ``transforms``) each worker draws
    from its own generator, seeded from the worker's torch seed and ``seed``: every worker and every
    epoch gets different augmentations, reproducibly when the loader's ``generator`` (or torch's
    global seed) is fixed."""

    def __init__(
        self,
        *,
        hflip: float = 0.5,
        shift: float = 0.0625,
        scale: float = 0.1,
        rotate_degrees: float = 10.0,
        affine_p: float = 0.7,
        brightness: float = 0.1,
        contrast: float = 0.1,
        gamma: tuple[float, float] = (0.8, 1.25),
        intensity_p: float = 0.5,
        seed: Optional[int] = None,
    ) -> None:
        hflip = check_probability(hflip, "hflip")
        affine_p = check_probability(affine_p, "affine_p")
        intensity_p = check_probability(intensity_p, "intensity_p")
        shift = check_real(shift, "shift", low=0.0, high=1.0)
        scale = check_real(scale, "scale", low=0.0, high=1.0, high_open=True)
        rotate_degrees = check_real(rotate_degrees, "rotate_degrees", low=0.0, high=180.0)
        brightness = check_real(brightness, "brightness", low=0.0, high=1.0)
        contrast = check_real(contrast, "contrast", low=0.0, high=1.0)
        if isinstance(gamma, (str, bytes)) or not isinstance(gamma, (tuple, list)) or len(gamma) != 2:
            raise InvalidInputError(f"gamma must be a (low, high) range of positive numbers, got {gamma!r}")
        low, high = (check_real(g, f"gamma[{i}]", low=0.0, low_open=True) for i, g in enumerate(gamma))
        gamma = (low, high)
        if high < low:
            raise InvalidInputError(f"gamma must be a range of positive numbers (low <= high), got {gamma}")
        if seed is not None:
            seed = check_int(seed, "seed", low=0)
        self.hflip, self.shift, self.scale, self.rotate = hflip, shift, scale, rotate_degrees
        self.affine_p, self.brightness, self.contrast, self.gamma = affine_p, brightness, contrast, gamma
        self.intensity_p = intensity_p
        self.seed = seed
        self.generator = torch.Generator()
        # torch.Generator() starts from one fixed seed: without this every Augment() drew the same
        # augmentations in every run.
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        self._worker_seed: Optional[int] = None

    def _use_worker_generator(self) -> None:
        """In a DataLoader worker, draw from a generator of the worker's own. The copy of the parent's
        generator each worker got drew the same augmentations in all of them, and, as workers start
        afresh each epoch, the same ones every epoch."""
        info = torch.utils.data.get_worker_info()
        if info is not None and info.seed != self._worker_seed:
            self._worker_seed = info.seed
            self.generator = torch.Generator()
            self.generator.manual_seed(hash((info.seed, -1 if self.seed is None else self.seed)) % 2**63)

    def _uniform(self, n: int, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=self.generator, dtype=torch.float64)

    def __call__(self, images: torch.Tensor, masks: Optional[torch.Tensor] = None):
        if not isinstance(images, torch.Tensor):
            raise InvalidInputError(f"images must be a torch tensor, got {type(images).__name__}")
        check_array_object(images, "images")
        check_readable_tensor(images, "images")
        if masks is not None:
            if not isinstance(masks, torch.Tensor):
                raise InvalidInputError(f"masks must be a torch tensor, got {type(masks).__name__}")
            check_array_object(masks, "masks")
            check_readable_tensor(masks, "masks")
            if masks.device != images.device:
                raise InvalidInputError(f"masks are on {masks.device} but images on {images.device}")
        if images.dim() != 4 or images.shape[1] != 1:
            raise InvalidInputError(f"images must be (N, 1, H, W), got {tuple(images.shape)}")
        if images.shape[2] == 0 or images.shape[3] == 0:  # torch's resampling and reductions refuse them unclearly
            raise InvalidInputError(f"images has no pixels, shape {tuple(images.shape)}")
        if masks is not None and masks.shape != images.shape:
            raise InvalidInputError(f"masks shape {tuple(masks.shape)} differs from images {tuple(images.shape)}")
        n, device = images.shape[0], images.device
        self._use_worker_generator()
        # Random numbers come from a CPU generator so results do not depend on the device. They are
        # all drawn first and reach a CUDA device in one non-blocking copy from pinned memory: a
        # plain copy of each (six per call) would wait for the GPU to finish every queued kernel.
        flip = torch.rand(n, generator=self.generator) < self.hflip
        do_affine = torch.rand(n, generator=self.generator) < self.affine_p
        angle = torch.where(do_affine, self._uniform(n, -self.rotate, self.rotate), torch.zeros(n, dtype=torch.float64))
        zoom = torch.where(do_affine, self._uniform(n, 1 - self.scale, 1 + self.scale), torch.ones(n, dtype=torch.float64))
        tx = torch.where(do_affine, self._uniform(n, -self.shift, self.shift), torch.zeros(n, dtype=torch.float64))
        ty = torch.where(do_affine, self._uniform(n, -self.shift, self.shift), torch.zeros(n, dtype=torch.float64))
        rad = angle * math.pi / 180
        cos, sin = torch.cos(rad) / zoom, torch.sin(rad) / zoom
        theta = torch.stack([torch.stack([cos, -sin, 2 * tx], 1), torch.stack([sin, cos, 2 * ty], 1)], 1)
        do_int = (torch.rand(n, generator=self.generator) < self.intensity_p)
        b = torch.where(do_int, self._uniform(n, -self.brightness, self.brightness), torch.zeros(n, dtype=torch.float64))
        c = torch.where(do_int, self._uniform(n, 1 - self.contrast, 1 + self.contrast), torch.ones(n, dtype=torch.float64))
        g = torch.where(do_int, self._uniform(n, *self.gamma), torch.ones(n, dtype=torch.float64))
        # Only the samples that drew an affine transform are resampled: the rest stay exact.
        warp = do_affine.nonzero().flatten()
        params = torch.cat([flip[:, None].float(), theta.reshape(n, 6).float(), torch.stack([b, c, g], 1).float()], 1)
        params, warp = to_device_async(params, device), to_device_async(warp, device)
        flip, theta = params[:, 0] > 0.5, params[:, 1:7].reshape(n, 2, 3)
        b, c, g = (params[:, i].view(n, 1, 1, 1) for i in (7, 8, 9))
        out = torch.where(flip[:, None, None, None], images.flip(-1), images).float()
        if masks is not None:
            masks = torch.where(flip[:, None, None, None], masks.flip(-1), masks).float()
        if warp.numel():
            grid = F.affine_grid(theta[warp], [warp.numel(), *images.shape[1:]], align_corners=False)
            out = out.clone()
            out[warp] = F.grid_sample(out[warp], grid, mode="bilinear", padding_mode="border", align_corners=False)
            if masks is not None:
                masks = masks.clone()
                masks[warp] = F.grid_sample(masks[warp], grid, mode="nearest", padding_mode="zeros", align_corners=False)
        lo = out.amin(dim=(2, 3), keepdim=True)
        hi = out.amax(dim=(2, 3), keepdim=True)
        span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
        unit = ((out - lo) / span).clamp(0, 1) ** g  # gamma on the image's own [0, 1] scale
        out = ((unit - 0.5) * c + 0.5 + b) * span + lo
        return (out, masks) if masks is not None else out
