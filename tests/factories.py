"""Input factories shared by the tests and the benchmarks."""

from __future__ import annotations

import warnings
from pathlib import Path

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


def randomize_model(model, seed: int = 0):
    """Random values in every floating parameter and BatchNorm statistic of a torch model (in place,
    returned): He-scaled weights, BatchNorm scales near 1 and variances in [0.75, 1.25], so deep
    networks keep bounded activations and a loaded model is told from a freshly built one."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * 0.5 + 0.75)
            elif t.dim() > 1:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * (2.0 / fan_in) ** 0.5)
            else:
                centre = 1.0 if name.endswith("weight") else 0.0
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.2 + centre)
    return model


def write_dicom(path, raw=None, *, syntax=None, **attrs):
    """An uncompressed (or deflated) 16-bit DICOM; attrs override or, as None, delete header fields."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    raw = np.arange(12, dtype=np.uint16).reshape(3, 4) if raw is None else raw
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = raw.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = raw.astype(np.uint16).tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values these tests want
        for key, value in attrs.items():
            if value is None:
                if key in ds:
                    delattr(ds, key)
            elif isinstance(value, tuple):  # (VR, value): stored as given, e.g. text where numbers belong
                ds.add_new(tag_for_keyword(key), *value)
            else:
                setattr(ds, key, value)
        ds.save_as(path, enforce_file_format=True)
    return Path(path)


#: The smallest segmentation run the training walkthrough and the train/export tests use: 64 px,
#: resnet_tiny, one 4-image step (Adam, BCE + Dice).
TINY_TRAINING = {
    "task": "segmentation",
    "data": {"image_size": 64, "folds": 2, "preload": True},
    "model": {"encoder": "resnet_tiny", "decoder_channels": [16, 16, 8, 8, 8]},
    "loss": {"bce": 1.0, "dice": 1.0, "focal": 0.0, "dice_smooth": 1.0},
    "optimizer": {"name": "adam", "lr": 2e-3},
    "epochs": 1, "batch_size": 4, "samples_per_epoch": 4, "positive_ratio": 0.5,
    "validation": {"min_areas": [0, 10], "min_component_areas": [0]},
    "checkpoint": {"keep_top_k": 1},
    "log": {"progress": False, "tensorboard": False, "plots": False},
    "threads": 1,
}

#: A tiny segmentation run whose every step is reproducible: plain SGD, no augmentation, one thread
#: (the training-math and training-review tests compare runs step by step).
TINY_DETERMINISTIC_TRAINING = {
    "task": "segmentation",
    "data": {"image_size": 64, "folds": 4, "preload": True},
    "model": {"encoder": "resnet_tiny", "decoder_channels": [16, 16, 8, 8, 8]},
    "loss": {"bce": 1.0, "dice": 1.0, "focal": 1.0, "dice_smooth": 1.0},
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.0},
    "epochs": 1, "batch_size": 4, "samples_per_epoch": 8, "positive_ratio": 0.5,
    "augment": {"enabled": False},
    "validation": {"min_areas": [0, 10, 40], "min_component_areas": [0, 8]},
    "checkpoint": {"keep_top_k": 1},
    "log": {"progress": False, "tensorboard": False, "plots": False},
    "threads": 1,
}


def training_config(base: dict, root, **changes):
    """A ``TrainConfig`` from the mapping ``base`` with ``data.root`` set to ``root`` and each change
    applied: ``epochs=2`` sets a top-level field (a whole section when the value is a mapping),
    ``data__image_size=48`` a nested one. ``base`` is not modified."""
    import copy

    from pneumoseg.train import config_from_dict

    raw = copy.deepcopy(base)
    raw["data"]["root"] = str(root)
    for key, value in changes.items():
        node = raw
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return config_from_dict(raw)


def binormal(seed: int, n: int, prevalence: float = 0.3, separation: float = 1.2, decimals=None):
    """Labels and probability-like scores for the classification metrics' tests: positives' scores
    shifted up, squashed into (0, 1)."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < prevalence
    y[:2], y[2:4] = True, False  # both classes, at least two of each
    s = 1 / (1 + np.exp(-(rng.normal(size=n) + separation * y)))
    return y, (s.round(decimals) if decimals is not None else s)
