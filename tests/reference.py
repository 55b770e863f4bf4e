"""Slow references written from the format specs, never by calling pneumoseg.

The SIIM-ACR RLE: pixels in column-major order (the flattening of ``mask.T``), 0-based; the first
number of each pair is the start (absolute for the first run, the count of background pixels since
the end of the previous run for every later one), the second the run length; ``-1`` is empty.
"""

from __future__ import annotations

import numpy as np


def runs_of(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal foreground runs (start, length) of ``mask`` in column-major order, pixel by pixel."""
    flat = [bool(v) for v in np.asarray(mask).T.reshape(-1).tolist()]
    runs: list[tuple[int, int]] = []
    start = None
    for k, on in enumerate(flat):
        if on and start is None:
            start = k
        elif not on and start is not None:
            runs.append((start, k - start))
            start = None
    if start is not None:
        runs.append((start, len(flat) - start))
    return runs


def ref_encode(mask: np.ndarray, style: str = "siim") -> str:
    runs = runs_of(mask)
    if not runs:
        return "-1" if style == "siim" else ""
    numbers: list[int] = []
    previous_end = 0
    for start, length in runs:
        if style == "siim":
            numbers += [start - previous_end, length]
        else:
            numbers += [start + 1, length]
        previous_end = start + length
    return " ".join(str(n) for n in numbers)


def ref_decode(rle: str, shape: tuple[int, int], style: str = "siim") -> np.ndarray:
    h, w = shape
    flat = np.zeros(h * w, dtype=np.uint8)
    tokens = rle.split()
    if tokens == ["-1"] or not tokens:
        return flat.reshape(w, h).T.copy()
    values = [int(t) for t in tokens]
    assert len(values) % 2 == 0
    position = 0
    for a, length in zip(values[0::2], values[1::2]):
        start = position + a if style == "siim" else a - 1
        assert 0 <= start and start + length <= h * w
        flat[start : start + length] = 1
        position = start + length
    return flat.reshape(w, h).T.copy()


def competition_mask2rle(img: np.ndarray, width: int, height: int) -> str:
    """The behaviour of the SIIM-ACR organisers' ``mask2rle(img, width, height)`` (mask_functions.py),
    called as ``mask2rle(mask.T * 255, W, H)``: it walks ``img[x][y]`` and, unlike the format, drops a
    run still open at the last pixel, and returns ``""`` for an empty mask."""
    rle: list[str] = []
    last_color = 0
    current_pixel = 0
    run_start = -1
    run_length = 0
    for x in range(width):
        for y in range(height):
            current_color = img[x][y]
            if current_color != last_color:
                if current_color == 255:
                    run_start = current_pixel
                    run_length = 1
                else:
                    rle.append(str(run_start))
                    rle.append(str(run_length))
                    run_start = -1
                    run_length = 0
                    current_pixel = 0
            elif run_start > -1:
                run_length += 1
            last_color = current_color
            current_pixel += 1
    return " ".join(rle)
