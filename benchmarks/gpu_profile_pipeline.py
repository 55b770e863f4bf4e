"""Where a Predictor's batch-1 time goes (issue 10's latency target): the stage timings the Predictor
records (CUDA events), each network's part alone through the backend (its CUDA graph replay), and
torch.profiler over whole predict calls, by device time and by host time.

    python3 benchmarks/gpu_profile_pipeline.py                    # the GPU case: U-Net ResNet34 at 1024,
                                                                  # EfficientNet-B4 classifier at 512
    python3 benchmarks/gpu_profile_pipeline.py --device cpu --small   # the same code, small, on a CPU
    python3 benchmarks/gpu_profile_pipeline.py --ablate           # BatchNorm folding / sub-pixel decoder
                                                                  # off and on, latency of each
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pneumoseg.data import chest_phantom  # noqa: E402
from pneumoseg.infer import Predictor  # noqa: E402
from pneumoseg.models import create_classifier, create_segmenter  # noqa: E402
from pneumoseg.models.model_dir import save_model_dir  # noqa: E402


def wall_ms(fn, reps: int, cuda: bool) -> float:
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def profile_dir(name: str, path: Path, device: str, precision: str, image, reps: int, compile: bool) -> None:
    cuda = device == "cuda"
    start = time.perf_counter()
    pred = Predictor.from_dir(path, device=device, precision=precision, segment="all", compile=compile)
    pred.warmup(1)
    if compile:
        name += " (torch.compile)"
        print(f"\n   {name}: loaded and compiled for batch 1 in {time.perf_counter() - start:.1f} s")
    total = wall_ms(lambda: pred.predict(image, batch_size=1), reps, cuda)
    stages: dict[str, list[float]] = {}
    for _ in range(reps):
        for stage, ms in pred.predict(image, batch_size=1)[0].timings.items():
            stages.setdefault(stage, []).append(ms)
    print(f"\n== {name}: predict, batch 1, {device} {precision}: {total:.3f} ms wall (median of {reps})")
    print("   stage timings (median ms): " + ", ".join(f"{s} {statistics.median(v):.3f}" for s, v in stages.items()))
    if cuda:
        print(f"   overlap_networks={pred.overlap_networks}")
    for part, size in pred.backend.input_sizes.items():
        x = torch.randn(1, 1, *size, device=device)
        try:
            ms = wall_ms(lambda: pred.backend.run(part, x), reps, cuda)
        except Exception as exc:  # a decoder part takes features, not an image
            print(f"   part {part}: not timed alone ({type(exc).__name__})")
            continue
        print(f"   part {part} alone at {size}: {ms:.3f} ms")
    if not cuda:
        return
    pred.predict(image, batch_size=1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            pred.predict(image, batch_size=1)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in averages) / 10
    print(f"   device time per predict (sum of kernels): {device_us / 1e3:.3f} ms")
    print(averages.table(sort_by="device_time_total", row_limit=18))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25))


def ablate_dir(name: str, path: Path, device: str, precision: str, image, reps: int) -> None:
    """Batch-1 predict latency with each inference rewrite off and on, measured in one process so the
    ratios compare like with like: BatchNorm folding (``fuse_batchnorm``) and the sub-pixel decoder
    blocks (``DecoderBlock.subpixel``, read when the backend captures its graphs, hence set before
    loading). Rows run interleaved, ``rounds`` times, and report the median of each row's medians."""
    from pneumoseg.models.decoders.blocks import DecoderBlock

    cuda = device == "cuda"
    variants = {"plain": (False, False), "+ BatchNorm folding": (True, False), "+ sub-pixel decoder": (False, True),
                "+ both (the default)": (True, True)}
    predictors = {}
    default = DecoderBlock.subpixel
    try:
        for label, (fuse, subpixel) in variants.items():
            DecoderBlock.subpixel = subpixel
            pred = Predictor.from_dir(path, device=device, precision=precision, segment="all", fuse_batchnorm=fuse)
            pred.warmup(1)
            predictors[label] = pred
    finally:
        DecoderBlock.subpixel = default
    reference = {label: pred.predict(image, batch_size=1)[0] for label, pred in predictors.items()}
    masks = {label: p.rle for label, p in reference.items()}
    rounds, per_round = 3, max(3, reps // 3)
    medians: dict[str, list[float]] = {label: [] for label in predictors}
    for _ in range(rounds):
        for label, pred in predictors.items():
            medians[label].append(wall_ms(lambda: pred.predict(image, batch_size=1), per_round, cuda))
    plain = statistics.median(medians["plain"])
    print(f"\n== {name}: inference rewrites, predict batch 1, {device} {precision} "
          f"(median of {rounds} interleaved rounds of {per_round})")
    for label in predictors:
        ms = statistics.median(medians[label])
        same = "same RLE" if masks[label] == masks["plain"] else "RLE DIFFERS from plain"
        print(f"   {label:<24} {ms:8.3f} ms  {plain / ms:5.2f}x plain  score {reference[label].score:.4f}  {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny networks and images (a CPU check of this script)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--compile", action="store_true", help="the torch backend's torch.compile option (reduce-overhead "
                    "on CUDA) instead of its CUDA graphs: issue 10's 3 ms target needs compiled networks")
    ap.add_argument("--only", choices=("two", "own"), help="one model directory: classifier + segmenter, or the "
                    "segmenter gating on its own encoder")
    ap.add_argument("--ablate", action="store_true", help="instead of the profile: batch-1 latency with BatchNorm "
                    "folding and the sub-pixel decoder each off and on, in one process")
    args = ap.parse_args()
    precision = "fp16" if args.device == "cuda" else "fp32"
    seg, cls, original = (("resnet_tiny", 64), ("resnet_tiny", 64), 96) if args.small else (
        ("resnet34", 1024), ("efficientnet_b4", 512), 1024)
    root = Path(tempfile.mkdtemp(prefix="pneumoseg-profile-pipeline-"))
    thresholds = {"gate": 0.0, "top": 0.75, "min_area": 2000, "bottom": 0.3}
    torch.manual_seed(0)
    dirs = {
        "classifier + segmenter": save_model_dir(
            root / "two", {"segmenter": create_segmenter("unet", seg[0], in_channels=1).eval(),
                           "classifier": create_classifier(cls[0], num_classes=1, in_channels=1).eval()},
            input_sizes={"segmenter": seg[1], "classifier": cls[1]}, thresholds=thresholds),
        "segmenter with its own gate": save_model_dir(
            root / "own", {"segmenter": create_segmenter("unet", seg[0], in_channels=1, aux_classifier=True).eval()},
            input_sizes={"segmenter": seg[1]}, thresholds=thresholds),
    }
    image = torch.from_numpy(chest_phantom(original, np.random.default_rng(0), True)[0]).to(args.device)
    print(f"pneumoseg pipeline profile, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}")
    keys = {"two": "classifier + segmenter", "own": "segmenter with its own gate"}
    for name, path in dirs.items():
        if args.only is None or keys[args.only] == name:
            if args.ablate:
                ablate_dir(name, path, args.device, precision, image, args.reps)
            else:
                profile_dir(name, path, args.device, precision, image, args.reps, args.compile)


if __name__ == "__main__":
    main()
