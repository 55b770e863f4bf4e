"""A synthetic SIIM-ACR study set: the built-in default data of the demo and the tests.

The images are chest-like phantoms (body, lung fields with vessel-like markings, ribs, mediastinum,
spine, noise); positives carry a pneumothorax-like region, a darker crescent without lung markings
along the apex or the lateral edge of one lung. They are written exactly like the Kaggle download:
JPEG-baseline DICOMs (8-bit MONOCHROME2, SIIM-like metadata) in ``dicom-images-train/<study>/<series>/``
and a ``train-rle.csv`` in the original layout, some positives with two annotations. Deterministic per
seed. A pipeline test set, not medical data: nothing learned on it says anything about patients.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Union

import numpy as np

from .. import limits
from .._checks import check_bool, check_int, check_probability
from .._fs import OutputFolder, OutputKind, prepare_output_folder
from ..rle import encode
from .siim import _format_rle_csv

__all__ = ["make_synthetic_siim", "chest_phantom"]

_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture, as the SIIM files
_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Band-limited noise: white noise on a coarse grid, upsampled bilinearly."""
    coarse = max(2, size // scale)
    grid = rng.standard_normal((coarse + 1, coarse + 1))
    idx = np.linspace(0, coarse, size)
    i0 = np.floor(idx).astype(int).clip(0, coarse - 1)
    f = idx - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def chest_phantom(size: int, rng: np.random.Generator, pneumothorax: bool) -> tuple[np.ndarray, np.ndarray]:
    """One (size, size) uint8 chest-like image and its pneumothorax mask (empty when negative)."""
    size = check_int(size, "size", low=8)
    limits.check_image(size, size, f"size={size}")
    pneumothorax = check_bool(pneumothorax, "pneumothorax")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    jitter = lambda a: a + rng.uniform(-0.02, 0.02)  # noqa: E731
    img = np.full((size, size), 18.0)
    body = ((yy - jitter(0.55)) / 0.62) ** 2 + ((xx - 0.5) / jitter(0.46)) ** 2 < 1
    img[body] = 125.0
    lungs = []
    for side in (-1, 1):
        cx = 0.5 + side * jitter(0.19)
        cy, ry, rx = jitter(0.47), jitter(0.3), jitter(0.13)
        lung = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        lungs.append((lung, cx, cy, ry, rx))
        img[lung < 1] = 60.0
    markings = np.abs(_smooth_noise(rng, size, 24)) < 0.12  # vessel-like branching lines
    lung_any = np.zeros((size, size), bool)
    for lung, *_ in lungs:
        lung_any |= lung < 1
    img[lung_any & markings] += 28.0
    mask = np.zeros((size, size), np.uint8)
    if pneumothorax:
        lung, cx, cy, ry, rx = lungs[rng.integers(0, 2)]
        shrink = rng.uniform(0.65, 0.85)
        shift = np.sign(0.5 - cx) * rng.uniform(0.01, 0.04)  # the collapsed lung falls medially
        collapsed = ((yy - cy - rng.uniform(0.02, 0.08)) / (ry * shrink)) ** 2 + ((xx - cx - shift) / (rx * shrink)) ** 2
        wobble = 0.05 * _smooth_noise(rng, size, 8)
        crescent = (lung < 1 + wobble) & (collapsed > 1 + wobble) & (yy < cy + rng.uniform(0.0, 0.15))
        mask = crescent.astype(np.uint8)
        img[crescent] = 32.0  # air without lung markings (ribs still cross it, drawn next)
    for k in range(8):  # ribs: bright curved bands across both lungs
        y0 = 0.2 + 0.075 * k + rng.uniform(-0.008, 0.008)
        rib = np.abs(yy - (y0 + 0.12 * (xx - 0.5) ** 2 * 4)) < 0.012
        img[rib & body] += 45.0
    mediastinum = (np.abs(xx - 0.5) < 0.07 + 0.1 * np.clip(yy - 0.45, 0, 1)) & (yy > 0.12) & body
    img[mediastinum] = 175.0
    spine = (np.abs(xx - 0.5) < 0.025) & body
    img[spine] = 195.0
    mask[mediastinum | spine] = 0  # annotate only what the image shows: the mediastinum hides the rest
    img += 6.0 * rng.standard_normal((size, size))
    return np.clip(img, 0, 255).astype(np.uint8), mask


def _jpeg_baseline(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=95, optimize=False, progressive=False)
    return buf.getvalue()


def _write_dicom(folder: OutputFolder, parts: tuple[str, ...], pixels: np.ndarray, uids: dict[str, str],
                 rng: np.random.Generator) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(_SOP_CLASS)
    meta.MediaStorageSOPInstanceUID = UID(uids["sop"])
    meta.TransferSyntaxUID = UID(_JPEG_BASELINE)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = _SOP_CLASS
    ds.SOPInstanceUID = uids["sop"]
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.PatientID = uids["patient"]
    ds.PatientName = uids["patient"]
    ds.PatientAge = f"{int(rng.integers(18, 90)):03d}Y"  # valid DICOM AS; SIIM wrote bare numbers
    ds.PatientSex = str(rng.choice(["M", "F"]))
    ds.ViewPosition = str(rng.choice(["PA", "AP"]))
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesDescription = f"view: {ds.ViewPosition}"
    spacing = f"{rng.uniform(0.139, 0.171):.3f}"
    ds.PixelSpacing = [spacing, spacing]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate([_jpeg_baseline(pixels)])
    ds["PixelData"].VR = "OB"
    with folder.open(*parts) as f:
        ds.save_as(f, enforce_file_format=True)


def make_synthetic_siim(
    out_dir: Union[str, Path],
    n_images: int = 64,
    size: int = 1024,
    positive_fraction: float = 0.3,
    seed: int = 0,
    progress: bool = False,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``n_images`` synthetic studies under ``out_dir`` in the Kaggle layout; returns the path
    of its ``train-rle.csv``. About a third of the positives are annotated as two regions (two rows).

    ``out_dir`` must be new, empty, or hold only an earlier synthetic set (which is replaced);
    anything else (someone's own ``train-rle.csv`` and DICOMs, say) is refused with
    :class:`pneumoseg.OutputError` unless ``overwrite=True``."""
    n_images = check_int(n_images, "n_images", low=1, high=10**7)
    size = check_int(size, "size", low=32)
    limits.check_image(size, size, f"size={size}")
    positive_fraction = check_probability(positive_fraction, "positive_fraction")
    seed = check_int(seed, "seed", low=0)
    progress = check_bool(progress, "progress")
    # a failure inside the block puts the folder's earlier output back (see pneumoseg._fs)
    with prepare_output_folder(out_dir, overwrite=overwrite, what=OutputKind.SYNTHETIC_DATA) as folder:
        from pydicom.uid import generate_uid

        rng = np.random.default_rng(seed)
        n_pos = int(round(n_images * positive_fraction))
        positive = np.zeros(n_images, bool)
        positive[rng.permutation(n_images)[:n_pos]] = True
        root = "1.2.826.0.1.3680043.10.1082."  # pneumoseg's synthetic UIDs, deterministic per seed
        rles: dict[str, list[str]] = {}
        items: Iterable[int] = range(n_images)
        if progress:
            from tqdm import tqdm

            items = tqdm(items, desc="synthetic studies", unit="image")
        for i in items:
            image_rng = np.random.default_rng([seed, i])
            pixels, mask = chest_phantom(size, image_rng, bool(positive[i]))
            uids: dict[str, str] = {k: generate_uid(prefix=root, entropy_srcs=[str(seed), str(i), k]) for k in ("sop", "study", "series")}
            uids["patient"] = f"synthetic-{seed}-{i:05d}"
            _write_dicom(folder, ("dicom-images-train", uids["study"], uids["series"], f"{uids['sop']}.dcm"),
                         pixels, uids, image_rng)
            rows = np.nonzero(mask.any(axis=1))[0]
            # A region one row high cannot be split: its upper part would be an empty "-1" annotation of a
            # positive image, which Kaggle's files never have.
            if mask.any() and image_rng.random() < 0.35 and len(rows) > 1:
                # Two annotations: split the region at a row through it, as two readers might.
                cut = int(rows[len(rows) // 2])
                upper, lower = mask.copy(), mask.copy()
                upper[cut:] = 0
                lower[:cut] = 0
                rles[uids["sop"]] = [encode(upper), encode(lower)]
            else:
                rles[uids["sop"]] = [encode(mask)]
        folder.write_bytes("train-rle.csv", data=_format_rle_csv(rles))
    return folder.path / "train-rle.csv"
