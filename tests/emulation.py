"""What the tests that run CUDA kernel source on the CPU (tests/cuda_emu/) need from the toolchain."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = Path(__file__).resolve().parent / "cuda_emu"
#: AddressSanitizer + UBSan, every UB report fatal: the emulators' index and arithmetic checks (left
#: out where the toolchain has no sanitizer runtimes)
SANITIZER_FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=undefined")


def _compiler(work: Path, kernel_source: str | None) -> tuple[str | None, str]:
    """(compiler, "") or (None, why not): see :func:`emulation_compiler`."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None or (kernel_source is not None and not (ROOT / "csrc" / kernel_source).exists()):
        return None, "needs a C++ compiler and the csrc/ sources"
    probe = work / "probe.cpp"
    probe.write_text("#include <atomic>\nint main() { int x = 0; std::atomic_ref<int>(x).fetch_add(1); return x - 1; }\n")
    if subprocess.run([cxx, "-std=c++20", str(probe), "-o", str(work / "probe")], capture_output=True).returncode:
        return None, f"{cxx} has no C++20 std::atomic_ref"
    return cxx, ""


def emulation_compiler(work: Path, kernel_source: str) -> str:
    """The C++ compiler to build an emulator with; skips the calling tests where there is none, where
    ``kernel_source`` (relative to csrc/) is absent, or where the compiler lacks C++20's
    std::atomic_ref, which cuda_emu.h's atomics are built on."""
    cxx, why_not = _compiler(work, kernel_source)
    if cxx is None:
        pytest.skip(why_not)
    return cxx


# --------------------------------------------------------------------------------------------------
# Building the emulators. Each is a sanitized C++ build of 10-15 s of CPU (the loss kernels: four, one
# per logits dtype); run when their tests' fixtures first ask, they cost the suite about a minute on
# CI's two cores. The suite itself runs on one core (one torch thread, one test at a time), so when
# the emulated tests are among those collected, conftest starts the builds right after collection,
# one at a time on the otherwise idle core; a fixture then waits for its own, and starts at once (in
# parallel) whatever has not begun. The executables and flags are the same either way.

LOSS_LOGIT_DTYPE_CODES = {"float16": 9, "bfloat16": 10, "float32": 11, "float64": 12}  # pneumoseg::DType
_BUILT_BY = {  # (test module, fixture) -> the emulators the fixture takes
    ("test_cuda_kernels_emulated", "emulator"): ("components_emu",),
    ("test_loss_kernels_emulated", "emulators"): tuple(f"loss_emu_{d}" for d in LOSS_LOGIT_DTYPE_CODES),
}


def emulator_command(cxx: str, name: str, exe: Path) -> list[str]:
    """The compile command (sanitizers included) of emulator ``name``, written to ``exe``."""
    include = [f"-I{ROOT / 'csrc'}", f"-I{EMU}"]
    if name == "components_emu":
        return [cxx, "-std=c++20", "-O1", "-g", "-pthread", "-fno-omit-frame-pointer", *SANITIZER_FLAGS, *include,
                str(EMU / "components_emu.cpp"), "-o", str(exe)]
    dtype = name.removeprefix("loss_emu_")
    # -O0: the emulation's cost is its barriers, not the arithmetic, and -O1 takes 3x longer to build
    return [cxx, "-std=c++20", "-O0", "-g1", "-pthread", "-fno-omit-frame-pointer", "-Wno-psabi", *SANITIZER_FLAGS,
            f"-DLOSS_EMU_LOGITS={LOSS_LOGIT_DTYPE_CODES[dtype]}", *include, str(EMU / "loss_emu.cpp"), "-o", str(exe)]


class _EmulatorBuilds:
    """Emulator builds of this test session, started early in the background or on demand."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._work: Path | None = None
        self._background: ThreadPoolExecutor | None = None
        self._jobs: dict[str, Future] = {}
        self._running: dict[str, tuple[subprocess.Popen, bool]] = {}  # name -> (compiler, in the background)
        self._stopped = False

    def _dir(self) -> Path:
        if self._work is None:
            self._work = Path(tempfile.mkdtemp(prefix="pneumoseg-emu-"))
        return self._work

    def _build(self, cxx: str, name: str, background: bool = False) -> tuple[Path, str]:
        """(executable, "") or (missing path, compiler errors); without sanitizers where the toolchain
        has no sanitizer runtimes, as before. A background build runs at the lowest priority, so it
        takes only CPU that no test is using."""
        exe = self._dir() / name
        command = emulator_command(cxx, name, exe)
        nice = ["nice", "-n", "19"] if background and shutil.which("nice") else []
        for attempt in (command, [c for c in command if c not in SANITIZER_FLAGS]):
            with self._lock:
                if self._stopped:
                    return exe, "the test session ended"
                # its own process group: a kill reaches cc1plus and the linker too
                proc = subprocess.Popen([*nice, *attempt], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)
                self._running[name] = (proc, background)
            _, err = proc.communicate()
            with self._lock:
                self._running.pop(name, None)
            if proc.returncode == 0:
                return exe, ""
            if proc.returncode < 0 or "sanitize" not in err:  # killed, or a real compile error
                break
        return exe, err

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def start(self, items) -> None:
        """Queue the builds that the given (collected) tests' fixtures take, one at a time in the
        background."""
        uses = {(Path(str(item.path)).stem, f) for item in items for f in getattr(item, "fixturenames", ())}
        names = list(dict.fromkeys(n for key, built in _BUILT_BY.items() if key in uses for n in built))
        if not names:
            return
        cxx, _ = _compiler(self._dir(), None)
        if cxx is None:
            return  # the fixtures skip, as they would have
        with self._lock:
            if self._background is None:
                self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emulator-build")
            for name in names:
                if name not in self._jobs:
                    self._jobs[name] = self._background.submit(self._build, cxx, name, True)

    def get(self, cxx: str, names) -> dict[str, Path]:
        """name -> executable. A finished background build is taken as it is; the rest are built now,
        in parallel and at normal priority (one still running in the background is stopped and begun
        again: at the lowest priority it could wait behind other work indefinitely). A failed build
        fails the calling fixture with the compiler's errors."""
        now, stopped = [], []
        with self._lock:
            for name in names:
                job = self._jobs.get(name)
                if job is None or job.cancel():
                    now.append(name)
                elif name in self._running and self._running[name][1]:
                    self._kill(self._running[name][0])
                    stopped.append(job)
                    now.append(name)
        for job in stopped:  # its compiler is gone before the new one writes the same file
            job.result()
        if now:
            pool = ThreadPoolExecutor(max_workers=len(now))
            with self._lock:
                for name in now:
                    self._jobs[name] = pool.submit(self._build, cxx, name)
            pool.shutdown(wait=False)
        built = {name: self._jobs[name].result() for name in names}
        for exe, err in built.values():
            assert not err, err[-4000:]
        return {name: exe for name, (exe, _) in built.items()}

    def stop(self) -> None:
        """End of the session: no new builds, kill the running ones, remove the executables."""
        with self._lock:
            self._stopped = True
            for proc, _ in self._running.values():
                self._kill(proc)
            background, self._background = self._background, None
        if background is not None:
            background.shutdown(wait=True, cancel_futures=True)
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)


EMULATOR_BUILDS = _EmulatorBuilds()
