"""The stage-1 classifier's input, made from network input at any size by one function that the
Predictor and segmenter training's validation gate both call: a gate threshold chosen on validation
is then applied at prediction to the same kind of input it was chosen on."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .transforms import crop_to_chest


def classifier_input(x: torch.Tensor, size: Union[int, tuple[int, int]], crop: Optional[str] = None) -> torch.Tensor:
    """(N, 1, h, w) normalised network input -> the classifier's (N, 1, S, S) input: resized to ``size``
    (bilinear, antialiased) unless already there, then, for a classifier trained on chest crops
    (``crop == "chest"``), each image cropped to its chest at that size and resized back, as the
    classifier's own training crops its ``data.image_size`` images. Cropping first at another size
    gave the classifier sharper crops than it meets at prediction (probabilities 0.02-0.03 apart
    with a tiny random classifier, 256 px images, gate 128 or 96 px)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    if crop == "chest":
        x = crop_to_chest(x, size)  # reads the pixels on the host
    return x
