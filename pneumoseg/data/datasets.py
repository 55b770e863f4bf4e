"""torch datasets, folds and samplers for the SIIM-ACR layout."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from .. import limits
from .._checks import as_numpy_array, check_choice, check_int, check_path, check_real, check_str_sequence
from ..errors import DataFormatError, DataWarning, InvalidInputError, RLEError
from ..rle import decode_union
from .dicom import read_dicom
from .siim import find_dicoms, read_rle_csv
from .transforms import preprocess, resize_mask

__all__ = ["SIIMDataset", "stratified_kfold", "PositiveRatioSampler", "DataWarning"]


class SIIMDataset(torch.utils.data.Dataset):
    """The Kaggle folder (any nesting of ``*.dcm``) with an optional RLE CSV.

    Items are dicts: ``image`` (1, S, S) float32 network input (see ``preprocess``), ``image_id``, and,
    with a CSV, ``mask`` (1, S, S) float32 (the union of the image's annotations) and ``label`` (0/1).
    ``task="classification"`` leaves the mask out. DICOMs absent from the CSV are not mixed in: they
    are listed in ``unlabelled`` and reported with a ``DataWarning``, as are CSV rows without a file
    (``missing_files``). Without a CSV (a test set) every DICOM is an item.
    ``transforms`` gets (1, 1, S, S) tensors: called ``transforms(image, mask)`` returning
    ``(image, mask)`` when the item has a mask, and ``transforms(image)`` returning the image when it
    has none (``task="classification"`` or no CSV), as ``Augment`` takes them.
    """

    def __init__(
        self,
        root: Union[str, Path],
        rle_csv: Optional[Union[str, Path]] = None,
        *,
        image_size: int = 512,
        task: str = "segmentation",
        transforms: Optional[Callable] = None,
    ) -> None:
        task = check_choice(task, "task", ("segmentation", "classification"))
        image_size = check_int(image_size, "image_size", low=8)
        limits.check_image(image_size, image_size, f"image_size={image_size}")
        if transforms is not None and not callable(transforms):
            raise InvalidInputError(f"transforms must be callable, got {type(transforms).__name__}")
        root = check_path(root, "root", error=DataFormatError)
        self.root, self.image_size, self.task, self.transforms = root, image_size, task, transforms
        files = find_dicoms(self.root)
        self.skipped = files.skipped
        if files.skipped:
            warnings.warn(f"{len(files.skipped)} entries under {self.root} were skipped (see .skipped), e.g. "
                          f"{files.skipped[0][0]}: {files.skipped[0][1]}", DataWarning, stacklevel=2)
        if not files:
            raise DataFormatError(f"{self.root}: no *.dcm files found")
        self.rles: Optional[dict[str, list[str]]] = None
        self.rle_csv: Optional[Path] = None
        self.unlabelled: list[str] = []
        self.missing_files: list[str] = []
        if rle_csv is None:
            self.ids = sorted(files)
        else:
            self.rles = read_rle_csv(rle_csv)
            self.rle_csv = Path(rle_csv)
            self.ids = [i for i in self.rles if i in files]
            self.unlabelled = sorted(set(files) - set(self.rles))
            self.missing_files = [i for i in self.rles if i not in files]
            if self.unlabelled:
                warnings.warn(f"{len(self.unlabelled)} DICOMs under {self.root} have no row in {rle_csv}; "
                              "they are left out (see .unlabelled)", DataWarning, stacklevel=2)
            if self.missing_files:
                warnings.warn(f"{len(self.missing_files)} ImageIds of {rle_csv} have no DICOM under {self.root} "
                              "(see .missing_files)", DataWarning, stacklevel=2)
            if not self.ids:
                raise DataFormatError(f"no ImageId of {rle_csv} has a DICOM under {self.root}")
        self.files = files

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labels(self) -> list[int]:
        """0/1 per item (an image is positive when any annotation is not "-1"); needs a CSV."""
        if self.rles is None:
            raise InvalidInputError("a dataset without an RLE CSV has no labels")
        return [int(any(s.strip() != "-1" for s in self.rles[i])) for i in self.ids]

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        dicom = read_dicom(self.files[image_id])
        image = preprocess(dicom.pixels, self.image_size)  # (1, 1, S, S)
        mask = None
        item: dict[str, Any] = {"image_id": image_id}
        if self.rles is not None:
            strings = self.rles[image_id]
            label = int(any(s.strip() != "-1" for s in strings))
            item["label"] = torch.tensor(label, dtype=torch.float32)
            if self.task == "segmentation":
                mask = resize_mask(annotation_mask(strings, dicom.pixels.shape, image_id, self.files[image_id],
                                                   self.rle_csv), self.image_size)
        if self.transforms is not None:
            if mask is not None:
                image, mask = self.transforms(image, mask)
            else:
                image = self.transforms(image)
        item["image"] = image[0]
        if mask is not None:
            item["mask"] = mask[0]
        return item


def annotation_mask(strings: Sequence[str], shape: tuple[int, int], image_id: str, path: Path,
                    csv: Optional[Path]) -> np.ndarray:
    """The union of an image's annotations at its DICOM's size; one that does not fit the image (an
    RLE of another size) is a DataFormatError naming the image, its file and the CSV, instead of the
    RLE decoder's 'rles[0]: ...', which says nothing of which of thousands of images it was."""
    try:
        return decode_union(strings, shape)
    except RLEError as exc:
        source = f" in {csv}" if csv is not None else ""
        raise DataFormatError(f"{path}: the annotation of ImageId {image_id}{source} does not fit its "
                              f"{shape[0]}x{shape[1]} DICOM: {exc}") from None


def _check_labels(labels: Any, *, binary: bool = True) -> list[int]:
    """Integer class labels (0/1 with ``binary``) as a list of int; anything else is refused, since
    a label 2 or 0.5 would otherwise fall silently into no class."""
    if isinstance(labels, (str, bytes)) or labels is None:
        raise InvalidInputError(f"labels must be a sequence of integers, got {type(labels).__name__}")
    arr = as_numpy_array(labels.cpu() if isinstance(labels, torch.Tensor) else labels, "labels")
    if arr.ndim != 1:
        raise InvalidInputError(f"labels must be one-dimensional, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "biu":
        if arr.dtype.kind == "f" and np.isfinite(arr).all() and (arr == np.round(arr)).all():
            arr = arr.astype(np.int64)
        else:
            raise InvalidInputError(f"labels must be integers, got dtype {arr.dtype} (e.g. {arr.tolist()[:3]})")
    values = [int(v) for v in arr.tolist()]
    if binary and any(v not in (0, 1) for v in values):
        raise InvalidInputError(f"labels must be 0 or 1, got {sorted(set(values) - {0, 1})[:3]}")
    return values


def stratified_kfold(image_ids: Sequence[str], labels: Sequence[int], k: int = 5, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """k (train_ids, val_ids) splits with each class spread evenly over the folds (shuffled per class
    with ``seed``, then dealt round-robin), every id in exactly one validation fold."""
    ids = check_str_sequence(image_ids, "image_ids")
    labs = _check_labels(labels, binary=False)
    if len(ids) != len(labs):
        raise InvalidInputError(f"{len(ids)} image_ids but {len(labs)} labels")
    k = check_int(k, "k", low=2, high=max(2, len(ids)))
    if k > len(ids):
        raise InvalidInputError(f"k must be an integer in [2, {len(ids)}], got {k!r}")
    seed = check_int(seed, "seed", low=0)
    if len(set(ids)) != len(ids):
        raise InvalidInputError("image_ids contains duplicates")
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    start = 0
    for cls in sorted(set(labs)):
        members = [i for i, l in zip(ids, labs) if l == cls]
        for j, pos in enumerate(rng.permutation(len(members))):
            fold_of[members[pos]] = (start + j) % k
        start += len(members)  # the next class starts where this one stopped: folds stay balanced
    return [([i for i in ids if fold_of[i] != f], [i for i in ids if fold_of[i] == f]) for f in range(k)]


class PositiveRatioSampler(torch.utils.data.Sampler):
    """Samples an epoch with a chosen share of positive images, which may change over epochs (the
    winning SIIM-ACR solution went from 0.8 to 0.4): ``positive_ratio`` is a number, a
    ``(start, end)`` pair interpolated linearly over ``epochs``, or a function of the epoch. Call
    ``set_epoch(e)`` each epoch. Positives and negatives are drawn with replacement."""

    def __init__(
        self,
        labels: Sequence[int],
        positive_ratio: Union[float, tuple[float, float], Callable[[int], float]] = 0.5,
        *,
        num_samples: Optional[int] = None,
        epochs: int = 1,
        seed: int = 0,
    ) -> None:
        lab = np.asarray(_check_labels(labels), dtype=np.int64)
        self.positives = np.nonzero(lab == 1)[0]
        self.negatives = np.nonzero(lab == 0)[0]
        if len(self.positives) == 0 or len(self.negatives) == 0:
            raise InvalidInputError("PositiveRatioSampler needs both positive and negative images")
        if isinstance(positive_ratio, (tuple, list)):
            if len(positive_ratio) != 2:
                raise InvalidInputError(f"positive_ratio as a schedule must be a (start, end) pair, got {positive_ratio!r}")
            start, end = (check_real(v, f"positive_ratio[{i}]", low=0.0, high=1.0) for i, v in enumerate(positive_ratio))
            positive_ratio = (start, end)
        elif not callable(positive_ratio):
            positive_ratio = check_real(positive_ratio, "positive_ratio", low=0.0, high=1.0)
        self.schedule = positive_ratio
        self.num_samples = len(lab) if num_samples is None else check_int(num_samples, "num_samples", low=1, high=2**40)
        self.epochs = check_int(epochs, "epochs", low=1)
        self.seed, self.epoch = check_int(seed, "seed", low=0), 0
        self.ratio(0)  # validate now

    def ratio(self, epoch: int) -> float:
        s = self.schedule
        if callable(s):
            r = check_real(s(epoch), f"positive_ratio({epoch})")
        elif isinstance(s, (tuple, list)):
            a, b = s
            r = a + (b - a) * min(1.0, epoch / max(1, self.epochs - 1))
        else:
            r = float(s)
        if not 0.0 <= r <= 1.0:
            raise InvalidInputError(f"positive ratio must be in [0, 1], got {r} at epoch {epoch}")
        return r

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_int(epoch, "epoch", low=0)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        n_pos = int(round(self.num_samples * self.ratio(self.epoch)))
        picks = np.concatenate([
            rng.choice(self.positives, n_pos, replace=True),
            rng.choice(self.negatives, self.num_samples - n_pos, replace=True),
        ])
        return iter(rng.permutation(picks).tolist())
