"""torch datasets, folds and samplers for the SIIM-ACR layout."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import DataFormatError, InvalidInputError
from ..rle import decode_union
from .dicom import read_dicom
from .siim import find_dicoms, read_rle_csv
from .transforms import preprocess, resize_mask

__all__ = ["SIIMDataset", "stratified_kfold", "PositiveRatioSampler", "DataWarning"]


class DataWarning(UserWarning):
    """Something in a dataset folder deserves a look (images without labels, labels without images)."""


class SIIMDataset(torch.utils.data.Dataset):
    """The Kaggle folder (any nesting of ``*.dcm``) with an optional RLE CSV.

    Items are dicts: ``image`` (1, S, S) float32 network input (see ``preprocess``), ``image_id``, and,
    with a CSV, ``mask`` (1, S, S) float32 (the union of the image's annotations) and ``label`` (0/1).
    ``task="classification"`` leaves the mask out. DICOMs absent from the CSV are not mixed in: they
    are listed in ``unlabelled`` and reported with a ``DataWarning``, as are CSV rows without a file
    (``missing_files``). Without a CSV (a test set) every DICOM is an item.
    ``transforms(image, mask)`` receives and returns (1, 1, S, S) tensors (mask may be None).
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
        if task not in ("segmentation", "classification"):
            raise InvalidInputError(f"task must be 'segmentation' or 'classification', got {task!r}")
        if not isinstance(image_size, int) or image_size < 8:
            raise InvalidInputError(f"image_size must be an integer >= 8, got {image_size!r}")
        self.root, self.image_size, self.task, self.transforms = Path(root), image_size, task, transforms
        files = find_dicoms(self.root)
        if not files:
            raise DataFormatError(f"{self.root}: no *.dcm files found")
        self.rles: Optional[dict[str, list[str]]] = None
        self.unlabelled: list[str] = []
        self.missing_files: list[str] = []
        if rle_csv is None:
            self.ids = sorted(files)
        else:
            self.rles = read_rle_csv(rle_csv)
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
                mask = resize_mask(decode_union(strings, dicom.pixels.shape), self.image_size)
        if self.transforms is not None:
            if mask is not None:
                image, mask = self.transforms(image, mask)
            else:
                image = self.transforms(image)
        item["image"] = image[0]
        if mask is not None:
            item["mask"] = mask[0]
        return item


def stratified_kfold(image_ids: Sequence[str], labels: Sequence[int], k: int = 5, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """k (train_ids, val_ids) splits with each class spread evenly over the folds (shuffled per class
    with ``seed``, then dealt round-robin), every id in exactly one validation fold."""
    ids, labs = list(image_ids), list(labels)
    if len(ids) != len(labs):
        raise InvalidInputError(f"{len(ids)} image_ids but {len(labs)} labels")
    if not isinstance(k, int) or k < 2 or k > len(ids):
        raise InvalidInputError(f"k must be an integer in [2, {len(ids)}], got {k!r}")
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
        lab = np.asarray(labels)
        self.positives = np.nonzero(lab == 1)[0]
        self.negatives = np.nonzero(lab == 0)[0]
        if len(self.positives) == 0 or len(self.negatives) == 0:
            raise InvalidInputError("PositiveRatioSampler needs both positive and negative images")
        self.schedule = positive_ratio
        self.num_samples = int(num_samples or len(lab))
        self.epochs, self.seed, self.epoch = max(1, int(epochs)), seed, 0
        self.ratio(0)  # validate now

    def ratio(self, epoch: int) -> float:
        s = self.schedule
        if callable(s):
            r = float(s(epoch))
        elif isinstance(s, (tuple, list)):
            a, b = s
            r = a + (b - a) * min(1.0, epoch / max(1, self.epochs - 1))
        else:
            r = float(s)
        if not 0.0 <= r <= 1.0:
            raise InvalidInputError(f"positive ratio must be in [0, 1], got {r} at epoch {epoch}")
        return r

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

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
