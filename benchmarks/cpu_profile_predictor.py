"""The Predictor's per-batch host overhead at batch 1, measured on the CPU with networks so small
that they cost next to nothing: what a ``predict`` takes beyond them is input handling,
preprocessing, the gate, post-processing, RLE and bookkeeping, the same Python and aten calls a CUDA
``predict`` makes before and after its kernels (on a GPU that host time is what stands between the
device time, 2.81 ms for the own-gate U-Net on an H200, and the 3.60 ms wall time).

    python3 benchmarks/cpu_profile_predictor.py [--calls 300] [--rounds 10] [--json out.json]
    python3 benchmarks/cpu_profile_predictor.py --baseline HEAD~3   # before/after, alternating rounds
    python3 benchmarks/cpu_profile_predictor.py --profile            # cProfile of one case
    python3 benchmarks/cpu_profile_predictor.py --check HEAD~3       # same answers as that revision?
    python3 benchmarks/cpu_profile_predictor.py --baseline HEAD --overlay pneumoseg/infer/predictor.py

Cases (64x64 uint8 image or float32 array in memory, networks at 32 px): a classifier + segmenter
with ``segment="all"`` (the ``fixed_cost`` case of ``bench_pipeline.py``) and a segmenter gating on
its own encoder (``segment="gated"``, a gate of 0 so stage 2 always runs). Each is timed twice:
``predict`` as it is, and ``around nets``, the networks replaced by their stored outputs (what the
Predictor alone costs). Figures are the best over ``--rounds`` of the mean microseconds of thread
CPU time per call over ``--calls`` calls (other processes on a shared machine only ever add time).

``aten ops`` counts every aten operator the dispatcher sees per predict (torch.profiler, CPU), around
the networks, on the CPU path and on the CUDA path (the Predictor's CUDA branches run on the CPU under
``fake_cuda.py``): on a GPU each compute op is a kernel launch of 5-10 us host time. ``host reads``
counts, on that CUDA path, what the Predictor's own code (``pneumoseg/infer/``) does that would make
the host wait for the GPU: ``.tolist()``, ``.item()``,
``.cpu()``, ``bool(tensor)``, ``.numpy()``, ``nonzero`` (its output size) on anything but a copy made
with ``non_blocking=True``, blocking copies of host lists to the device
(``torch.tensor(list, device=...)``) and event synchronisations (the RLE encoder's one copy of the
strings, in native code, comes on top of these). Under ``fake_cuda`` the tensors are on the CPU, so
code that branches on a tensor's device (``scale_to_unit``, the native ops) takes its CPU path: the
CUDA-path op counts are those of the Predictor's CUDA branches around CPU-path ops.

``--baseline REV`` runs the ``pneumoseg/`` sources of git revision REV (``git archive``, with this
checkout's built native extension) in a second process, both processes timed round by round in turn,
so a load change on the machine hits both alike. ``--check REV`` predicts the synthetic phantoms
(every gate layout, segment mode, TTA, batch 1 and 4, uint8 / float / tensor input) with both and
compares RLEs, scores (bit for bit), component counts and masks. ``--overlay FILE...`` makes "now"
REV's tree with only those working-tree files over it, to measure one change apart from other
uncommitted work in the checkout. Not a test and not timed in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import weakref
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from host_profile import ROOT, mean_us, options, profile_text, write_json

HERE = Path(__file__).resolve().parent

#: name -> (model layout, segment mode, input kind)
CASES = {
    "two-stage, all, uint8 tensor": ("classifier", "all", "tensor"),
    "own gate, gated, uint8 tensor": ("aux", "gated", "tensor"),
    "two-stage, all, float32 array": ("classifier", "all", "numpy-float"),
}
IMAGE = 64
NET = 32


# --------------------------------------------------------------------------------------------------
# model directories (made once by the parent, read by every worker)


def make_model_dirs(root: Path) -> dict[str, str]:
    import torch

    from pneumoseg.models import create_classifier, create_segmenter
    from pneumoseg.models.model_dir import save_model_dir

    out = {}
    for kind in ("classifier", "aux", "plain"):
        torch.manual_seed(0)
        seg = create_segmenter("unet", "resnet_tiny", in_channels=1, decoder_channels=(8,) * 5, aux_classifier=kind == "aux")
        networks = {"segmenter": seg.eval()}
        if kind == "classifier":
            networks["classifier"] = create_classifier("resnet_tiny", num_classes=1, in_channels=1).eval()
        with torch.no_grad():  # spread the random logits over both sides of the thresholds
            seg.segmentation_head[0].weight.mul_(40.0)
        sizes = {"segmenter": NET, "classifier": NET + 16}
        out[kind] = str(save_model_dir(root / kind, networks, input_sizes={k: sizes[k] for k in networks},
                                       thresholds={"gate": 0.0, "top": 0.6, "min_area": 20, "bottom": 0.45}).path)
    return out


# --------------------------------------------------------------------------------------------------
# the worker: one process per pneumoseg source tree, driven by the parent over stdin / stdout


def _use_source_tree(source: str | None) -> None:
    """Import pneumoseg from ``source`` (a git archive of another revision) instead of this checkout."""
    if source is None:
        return
    # the editable install's finder would map pneumoseg to this checkout whatever sys.path says
    sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__name__.startswith("ScikitBuild")]
    sys.path.insert(0, source)
    import pneumoseg

    if not Path(pneumoseg.__file__).resolve().is_relative_to(Path(source).resolve()):
        raise RuntimeError(f"pneumoseg was imported from {pneumoseg.__file__}, not from {source}")


def _image(kind: str):
    import numpy as np
    import torch

    img = np.random.default_rng(0).integers(0, 255, (IMAGE, IMAGE), dtype=np.uint8)
    img[16:40, 20:44] = 250  # a bright block, so that the masks are not empty
    if kind == "tensor":
        return torch.from_numpy(img)
    return img.astype(np.float32)


class _StoredOutputs:
    """A backend's ``run`` replaced by each part's outputs for the first inputs of their shape."""

    def __init__(self, run: Callable) -> None:
        self.real, self.cache = run, {}

    def __call__(self, part: str, *inputs: Any) -> tuple:
        key = (part, *(tuple(x.shape) for x in inputs))
        if key not in self.cache:
            self.cache[key] = self.real(part, *inputs)
        return self.cache[key]


def _predictor(dirs: dict, case: str, stub: bool, device: str = "cpu"):
    from pneumoseg.infer import Predictor

    layout, segment, _ = CASES[case]
    kwargs = {"precision": "fp32", "max_batch": 1} if device != "cpu" else {}
    p = Predictor.from_dir(dirs[layout], backend="torch", device=device, segment=segment, **kwargs)
    p.warmup(1)
    if stub:
        p.backend.run = _StoredOutputs(p.backend.run)
    return p


class Worker:
    def __init__(self, dirs: dict) -> None:
        import torch

        torch.set_num_threads(1)  # tiny inputs: a thread pool would only add noise
        self.dirs = dirs
        self.calls: dict[tuple[str, bool], Callable[[], Any]] = {}

    def call(self, case: str, stub: bool) -> Callable[[], Any]:
        key = (case, stub)
        if key not in self.calls:
            p = _predictor(self.dirs, case, stub)
            image = _image(CASES[case][2])
            self.calls[key] = lambda: p.predict(image, batch_size=1)
            for _ in range(30):
                self.calls[key]()
        return self.calls[key]

    def time(self, case: str, stub: bool, calls: int) -> float:
        return mean_us(self.call(case, stub), calls)

    def aten_ops(self, case: str, device: str) -> dict:
        """aten ops per predict around the networks, and on the CUDA path the host reads."""
        from torch.profiler import ProfilerActivity, profile

        with _fake_cuda_if(device) as reads:
            p = _predictor(self.dirs, case, stub=True, device=device)
            image = _image(CASES[case][2])
            for _ in range(3):
                p.predict(image, batch_size=1)
            if reads is not None:
                reads.clear()
            n = 10
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(n):
                    p.predict(image, batch_size=1)
            counts = Counter(e.name for e in prof.events() if e.name.startswith("aten::"))
        out = {"aten_ops": sum(counts.values()) / n,
               "by_name": {k: v / n for k, v in counts.most_common()}}
        if reads is not None:
            out["host_reads"] = {k: v / n for k, v in reads.items()}
        return out

    def profile(self, case: str, stub: bool, calls: int) -> str:
        return profile_text(self.call(case, stub), calls, warmup=0, top=30)  # call() has warmed it up

    def answers(self) -> dict:
        """Predictions of phantoms over every layout and option, as comparable text."""
        import numpy as np
        import torch

        from pneumoseg.data import chest_phantom
        from pneumoseg.infer import Predictor

        images = []
        for i, (h, w) in enumerate(((80, 96), (64, 64), (100, 72), (64, 64))):
            img, _ = chest_phantom(max(h, w), np.random.default_rng([3, i]), bool(i % 2))
            images.append(np.ascontiguousarray(img[:h, :w]))
        inputs = {"uint8": images, "float": [i.astype(np.float32) * 3.5 - 7 for i in images],
                  "tensor": [torch.from_numpy(i.astype(np.int16)) for i in images]}
        out = {}
        for layout in ("classifier", "aux", "plain"):
            for segment in ("gated", "all"):
                for tta in (False, True):
                    for gate in (0.0, 0.5):
                        p = Predictor.from_dir(self.dirs[layout], segment=segment, tta=tta, thresholds={"gate": gate})
                        for kind, imgs in inputs.items():
                            for batch in (1, 4):
                                preds = p.predict(imgs, batch_size=batch, return_masks=True)
                                out[f"{layout} {segment} tta={tta} gate={gate} {kind} b{batch}"] = [
                                    [q.image_id, q.score.hex(), q.rle, q.n_components, list(q.shape), q.segmented,
                                     hashlib.sha256(q.mask.tobytes()).hexdigest()[:16], sorted(q.timings)]
                                    for q in preds]
        return out


_SYNC_METHODS = {"tolist", "item", "cpu", "__bool__", "numpy", "__int__", "__float__", "nonzero"}


@contextlib.contextmanager
def _fake_cuda_if(device: str):
    if device == "cpu":
        yield None
        return
    import pytest
    import torch
    from torch.overrides import TorchFunctionMode

    sys.path.insert(0, str(HERE))
    from fake_cuda import fake_cuda

    reads: Counter = Counter()
    # host copies made without waiting: reading them waits for nothing more (keyed by id: a WeakSet
    # would compare tensors with ==, ops of its own in the count)
    fetched: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    class CountHostReads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            caller = sys._getframe(1).f_code.co_filename
            if os.sep.join(("pneumoseg", "infer", "")) not in caller:
                pass  # the ops' own code takes its CPU path here (the tensors are on the CPU)
            elif name in _SYNC_METHODS:
                if not (args and fetched.get(id(args[0])) is args[0]):
                    reads[f"Tensor.{name}"] += 1
            elif name == "to" and args and any(
                    (a == "cpu" or getattr(a, "type", None) == "cpu") for a in (*args[1:], kwargs.get("device"))):
                if not kwargs.get("non_blocking"):
                    reads["Tensor.to(cpu)"] += 1
                else:
                    result = func(*args, **kwargs)
                    fetched[id(result)] = result
                    return result
            elif name == "tensor" and kwargs.get("device") is not None:  # a blocking copy to the GPU there
                reads["torch.tensor(list, device=cuda)"] += 1
            return func(*args, **kwargs)

    with pytest.MonkeyPatch.context() as monkeypatch, fake_cuda(monkeypatch):
        original_sync = torch.cuda.Event.synchronize

        def counted_sync(event):
            reads["Event.synchronize"] += 1
            return original_sync(event)

        monkeypatch.setattr(torch.cuda.Event, "synchronize", counted_sync)
        with CountHostReads():
            yield reads


def worker_main(source: str | None, dirs_json: str) -> None:
    _use_source_tree(source)
    worker = Worker(json.loads(dirs_json))
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # only replies on the pipe
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        result = getattr(worker, op)(**request)
        real_stdout.write(json.dumps(result) + "\n")
        real_stdout.flush()


# --------------------------------------------------------------------------------------------------
# the parent


class WorkerProcess:
    def __init__(self, source: str | None, dirs: dict) -> None:
        args = [sys.executable, __file__, "--worker", json.dumps(dirs)]
        if source is not None:
            args += ["--source", source]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, op: str, **kwargs: Any) -> Any:
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker stopped (exit status {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def source_tree_at(rev: str, into: Path) -> str:
    """``pneumoseg/`` as of git revision ``rev`` under ``into``, with this checkout's native extension."""
    archive = subprocess.run(["git", "archive", rev, "pneumoseg"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    native = importlib.util.find_spec("pneumoseg._C").origin
    os.symlink(native, into / "pneumoseg" / Path(native).name)
    return str(into)


def timings(workers: dict[str, WorkerProcess], calls: int, rounds: int) -> dict:
    out: dict = {}
    for case in CASES:
        for stub in (False, True):
            best = {name: float("inf") for name in workers}
            for name, w in workers.items():
                w.ask("time", case=case, stub=stub, calls=max(1, calls // 10))  # warm up
            for _ in range(rounds):
                for name, w in workers.items():
                    best[name] = min(best[name], w.ask("time", case=case, stub=stub, calls=calls))
            out[f"{case}, {'around nets' if stub else 'predict'}"] = best
    return out


def main() -> None:
    parser = options(__doc__, calls=300, rounds=10, json_help="also write the figures here",
                     baseline_help="also run pneumoseg/ as of this git revision")
    parser.add_argument("--check", metavar="REV", help="compare the answers with those of this git revision")
    parser.add_argument("--profile", action="store_true", help="cProfile the first case around the networks")
    parser.add_argument("--overlay", nargs="+", metavar="PATH",
                        help="with --baseline/--check: 'now' is REV's tree with only these working-tree files over it "
                             "(one change measured apart from other uncommitted work)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker_main(args.source, args.worker)
        return
    sys.path.insert(0, str(ROOT / "tests"))
    with tempfile.TemporaryDirectory(prefix="pneumoseg-cpu-profile-predictor-") as tmp:
        dirs = make_model_dirs(Path(tmp))
        rev = args.check or args.baseline
        now = None
        if rev and args.overlay:
            (Path(tmp) / "now").mkdir()
            now = source_tree_at(rev, Path(tmp) / "now")
            for path in args.overlay:
                target = Path(now) / Path(path).resolve().relative_to(ROOT)
                target.write_bytes(Path(path).read_bytes())
        workers = {"now": WorkerProcess(now, dirs)}
        if rev:
            (Path(tmp) / "baseline").mkdir()
            workers = {rev: WorkerProcess(source_tree_at(rev, Path(tmp) / "baseline"), dirs), **workers}
        try:
            if args.check:
                check(workers, rev)
            elif args.profile:
                print(workers["now"].ask("profile", case=next(iter(CASES)), stub=True, calls=args.calls * 3))
            else:
                report(workers, args)
        finally:
            for w in workers.values():
                w.close()


def check(workers: dict[str, WorkerProcess], rev: str) -> None:
    before, after = workers[rev].ask("answers"), workers["now"].ask("answers")
    differ = [k for k in before if before[k] != after.get(k)]
    rows = [row for rows in before.values() for row in rows]
    print(f"{len(before)} configurations, {len(rows)} predictions ({sum(r[2] != '-1' for r in rows)} positive, "
          f"{sum(not r[5] for r in rows)} gated out): {len(differ)} configurations differ from {rev}")
    for k in differ[:10]:
        print(f"  {k}:\n    {rev}: {before[k]}\n    now: {after.get(k)}")
    if differ or set(before) != set(after):
        sys.exit(1)


def report(workers: dict[str, WorkerProcess], args: argparse.Namespace) -> None:
    import torch

    names = list(workers)
    print(f"torch {torch.__version__}, CPU, one thread, batch 1, {IMAGE}x{IMAGE} image, networks at {NET} px: "
          f"us per predict, best of {args.rounds} rounds of {args.calls} calls\n")
    figures = timings(workers, args.calls, args.rounds)
    width = max(len(k) for k in figures)
    print(f"{'case':<{width}} " + " ".join(f"{n:>10}" for n in names) + ("  before/after" if len(names) == 2 else ""))
    for key, best in figures.items():
        row = f"{key:<{width}} " + " ".join(f"{best[n]:10.1f}" for n in names)
        if len(names) == 2:
            row += f"  {best[names[0]] / best[names[1]]:12.2f}"
        print(row)
    ops: dict = {}
    print("\naten ops per predict around the networks (CPU path / CUDA path under fake_cuda), and host reads "
          "in pneumoseg/infer/ that wait for the GPU on the CUDA path (+1: the RLE strings' copy)")
    for case in CASES:
        ops[case] = {n: {d: w.ask("aten_ops", case=case, device=d) for d in ("cpu", "cuda")} for n, w in workers.items()}
        for n in names:
            cpu, cuda = ops[case][n]["cpu"], ops[case][n]["cuda"]
            reads = ", ".join(f"{k} {v:g}" for k, v in cuda["host_reads"].items() if v) or "none"
            print(f"  {case:<{width - 2}} {n:>10}: {cpu['aten_ops']:6.1f} / {cuda['aten_ops']:6.1f}   "
                  f"host reads {sum(cuda['host_reads'].values()):g} ({reads})")
    write_json(args.json, {"us_per_predict": figures, "aten_ops": ops})


if __name__ == "__main__":
    main()
