"""onnxruntime sessions set for latency, shared by the export checks and the onnxruntime backend."""

from __future__ import annotations

import os
from typing import Any, Optional

from .. import _onnxruntime
from .._checks import check_int
from .._optional import import_optional

__all__ = ["physical_cores", "session_options", "import_onnxruntime"]

MAX_THREADS = 1024


def physical_cores() -> int:
    """Physical CPU cores this process may use (hyper-threads counted once), for latency-bound
    thread pools: two threads on one core's siblings only slow each other down."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        allowed = set(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    try:
        physical = core = None
        processor = None
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    processor = int(value)
                elif key == "physical id":
                    physical = value
                elif key == "core id":
                    core = value
                elif not key and processor is not None:
                    if processor in allowed:
                        cores.add((str(physical), str(core) if core is not None else str(processor)))
                    physical = core = processor = None
        if processor is not None and processor in allowed:
            cores.add((str(physical), str(core) if core is not None else str(processor)))
    except (OSError, ValueError):
        cores = set()
    return max(1, min(len(cores) or len(allowed), len(allowed)))


def import_onnxruntime() -> Any:
    """onnxruntime, with its telemetry off unless the user opted in (see :mod:`pneumoseg._onnxruntime`);
    an InvalidInputError saying whether it is missing or installed but failing to load."""
    return import_optional("onnxruntime", needed_for="backend='onnxruntime'", install="pip install 'pneumoseg[onnx]'",
                           load=_onnxruntime.import_onnxruntime)


def session_options(threads: Optional[int] = None) -> Any:
    """onnxruntime session options for latency: intra-op threads = physical cores (or ``threads``),
    one inter-op thread, sequential execution, every graph optimisation."""
    ort = import_onnxruntime()
    if threads is not None:
        # onnxruntime took -3 as given, "4" as a TypeError, and 10**6 by allocating 20 GB of thread pool
        threads = check_int(threads, "threads", low=0, high=MAX_THREADS)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise
    # Idle pool threads would otherwise spin for a while after each run, on the cores the pipeline's
    # torch pre- and post-processing needs next (measured: 10x slower preprocessing on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options
