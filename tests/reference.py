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


def competition_rle2mask(rle: str, width: int, height: int) -> np.ndarray:
    """The SIIM-ACR organisers' ``rle2mask(rle, width, height)`` (mask_functions.py), transcribed:
    relative starts, 255 inside, column-major (the caller transposes, as the competition's notebooks
    did: ``rle2mask(rle, W, H).T``). ``"-1"`` (with or without the CSV's leading space) is empty."""
    mask = np.zeros(width * height)
    if rle.strip() == "-1":
        return mask.reshape(width, height)
    numbers = np.asarray([int(x) for x in rle.split()])
    position = 0
    for start, length in zip(numbers[0::2], numbers[1::2]):
        position += start
        mask[position:position + length] = 255
        position += length
    return mask.reshape(width, height)


def ref_combo_loss(logits, target, *, bce_weight=1.0, dice_weight=1.0, focal_weight=0.0, focal_gamma=2.0,
                   per_image=False, smooth=1.0, pos_weight=None, dtype=None):
    """The combo loss in plain PyTorch, from its definition; float64 unless ``dtype`` says otherwise
    (the "plain-PyTorch composite" a user would write in that dtype)."""
    import torch

    dtype = dtype or torch.float64
    x = logits.to(dtype).reshape(logits.shape[0], -1)
    t = target.to(dtype).reshape(logits.shape[0], -1)
    w = 1.0 if pos_weight is None else float(pos_weight)
    # torch's binary_cross_entropy_with_logits with pos_weight, written out; its
    # log1p(exp(-|x|)) + max(-x, 0) is -logsigmoid(x), whose autograd derivative is exact at x = 0
    # (|x| and clamp would give subgradients there).
    log_weight = 1 + (w - 1) * t
    bce_pixel = (1 - t) * x + log_weight * -torch.nn.functional.logsigmoid(x)
    p = torch.sigmoid(x)
    if per_image:
        dice = (1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()
    else:
        dice = 1 - (2 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)
    loss = bce_weight * bce_pixel.mean() + dice_weight * dice
    if focal_weight:
        p_t = p * t + (1 - p) * (1 - t)
        loss = loss + focal_weight * ((1 - p_t) ** focal_gamma * bce_pixel).mean()
    return loss


def same_partition(labels_a, labels_b) -> bool:
    """True when two labelings split the pixels into the same components (numbers may differ)."""
    a = np.asarray(labels_a).ravel()
    b = np.asarray(labels_b).ravel()
    if ((a == 0) != (b == 0)).any():
        return False
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    # a bijection between the label sets: each label pairs with exactly one label of the other side
    return len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))


def ref_triplet(probs: np.ndarray, top: float, min_area: int, bottom: float) -> np.ndarray:
    """The triplet rule per image, from its definition."""
    probs = np.asarray(probs, dtype=np.float64)
    out = np.zeros(probs.shape, dtype=np.uint8)
    for i, p in enumerate(probs):
        if (p > top).sum() >= min_area:
            out[i] = p > bottom
    return out


def ref_remove_small(mask: np.ndarray, min_area: int, connectivity: int) -> np.ndarray:
    from scipy import ndimage

    structure = np.ones((3, 3)) if connectivity == 8 else None
    out = np.zeros(mask.shape, dtype=np.uint8)
    for i, m in enumerate(mask):
        labels, k = ndimage.label(m != 0, structure=structure)
        sizes = np.bincount(labels.ravel(), minlength=k + 1)
        keep = sizes >= min_area
        keep[0] = False
        out[i] = keep[labels]
    return out


def trapezoid_area(y, x) -> float:
    """Area under the polyline through (x[i], y[i]) by the trapezoid rule, the formula np.trapezoid
    uses. Written out because np.trapezoid is NumPy 2.0+ and np.trapz is gone from 2.x, while
    pneumoseg supports NumPy from 1.23 (a test must run against either)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return float((np.diff(x) * (y[1:] + y[:-1]) / 2.0).sum())
