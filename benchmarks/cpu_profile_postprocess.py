"""The host cost of post-processing and RLE per call, measured on the CPU: the Python path that runs
before every native call, on a CUDA tensor too. At batch 1 on a GPU the kernels are a handful of
tiny launches, so this path is most of what ``postprocess(..., to_rle=True)`` of one logit map costs
(0.262 ms on the H200 against a 0.2 ms target, issue 11).

    python3 benchmarks/cpu_profile_postprocess.py [--calls 400] [--rounds 15] [--json out.json]
    python3 benchmarks/cpu_profile_postprocess.py --baseline HEAD~1   # before/after, interleaved rounds
    python3 benchmarks/cpu_profile_postprocess.py --profile           # cProfile of one case
    python3 benchmarks/cpu_profile_postprocess.py -k encode           # only cases whose name holds "encode"

Cases: ``postprocess`` of a logit map (``from_logits=True``, the triplet rule, a gate and a
component filter, as the Predictor calls it) with and without gate scores and ``return_components``,
from torch and NumPy input, and with ``to_rle=True``; ``rle.encode_batch`` and ``rle.decode_batch``.
At 1x32x32 the native work is nearly free and the figure is the host path; at 1x1024x1024 the
native CPU work is in it too (the ratio there shows how much of a CPU call the host path was).

``--baseline REV`` loads ``pneumoseg/{_checks,_native,rle,postprocess}.py`` as they were at git
revision REV as a second package beside the current one (sharing the native extension, the errors
and the limits) and times both in alternating rounds, so a load change on the machine hits both alike.

Each figure is the median over ``--rounds`` of the mean microseconds per call over ``--calls`` calls
back to back (a tenth of them at 1024x1024), in this thread's CPU time (other processes on a shared
machine then add little); the best round is printed beside it. One torch thread. Not a test and not
timed in CI: absolute times depend on the host.
"""

from __future__ import annotations

import statistics
import sys
import types
from typing import Any, Callable

import numpy as np
import torch

import pneumoseg
from host_profile import ROOT, options, profile_text, rounds_us, source_at, write_json
from pneumoseg import postprocess as current_postprocess
from pneumoseg import rle as current_rle

sys.path.insert(0, str(ROOT / "tests"))
from factories import pneumothorax_blob

SIZES = (32, 1024)
# The Predictor's call: the SIIM winners' triplet rule on logits, a classifier gate, small blobs removed.
SETTINGS = {"from_logits": True, "top": 0.75, "min_area": 64, "bottom": 0.3, "gate_threshold": 0.5,
            "min_component_area": 16}
BASELINE_MODULES = ("_checks", "_native", "rle", "postprocess")


def load_baseline(rev: str) -> types.ModuleType:
    """pneumoseg's post-processing and RLE modules as they were at git revision ``rev``, as a package
    ``pneumoseg._baseline`` beside the current one (the native extension, errors and limits shared)."""
    name = "pneumoseg._baseline"
    package = types.ModuleType(name)
    package.__path__ = []
    package.__package__ = name
    sys.modules[name] = package
    for shared in ("errors", "limits", "_C"):
        module = sys.modules[f"pneumoseg.{shared}"]
        sys.modules[f"{name}.{shared}"] = module
        setattr(package, shared, module)
    for module_name in BASELINE_MODULES:
        source = source_at(rev, f"pneumoseg/{module_name}.py")
        module = types.ModuleType(f"{name}.{module_name}")
        module.__package__ = name
        module.__file__ = f"{rev}:pneumoseg/{module_name}.py"
        sys.modules[module.__name__] = module  # before exec: dataclasses look their module up
        setattr(package, module_name, module)
        exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 - our own source at REV
    return package


def logit_map(size: int, kind: str) -> Any:
    """A (1, size, size) float32 logit map with a pneumothorax-shaped positive region and noise."""
    rng = np.random.default_rng(0)
    blob = pneumothorax_blob(size) if size >= 64 else (rng.random((size, size)) < 0.3).astype(np.uint8)
    logits = (blob.astype(np.float32) * 6 - 3 + rng.normal(0, 1, blob.shape).astype(np.float32))[None]
    return torch.from_numpy(logits) if kind == "torch" else logits


