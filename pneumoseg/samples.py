"""Built-in synthetic sample masks: shapes for demos, tests and benchmarks, not medical data."""

from __future__ import annotations

import numpy as np

from . import limits
from ._checks import check_int

__all__ = ["pneumothorax_mask"]


def pneumothorax_mask(size: int = 1024, seed: int = 0) -> np.ndarray:
    """A pneumothorax-shaped (H, W) uint8 mask: a crescent along the apex and lateral edge of the
    right lung (the image's left half) with an irregular border. At 1024x1024 it has tens of
    thousands of foreground pixels in a few hundred runs, like the SIIM-ACR annotations."""
    size = check_int(size, "size", low=1)
    limits.check_image(size, size, f"size={size}")
    seed = check_int(seed, "seed", low=0)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    cy, cx, ry, rx = 0.45, 0.3, 0.3, 0.16
    lung = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    # The collapsed lung is smaller and pulled medially and down; the gap left is the pneumothorax.
    collapsed = ((yy - cy - 0.05) / (ry * 0.82)) ** 2 + ((xx - cx - 0.04) / (rx * 0.78)) ** 2
    wobble = 0.04 * np.sin(yy * 37 + rng.uniform(0, 6)) + 0.03 * np.sin(xx * 23 + rng.uniform(0, 6))
    crescent = (lung < 1 + wobble) & (collapsed > 1 + wobble) & (yy < cy + 0.1)
    return crescent.astype(np.uint8)
