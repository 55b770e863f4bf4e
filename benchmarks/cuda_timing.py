"""Timing helpers shared by the GPU benchmarks and profiles (torch is passed in, so importing this
module needs nothing but NumPy)."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np


def median_ms(torch: Any, fn: Callable[[], Any], reps: int, warmup: int = 2) -> float:
    """Median over `reps` of one call timed with CUDA events; a call that synchronises with the host
    (a cupyx loop, a readback) is included whole, since the stop event is recorded after it returns."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return float(np.median(times))


def per_call_us(torch: Any, fn: Callable[[], Any], calls: int = 200, warmup: int = 20) -> float:
    """Microseconds per call over `calls` calls back to back with one synchronisation at the end: on
    tiny inputs, the host's cost per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def d2d_bandwidth(torch: Any, nbytes: int = 256 << 20) -> float:
    """Bytes/s of a device-to-device copy (read + write), median of 7: the denominator of a
    bandwidth floor (bytes a kernel must move / this)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = median_ms(torch, lambda: dst.copy_(src), 7, warmup=1) / 1e3
    return 2 * nbytes / seconds
