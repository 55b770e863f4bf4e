"""The fused loss's per-call host overhead, measured on the CPU: the CPU twin of
``gpu_profile_loss.py``'s host probe. On tiny inputs (1x1x8x8, 2x1x32x32) the native kernels cost
next to nothing, so what a call takes is the Python wrapper, autograd and the binding: the same code
path a CUDA call runs before its launches (on a GPU that host time is what bounds a small or
CUDA-graph-free training step: 0.245 ms per step against 0.136 ms in a graph replay on the H200).

    python3 benchmarks/cpu_profile_loss.py [--calls 500] [--rounds 20] [--json out.json]
    python3 benchmarks/cpu_profile_loss.py --baseline HEAD~1   # before/after, interleaved rounds
    python3 benchmarks/cpu_profile_loss.py --profile      # cProfile of forward+backward, one case

``--baseline REV`` loads ``pneumoseg/losses.py`` as it was at git revision REV next to the current
one (its custom ops renamed, so both register) and times the two in alternating rounds, so a load
change on the machine hits both alike.

Each figure is the best over ``--rounds`` of the mean microseconds per call over ``--calls`` calls
back to back, in this thread's CPU time: on a shared machine other processes only ever add time
(waiting for a core, cold caches), so thread time and the best round are the steadiest estimate of
the code's own cost. Everything runs on this thread (one torch thread; the CPU autograd engine runs
backward on the caller's thread; the native loops use one thread at these sizes). Not a test and not
timed in CI: absolute times depend on the host.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from typing import Callable

import torch

from gpu_profile_loss import WEIGHTS, AutogradFloor, reference_probes
from host_profile import options, profile_text, rounds_us, source_at, write_json
from pneumoseg.losses import combo_loss

SHAPES = ((1, 1, 8, 8), (2, 1, 32, 32))
DTYPES = (torch.float32, torch.bfloat16)
TARGETS = ("float", "bool", "uint8")


def per_call_us(fn: Callable[[], object], calls: int, rounds: int, warmup: int = 50) -> float:
    return per_call_us_each([fn], calls, rounds, warmup)[0]


def per_call_us_each(fns: list[Callable[[], object]], calls: int, rounds: int, warmup: int = 50) -> list[float]:
    """Best-round microseconds per call of each function, the functions taking turns round by round."""
    return [min(times) for times in rounds_us(fns, calls, rounds, warmup)]


def load_losses_at(rev: str):
    """pneumoseg.losses as it was at git revision ``rev``, as a second module beside the current one."""
    source = source_at(rev, "pneumoseg/losses.py").replace('"pneumoseg::', '"pneumoseg_baseline::')  # its own op names
    name = "pneumoseg._losses_baseline"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "pneumoseg"
    sys.modules[name] = module
    exec(compile(source, f"{rev}:pneumoseg/losses.py", "exec"), module.__dict__)
    return module


def inputs(shape, dtype, target_kind):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2).to(dtype).requires_grad_()
    hit = torch.rand(shape, generator=g) > 0.7
    t = {"float": hit.to(dtype), "bool": hit, "uint8": hit.to(torch.uint8)}[target_kind]
    return x, t


def case_fns(shape, dtype, per_image, target_kind, loss_fn=combo_loss):
    x, t = inputs(shape, dtype, target_kind)

    def forward():
        return loss_fn(x, t, per_image=per_image, **WEIGHTS)

    def step():
        x.grad = None
        loss_fn(x, t, per_image=per_image, **WEIGHTS).backward()

    return forward, step


def references(calls: int, rounds: int) -> dict[str, float]:
    """For scale, at 1x1x8x8 fp32: what the same call costs with less or none of our code in it."""
    x, t = inputs((1, 1, 8, 8), torch.float32, "float")
    fns = reference_probes(x, t)
    fns["minimal autograd.Function fwd (x.sum)"] = lambda: AutogradFloor.apply(x)
    fns["one torch.empty(())"] = lambda: torch.empty(())
    return {name: per_call_us(fn, calls, rounds) for name, fn in fns.items()}


def run_cases(calls: int, rounds: int, baseline=None) -> dict[str, float]:
    out = {}
    head = f"{'shape':>10} {'dtype':>9} {'per_image':>9} {'target':>6}"
    if baseline is None:
        print(f"{head} {'fwd us':>8} {'fwd+bwd us':>10}")
    else:
        print(f"{head} {'fwd before':>10} {'after':>7} {'fwd+bwd before':>14} {'after':>7} {'x':>5}")
    for shape, dtype, per_image, target_kind in itertools.product(SHAPES, DTYPES, (False, True), TARGETS):
        forward, step = case_fns(shape, dtype, per_image, target_kind)
        key = f"{'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} per_image={per_image} {target_kind}"
        row = f"{'x'.join(map(str, shape)):>10} {str(dtype).replace('torch.', ''):>9} {per_image!s:>9} {target_kind:>6}"
        if baseline is None:
            fwd, both = per_call_us_each([forward, step], calls, rounds)
            out[key + " fwd"], out[key + " fwd+bwd"] = fwd, both
            print(f"{row} {fwd:8.1f} {both:10.1f}", flush=True)
            continue
        old_forward, old_step = case_fns(shape, dtype, per_image, target_kind, baseline.combo_loss)
        old_fwd, fwd, old_both, both = per_call_us_each([old_forward, forward, old_step, step], calls, rounds)
        out.update({key + " fwd before": old_fwd, key + " fwd": fwd, key + " fwd+bwd before": old_both,
                    key + " fwd+bwd": both})
        print(f"{row} {old_fwd:10.1f} {fwd:7.1f} {old_both:14.1f} {both:7.1f} {old_both / both:5.2f}", flush=True)
    return out


def profile_one(calls: int) -> None:
    forward, step = case_fns((1, 1, 8, 8), torch.float32, False, "float")
    print(profile_text(step, calls, warmup=100))


def main() -> None:
    parser = options(__doc__, calls=500, rounds=20,
                     baseline_help="also time pneumoseg/losses.py as of this git revision")
    parser.add_argument("--profile", action="store_true", help="cProfile forward+backward at 1x1x8x8 fp32 instead")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny inputs: a thread pool would only add noise
    if args.profile:
        profile_one(args.calls)
        return
    print(f"torch {torch.__version__}, CPU, combo_loss {WEIGHTS}: us per call, best of {args.rounds} rounds "
          f"of {args.calls} calls\n")
    baseline = load_losses_at(args.baseline) if args.baseline else None
    out = run_cases(args.calls, args.rounds, baseline)
    print()
    for name, us in references(args.calls, args.rounds).items():
        out[f"{name} (reference)"] = us
        print(f"reference, 1x1x8x8 fp32: {name}: {us:.1f} us")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
