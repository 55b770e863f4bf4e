"""Training throughput of ``pneumoseg.train`` against the loop a user would otherwise write: plain
PyTorch, the same U-Net, eager fp32, the composite BCE + Dice + focal loss in torch, and a torch
DataLoader that decodes each DICOM per sample (``SIIMDataset``), Adam, no augmentation on either side.

    pytest benchmarks/bench_train.py --benchmark-json=train.json && python benchmarks/report.py train.json

CPU: both sides run the same number of training images; pneumoseg's time is a whole ``train()`` call
(images decoded once into memory, the fused native loss, its validation passes and checkpoints
included), so the ratio is end to end. On a GPU the CUDA test runs pneumoseg with AMP (bf16) +
channels_last + the fused loss + a ``pneumoseg data cache`` against the same plain loop (fp32,
per-sample decoding with DataLoader workers) and writes ``benchmarks/results/train_gpu.{json,png}``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("yaml")

from reference import ref_combo_loss  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WEIGHTS = dict(bce_weight=3.0, dice_weight=1.0, focal_weight=4.0)
CPU = dict(n_images=64, source_size=512, image_size=256, batch=8, steps=12, decoder=[64, 32, 16, 16, 8],
           encoder="resnet_tiny")
GPU = dict(n_images=256, source_size=1024, image_size=512, batch=16, steps=60, decoder=[256, 128, 64, 32, 16],
           encoder="resnet34")


@pytest.fixture(scope="module")
def study_set(tmp_path_factory):
    from pneumoseg.data import make_synthetic_siim

    def make(n, size):
        root = tmp_path_factory.mktemp(f"bench-train-{n}-{size}")
        make_synthetic_siim(root, n_images=n, size=size, positive_fraction=0.3, seed=0)
        return root

    return make


def plain_loop(root: Path, p: dict, device: str = "cpu", workers: int = 0) -> int:
    """What a user writes by hand: per-sample DICOM decoding in a DataLoader, eager fp32 model and
    composite loss. Returns the number of training images processed."""
    from pneumoseg.data import SIIMDataset
    from pneumoseg.models import create_segmenter

    torch.manual_seed(0)
    model = create_segmenter("unet", p["encoder"], decoder_channels=p["decoder"]).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    ds = SIIMDataset(root, root / "train-rle.csv", image_size=p["image_size"])
    loader = torch.utils.data.DataLoader(ds, batch_size=p["batch"], shuffle=True, drop_last=True, num_workers=workers,
                                         pin_memory=device == "cuda", persistent_workers=workers > 0)
    seen = 0
    while seen < p["steps"] * p["batch"]:
        for batch in loader:
            x = batch["image"].to(device, non_blocking=True)
            t = batch["mask"].to(device, non_blocking=True)
            loss = ref_combo_loss(model(x), t, dtype=torch.float32, smooth=1e-6, **WEIGHTS)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += x.shape[0]
            if seen >= p["steps"] * p["batch"]:
                break
    if device == "cuda":
        torch.cuda.synchronize()
    return seen


def engine_config(p: dict, **data):
    from pneumoseg.train import config_from_dict

    return config_from_dict({
        "task": "segmentation",
        "data": {"image_size": p["image_size"], "folds": 8, **data},
        "model": {"encoder": p["encoder"], "decoder_channels": p["decoder"]},
        "loss": {"bce": 3.0, "dice": 1.0, "focal": 4.0, "dice_smooth": 1e-6},
        "optimizer": {"name": "adam", "lr": 1e-4},
        "epochs": 1, "batch_size": p["batch"], "samples_per_epoch": p["steps"] * p["batch"],
        "augment": {"enabled": False},
        "validation": {"min_component_areas": [0]},
        "log": {"progress": False, "tensorboard": False, "plots": False},
        "checkpoint": {"keep_top_k": 1},
    })


def engine_run(cfg, out: Path) -> int:
    from pneumoseg.train.engine import train

    result = train(cfg, out, progress=False)
    return result.steps * cfg.batch_size


IMPLS = {"pneumoseg": False, "plain PyTorch loop": True}


@pytest.mark.parametrize("impl", list(IMPLS))
def test_training_throughput_cpu(benchmark, study_set, tmp_path, impl):
    # Run once and untimed (--benchmark-disable: CI's smoke run), the same code at the smoke sizes:
    # the full CPU sizes took 45 s a side there and measured nothing.
    p = SMOKE if benchmark.disabled else CPU
    root = study_set(p["n_images"], p["source_size"])
    benchmark.group = f"train U-Net {p['encoder']} {p['image_size']}px batch {p['batch']} x {p['steps']} steps cpu"
    benchmark.extra_info.update(impl=impl, baseline=IMPLS[impl], images=p["steps"] * p["batch"])
    runs = iter(range(100))
    if impl == "pneumoseg":
        cfg = engine_config(p, root=str(root), preload=True)
        seen = benchmark.pedantic(lambda: engine_run(cfg, tmp_path / f"run{next(runs)}"), rounds=2, iterations=1)
    else:
        seen = benchmark.pedantic(plain_loop, args=(root, p), rounds=2, iterations=1)
    assert seen == p["steps"] * p["batch"]


SMOKE = dict(n_images=40, source_size=128, image_size=64, batch=4, steps=2, decoder=[16, 16, 8, 8, 8],
             encoder="resnet_tiny")


@pytest.mark.cuda
def test_training_throughput_gpu(study_set, tmp_path):
    """AMP + channels_last + fused loss + cached data against the plain fp32 loop, on the GPU."""
    out = _engine_against_plain_loop("cuda", GPU, study_set, tmp_path, workers=8, amp="bf16")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_gpu.json").write_text(json.dumps(out, indent=2) + "\n")
    _draw(out, RESULTS / "train_gpu.png")
    print(json.dumps(out, indent=2))
    assert out["speedup"] >= 1.5, out


def test_gpu_comparison_runs_on_the_cpu(study_set, tmp_path):
    """The GPU test's own code (cache, config overrides, both loops, the plot) on the CPU with a tiny
    setup, so a GPU session's minutes are not spent discovering a bug in the benchmark."""
    out = _engine_against_plain_loop("cpu", SMOKE, study_set, tmp_path, workers=0, amp="bf16")
    assert [r["images"] for r in out["results"]] == [SMOKE["steps"] * SMOKE["batch"]] * 2
    assert all(r["images_per_s"] > 0 for r in out["results"])
    _draw(out, tmp_path / "train.png")
    assert (tmp_path / "train.png").stat().st_size > 0


