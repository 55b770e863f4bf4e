"""Where the time of one fused loss step goes on a GPU: torch.profiler over 20 forward + backward
steps of ``combo_loss`` (SIIM weights 3/1/4, 8x1x512^2 fp32), then the per-call host overhead on a
tiny input, where the kernels cost next to nothing and what remains is Python, dispatch, allocation,
launches and any synchronisation.

    python3 benchmarks/gpu_profile_loss.py [--steps 20] [--shape 8,1,512,512] [--dtype float32]

The host part runs the same Python as on the CPU, so ``cpu_profile_loss.py`` (its CPU twin, with a
before/after mode against a git revision) measures changes to it without a GPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from cuda_timing import per_call_us
from pneumoseg.losses import combo_loss

WEIGHTS = dict(bce_weight=3.0, dice_weight=1.0, focal_weight=4.0)


def step(x: torch.Tensor, t: torch.Tensor) -> None:
    x.grad = None
    combo_loss(x, t, **WEIGHTS).backward()


class AutogradFloor(torch.autograd.Function):
    """The autograd floor: one Python node, one output each way (x.sum and its gradient)."""

    @staticmethod
    def forward(ctx, a):
        ctx.shape = a.shape
        return a.sum()

    @staticmethod
    def backward(ctx, g):
        return g.expand(ctx.shape)


def reference_probes(x: torch.Tensor, t: torch.Tensor) -> dict:
    """Calls that show the scale of a loss call's host cost on ``x``, ``t`` (1x1x8x8): the native forward
    without autograd or checks, the cheapest Python autograd function, one torch op."""
    from pneumoseg import losses

    params = losses._params(3.0, 1.0, 4.0, 2.0, 1.0, 1.0, False)

    def minimal_step():
        x.grad = None
        AutogradFloor.apply(x).backward()

    return {
        "native forward alone (no autograd, no checks)": lambda: losses._run_forward(x.detach(), t, params),
        "minimal autograd.Function fwd+bwd (x.sum)": minimal_step,
        "one torch.mul": lambda: x.detach().mul(2.0),
    }


def host_overhead_us(calls: int = 200) -> dict[str, float]:
    """Microseconds per call on a 1x1x8x8 CUDA tensor: `calls` calls back to back, one synchronisation
    at the end (kernels that small take a few microseconds, so this is the host's cost per call)."""
    x = torch.randn(1, 1, 8, 8, device="cuda", requires_grad=True)
    t = (torch.rand(1, 1, 8, 8, device="cuda") > 0.5).float()
    out = {}
    for name, fn in (("forward", lambda: combo_loss(x, t, **WEIGHTS)), ("forward+backward", lambda: step(x, t))):
        out[name] = per_call_us(torch, fn, calls)
    def eager_step():
        x.grad = None
        composite(x, t).backward()

    references = reference_probes(x, t)  # for scale: the same step with less or none of our code in it
    references["eager composite fwd+bwd"] = eager_step
    for name, fn in references.items():
        out[f"{name} (reference)"] = per_call_us(torch, fn, calls)
    return out


def composite(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The plain PyTorch composite of the same loss (as benchmarks/bench_loss.py's eager baseline)."""
    p = torch.sigmoid(x)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    p_t = p * t + (1 - p) * (1 - t)
    return 3.0 * bce.mean() + 1.0 * dice + 4.0 * ((1 - p_t) ** 2 * bce).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--shape", default="8,1,512,512")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--trace", help="also write a Chrome trace (JSON) here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    shape = tuple(int(s) for s in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(shape, device="cuda", generator=g) * 2).to(dtype).requires_grad_()
    t = (torch.rand(shape, device="cuda", generator=g) > 0.9).to(dtype)
    for _ in range(5):
        step(x, t)
    torch.cuda.synchronize()

    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; combo_loss {WEIGHTS} "
          f"on {shape} {args.dtype}, {args.steps} fwd+bwd steps\n", flush=True)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=False) as prof:
        for _ in range(args.steps):
            step(x, t)
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps
    averages = prof.key_averages()
    print("== by self CPU time ==")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25))
    print("== by CUDA (device) time ==")
    print(averages.table(sort_by="device_time_total", row_limit=25))
    if args.trace:
        prof.export_chrome_trace(args.trace)
    print(f"wall time per step under the profiler: {wall * 1e3:.3f} ms", flush=True)

    # Unprofiled: per-step time back to back, and per-call host overhead on a tiny tensor.
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        step(x, t)
    stop.record()
    stop.synchronize()
    print(f"per step, unprofiled, {args.steps} back to back (CUDA events): {start.elapsed_time(stop) / args.steps:.3f} ms")
    for name, us in host_overhead_us().items():
        print(f"host overhead per call, 1x1x8x8, 200 calls then one sync: {name}: {us:.1f} us")


if __name__ == "__main__":
    main()
