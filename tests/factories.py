"""Input factories shared by the tests and the benchmarks."""

from __future__ import annotations

import numpy as np

from pneumoseg.samples import pneumothorax_mask


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
    """A realistic pneumothorax-shaped mask (tens of thousands of pixels, ~300 runs at 1024x1024)."""
    return pneumothorax_mask(size, seed)
