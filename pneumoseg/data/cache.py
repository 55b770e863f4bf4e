"""A decoded-image cache: every DICOM decoded once, at the training size, into memory-mapped uint8
arrays, so training reads raw bytes instead of decoding JPEG DICOMs every epoch (the bottleneck on a
GPU). Written by ``pneumoseg data cache`` / :func:`build_cache`, read by :class:`CachedDataset`.

    CACHE/
      images.npy     (N, S, S) uint8: each image scaled by its own min and max to 0..255 and resized
                     (bilinear, antialiased): exactly ``pneumoseg.data.preprocess`` before normalising
      masks.npy      (N, S, S) uint8 0/1: the union of each image's annotations (with a CSV), resized
                     as the image is, then 0/1 at one half (``pneumoseg.data.resize_mask``)
      index.json     format, version, size, and per row: ImageId, label, original height and width;
                     written last, so a cache whose build was interrupted has none and is refused

Images are decoded by a pool of threads (Pillow's JPEG decoder and torch's resize release the GIL).
An unreadable DICOM is skipped and listed in ``index.json`` under ``skipped`` (with a warning), the
rest of the cache is still written. The ``.npy`` files are plain NumPy arrays, read with
``allow_pickle=False``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__, limits
from .._checks import check_bool, check_choice, check_int, check_path, show
from .._fs import OutputKind, prepare_output_folder, read_json
from ..errors import DataFormatError, DataWarning, InvalidInputError
from .datasets import annotation_mask
from .dicom import read_dicom
from .siim import dicom_file_image_id, find_dicoms, read_rle_csv
from .transforms import NORMALISE_MEAN, NORMALISE_STD, preprocess, resize_mask

__all__ = ["build_cache", "CachedDataset", "decode_to_arrays", "CACHE_INDEX", "load_cache_index"]

CACHE_FORMAT = "pneumoseg-cache"
# 3: masks resized as their images (bilinear about pixel centres, then 0/1 at one half). Earlier
#    formats picked mask pixels by nearest neighbour, up to 1.5 source pixels up-left of the image
#    (1: torch's top-left pick; 2, never released: the centred pick, half a pixel at even scales).
CACHE_VERSION = 3
CACHE_INDEX = "index.json"
IMAGES_FILE = "images.npy"
MASKS_FILE = "masks.npy"
_MAX_INDEX_BYTES = 256 * 2**20


def _is_positive(strings: Sequence[str]) -> bool:
    return any(s.strip() != "-1" for s in strings)


def _encode_image(pixels: np.ndarray, size: int) -> np.ndarray:
    """``preprocess`` up to (not including) the normalisation, as uint8."""
    x = preprocess(pixels, size)[0, 0] * NORMALISE_STD + NORMALISE_MEAN  # [0, 1]
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def _decode_one(path: Path, strings: Optional[Sequence[str]], size: int) -> tuple[np.ndarray, Optional[np.ndarray], tuple[int, int]]:
    dicom = read_dicom(path, with_dataset=False)
    image = _encode_image(dicom.pixels, size)
    mask = None
    if strings is not None:
        # an annotation that does not fit its image skips the image as an unreadable DICOM does
        full = annotation_mask(list(strings), dicom.pixels.shape, dicom_file_image_id(path), path, None)
        mask = (resize_mask(full, size)[0, 0] > 0.5).to(torch.uint8).numpy()
    h, w = dicom.pixels.shape  # DicomImage.pixels is (H, W)
    return image, mask, (int(h), int(w))


def decode_to_arrays(
    paths: Sequence[Path],
    rles: Optional[Sequence[Sequence[str]]],
    size: int,
    images: np.ndarray,
    masks: Optional[np.ndarray],
    *,
    workers: Optional[int] = None,
    progress: bool = True,
    desc: str = "decode",
) -> tuple[list[tuple[int, int]], list[tuple[int, str]]]:
    """Decode ``paths[i]`` (and rasterise ``rles[i]``) into row i of ``images`` / ``masks`` (uint8
    (N, size, size) arrays, e.g. memory maps) with a pool of threads. Returns the original shapes and
    the (row, reason) of each file that could not be read (its row is left zero)."""
    n = len(paths)
    shapes: list[tuple[int, int]] = [(0, 0)] * n
    failed: list[tuple[int, str]] = []
    workers = workers or min(8, os.cpu_count() or 1)

    def work(i: int) -> None:
        try:
            image, mask, shape = _decode_one(paths[i], None if rles is None else rles[i], size)
        except DataFormatError as exc:  # an unreadable DICOM, an annotation that does not fit it
            failed.append((i, str(exc)))
            return
        images[i] = image
        if masks is not None and mask is not None:
            masks[i] = mask
        shapes[i] = shape

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=desc, unit="image")
    # torch would otherwise spread each small resize over every core, fighting the pool for them
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # read_dicom touches no process-wide warning state, so the threads need no filters of their own.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(work, range(n)):
                if bar is not None:
                    bar.update(1)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
    return shapes, sorted(failed)


def _labelled_items(root: Path, csv: Optional[Path]) -> tuple[list[str], list[Path], Optional[list[list[str]]]]:
    files = find_dicoms(root)
    if not files:
        raise DataFormatError(f"{root}: no *.dcm files found")
    if csv is None:
        ids = sorted(files)
        return ids, [files[i] for i in ids], None
    rles = read_rle_csv(csv)
    ids = [i for i in rles if i in files]
    if not ids:
        raise DataFormatError(f"no ImageId of {csv} has a DICOM under {root}")
    missing = len(rles) - len(ids)
    if missing:
        warnings.warn(f"{missing} ImageIds of {csv} have no DICOM under {root}; they are left out of the cache",
                      DataWarning, stacklevel=3)
    # As SIIMDataset says: the Kaggle download has DICOMs without a train-rle.csv row, and a cache
    # that dropped them without a word looked complete.
    unlabelled = len(files) - len(ids)
    if unlabelled:
        warnings.warn(f"{unlabelled} DICOMs under {root} have no row in {csv}; they are left out of the cache",
                      DataWarning, stacklevel=3)
    return ids, [files[i] for i in ids], [rles[i] for i in ids]


def _open_reserved_memmap(path: Path, shape: tuple[int, int, int]) -> np.memmap:
    """A new uint8 ``.npy`` memory map whose disk blocks are reserved before the first page is
    touched. ``open_memmap`` makes a sparse file: on a disk without room for it the kernel answers a
    write to a page with SIGBUS, killing the process with 'Bus error' and no message, and leaving
    the file. Reserving the space first turns that into ENOSPC, an OSError naming the file."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    if hasattr(os, "posix_fallocate"):
        try:
            fd = os.open(path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # a file system without it: as before
                return array
            del array
            raise OSError(exc.errno, f"{exc.strerror} (reserving {int(np.prod(shape))} bytes for the cache)",
                          os.fspath(path)) from None
    return array


def build_cache(
    root: Union[str, Path],
    csv: Optional[Union[str, Path]] = None,
    *,
    size: int = 1024,
    out: Union[str, Path],
    workers: Optional[int] = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Decode every DICOM under ``root`` (those listed in ``csv`` when given, with their masks) once
    into a cache folder ``out`` at ``size`` x ``size``; returns the path of its ``index.json``.

    ``out`` follows pneumoseg's output rules (new, empty, or an earlier pneumoseg output; anything
    else needs ``overwrite=True``). Size limits are checked before the arrays are allocated."""
    root = check_path(root, "root", error=DataFormatError)
    if not root.is_dir():
        raise DataFormatError(f"{root}: no such data folder")
    csv_path = None if csv is None else check_path(csv, "csv", error=DataFormatError)
    size = check_int(size, "size", low=8)
    limits.check_image(size, size, f"size={size}")
    if workers is not None:
        workers = check_int(workers, "workers", low=1, high=256)
    progress = check_bool(progress, "progress")
    ids, paths, rles = _labelled_items(root, csv_path)
    n = len(ids)
    limits.check("max_batch_bytes", n * size * size, f"a cache of {n} images at {size}x{size} (uint8)")
    # a failure inside the block puts the folder's earlier cache back (see pneumoseg._fs)
    with prepare_output_folder(out, overwrite=overwrite, what=OutputKind.CACHE, inputs=(root, csv_path)) as folder:
        # The arrays are filled in place; if anything fails they are removed, so a rerun needs no --force.
        with contextlib.ExitStack() as files:
            images_path = files.enter_context(folder.filled_in_place(IMAGES_FILE))
            images = _open_reserved_memmap(images_path, (n, size, size))
            masks = None
            if rles is not None:
                masks_path = files.enter_context(folder.filled_in_place(MASKS_FILE))
                masks = _open_reserved_memmap(masks_path, (n, size, size))
            shapes, failed = decode_to_arrays(paths, rles, size, images, masks, workers=workers, progress=progress,
                                              desc="cache")
            images.flush()
            del images
            if masks is not None:
                masks.flush()
                del masks
            bad = {i for i, _ in failed}
            rows = [i for i in range(n) if i not in bad]
            if not rows:
                raise DataFormatError(f"{root}: none of the {n} DICOMs could be read, e.g. {failed[0][1]}")
        if failed:
            warnings.warn(f"{len(failed)} DICOMs could not be read and are left out of the cache (see 'skipped' in "
                          f"its {CACHE_INDEX}), e.g. {failed[0][1]}", DataWarning, stacklevel=2)
        index = {
            "format": CACHE_FORMAT,
            "format_version": CACHE_VERSION,
            "pneumoseg_version": __version__,
            "size": size,
            "count": n,
            "has_masks": rles is not None,
            "source": {"root": str(root), "csv": None if csv_path is None else str(csv_path)},
            "ids": [ids[i] for i in rows],
            "rows": rows,
            "labels": None if rles is None else [int(_is_positive(rles[i])) for i in rows],
            "shapes": [list(shapes[i]) for i in rows],
            "skipped": [{"id": ids[i], "path": str(paths[i]), "reason": reason} for i, reason in failed],
        }
        return folder.write_bytes(CACHE_INDEX, data=json.dumps(index, indent=1) + "\n")


def load_cache_index(cache_dir: Union[str, Path]) -> dict[str, Any]:
    """The checked ``index.json`` of a cache folder."""
    folder = check_path(cache_dir, "cache", error=DataFormatError)
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: no such cache folder (write one with `pneumoseg data cache`)")
    path = folder / CACHE_INDEX
    if not path.is_file():
        raise DataFormatError(f"{folder}: not a pneumoseg cache (no {CACHE_INDEX}; an interrupted "
                              "`pneumoseg data cache` leaves none: run it again)")
    if path.stat().st_size > _MAX_INDEX_BYTES:  # about 100 bytes an image: millions of images
        raise DataFormatError(f"{path}: larger than {_MAX_INDEX_BYTES >> 20} MiB; not a pneumoseg cache index")
    index = read_json(path)
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
        raise DataFormatError(f"{path}: not a pneumoseg cache index")
    if index.get("format_version") in (1, 2):
        raise DataFormatError(f"{path}: written by an older pneumoseg whose masks sit up to 1.5 source pixels "
                              "up and left of their images (a nearest-neighbour resize): rebuild the cache")
    if index.get("format_version") != CACHE_VERSION:
        raise DataFormatError(f"{path}: cache format {index.get('format_version')!r}; this pneumoseg reads "
                              f"version {CACHE_VERSION}: rebuild the cache")
    try:
        # JSON integers only: int() of Infinity raised OverflowError, of "x" or {} a bare ValueError or
        # TypeError, and a missing has_masks a KeyError (tracebacks from `pneumoseg train`)
        size, count = _whole(index["size"], "size", 1), _whole(index["count"], "count", 0)
        ids, rows, labels = _list(index["ids"], "ids"), _list(index["rows"], "rows"), index["labels"]
        rows = [_whole(r, "a row", 0) for r in rows]
        if labels is not None:
            labels = [_whole(v, "a label", 0) for v in _list(labels, "labels")]
            if any(v > 1 for v in labels):
                raise ValueError("labels must be 0 or 1")
        if not isinstance(index["has_masks"], bool):
            raise ValueError(f"has_masks must be true or false, got {show(index['has_masks'])}")
        if len(ids) != len(rows) or (labels is not None and len(labels) != len(ids)):
            raise ValueError("ids, rows and labels differ in length")
        if any(not isinstance(i, str) for i in ids) or len(set(ids)) != len(ids):
            raise ValueError("ids must be distinct strings")
        if any(not 0 <= r < count for r in rows):
            raise ValueError("a row is outside the arrays")
        if len(set(rows)) != len(rows):  # two ids reading one row's image and mask
            raise ValueError("rows must be distinct")
        if index["has_masks"] and labels is None:  # build_cache writes both from a CSV, or neither
            raise ValueError("has_masks is true but labels is null")
    except KeyError as exc:
        raise DataFormatError(f"{path}: malformed cache index (missing field {exc})") from None
    except (TypeError, ValueError) as exc:
        raise DataFormatError(f"{path}: malformed cache index ({exc})") from None
    index.update(size=size, count=count, ids=ids, rows=rows, labels=labels)
    return index


def _whole(value: Any, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {show(value)}")
    return value


def _list(value: Any, what: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list, got {show(value)}")
    return value


def _open_array(path: Path, count: int, size: int) -> np.ndarray:
    if not path.is_file():
        raise DataFormatError(f"{path}: missing from the cache folder")
    try:
        # the header first: a shape whose size overflows int64 made np.load's memmap warn (an error
        # under warnings-as-errors) before it refused the file
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
        if dtype != np.uint8 or shape != (count, size, size):
            raise DataFormatError(f"{path}: expected a uint8 array of shape {(count, size, size)}, got {dtype} "
                                  f"{shape} (a damaged or mixed-up cache)")
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        if isinstance(exc, DataFormatError):
            raise
        raise DataFormatError(f"{path}: not a readable .npy array ({exc})") from None
    return arr


class CachedDataset(torch.utils.data.Dataset):
    """Items of a cache folder (or of in-memory uint8 arrays), in the format of ``SIIMDataset``:
    ``image`` (1, S, S) float32 network input, ``mask`` (1, S, S) float32, ``label``, ``image_id``.

    ``image_size`` other than the cache's resizes on the fly (bilinear antialiased images; masks
    the same way, then 0/1 at one half). ``raw=True`` returns ``image`` as the uint8 (1, S, S) cache
    row (and ``mask`` as uint8), for a training loop that normalises on its device (4x less to copy);
    ``normalise`` does it.
    ``arrays=(images, masks, ids, labels)`` builds the dataset from arrays in memory instead."""

    def __init__(
        self,
        cache_dir: Optional[Union[str, Path]] = None,
        *,
        arrays: Optional[tuple[np.ndarray, Optional[np.ndarray], Sequence[str], Optional[Sequence[int]]]] = None,
        task: str = "segmentation",
        image_size: Optional[int] = None,
        raw: bool = False,
        transforms: Optional[Callable] = None,
    ) -> None:
        task = check_choice(task, "task", ("segmentation", "classification"))
        self.task, self.raw = task, check_bool(raw, "raw")
        if (cache_dir is None) == (arrays is None):
            raise InvalidInputError("give either cache_dir or arrays")
        if arrays is not None:
            images, masks, ids, labels = arrays
            self.rows = list(range(len(ids)))
            self.size = int(images.shape[-1])
            self.path = None
        else:
            assert cache_dir is not None  # exactly one of cache_dir and arrays was given (checked above)
            index = load_cache_index(cache_dir)
            self.path = Path(cache_dir)
            self.size, ids, labels = index["size"], index["ids"], index["labels"]
            self.rows = index["rows"]
            images = _open_array(self.path / IMAGES_FILE, index["count"], self.size)
            masks = _open_array(self.path / MASKS_FILE, index["count"], self.size) if index["has_masks"] else None
        self.images, self.masks = images, masks
        self.ids = list(ids)
        self._labels = None if labels is None else [int(v) for v in labels]
        if task == "segmentation" and masks is None and labels is not None:
            raise DataFormatError("the cache has labels but no masks")
        self.image_size = self.size if image_size is None else check_int(image_size, "image_size", low=8)
        if raw and self.image_size != self.size:
            raise InvalidInputError(f"raw=True needs image_size equal to the cache's size {self.size}, got {self.image_size}")
        if transforms is not None and not callable(transforms):
            raise InvalidInputError(f"transforms must be callable, got {type(transforms).__name__}")
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labels(self) -> list[int]:
        if self._labels is None:
            raise InvalidInputError("this cache was built without an RLE CSV and has no labels")
        return list(self._labels)

    @staticmethod
    def normalise(images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 cache rows -> float32 network input, on their device."""
        return (images_u8.float() / 255.0 - NORMALISE_MEAN) / NORMALISE_STD

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        image = torch.from_numpy(np.array(self.images[row]))[None]  # copy out of the memory map
        item: dict[str, Any] = {"image_id": self.ids[index]}
        mask = None
        if self._labels is not None:
            item["label"] = torch.tensor(float(self._labels[index]))
            if self.task == "segmentation":
                assert self.masks is not None  # __init__ refuses labels without masks for segmentation
                mask = torch.from_numpy(np.array(self.masks[row]))[None]
        if self.raw:
            item["image"] = image
            if mask is not None:
                item["mask"] = mask
            return item
        x = image[None].float() / 255.0
        if self.image_size != self.size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        x = (x - NORMALISE_MEAN) / NORMALISE_STD
        m = None
        if mask is not None:
            m = mask[None].float()
            if self.image_size != self.size:
                m = resize_mask(m, self.image_size)  # as the image, so a cache resized stays centred
        if self.transforms is not None:
            if m is not None:
                x, m = self.transforms(x, m)
            else:
                x = self.transforms(x)
        item["image"] = x[0]
        if m is not None:
            item["mask"] = m[0]
        return item
