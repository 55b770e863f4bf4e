"""The datasets of a training run: the source (DICOM folder + CSV, a cache, or DICOMs preloaded into
memory), the stratified fold split, and the checks that a split can train and validate at all. Every
problem is found here, before the run's folder is touched or a step is taken."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from ..errors import DataFormatError, InvalidInputError
from .config import ConfigError, TrainConfig

__all__ = ["RunData", "build_data", "find_csv"]


@dataclass
class RunData:
    dataset: Any  # the whole labelled set (SIIMDataset or CachedDataset)
    train_indices: list[int]
    val_indices: list[int]
    labels: list[int]
    raw: bool  # items hold uint8 images (and masks) to normalise on the device
    image_size: int
    source: str

    @property
    def train_labels(self) -> list[int]:
        return [self.labels[i] for i in self.train_indices]

    @property
    def val_labels(self) -> list[int]:
        return [self.labels[i] for i in self.val_indices]

    @property
    def val_ids(self) -> list[str]:
        return [self.dataset.ids[i] for i in self.val_indices]

    def split_fingerprint(self) -> str:
        """SHA-256 of the training and validation folds' image ids and labels (in id order), saved in
        checkpoints: a resumed run must split its data as the run did, wherever the data now lives."""
        import hashlib
        import json

        parts = [sorted((str(self.dataset.ids[i]), int(self.labels[i])) for i in idx)
                 for idx in (self.train_indices, self.val_indices)]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


class ChestCrop(torch.utils.data.Dataset):
    """Each image cropped to its chest (``pneumoseg.data.chest_crop``) and resized back (classification)."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.ids = base.ids

    def __len__(self) -> int:
        return len(self.base)

    @property
    def labels(self) -> list[int]:
        return self.base.labels

    def __getitem__(self, index: int) -> dict[str, Any]:
        from ..data.transforms import crop_to_chest

        item = dict(self.base[index])
        image = item["image"]  # (1, S, S) float
        item["image"] = crop_to_chest(image[None], tuple(image.shape[1:]))[0]
        return item


def find_csv(root: Path) -> Optional[Path]:
    for name in ("train-rle.csv", "stage_2_train.csv"):
        if (root / name).is_file():
            return root / name
    return None


def _fold_problem(labels: list[int], part: str, fold: int, folds: int) -> Optional[str]:
    pos = sum(labels)
    if not labels:
        return f"fold {fold} of {folds} has no {part} images"
    if pos == 0:
        return f"fold {fold} of {folds} has no positive (pneumothorax) image in its {part} part ({len(labels)} images)"
    if pos == len(labels):
        return f"fold {fold} of {folds} has no negative image in its {part} part ({len(labels)} images)"
    return None


def build_data(cfg: TrainConfig, *, world_size: int = 1, progress: bool = True,
               preloaded: Optional[dict] = None) -> RunData:
    """The labelled dataset of ``cfg.data`` and its train / validation split, checked. ``preloaded``
    (a dict the caller keeps) shares images decoded for ``data.preload`` between runs on the same
    data and size (the classifier and the segmenter of one run)."""
    from ..data.cache import CachedDataset, decode_to_arrays, load_cache_index
    from ..data.datasets import SIIMDataset, stratified_kfold

    d = cfg.data
    task, size = cfg.task, d.image_size
    crop = d.chest_crop and task == "classification"
    dataset: Union[CachedDataset, SIIMDataset, ChestCrop]
    if d.cache is not None:
        cache = Path(d.cache)
        index = load_cache_index(cache)  # a missing or broken cache is a DataFormatError naming it
        if index["labels"] is None:
            raise ConfigError(f"config field data.cache: {cache} was built without an RLE CSV; training needs labels")
        if size > index["size"]:
            # Upsampled cache rows are blurred versions of what the model meets at prediction, where
            # each DICOM is resized from its full resolution to image_size.
            raise ConfigError(f"config field data.image_size: {size} is larger than the {index['size']} px images of the "
                              f"cache {cache}; build a cache at --size {size} or more (or train at {index['size']} or less)")
        raw = index["size"] == size and not crop
        dataset = CachedDataset(cache, task=task, image_size=size, raw=raw)
        source = f"cache {cache}"
    else:
        if d.root is None:
            raise ConfigError("config field data.root: no training data given (set data.root to the DICOM folder, "
                              "or data.cache to a `pneumoseg data cache` folder)")
        root = Path(d.root)
        if not root.is_dir():
            raise ConfigError(f"config field data.root: {root} is not a folder (no such data folder)")
        csv = Path(d.csv) if d.csv is not None else find_csv(root)
        if csv is None:
            raise ConfigError(f"config field data.csv: not given, and {root} has no train-rle.csv or stage_2_train.csv")
        if not csv.is_file():
            raise ConfigError(f"config field data.csv: {csv} is not a file")
        dataset = SIIMDataset(root, csv, image_size=size, task=task)
        source = f"{root} + {csv.name}"
        raw = False
        if d.preload:
            ids = list(dataset.ids)
            labels = dataset.labels
            key = (str(root.resolve()), str(csv.resolve()), size)
            if preloaded is not None and key in preloaded:
                images, masks = preloaded[key]
            else:
                images = np.zeros((len(ids), size, size), np.uint8)
                masks = np.zeros((len(ids), size, size), np.uint8)
                paths = [dataset.files[i] for i in ids]
                table = dataset.rles
                assert table is not None  # the dataset was read with a CSV
                rles = [table[i] for i in ids]
                _, failed = decode_to_arrays(paths, rles, size, images, masks, progress=progress, desc="preload")
                if failed:
                    raise DataFormatError(f"{len(failed)} DICOMs could not be read, e.g. {failed[0][1]}")
                if preloaded is not None:
                    preloaded[key] = (images, masks)
            dataset = CachedDataset(arrays=(images, masks, ids, labels), task=task, raw=not crop)
            raw = not crop
            source += " (preloaded)"
    if crop:
        dataset = ChestCrop(dataset)
    labels = [int(v) for v in dataset.labels]
    n = len(labels)
    if n < d.folds:
        raise ConfigError(f"config field data.folds: {d.folds} folds need at least {d.folds} images; the data has {n}")
    positives = sum(labels)
    if positives < d.folds:
        raise ConfigError(f"config field data.folds: the CSV has {positives} positive images, fewer than the {d.folds} "
                          "folds, so some fold would have no positive image to validate on")
    folds = stratified_kfold(list(dataset.ids), labels, k=d.folds, seed=d.split_seed)
    train_ids, val_ids = folds[d.fold]
    position = {image_id: i for i, image_id in enumerate(dataset.ids)}
    train_idx = [position[i] for i in train_ids]
    val_idx = [position[i] for i in val_ids]
    for part, idx in (("training", train_idx), ("validation", val_idx)):
        problem = _fold_problem([labels[i] for i in idx], part, d.fold, d.folds)
        if problem:
            raise DataFormatError(f"{problem}: check the CSV and data.folds / data.fold")
    if len(val_idx) < world_size:
        raise InvalidInputError(f"the validation fold has {len(val_idx)} images, fewer than the {world_size} processes")
    return RunData(dataset, train_idx, val_idx, labels, raw, size, source)
