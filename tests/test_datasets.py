from __future__ import annotations

import numpy as np
import pytest
from cuda_sync import synchronisation_forbidden

torch = pytest.importorskip("torch")
pytest.importorskip("pydicom")

import pneumoseg  # noqa: E402
from pneumoseg import rle  # noqa: E402
from pneumoseg.data import (  # noqa: E402
    Augment,
    DataWarning,
    PositiveRatioSampler,
    SIIMDataset,
    chest_crop,
    chest_phantom,
    make_synthetic_siim,
    preprocess,
    read_rle_csv,
    stratified_kfold,
)
from pneumoseg.data.siim import write_rle_csv  # noqa: E402
from pneumoseg.data.transforms import resize_mask  # noqa: E402


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth-ds")
    return root, make_synthetic_siim(root, n_images=10, size=96, positive_fraction=0.5, seed=5)


def test_dataset_items(synth):
    root, csv_path = synth
    ds = SIIMDataset(root, csv_path, image_size=64)
    rles = read_rle_csv(csv_path)
    assert len(ds) == 10 and ds.unlabelled == [] and ds.missing_files == []
    assert ds.labels == [int(any(s != "-1" for s in rles[i])) for i in ds.ids]
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (1, 64, 64) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, 64, 64) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert item["label"].item() == ds.labels[i]
        assert bool(item["mask"].any()) == bool(item["label"].item())
        full = rle.decode_union(rles[item["image_id"]], (96, 96))
        # the mask resized as the image is (bilinear, antialiased, about pixel centres), then 0/1 at
        # one half, so the mask stays where the image is
        small = torch.nn.functional.interpolate(torch.from_numpy(full).float()[None, None], size=64, mode="bilinear",
                                                align_corners=False, antialias=True)
        small = (small >= 0.5).float()
        assert torch.equal(item["mask"], small[0])


def test_dataset_classification_test_set_and_transforms(synth):
    root, csv_path = synth
    cls = SIIMDataset(root, csv_path, image_size=32, task="classification")
    assert "mask" not in cls[0] and "label" in cls[0]
    test = SIIMDataset(root, image_size=32)
    assert len(test) == 10 and set(test[0]) == {"image", "image_id"}
    with pytest.raises(pneumoseg.InvalidInputError, match="without an RLE CSV has no labels"):
        _ = test.labels
    seen = []
    flipped = SIIMDataset(root, csv_path, image_size=32, transforms=lambda im, m: (seen.append(1) or im.flip(-1), m.flip(-1)))
    plain = SIIMDataset(root, csv_path, image_size=32)
    assert torch.equal(flipped[1]["image"], plain[1]["image"].flip(-1)) and seen


def test_dataset_reports_unlabelled_and_missing(tmp_path, synth):
    root, csv_path = synth
    rles = read_rle_csv(csv_path)
    ids = list(rles)
    partial = dict((k, rles[k]) for k in ids[:7])
    partial["no-such-image"] = ["-1"]
    write_rle_csv(tmp_path / "partial.csv", partial)
    with pytest.warns(DataWarning) as record:
        ds = SIIMDataset(root, tmp_path / "partial.csv", image_size=32)
    assert len(ds) == 7 and sorted(ds.unlabelled) == sorted(ids[7:]) and ds.missing_files == ["no-such-image"]
    assert len(record) == 2


