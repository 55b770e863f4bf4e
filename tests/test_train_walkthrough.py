"""A new user's walk through README's Training section: a cache of the Kaggle layout, a recipe at
another image size, a stage-1 classifier's config errors, and --resume. Each test failed on the code
before its fix; the real-data test runs where the SIIM sample is present and is skipped elsewhere."""

from __future__ import annotations

import copy
import csv
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("yaml")

from pneumoseg.data import make_synthetic_siim  # noqa: E402
from pneumoseg.errors import DataWarning  # noqa: E402
from pneumoseg.metrics import TripletSearch  # noqa: E402
from pneumoseg.train import ConfigError, config_from_dict, load_recipe  # noqa: E402
from pneumoseg.train.engine import train  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "siim-sample"

TINY = {
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


def tiny(root: Path, **top) -> "object":
    raw = copy.deepcopy(TINY)
    raw["data"]["root"] = str(root)
    raw.update(top)
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("walk-synth")
    make_synthetic_siim(root, n_images=8, size=64, positive_fraction=0.5, seed=5)
    return root


def _csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_cache_says_which_dicoms_it_leaves_out_for_want_of_a_csv_row(synth, tmp_path):
    # The Kaggle download has DICOMs without a train-rle.csv row (37 of them). SIIMDataset warned
    # about them, but `pneumoseg data cache` dropped them without a word and looked complete.
    from pneumoseg.data.cache import CachedDataset, build_cache

    rows = _csv_rows(synth / "train-rle.csv")
    dropped = rows[1][0]
    partial = tmp_path / "partial.csv"
    with open(partial, "w", newline="") as f:
        csv.writer(f).writerows([r for r in rows if r[0] != dropped])
    with pytest.warns(DataWarning, match="1 DICOMs under .* have no row in .*partial.csv; they are left out of the cache"):
        build_cache(synth, partial, size=32, out=tmp_path / "cache", progress=False)
    assert dropped not in CachedDataset(tmp_path / "cache").ids
    # the complete CSV: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_cache(synth, synth / "train-rle.csv", size=32, out=tmp_path / "cache-full", progress=False)


@pytest.mark.parametrize("size", [256, 512, 1024])
def test_siim_1st_searches_the_winners_min_area_grid_at_any_image_size(size):
    # The recipe listed the winners' min_areas (pixels at 1024) literally, while the field is in pixels
    # at data.image_size: at 256 the search offered min_area 4000 of 65536 pixels (16x the winners').
    cfg = load_recipe("siim-1st", [f"data.image_size={size}"])
    v = cfg.validation
    search = TripletSearch(v.tops, v.min_areas, v.bottoms)
    search.update(np.zeros((1, size, size), np.float32), np.zeros((1, size, size), np.uint8))
    scale = size * size / (1024 * 1024)
    expected = tuple(dict.fromkeys(int(round(a * scale)) for a in (0, 250, 500, 1000, 2000, 3000, 4000)))
    assert search.min_areas == expected


def test_a_stage1_classifier_error_names_the_classifier_field(synth, tmp_path):
    # The demo recipe's classifier section: errors named the segmenter's field (model.encoder), which
    # the user had not touched.
    out = tmp_path / "run"
    cfg = tiny(synth, classifier={"model": {"encoder": "resnet_tinny"}})
    with pytest.raises(ConfigError, match=r"config field classifier\.model\.encoder: unknown encoder 'resnet_tinny' "
                                          r"\(did you mean 'resnet_tiny'\?\)"):
        train(cfg, out, progress=False)
    cfg = tiny(synth, classifier={"model": {"encoder": "resnet_tiny", "pretrained": str(tmp_path / "none.pth")}})
    with pytest.raises(ConfigError, match=r"config field classifier\.model\.pretrained: .*none\.pth is not a file"):
        train(cfg, out, progress=False)
    # the segmenter's own fields are still named without a section
    with pytest.raises(ConfigError, match=r"config field model\.encoder: unknown encoder 'resnet_tinny'"):
        train(tiny(synth, model={"encoder": "resnet_tinny", "decoder_channels": [16, 16, 8, 8, 8]}), out,
              progress=False)
    assert not out.exists()