def cases(pp: Any, rle: Any, only: str = "") -> dict[str, tuple[Callable[[], object], int]]:
    """name -> (call, size) for the post-processing module ``pp`` and RLE module ``rle``."""
    out: dict[str, tuple[Callable[[], object], int]] = {}
    for size in SIZES:
        for kind in ("torch", "numpy"):
            x = logit_map(size, kind)
            scores = torch.tensor([0.9]) if kind == "torch" else np.array([0.9], np.float32)
            for gated in (False, True):
                for components in (False, True):
                    name = (f"postprocess {kind} 1x{size}x{size}{' scores' if gated else ''}"
                            f"{' components' if components else ''}")

                    def call(x=x, s=scores if gated else None, c=components):
                        return pp.postprocess(x, s, return_components=c, **SETTINGS)

                    out[name] = (call, size)
            out[f"postprocess {kind} 1x{size}x{size} scores components to_rle"] = (
                lambda x=x, s=scores: pp.postprocess(x, s, return_components=True, to_rle=True, **SETTINGS), size)
            mask = pp.postprocess(x, top=None, from_logits=True, bottom=0.5)
            text = rle.encode_batch(mask)
            out[f"encode_batch {kind} 1x{size}x{size}"] = (lambda m=mask: rle.encode_batch(m), size)
            if kind == "numpy":
                out[f"decode_batch 1x{size}x{size}"] = (lambda t=text, s=size: rle.decode_batch(t, (s, s)), size)
    return {name: case for name, case in out.items() if only in name}


def calls_for(size: int, calls: int) -> int:
    return calls if size <= 64 else max(1, calls // 10)


def run(calls: int, rounds: int, baseline: Any, only: str) -> dict[str, dict[str, float]]:
    now = cases(current_postprocess, current_rle, only)
    before = cases(baseline.postprocess, baseline.rle, only) if baseline is not None else {}
    width = max(map(len, now), default=10)
    if baseline is None:
        print(f"{'case':<{width}} {'median us':>10} {'best us':>9}")
    else:
        print(f"{'case':<{width}} {'before us':>10} {'after us':>9} {'x':>6}   (median; best before/after)")
    out: dict[str, dict[str, float]] = {}
    for name, (fn, size) in now.items():
        fns = [fn] if baseline is None else [before[name][0], fn]
        times = rounds_us(fns, calls_for(size, calls), rounds)
        medians = [statistics.median(t) for t in times]
        bests = [min(t) for t in times]
        if baseline is None:
            out[name] = {"median_us": medians[0], "best_us": bests[0]}
            print(f"{name:<{width}} {medians[0]:10.1f} {bests[0]:9.1f}", flush=True)
        else:
            ratio = medians[0] / medians[1]
            out[name] = {"before_median_us": medians[0], "median_us": medians[1], "before_best_us": bests[0],
                         "best_us": bests[1], "ratio": ratio}
            print(f"{name:<{width}} {medians[0]:10.1f} {medians[1]:9.1f} {ratio:6.2f}   "
                  f"({bests[0]:.1f} / {bests[1]:.1f})", flush=True)
    return out


def references(calls: int, rounds: int) -> dict[str, float]:
    """For scale: plain torch calls on the 1x32x32 input."""
    x = logit_map(32, "torch")
    fns = {"torch.sigmoid(x)": lambda: torch.sigmoid(x), "torch.empty_like(x)": lambda: torch.empty_like(x)}
    times = rounds_us(list(fns.values()), calls, rounds)
    return {name: statistics.median(t) for name, t in zip(fns, times)}


def profile_one(name: str, calls: int) -> None:
    fn, _ = cases(current_postprocess, current_rle, name)[name]
    print(profile_text(fn, calls))


def main(argv: list[str] | None = None) -> None:
    parser = options(__doc__, calls=400, rounds=15, calls_help="calls per round at 1x32x32 (a tenth at 1024)",
                     baseline_help="also time the modules as of this git revision")
    parser.add_argument("-k", dest="only", default="", help="only the cases whose name contains this")
    parser.add_argument("--profile", nargs="?", const="postprocess torch 1x32x32 scores components",
                        metavar="CASE", help="cProfile one case instead (default: %(const)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny inputs: a thread pool would only add noise
    if args.profile:
        profile_one(args.profile, args.calls)
        return
    print(f"pneumoseg {pneumoseg.__version__}, torch {torch.__version__}, CPU: us per call, median of "
          f"{args.rounds} rounds of {args.calls} calls ({max(1, args.calls // 10)} at 1024x1024)\n")
    baseline = load_baseline(args.baseline) if args.baseline else None
    out: dict[str, Any] = run(args.calls, args.rounds, baseline, args.only)
    print()
    for name, us in references(args.calls, args.rounds).items():
        out[f"{name} (reference)"] = {"median_us": us}
        print(f"reference, 1x32x32 float32: {name}: {us:.1f} us")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
