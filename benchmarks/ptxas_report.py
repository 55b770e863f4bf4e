#!/usr/bin/env python3
"""Registers, spills and shared memory of every CUDA kernel, read from ptxas at build time: no GPU needed.

    python benchmarks/ptxas_report.py                      # build csrc/*.cu for sm_90 into a temp dir
    python benchmarks/ptxas_report.py --arch "80;90" --all # every template instance, two arches
    python benchmarks/ptxas_report.py --log build.log      # tabulate an existing -Xptxas -v log
    python benchmarks/ptxas_report.py --save-log ptxas.log # keep the raw build output too

It configures the project with ``-DPNEUMOSEG_PTXAS_VERBOSE=ON`` (``-Xptxas -v``) in a scratch build
directory (never the repo's ``build/``), compiles only the CUDA objects, and prints one row per kernel
(the worst template instance unless ``--all``): registers per thread, spill stores/loads, stack and
static shared memory, the launch bound the compiler saw (``.maxntid`` in the kept PTX) and the largest
block those registers allow on one SM (64K registers, allocated per warp in units of 256). A kernel whose
launch bound exceeds that figure, or which has no bound, is the kind that fails with "too many resources
requested for launch" at run time. Exit status 1 if any kernel spills or cannot launch at its bound.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REGISTERS_PER_SM = 65536  # also the per-block limit on sm_80..sm_90
REGISTER_ALLOCATION_UNIT = 256  # registers are granted per warp in these units
MAX_THREADS_PER_BLOCK = 1024

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_PTX_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\((.*?)\)\s*((?:\.\w+[^{]*?)*)\{", re.S)
_MAXNTID = re.compile(r"\.maxntid\s+(\d+)\s*,\s*(\d+)\s*,\s*(\d+)")


@dataclass
class Kernel:
    mangled: str
    arch: str
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    max_threads: int | None = None  # from __launch_bounds__, None when the kernel has none
    name: str = ""
    instances: int = 1

    @property
    def base(self) -> str:
        return re.sub(r"[<(].*", "", self.name).split("::")[-1]

    @property
    def threads_registers_allow(self) -> int:
        per_warp = -(-max(self.registers, 1) * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
        return min(MAX_THREADS_PER_BLOCK, REGISTERS_PER_SM // per_warp * 32)

    @property
    def problems(self) -> list[str]:
        out = []
        if self.spill_stores or self.spill_loads:
            out.append("spills")
        if self.max_threads is not None and self.max_threads > self.threads_registers_allow:
            out.append("cannot launch at its bound")
        return out


def parse_ptxas_log(text: str) -> list[Kernel]:
    """Kernels (entry functions only, not out-of-line device functions) from `-Xptxas -v` output."""
    kernels: dict[tuple[str, str], Kernel] = {}
    current: Kernel | None = None
    arch_of_entry: dict[str, str] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _ENTRY.search(line)
        if m:
            arch_of_entry[m.group(1)] = m.group(2)
            continue
        m = _PROPS.search(line)
        if m:
            name = m.group(1)
            current = None
            if name in arch_of_entry:
                current = Kernel(mangled=name, arch=arch_of_entry[name])
                kernels[(name, current.arch)] = current
            continue
        if current is None:
            continue
        m = _STACK.search(line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
            continue
        m = _USED.search(line)
        if m:
            current.registers = int(m.group(1))
            s = _SMEM.search(line)
            current.smem = int(s.group(1)) if s else 0
            current = None
    return list(kernels.values())


def parse_ptx_launch_bounds(ptx_dir: Path) -> dict[str, int]:
    """Mangled kernel name -> threads per block from `.maxntid` in the kept PTX files."""
    bounds: dict[str, int] = {}
    for ptx in ptx_dir.rglob("*.ptx"):
        for m in _PTX_ENTRY.finditer(ptx.read_text(errors="replace")):
            directives = m.group(3)
            nt = _MAXNTID.search(directives)
            if nt:
                x, y, z = map(int, nt.groups())
                bounds[m.group(1)] = x * y * z
    return bounds


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False).stdout.splitlines()
    if len(out) != len(names):
        return {n: n for n in names}
    pretty = {}
    for n, d in zip(names, out):
        d = re.sub(r"\(anonymous namespace\)::|pneumoseg::(\w+::)?", "", d)
        pretty[n] = re.sub(r"^void ", "", d.split("(")[0]) if "(" in d else d
    return pretty


def build(source: Path, build_dir: Path, arch: str, jobs: int) -> str:
    """Configure + compile the CUDA objects with -Xptxas -v; returns the build output."""
    import pybind11  # the build needs it anyway; its CMake config dir saves a lookup

    ptx_dir = build_dir / "ptx"
    ptx_dir.mkdir(parents=True, exist_ok=True)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [
        "cmake", "-S", str(source), "-B", str(build_dir), *generator,
        "-DPNEUMOSEG_CUDA=ON", "-DPNEUMOSEG_PTXAS_VERBOSE=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
        f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        # --keep leaves the PTX beside the build, where the launch bounds (.maxntid) can be read.
        f"-DCMAKE_CUDA_FLAGS=--keep --keep-dir={ptx_dir}",
    ]
    done = subprocess.run(configure, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"cmake configure failed:\n{done.stdout}\n{done.stderr}")
    targets: list[str] = []
    if generator:
        listing = subprocess.run(["ninja", "-C", str(build_dir), "-t", "targets", "all"], capture_output=True, text=True).stdout
        targets = [line.split(":")[0] for line in listing.splitlines() if line.split(":")[0].endswith(".cu.o")]
    cmd = ["cmake", "--build", str(build_dir), "-j", str(jobs)]
    if targets:  # only the CUDA objects: the C++ half has nothing to report and takes as long
        cmd += ["--target", *targets]
    done = subprocess.run(cmd, capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode:
        sys.exit(f"build failed:\n{log[-8000:]}")
    return log


def merge_instances(kernels: list[Kernel]) -> list[Kernel]:
    """One row per kernel name and arch: the template instance with the most registers, the largest
    spills, the smallest launch bound."""
    rows: dict[tuple[str, str], Kernel] = {}
    for k in kernels:
        key = (k.base, k.arch)
        if key not in rows:
            rows[key] = Kernel(**{**k.__dict__, "name": k.base})
            continue
        r = rows[key]
        r.instances += 1
        r.registers = max(r.registers, k.registers)
        r.spill_stores, r.spill_loads = max(r.spill_stores, k.spill_stores), max(r.spill_loads, k.spill_loads)
        r.stack, r.smem = max(r.stack, k.stack), max(r.smem, k.smem)
        # An instance without a bound makes the kernel unbounded; otherwise the tightest bound counts.
        r.max_threads = None if None in (r.max_threads, k.max_threads) else min(r.max_threads, k.max_threads)
    return sorted(rows.values(), key=lambda k: (k.arch, k.name))


def table(kernels: list[Kernel], bounds_known: bool) -> str:
    header = ["kernel", "arch", "inst", "regs", "spill st/ld B", "stack B", "smem B", "launch bound", "regs allow", "note"]
    rows = []
    for k in kernels:
        bound = "-" if not bounds_known else ("none" if k.max_threads is None else str(k.max_threads))
        note = ", ".join(k.problems)
        if not note and bounds_known and k.max_threads is None:
            note = "no __launch_bounds__"
            if k.threads_registers_allow < MAX_THREADS_PER_BLOCK:
                note += f": a launch above {k.threads_registers_allow} threads fails"
        name = k.name if len(k.name) <= 72 else k.name[:69] + "..."  # CUB's instances run to hundreds
        rows.append([name, k.arch, str(k.instances), str(k.registers), f"{k.spill_stores}/{k.spill_loads}",
                     str(k.stack), str(k.smem), bound, str(k.threads_registers_allow), note])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=ROOT, help="project root to build (default: this checkout)")
    parser.add_argument("--arch", default="90", help="CMAKE_CUDA_ARCHITECTURES (default 90)")
    parser.add_argument("--build-dir", type=Path, help="scratch build directory (default: a temp dir, removed)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--log", type=Path, help="read this -Xptxas -v build log instead of building")
    parser.add_argument("--all", action="store_true", help="one row per template instance")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--save-log", type=Path, help="also write the raw build output (with the ptxas lines) here")
    args = parser.parse_args()

    bounds: dict[str, int] = {}
    if args.log:
        log = args.log.read_text(errors="replace")
    else:
        if not (shutil.which("nvcc") or os.environ.get("CUDACXX")):
            sys.exit("nvcc not found: the CUDA toolkit is needed to compile the kernels (no GPU is)")
        if args.build_dir and args.build_dir.resolve().is_relative_to((args.source / "build").resolve()):
            sys.exit("use a scratch --build-dir outside the project's build/ folder")
        tmp = None if args.build_dir else tempfile.mkdtemp(prefix="pneumoseg-ptxas-")
        build_dir = args.build_dir or Path(tmp)
        try:
            log = build(args.source.resolve(), build_dir.resolve(), args.arch, args.jobs)
            if args.save_log:
                args.save_log.write_text(log)
            bounds = parse_ptx_launch_bounds(build_dir / "ptx")
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
    kernels = parse_ptxas_log(log)
    if not kernels:
        sys.exit("no ptxas resource lines found (was the build made with PNEUMOSEG_PTXAS_VERBOSE=ON, or was it up to date?)")
    names = demangle([k.mangled for k in kernels])
    for k in kernels:
        k.name = names[k.mangled]
        k.max_threads = bounds.get(k.mangled)
    bounds_known = not args.log
    rows = sorted(kernels, key=lambda k: (k.arch, k.name)) if args.all else merge_instances(kernels)
    print(table(rows, bounds_known))
    if args.json:
        args.json.write_text(json.dumps([{**r.__dict__,
                                          "threads_registers_allow": r.threads_registers_allow,
                                          "problems": r.problems} for r in rows], indent=2) + "\n")
    bad = [r for r in rows if r.problems]
    for r in bad:
        print(f"PROBLEM: {r.name} ({r.arch}): {', '.join(r.problems)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
