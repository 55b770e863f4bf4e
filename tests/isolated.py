"""Running a snippet of Python in its own process, for hostile-input tests where a crash is possible
(a segfault must fail one test, not kill the run) or where memory is the point (an address-space limit
set inside the child, above what it uses once its inputs exist)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

PRELUDE = '''
import os, resource, sys

def vm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")

def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")

def limit_memory(extra_mib):
    """Cap the address space at what the process maps now plus extra_mib."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm_bytes() + extra_mib * 2**20
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
'''


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return f"exit code {self.returncode}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


def _default_sigint() -> None:
    # The child starts as a command typed at a terminal does. pytest started in the background by a
    # non-interactive shell (`pytest &`) ignores SIGINT, children inherit that, and Python then installs
    # no KeyboardInterrupt handler: the Ctrl-C tests' signal was silently dropped.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_isolated(code: str, *, env: Optional[dict[str, str]] = None, timeout: float = 120,
                 cwd: Optional[Path] = None) -> Result:
    """Run PRELUDE + ``code`` with this interpreter in a fresh process; its environment is this one's
    plus ``env`` (so the child finds the same pneumoseg)."""
    full_env = dict(os.environ)
    # Threads cost address space (stacks, malloc arenas); keep the children's small and predictable.
    full_env.update({"OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"})
    full_env.update(env or {})
    program = PRELUDE + "\n" + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", program], env=full_env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, preexec_fn=_default_sigint)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def release_fifo(fifo: Path) -> None:
    """Open and close the pipe's writing end, so a reader stuck waiting for a writer (the bug) ends."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: no reader is waiting
        pass


def call_with_fifo_limit(fn, fifo: Path, limit: float = 30.0, *, why: str = "a pipe without a writer"):
    """fn() in a thread: (returned value or None, raised exception or None); a call still waiting
    after ``limit`` seconds fails the test, and the pipe is released so the thread ends."""
    import threading

    import pytest

    result: dict = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        release_fifo(fifo)
        thread.join(5)
        pytest.fail(f"reading {fifo} was still waiting after {limit:g} s ({why})")
    return result.get("value"), result.get("error")
