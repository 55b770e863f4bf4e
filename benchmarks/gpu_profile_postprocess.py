"""Where the time of post-processing goes on a GPU: torch.profiler over (a) the inference case, one
1024x1024 logit map to its RLE string (gating, triplet rule, area filter), and (b) labelling a batch of
64 1024x1024 masks (50% noise and realistic probability maps), with per-kernel device times and the
host's share.

    python3 benchmarks/gpu_profile_postprocess.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_postprocess import realistic_probability_map  # noqa: E402
from cuda_timing import per_call_us  # noqa: E402
from pneumoseg import postprocess as pp  # noqa: E402


def profiled(name: str, fn, reps: int) -> None:
    wall = per_call_us(torch, fn, reps, warmup=3) / 1e6
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in averages) / reps
    print(f"== {name}: {wall * 1e3:.3f} ms per call unprofiled (back to back, {reps} calls); "
          f"device time per call {device_us / 1e3:.3f} ms ==")
    print(averages.table(sort_by="device_time_total", row_limit=14))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=14))


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    probs = torch.from_numpy(realistic_probability_map(0)).clamp(1e-6, 1 - 1e-6)
    logits = torch.logit(probs)[None].cuda()
    scores = torch.tensor([0.9], device="cuda")
    kwargs = dict(from_logits=True, top=0.75, min_area=2000, bottom=0.3, min_component_area=64)
    profiled("postprocess + RLE, one 1024x1024 logit map", lambda: pp.postprocess(logits, scores, to_rle=True, **kwargs), 50)
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.random((64, 1024, 1024), dtype=np.float32) > 0.5).cuda()
    realistic = torch.from_numpy(np.stack([realistic_probability_map(s) for s in range(64)]) > 0.5).cuda()
    for name, masks in (("noise", noise), ("realistic", realistic)):
        profiled(f"label_components, 64 x 1024x1024 {name}", lambda m=masks: pp.label_components(m, 8), 3)
        probs64 = masks.float() * 0.9
        profiled(f"postprocess (threshold + area filter), 64 x 1024x1024 {name}",
                 lambda p=probs64: pp.postprocess(p, top=None, bottom=0.5, min_component_area=64), 3)


if __name__ == "__main__":
    main()
