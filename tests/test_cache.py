"""The decoded-image cache: the arrays hold exactly what the DICOM dataset computes (before
normalisation, rounded to uint8), the index describes them, broken caches are refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pneumoseg  # noqa: E402
from pneumoseg import rle  # noqa: E402
from pneumoseg.data import SIIMDataset, make_synthetic_siim, read_dicom, read_rle_csv  # noqa: E402
from pneumoseg.data.cache import CachedDataset, build_cache, load_cache_index  # noqa: E402
from pneumoseg.data.transforms import NORMALISE_MEAN, NORMALISE_STD  # noqa: E402


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-synth")
    csv = make_synthetic_siim(root, n_images=12, size=80, positive_fraction=0.5, seed=4)
    return root, csv


def test_cache_holds_the_dataset_images_and_masks(synth, tmp_path):
    root, csv = synth
    index_path = build_cache(root, csv, size=64, out=tmp_path / "cache", workers=3, progress=False)
    index = json.loads(index_path.read_text())
    assert index["format"] == "pneumoseg-cache" and index["size"] == 64 and index["count"] == 12
    images = np.load(tmp_path / "cache" / "images.npy", mmap_mode="r", allow_pickle=False)
    masks = np.load(tmp_path / "cache" / "masks.npy", mmap_mode="r", allow_pickle=False)
    assert images.shape == masks.shape == (12, 64, 64) and images.dtype == masks.dtype == np.uint8
    reference = SIIMDataset(root, csv, image_size=64)
    rles = read_rle_csv(csv)
    by_id = {reference.ids[i]: i for i in range(len(reference))}
    for row, image_id in zip(index["rows"], index["ids"]):
        item = reference[by_id[image_id]]
        unit = item["image"][0].numpy() * NORMALISE_STD + NORMALISE_MEAN
        assert np.abs(images[row].astype(np.float64) - unit * 255).max() <= 0.5 + 1e-4  # rounded, not truncated
        assert np.array_equal(masks[row], item["mask"][0].numpy().astype(np.uint8))
        assert index["labels"][index["ids"].index(image_id)] == int(any(s != "-1" for s in rles[image_id]))
        assert index["shapes"][index["ids"].index(image_id)] == list(read_dicom(reference.files[image_id]).pixels.shape)
    # the dataset over the cache gives the DICOM dataset's items (to uint8 precision)
    ds = CachedDataset(tmp_path / "cache")
    assert ds.labels == [index["labels"][i] for i in range(12)] and len(ds) == 12
    for i in (0, 5, 11):
        a, b = ds[i], reference[by_id[ds.ids[i]]]
        assert a["image"].shape == (1, 64, 64) and a["image"].dtype == torch.float32
        assert torch.allclose(a["image"], b["image"], atol=0.5 / 255 / NORMALISE_STD + 1e-5)
        assert torch.equal(a["mask"], b["mask"]) and a["label"] == b["label"]
    raw = CachedDataset(tmp_path / "cache", raw=True)[0]
    assert raw["image"].dtype == torch.uint8 and torch.equal(CachedDataset.normalise(raw["image"]), ds[0]["image"])
    small = CachedDataset(tmp_path / "cache", image_size=32, task="classification")[3]
    assert small["image"].shape == (1, 32, 32) and "mask" not in small
    with pytest.raises(pneumoseg.InvalidInputError, match="raw=True needs"):
        CachedDataset(tmp_path / "cache", image_size=32, raw=True)


def test_unreadable_dicoms_are_skipped_and_listed(synth, tmp_path):
    import shutil

    root, csv = synth
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    victim = sorted(copy.rglob("*.dcm"))[0]
    victim.write_bytes(victim.read_bytes()[:300])  # truncated
    with pytest.warns(pneumoseg.DataWarning, match="could not be read"):
        build_cache(copy, copy / "train-rle.csv", size=32, out=tmp_path / "cache", progress=False)
    index = load_cache_index(tmp_path / "cache")
    assert len(index["ids"]) == 11 and victim.stem not in index["ids"]
    assert index["skipped"][0]["id"] == victim.stem and str(victim) in index["skipped"][0]["reason"]
    assert len(CachedDataset(tmp_path / "cache")) == 11


def test_broken_caches_are_refused(synth, tmp_path):
    root, csv = synth
    cache = tmp_path / "cache"
    build_cache(root, csv, size=32, out=cache, progress=False)
    with pytest.raises(pneumoseg.DataFormatError, match="no such cache folder"):
        CachedDataset(tmp_path / "nowhere")
    (cache / "index.json").rename(cache / "index.old")
    with pytest.raises(pneumoseg.DataFormatError, match="interrupted"):
        CachedDataset(cache)
    (cache / "index.old").rename(cache / "index.json")
    np.save(cache / "masks.npy", np.zeros((12, 16, 16), np.uint8))
    with pytest.raises(pneumoseg.DataFormatError, match="masks.npy: expected a uint8 array of shape"):
        CachedDataset(cache)
    index = json.loads((cache / "index.json").read_text())
    index["format_version"] = 99
    (cache / "index.json").write_text(json.dumps(index))
    with pytest.raises(pneumoseg.DataFormatError, match="rebuild the cache"):
        CachedDataset(cache)
    index["format_version"] = 1  # its masks were resized top-left ('nearest'), off their images
    (cache / "index.json").write_text(json.dumps(index))
    with pytest.raises(pneumoseg.DataFormatError, match="up and left of their images.*rebuild the cache"):
        CachedDataset(cache)
    with pytest.raises(pneumoseg.DataFormatError, match="no such data folder"):
        build_cache(tmp_path / "missing", size=32, out=tmp_path / "c2")


def test_training_from_a_cache(synth, tmp_path):
    from pneumoseg.train import config_from_dict
    from pneumoseg.train.engine import train

    root, csv = synth
    build_cache(root, csv, size=64, out=tmp_path / "cache", progress=False)
    cfg = config_from_dict({"data": {"cache": str(tmp_path / "cache"), "image_size": 64, "folds": 3},
                            "model": {"encoder": "resnet_tiny", "decoder_channels": [16, 16, 8, 8, 8]},
                            "epochs": 1, "batch_size": 4, "samples_per_epoch": 8, "threads": 1,
                            "log": {"progress": False, "tensorboard": False, "plots": False}})
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.steps == 2 and result.metrics["data"].startswith("cache")


def test_cli_data_cache(synth, tmp_path):
    root, csv = synth
    out = tmp_path / "cache"
    done = subprocess.run([sys.executable, "-m", "pneumoseg", "data", "cache", "--root", str(root), "--csv", str(csv),
                           "--size", "32", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert load_cache_index(out)["size"] == 32 and "cache" in done.stdout
    again = subprocess.run([sys.executable, "-m", "pneumoseg", "data", "cache", "--root", str(root), "--size", "32",
                            "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr  # its own earlier output is replaced
    assert load_cache_index(out)["labels"] is None  # without a CSV: every DICOM, no labels
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep me")
    refused = subprocess.run([sys.executable, "-m", "pneumoseg", "data", "cache", "--root", str(root), "--size", "32",
                              "--out", str(tmp_path / "theirs")], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "pneumoseg did not write" in refused.stderr
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "keep me"



def test_a_cache_never_removes_the_study_set_it_reads(tmp_path):
    # The study set is pneumoseg's own output; --out pointed at it removed every DICOM before reading them.
    studies = tmp_path / "studies"
    make_synthetic_siim(studies, n_images=2, size=32, seed=1)
    before = sorted(p.relative_to(studies) for p in studies.rglob("*"))
    # another command's output is refused as such (the manifest names its kind) ...
    with pytest.raises(pneumoseg.OutputError, match="another pneumoseg command wrote it .*synthetic data folder"):
        build_cache(studies, size=16, out=studies, progress=False)
    assert sorted(p.relative_to(studies) for p in studies.rglob("*")) == before
    # ... and a cache folder's own file given to it as an input is refused as such
    cache = tmp_path / "cache"
    build_cache(studies, size=16, out=cache, progress=False)
    shutil.copy2(studies / "train-rle.csv", cache / "labels.csv")
    from pneumoseg._fs import record_in_manifest
    assert record_in_manifest(cache, cache / "labels.csv")
    cached = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    with pytest.raises(pneumoseg.OutputError, match="holds .*labels.csv, an input of this command"):
        build_cache(studies, cache / "labels.csv", size=16, out=cache, progress=False)
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == cached

def test_rle_union_in_the_cache_matches_the_csv(synth, tmp_path):
    root, csv = synth
    build_cache(root, csv, size=80, out=tmp_path / "full", progress=False)  # the original size: no resizing
    index = load_cache_index(tmp_path / "full")
    masks = np.load(tmp_path / "full" / "masks.npy", allow_pickle=False)
    rles = read_rle_csv(csv)
    for row, image_id in zip(index["rows"], index["ids"]):
        assert np.array_equal(masks[row], rle.decode_union(rles[image_id], (80, 80)))


def test_decoding_threads_leave_the_warning_filters_as_they_were(synth, tmp_path):
    import warnings

    root, csv = synth
    before = list(warnings.filters)
    build_cache(root, csv, size=32, out=tmp_path / "cache", workers=4, progress=False)
    assert warnings.filters == before
