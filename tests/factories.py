"""Input factories shared by the tests and the benchmarks."""

from __future__ import annotations

import numpy as np


def random_mask(rng: np.random.Generator, shape: tuple[int, ...], density: float = 0.5) -> np.ndarray:
    return (rng.random(shape) < density).astype(np.uint8)


def blocky_mask(rng: np.random.Generator, shape: tuple[int, int], blocks: int = 6) -> np.ndarray:
    """Rectangles of foreground: long runs, runs crossing column boundaries, few transitions."""
    h, w = shape
    m = np.zeros(shape, dtype=np.uint8)
    for _ in range(blocks):
        r0, c0 = rng.integers(0, h), rng.integers(0, w)
        r1, c1 = rng.integers(r0, h + 1), rng.integers(c0, w + 1)
        m[r0:r1, c0:c1] = 1
    return m


def pneumothorax_blob(size: int = 1024, seed: int = 0) -> np.ndarray:
    """A realistic pneumothorax-shaped mask: a crescent along the apex and lateral edge of the right
    lung, with an irregular border. At 1024x1024 it has tens of thousands of pixels and ~200 runs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    # Lung field: an ellipse in the image's left half (the patient's right side).
    cy, cx, ry, rx = 0.45, 0.3, 0.3, 0.16
    lung = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    # The collapsed lung is a smaller ellipse shifted medially and down; the gap is the pneumothorax.
    collapsed = ((yy - cy - 0.05) / (ry * 0.82)) ** 2 + ((xx - cx - 0.04) / (rx * 0.78)) ** 2
    wobble = 0.04 * np.sin(yy * 37 + rng.uniform(0, 6)) + 0.03 * np.sin(xx * 23 + rng.uniform(0, 6))
    blob = (lung < 1 + wobble) & (collapsed > 1 + wobble) & (yy < cy + 0.1)
    return blob.astype(np.uint8)
