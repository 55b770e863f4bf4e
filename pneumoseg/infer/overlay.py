"""Pictures of predictions: the radiograph in grey with the predicted mask tinted red and outlined."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

__all__ = ["overlay", "display_pixels", "display_grey"]

_RED = np.array([255, 40, 40], dtype=np.float32)


def display_pixels(pixels: Any) -> np.ndarray:
    """(H, W) pixels of any range as uint8 grey (min-max scaled)."""
    img = np.asarray(pixels, dtype=np.float64)
    lo, hi = float(img.min()), float(img.max())
    return np.round((img - lo) / (hi - lo if hi > lo else 1.0) * 255).astype(np.uint8)


def display_grey(image: Any) -> tuple[np.ndarray, Optional[Exception]]:
    """A :class:`pneumoseg.data.DicomImage` as uint8 grey for an overlay: through its own VOI LUT or
    window, or, where that is broken, over the full pixel range with the DicomError saying why (a
    broken display window must not cost a picture; the caller says so)."""
    from ..errors import DicomError

    try:
        return display_pixels(image.window()), None
    except DicomError as exc:
        return display_pixels(image.pixels), exc


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def overlay(grey: np.ndarray, mask: np.ndarray, truth: Optional[np.ndarray] = None, alpha: float = 0.35) -> np.ndarray:
    """(H, W, 3) uint8: ``grey`` (uint8) with ``mask`` tinted red and outlined; ``truth``, if given,
    outlined in green."""
    m = np.asarray(mask).astype(bool)
    rgb = np.repeat(np.asarray(grey, dtype=np.float32)[..., None], 3, axis=2)
    rgb[m] = (1 - alpha) * rgb[m] + alpha * _RED
    rgb[_outline(m)] = _RED
    if truth is not None:
        rgb[_outline(np.asarray(truth).astype(bool))] = (40, 220, 60)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)