def _engine_against_plain_loop(device: str, p: dict, study_set, tmp_path: Path, workers: int, amp: str) -> dict:
    from pneumoseg.data.cache import build_cache
    from pneumoseg.train import config_from_dict

    root = study_set(p["n_images"], p["source_size"])
    build_cache(root, root / "train-rle.csv", size=p["image_size"], out=tmp_path / "cache", progress=False)
    rows = []
    plain_loop(root, dict(p, steps=min(3, p["steps"])), device=device, workers=workers)  # warm-up (cuDNN, workers)
    t0 = time.perf_counter()
    seen = plain_loop(root, p, device=device, workers=workers)
    plain_s = time.perf_counter() - t0
    rows.append({"impl": f"plain PyTorch loop (fp32, eager composite loss, per-sample DICOM decoding, {workers} workers)",
                 "images": seen, "images_per_s": seen / plain_s})
    raw = engine_config(p, cache=str(tmp_path / "cache")).to_dict()
    raw.update(amp=amp, channels_last=True, device=device)
    engine_run(config_from_dict({**raw, "samples_per_epoch": min(3, p["steps"]) * p["batch"]}), tmp_path / "warm")
    t0 = time.perf_counter()
    seen = engine_run(config_from_dict(raw), tmp_path / "run")
    engine_s = time.perf_counter() - t0
    rows.append({"impl": f"pneumoseg train ({amp} AMP, channels_last, fused loss, uint8 cache; validation included)",
                 "images": seen, "images_per_s": seen / engine_s})
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"device": name, "setup": p, "results": rows, "speedup": rows[1]["images_per_s"] / rows[0]["images_per_s"]}


def _draw(out: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    rows, p = out["results"], out["setup"]
    fig = Figure(figsize=(7, 2.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh([0, 1], [r["images_per_s"] for r in rows], color=["tab:grey", "tab:blue"])
    ax.set_yticks([0, 1], ["plain PyTorch", "pneumoseg"])
    ax.set_xlabel("training images / s")
    ax.set_title(f"U-Net {p['encoder']} {p['image_size']}px, {out['device']}: {out['speedup']:.2f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
