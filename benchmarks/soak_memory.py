"""Soak test: does a long-lived Predictor (and `pneumoseg listen`'s node) plateau in memory, or grow?
Samples every --every rounds the process's RSS (/proc/self/status VmRSS), thread count, open fds and the
number of objects the garbage collector tracks; with --tracemalloc, the Python heap and the lines whose
allocations grew most from the first sample to the last. Verdict: RSS growth over the last third of the
samples (a plateau grows < 2 % there; a leak grows as much as in the middle third).

    python benchmarks/soak_memory.py [--scenario predictor node all] [--rounds 60] [--batch 4]
        [--sizes 256 1024] [--masks] [--images 300] [--every 5] [--tracemalloc] [--trim] [--out FILE.json]

predictor: Predictor.from_dir on the tests' tiny model (classifier gate) predicting --rounds batches of
--batch synthetic chest phantoms per size (arrays, RLE; masks with --masks), the same images each round.
node: a DicomNode in this process (SEG writing on) receiving --images C-STOREs, each a fresh
SOPInstanceUID, from a pynetdicom SCU on loopback, in associations of --batch * 4 images; a sample is
taken every --every associations once the node is idle. --trim calls glibc's malloc_trim(0) before each
sample: memory freed but kept by the allocator is then returned, and what is left is held by something."""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class Sampler:
    def __init__(self, trace: bool, trim: bool) -> None:
        self.trace, self.trim = trace, trim
        self.rows: list[dict[str, Any]] = []
        self.first: Optional[tracemalloc.Snapshot] = None
        self.last: Optional[tracemalloc.Snapshot] = None
        self.before_warmup = float("nan")

    def baseline(self) -> None:
        """RSS before the warm-up: its growth is one-off (imports, first SEG, allocator arenas)."""
        gc.collect()
        self.before_warmup = _status("VmRSS") / 1024

    def sample(self, step: int) -> None:
        if self.trace and not tracemalloc.is_tracing():  # from the first sample: the warm-up is not traced (it
            tracemalloc.start(1)  # would also slow the node's first C-STORE past pynetdicom's 30 s timeout)
        gc.collect()
        if self.trim:
            _trim()
        row: dict[str, Any] = {"step": step, "rss_mib": _status("VmRSS") / 1024, "threads": _status("Threads"),
                               "fds": len(os.listdir("/proc/self/fd")), "gc_objects": len(gc.get_objects())}
        if self.trace:
            row["py_heap_mib"] = tracemalloc.get_traced_memory()[0] / 2**20
            snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
            if self.first is None:
                self.first = snap
            self.last = snap
        self.rows.append(row)

    def verdict(self) -> dict[str, Any]:
        rss = [r["rss_mib"] for r in self.rows]
        third = max(1, len(rss) // 3)
        end_third = rss[-third - 1:] if len(rss) > third else rss
        out: dict[str, Any] = {
            "rss_before_warmup_mib": self.before_warmup,
            "rss_start_mib": rss[0], "rss_middle_mib": rss[len(rss) // 2], "rss_end_mib": rss[-1],
            "last_third_growth_mib": end_third[-1] - end_third[0],
            "last_third_growth_pct": 100 * (end_third[-1] - end_third[0]) / end_third[0],
            "gc_objects_growth_last_third": self.rows[-1]["gc_objects"] - self.rows[-third - 1]["gc_objects"]
            if len(self.rows) > third else 0,
            "threads_start_end": [self.rows[0]["threads"], self.rows[-1]["threads"]],
            "fds_start_end": [self.rows[0]["fds"], self.rows[-1]["fds"]],
        }
        out["plateau"] = out["last_third_growth_pct"] < 2.0
        if self.first is not None and self.last is not None:
            out["top_growth"] = [f"{s.traceback[0].filename}:{s.traceback[0].lineno} {s.size_diff / 1024:+.1f} KiB "
                                 f"({s.count_diff:+d} blocks)"
                                 for s in self.last.compare_to(self.first, "lineno")[:8]]
        return out


def _print(name: str, sampler: Sampler, verdict: dict[str, Any]) -> None:
    print(f"\n== {name}")
    heap = "py_heap_mib" in sampler.rows[0]
    print(f"{'step':>6} {'RSS MiB':>9} {'threads':>7} {'fds':>5} {'gc objs':>9}" + (f" {'py heap MiB':>11}" if heap else ""))
    for r in sampler.rows:
        print(f"{r['step']:>6} {r['rss_mib']:>9.1f} {r['threads']:>7} {r['fds']:>5} {r['gc_objects']:>9}"
              + (f" {r['py_heap_mib']:>11.2f}" if heap else ""))
    print(f"RSS before warm-up {verdict['rss_before_warmup_mib']:.1f} MiB; RSS start / middle / end: {verdict['rss_start_mib']:.1f} / {verdict['rss_middle_mib']:.1f} / "
          f"{verdict['rss_end_mib']:.1f} MiB; last third {verdict['last_third_growth_mib']:+.1f} MiB "
          f"({verdict['last_third_growth_pct']:+.2f} %), gc objects {verdict['gc_objects_growth_last_third']:+d}: "
          + ("plateau" if verdict["plateau"] else "STILL GROWING"))
    for line in verdict.get("top_growth", []):
        print("  " + line)


def soak_predictor(args, predictor, sampler: Sampler) -> None:
    from pneumoseg.data import chest_phantom

    rng = np.random.default_rng(0)
    batches = {s: [chest_phantom(s, rng, i % 2 == 0)[0] for i in range(args.batch)] for s in args.sizes}
    sampler.baseline()
    for images in batches.values():  # warm up: first-call imports and caches are not growth
        predictor.predict(images, return_masks=args.masks)
    for step in range(args.rounds + 1):
        if step % args.every == 0:
            sampler.sample(step)
        if step == args.rounds:
            break
        for images in batches.values():
            got = predictor.predict(images, return_masks=args.masks)
            assert len(got) == len(images)
            del got


def soak_node(args, predictor, sampler: Sampler, scratch: Path) -> None:
    import pydicom
    from pydicom.uid import generate_uid
    from pynetdicom import AE

    from pneumoseg.data import make_synthetic_siim
    from pneumoseg.serve import DicomNode

    make_synthetic_siim(scratch / "studies", n_images=8, size=args.sizes[0], positive_fraction=0.5, seed=0)
    datasets = [pydicom.dcmread(f) for f in sorted((scratch / "studies").rglob("*.dcm"))]
    node = DicomNode(predictor, scratch / "node", port=0, batch_size=args.batch, write_seg=True, log_every_s=1e6)
    sampler.baseline()
    node.start()
    per_assoc = args.batch * 4
    sent = 0
    try:
        ae = AE(ae_title="SOAK")
        for syntax in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1"):
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.7", syntax)
        assoc_n = -1  # the first association warms up (highdicom's imports, the first SEG): not sampled
        while True:
            done = sent >= args.images
            if done or (assoc_n >= 0 and assoc_n % args.every == 0):  # and always after the last
                assert node.wait_idle(600)
                sampler.sample(sent)
            if done:
                break
            assoc = ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSEG")
            assert assoc.is_established
            count = per_assoc if assoc_n < 0 else min(per_assoc, args.images - sent)
            for k in range(count):
                ds = datasets[(sent + k) % len(datasets)]
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # a new image each time
                status = assoc.send_c_store(ds)
                assert "Status" in status and int(status.Status) == 0, f"C-STORE {sent + k}: {status}"
            sent += count if assoc_n >= 0 else 0
            assoc.release()
            assoc_n += 1
        ae.shutdown()
        assert node.stats["predicted"] == args.images + per_assoc and not node.stats["failed"], node.stats
    finally:
        node.stop()


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", nargs="+", choices=("predictor", "node", "all"), default=["all"])
    parser.add_argument("--rounds", type=int, default=60, help="predictor: batches per size")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--masks", action="store_true", help="predictor: return_masks=True")
    parser.add_argument("--images", type=int, default=320, help="node: C-STOREs sent")
    parser.add_argument("--every", type=int, default=5, help="rounds (node: associations) between samples")
    parser.add_argument("--tracemalloc", action="store_true", help="trace the Python heap (slower)")
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) before each sample")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")  # the node's and pynetdicom's errors
    scenarios = ("predictor", "node") if "all" in args.scenario else tuple(dict.fromkeys(args.scenario))

    import torch

    from pneumoseg.infer import Predictor

    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.model is None:
        from infer_helpers import model_dir

        args.model = model_dir("classifier")
    predictor = Predictor.from_dir(args.model, backend="torch", device="cpu", batch_size=args.batch)
    report: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="soak-memory-") as tmp:
        runs: dict[str, Callable[[Sampler], None]] = {
            "predictor": lambda s: soak_predictor(args, predictor, s),
            "node": lambda s: soak_node(args, predictor, s, Path(tmp)),
        }
        for name in scenarios:
            sampler = Sampler(args.tracemalloc, args.trim)
            tracemalloc.stop()
            start = time.perf_counter()
            runs[name](sampler)
            verdict = sampler.verdict()
            verdict["seconds"] = time.perf_counter() - start
            _print(f"{name} ({verdict['seconds']:.0f} s)", sampler, verdict)
            report[name] = {"samples": sampler.rows, "verdict": verdict}
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
