"""The torch backend on a CPU against plain PyTorch eager, end to end (pixels -> RLE strings) and the
networks alone, with the compared pipelines interleaved round by round in one process, so that load
from other processes on a shared machine falls on all of them alike. Reports medians and the ratio
eager / pipeline (bench_pipeline.py's cases and baseline, without the ONNX export it needs).

    python benchmarks/torch_cpu_pipeline.py                          # 512 batch 1, 9 rounds
    python benchmarks/torch_cpu_pipeline.py --size 1024 --rounds 5
    python benchmarks/torch_cpu_pipeline.py --batch 16 --rounds 3 --threads 1

Pipelines: ``torch eager baseline`` (bench_pipeline's: the network in eager fp32, sigmoid, a NumPy
threshold, the competition's Python RLE loop); ``eager, smp decoder form``, the same with the decoder
blocks upsampling, concatenating and convolving as segmentation_models_pytorch's do; ``pneumoseg
torch`` (``Predictor.from_dir(..., backend="torch", device="cpu")``, ``segment="all"``: the same work)
and ``pneumoseg torch, NCHW`` (``channels_last=False``). Random weights (speed does not depend on
them): the RLE strings of the eager baseline and the Predictor may differ at pixels whose logit is
within rounding of the threshold.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]  # bench_pipeline imports the tests' reference RLE

import bench_pipeline as bp  # noqa: E402
from pneumoseg.infer import Predictor  # noqa: E402
from pneumoseg.models import create_segmenter  # noqa: E402
from pneumoseg.models.model_dir import save_model_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="resnet34")
    ap.add_argument("--size", type=int, default=512, help="network input size")
    ap.add_argument("--original", type=int, default=1024, help="radiograph size")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    net = create_segmenter("unet", args.encoder, in_channels=1, aux_classifier=True).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model_dir(Path(tmp) / "model", {"segmenter": net}, input_sizes={"segmenter": args.size},
                              thresholds={"gate": 0.0, "top": None, "bottom": 0.5, "min_component_area": 0}).path
        eager = {"torch eager baseline": bp.eager_baseline(path),
                 "eager, smp decoder form": bp.eager_baseline(path, subpixel=False)}
        predictors = {name: Predictor.from_dir(path, backend="torch", device="cpu", segment="all", channels_last=cl)
                      for name, cl in (("pneumoseg torch", True), ("pneumoseg torch, NCHW", False))}
        for p in predictors.values():
            p.warmup(args.batch)
        stages: dict[str, list[dict]] = {name: [] for name in (*eager, *predictors)}

        def call(name: str, batch: list) -> list[str]:
            if name in eager:
                return eager[name](batch, stages[name])
            preds = predictors[name].predict(batch, batch_size=args.batch)
            stages[name].append({k: v / 1e3 for k, v in preds[0].timings.items() if k != "load"})
            return [q.rle for q in preds]

        pool = list(bp.images(args.original, max(9, args.batch)))
        for name in stages:  # first call: kernel choices for these shapes
            call(name, pool[:args.batch])
            stages[name].clear()
        order = list(stages)
        for i in range(args.rounds):
            batch = [pool[(i * args.batch + j) % len(pool)] for j in range(args.batch)]
            for name in order if i % 2 == 0 else order[::-1]:
                call(name, batch)

    def median(name: str, network: bool) -> float:
        keys = ("classify", "segment") if network else ("total",)
        return float(np.median([sum(s.get(k, 0.0) for k in keys) for s in stages[name]])) * 1e3

    base_total, base_net = median("torch eager baseline", False), median("torch eager baseline", True)
    print(f"U-Net {args.encoder} {args.size} from {args.original}, batch {args.batch}, {args.rounds} rounds interleaved, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__} (ms per batch, p50; ratio = eager / this)")
    print(f"  {'pipeline':<26} {'total':>9} {'network':>9} {'vs eager':>9} {'network vs eager':>17}")
    for name in stages:
        total, network = median(name, False), median(name, True)
        print(f"  {name:<26} {total:>9.0f} {network:>9.0f} {base_total / total:>8.2f}x {base_net / network:>16.2f}x")


if __name__ == "__main__":
    main()
