"""What the CPU host-path profilers (``cpu_profile_loss.py``, ``cpu_profile_postprocess.py``,
``cpu_profile_predictor.py``) share: their common options, thread-CPU-time rounds taken in turn, a
cProfile of one call, and a source file as it was at a git revision (their ``--baseline``).

Thread CPU time, because on a shared machine other processes then add little (waiting for a core
does not count); the functions take turns round by round, so a load change hits each alike.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]


def options(doc: Optional[str], *, calls: int, rounds: int, baseline_help: str,
            calls_help: Optional[str] = None, json_help: str = "also write the figures (us per call) here",
            ) -> argparse.ArgumentParser:
    """A parser with the options every profiler takes: --calls, --rounds, --json and --baseline REV."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=calls, help=calls_help)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--json", help=json_help)
    parser.add_argument("--baseline", metavar="REV", help=baseline_help)
    return parser


def write_json(path: Optional[str], figures: Any) -> None:
    """``--json``: the figures written to ``path``, when one was given."""
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=1)


def mean_us(fn: Callable[[], object], calls: int) -> float:
    """Mean microseconds of this thread's CPU time per call over ``calls`` calls back to back."""
    t0 = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - t0) / calls * 1e6


def rounds_us(fns: list[Callable[[], object]], calls: int, rounds: int, warmup: int = 20) -> list[list[float]]:
    """Microseconds per call of each function in each round, the functions taking turns round by round."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, round_times in zip(fns, times):
            round_times.append(mean_us(fn, calls))
    return times


def profile_text(fn: Callable[[], object], calls: int, *, warmup: int = 50, top: int = 25) -> str:
    """cProfile of ``calls`` calls of ``fn`` after ``warmup`` unprofiled ones: the ``top`` functions by
    their own time."""
    for _ in range(warmup):
        fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def source_at(rev: str, path: str) -> str:
    """The text of ``path`` (relative to the repository root) at git revision ``rev``."""
    return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout
