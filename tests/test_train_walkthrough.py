"""A new user's walk through README's Training section and docs/training.md: a cache of the Kaggle layout, a recipe at
another image size, a stage-1 classifier's config errors, and --resume. Each test failed on the code
before its fix; the real-data test runs where the SIIM sample is present and is skipped elsewhere."""

from __future__ import annotations

import copy
import csv
import shutil
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
from factories import TINY_TRAINING as TINY, training_config  # noqa: E402
from reference import competition_rle2mask  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "siim-sample"


def tiny(root: Path, **top) -> "object":
    return training_config(TINY, root, **top)


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


def test_resume_under_another_config_is_refused_before_anything_changes(synth, tmp_path):
    # `--resume --set epochs=2` on a finished 1-epoch run trained nothing and printed "1 epochs", yet
    # rewrote the run's config.yaml to say 2; on an unfinished run it changed the schedule halfway.
    run = tmp_path / "run"
    train(tiny(synth), run, progress=False)
    config_before = (run / "config.yaml").read_bytes()
    last = (run / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"config field epochs: .*last\.pt was trained with another config "
                                          r"\(epochs: 1 in the run, 2 now\); --resume continues a run"):
        train(tiny(synth, epochs=2), run, resume=True, progress=False)
    with pytest.raises(ConfigError, match=r"optimizer\.lr: 0\.002 in the run, 0\.001 now"):
        train(tiny(synth, optimizer={"name": "adam", "lr": 1e-3}), run, resume=True, progress=False)
    with pytest.raises(ConfigError, match=r"config field classifier: .*\(classifier: None in the run, \{'model'"):
        train(tiny(synth, classifier={"model": {"encoder": "resnet_tiny"}, "batch_size": 4}), run, resume=True,
              progress=False)
    assert (run / "config.yaml").read_bytes() == config_before
    assert not (run / "classifier").exists()
    assert (run / "checkpoints" / "last.pt").read_bytes() == last
    # where the data lives, how it is loaded and what is logged may change: the data moved
    moved = tmp_path / "moved"
    shutil.copytree(synth, moved)
    result = train(tiny(moved, data__preload=False, data__workers=0, log__plots=True), run, resume=True,
                   progress=False)
    assert result.metrics["epochs"] == 1


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="the real SIIM sample (shared/data/siim-sample) is absent")
def test_real_dicoms_in_the_kaggle_layout_read_the_same_from_the_cache_and_the_folder(tmp_path):
    # The four real DICOMs copied under new SOPInstanceUIDs into dicom-images-train/<study>/<series>/,
    # with train-rle.csv rows as the real file writes them (", -1" and ", 1 2 ..." with the leading
    # space), one positive split into three rows (two overlapping): items of SIIMDataset and of the
    # cache must equal pydicom's pixels and the union of the rows decoded the competition's way.
    import pydicom
    import torch.nn.functional as F

    from pneumoseg.data import SIIMDataset
    from pneumoseg.data.cache import CachedDataset, build_cache

    source = {}
    with open(SAMPLE / "train-rle.csv") as f:
        for line in f.read().splitlines()[1:]:
            image_id, text = line.split(",", 1)
            source.setdefault(image_id, []).append(text)
    root = tmp_path / "siim" / "dicom-images-train"
    lines, pixels, truth = ["ImageId, EncodedPixels"], {}, {}
    for k, path in enumerate(sorted(SAMPLE.glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        rows = source[ds.SOPInstanceUID]
        uid = f"1.2.276.0.7230010.3.1.4.8323329.{9000 + k}.1517875165.{100000 + k}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        folder = root / ds.StudyInstanceUID / ds.SeriesInstanceUID
        folder.mkdir(parents=True)
        ds.save_as(folder / f"{uid}.dcm")
        pixels[uid] = ds.pixel_array.astype(np.float32)
        mask = competition_rle2mask(rows[0], 1024, 1024).T > 0
        if mask.any() and len(truth) % 2 == 0:  # split into column halves sharing 3 columns, plus a box
            cols = np.nonzero(mask.any(0))[0]
            middle = (cols.min() + cols.max()) // 2
            left, right, box = mask.copy(), mask.copy(), np.zeros_like(mask)
            left[:, middle:] = False
            right[:, :middle - 3] = False
            box[100:140, 600:660] = True
            from pneumoseg.rle import encode

            rows = [" " + encode(part.astype(np.uint8)) for part in (left, right, box)]
            mask = left | right | box
        truth[uid] = mask
        lines += [f"{uid},{text}" for text in rows]
    csv_path = tmp_path / "siim" / "train-rle.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    assert sum(len(r) for r in source.values()) + 2 == len(lines) - 1  # one image became three rows

    size = 128
    folder_set = SIIMDataset(root, csv_path, image_size=size)
    build_cache(root, csv_path, size=size, out=tmp_path / "cache", progress=False)
    cached = CachedDataset(tmp_path / "cache")
    assert sorted(folder_set.ids) == sorted(cached.ids) == sorted(truth)
    for i, uid in enumerate(folder_set.ids):
        px = torch.from_numpy(pixels[uid])
        x = ((px - px.min()) / (px.max() - px.min()))[None, None]
        x = (F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)[0] - 0.5) / 0.25
        # the mask resized as its image, then 0/1 at one half
        m = F.interpolate(torch.from_numpy(truth[uid].astype(np.float32))[None, None], size=size, mode="bilinear",
                          align_corners=False, antialias=True)[0]
        m = (m >= 0.5).float()
        a, b = folder_set[i], cached[cached.ids.index(uid)]
        assert a["label"].item() == b["label"].item() == float(truth[uid].any())
        torch.testing.assert_close(a["image"], x, atol=1e-5, rtol=0)
        torch.testing.assert_close(b["image"], x, atol=0.5 / 255 / 0.25 + 1e-5, rtol=0)  # uint8 rounding
        assert torch.equal(a["mask"], m) and torch.equal(b["mask"], m)


def test_training_larger_than_the_cache_is_refused(synth, tmp_path):
    # A cache at 32 px trained at 64 px gave the network upsampled, blurred images, unlike the DICOMs
    # resized from full resolution that it meets at prediction; nothing said so.
    from pneumoseg.data.cache import build_cache

    build_cache(synth, synth / "train-rle.csv", size=32, out=tmp_path / "cache", progress=False)
    raw = copy.deepcopy(TINY)
    raw["data"] = {"cache": str(tmp_path / "cache"), "image_size": 64, "folds": 2}
    with pytest.raises(ConfigError, match=r"config field data.image_size: 64 is larger than the 32 px images of the "
                                          r"cache .*; build a cache at --size 64 or more"):
        train(config_from_dict(raw), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
