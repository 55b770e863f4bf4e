"""Data: DICOM reading, the SIIM-ACR CSV and folder layouts, a synthetic study set, and (with torch)
datasets, folds, samplers and augmentations."""

from ..errors import DataWarning
from .dicom import DicomImage, read_dicom, read_dicom_shape
from .siim import DicomIndex, find_dicom_files, find_dicoms, read_rle_csv, write_rle_csv
from .synthetic import chest_phantom, make_synthetic_siim

_TORCH_NAMES = {
    "SIIMDataset": "datasets", "stratified_kfold": "datasets", "PositiveRatioSampler": "datasets",
    "Augment": "transforms", "preprocess": "transforms", "chest_crop": "transforms", "crop_to_chest": "transforms",
    "resize_mask": "transforms", "classifier_input": "transforms",
}


def __getattr__(name: str):
    # The torch-based parts load on first use, so reading DICOMs and CSVs needs no torch.
    if name in _TORCH_NAMES:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_TORCH_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DicomImage", "read_dicom", "read_dicom_shape", "find_dicoms", "find_dicom_files", "DicomIndex", "read_rle_csv", "write_rle_csv",
    "chest_phantom", "make_synthetic_siim", "DataWarning", *_TORCH_NAMES,
]