def test_dataset_bad_arguments(tmp_path, synth):
    root, csv_path = synth
    with pytest.raises(pneumoseg.InvalidInputError, match="task"):
        SIIMDataset(root, csv_path, task="detection")
    with pytest.raises(pneumoseg.InvalidInputError, match="image_size"):
        SIIMDataset(root, csv_path, image_size=3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(pneumoseg.DataFormatError, match="no \\*.dcm"):
        SIIMDataset(tmp_path / "empty")


def test_stratified_kfold():
    ids = [f"img{i}" for i in range(53)]
    labels = [int(i % 4 == 0) for i in range(53)]
    folds = stratified_kfold(ids, labels, k=5, seed=1)
    assert len(folds) == 5
    vals = [v for _, v in folds]
    assert sorted(sum(vals, [])) == sorted(ids)  # every id validated exactly once
    for train, val in folds:
        assert not set(train) & set(val) and len(train) + len(val) == 53
    pos_per_fold = [sum(labels[ids.index(i)] for i in v) for v in vals]
    size_per_fold = [len(v) for v in vals]
    assert max(pos_per_fold) - min(pos_per_fold) <= 1 and max(size_per_fold) - min(size_per_fold) <= 1
    assert stratified_kfold(ids, labels, k=5, seed=1) == folds != stratified_kfold(ids, labels, k=5, seed=2)
    with pytest.raises(pneumoseg.InvalidInputError, match="k must be"):
        stratified_kfold(ids, labels, k=1)
    with pytest.raises(pneumoseg.InvalidInputError, match="labels"):
        stratified_kfold(ids, labels[:-1])
    with pytest.raises(pneumoseg.InvalidInputError, match="duplicates"):
        stratified_kfold(ids[:3] + ids[:3], [0, 1, 0] * 2, k=2)


def test_positive_ratio_sampler_schedule():
    labels = [1] * 100 + [0] * 900
    sampler = PositiveRatioSampler(labels, (0.8, 0.4), num_samples=2000, epochs=5, seed=0)
    shares = []
    for epoch in range(5):
        sampler.set_epoch(epoch)
        picks = list(sampler)
        assert len(picks) == 2000 == len(sampler)
        shares.append(np.mean([labels[i] for i in picks]))
    np.testing.assert_allclose(shares, [0.8, 0.7, 0.6, 0.5, 0.4], atol=1e-3)
    constant = PositiveRatioSampler(labels, lambda e: 0.25, num_samples=400)
    assert np.mean([labels[i] for i in constant]) == pytest.approx(0.25, abs=1e-3)
    with pytest.raises(pneumoseg.InvalidInputError, match="both positive and negative"):
        PositiveRatioSampler([1, 1, 1])
    with pytest.raises(pneumoseg.InvalidInputError, match=r"positive.ratio must be in \[0, 1\]"):
        PositiveRatioSampler(labels, 1.5)


def test_augment_applies_the_same_geometry_to_image_and_mask():
    torch.manual_seed(0)
    _, mask = chest_phantom(64, np.random.default_rng(1), True)
    masks = torch.from_numpy(np.stack([mask] * 6)).float()[:, None]
    images = masks.clone()
    flip = Augment(hflip=1.0, affine_p=0.0, intensity_p=0.0, seed=0)
    fi, fm = flip(images, masks)
    assert torch.equal(fi, images.flip(-1)) and torch.equal(fm, masks.flip(-1))
    warp = Augment(hflip=0.5, affine_p=1.0, rotate_degrees=20, scale=0.2, shift=0.1, intensity_p=0.0, seed=3)
    wi, wm = warp(images, masks)
    assert set(wm.unique().tolist()) <= {0.0, 1.0}
    agree = ((wi > 0.5).float() == wm).float().mean().item()
    assert agree > 0.98  # bilinear image and nearest mask went through the same warp
    assert not torch.equal(wm, masks)
    again = Augment(hflip=0.5, affine_p=1.0, rotate_degrees=20, scale=0.2, shift=0.1, intensity_p=0.0, seed=3)
    assert torch.equal(again(images, masks)[1], wm)  # seeded: reproducible


def test_augment_intensity_changes_only_images():
    img, mask = chest_phantom(48, np.random.default_rng(2), True)
    images = torch.from_numpy(img).float()[None, None].repeat(4, 1, 1, 1)
    masks = torch.from_numpy(mask).float()[None, None].repeat(4, 1, 1, 1)
    aug = Augment(hflip=0.0, affine_p=0.0, intensity_p=1.0, brightness=0.2, contrast=0.2, seed=1)
    out_i, out_m = aug(images, masks)
    assert torch.equal(out_m, masks) and not torch.allclose(out_i, images)
    assert torch.isfinite(out_i).all()
    with pytest.raises(pneumoseg.InvalidInputError, match=r"\(N, 1, H, W\)"):
        aug(images[0], masks[0])
    with pytest.raises(pneumoseg.InvalidInputError, match=r"hflip must be in \[0, 1\]"):
        Augment(hflip=2.0)


def test_preprocess_batches_and_normalises():
    rng = np.random.default_rng(0)
    one = rng.integers(0, 4096, (100, 80)).astype(np.uint16)
    out = preprocess(one, 32)
    assert out.shape == (1, 1, 32, 32) and out.dtype == torch.float32
    assert out.min().item() >= -2.0 - 1e-6 and out.max().item() <= 2.0 + 1e-6
    batch = preprocess(torch.from_numpy(np.stack([one, one]).astype(np.float32)), (40, 24))
    assert batch.shape == (2, 1, 40, 24)
    same = preprocess(np.full((10, 10), 7, np.uint8), 10)
    assert torch.isfinite(same).all()
    with pytest.raises(pneumoseg.InvalidInputError, match="pixels must be"):
        preprocess(np.zeros((2, 3, 4, 5)), 8)



@pytest.mark.parametrize("dtype", [">u2", ">i2", ">f4", ">f8", np.longdouble, "read-only"])
def test_preprocess_and_resize_mask_take_any_byte_order_and_read_only_arrays(dtype):
    # torch.from_numpy refused other byte orders (ValueError) and long double (TypeError), and warned
    # about read-only arrays (an error under strict filters).
    rng = np.random.default_rng(1)
    img = rng.integers(0, 4096, (30, 20)).astype(np.float32)
    mask = (rng.random((30, 20)) > 0.5).astype(np.float32)
    if dtype == "read-only":
        odd_img, odd_mask = img.copy(), mask.copy()
        odd_img.flags.writeable = odd_mask.flags.writeable = False
    else:
        odd_img, odd_mask = img.astype(dtype), mask.astype(dtype)
    torch.testing.assert_close(preprocess(odd_img, 16), preprocess(img, 16))
    assert torch.equal(resize_mask(odd_mask, 16), resize_mask(mask, 16))


def test_preprocess_of_a_single_number_names_it():
    with pytest.raises(pneumoseg.InvalidInputError, match="got a single number"):
        preprocess(np.array(3.0), 8)

def test_chest_crop_drops_the_border():
    img, _ = chest_phantom(128, np.random.default_rng(4), False)
    padded = np.pad(img, ((20, 30), (40, 10)), constant_values=0)
    r0, r1, c0, c1 = chest_crop(padded)
    assert 15 <= r0 and r1 <= padded.shape[0] - 25 and 35 <= c0 and c1 <= padded.shape[1] - 5
    assert r1 - r0 >= 100 and c1 - c0 >= 90  # the chest itself is kept
    assert chest_crop(np.zeros((5, 5))) == (0, 5, 0, 5)
    with pytest.raises(pneumoseg.InvalidInputError, match=r"\(H, W\) image, got shape \(2, 2, 2\)"):
        chest_crop(np.zeros((2, 2, 2)))


@pytest.mark.cuda
def test_augment_and_preprocess_on_cuda():
    _, mask = chest_phantom(64, np.random.default_rng(1), True)
    masks = torch.from_numpy(np.stack([mask] * 3)).float()[:, None]
    aug = Augment(seed=7)
    cpu_i, cpu_m = Augment(seed=7)(masks.clone(), masks)
    gpu_i, gpu_m = aug(masks.cuda(), masks.cuda())
    assert gpu_i.is_cuda and (gpu_m.cpu() == cpu_m).float().mean() > 0.99
    assert preprocess(masks.cuda()[:, 0], 32).is_cuda


@pytest.mark.cuda
def test_augment_on_cuda_never_waits_for_the_gpu():
    """Its random parameters travel in non-blocking copies (a blocking one per call would drain the
    GPU's queue every training step), and it draws what the CPU draws."""
    imgs = torch.rand(6, 1, 48, 40, generator=torch.Generator().manual_seed(0))
    masks = (torch.rand(6, 1, 48, 40, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    kw = dict(seed=11, affine_p=0.5, intensity_p=1.0)
    aug = Augment(**kw)
    gpu_out, gpu_masks = aug(imgs.cuda(), masks.cuda())  # the first call also sets up pinned memory
    cpu_out, cpu_masks = Augment(**kw)(imgs, masks)
    torch.testing.assert_close(gpu_out.cpu(), cpu_out, rtol=1e-4, atol=1e-4)
    assert (gpu_masks.cpu() == cpu_masks).float().mean() > 0.99
    imgs, masks = imgs.cuda(), masks.cuda()
    torch.cuda.synchronize()
    with synchronisation_forbidden():  # any synchronisation now raises
        for _ in range(3):
            out, out_masks = aug(imgs, masks)
    assert out.is_cuda and out_masks.is_cuda
