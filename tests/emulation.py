"""What the tests that run CUDA kernel source on the CPU (tests/cuda_emu/) need from the toolchain."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = Path(__file__).resolve().parent / "cuda_emu"
#: AddressSanitizer + UBSan, every UB report fatal: the emulators' index and arithmetic checks (left
#: out where the toolchain has no sanitizer runtimes)
SANITIZER_FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=undefined")


def emulation_compiler(work: Path, kernel_source: str) -> str:
    """The C++ compiler to build an emulator with; skips the calling tests where there is none, where
    ``kernel_source`` (relative to csrc/) is absent, or where the compiler lacks C++20's
    std::atomic_ref, which cuda_emu.h's atomics are built on."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None or not (ROOT / "csrc" / kernel_source).exists():
        pytest.skip("needs a C++ compiler and the csrc/ sources")
    probe = work / "probe.cpp"
    probe.write_text("#include <atomic>\nint main() { int x = 0; std::atomic_ref<int>(x).fetch_add(1); return x - 1; }\n")
    if subprocess.run([cxx, "-std=c++20", str(probe), "-o", str(work / "probe")], capture_output=True).returncode:
        pytest.skip(f"{cxx} has no C++20 std::atomic_ref")
    return cxx
