#!/usr/bin/env python3
"""SASS instructions per pixel in the combo loss's CUDA hot loops, counted statically: no GPU needed.

    python benchmarks/sass_loss_report.py                          # float32 + bfloat16 logits, sm_90
    python benchmarks/sass_loss_report.py --dtypes float32,bfloat16,float16 --modes 0,1,2
    python benchmarks/sass_loss_report.py --source /tmp/old-checkout --json before.json
    python benchmarks/sass_loss_report.py --compare before.json    # after/before table

It compiles csrc/loss/combo_loss_cuda_<dtype>.cu to a cubin (nvcc -cubin, the flags CMakeLists.txt
gives CUDA sources), disassembles it with nvdisasm and, for each selected forward_partials_kernel /
backward_kernel instance (vectorised, targets of the logits' dtype unless --target), finds its
hot loop: of the loops (backward branches), the one loading the most bytes per iteration, i.e. the
two-vectors-per-thread grid-stride loop rather than its tail or its 64-bit-index fallback.
Pixels per iteration come from the loop's global loads (bytes loaded / bytes of one logit + one
target), so the figures stay right whatever the vector width. Per pixel it reports:

- instr: instructions on the fast path (the loop minus the blocks that call a slow-path routine,
  i.e. what a pixel costs when no division or reciprocal needs its IEEE fix-up);
- mufu: MUFU instructions (EX2, RCP, LG2, ...: 16 lanes per SM per clock on sm_80-sm_90, against
  128 for FP32);
- cost: instr + 7 * mufu, a MUFU counted at 8 issue slots (its 1/8 rate);
- slow br: slow-path branches in the loop (an FCHK, or a range test, guarding a CALL); fchk: FCHKs;
  f64: double-precision instructions; cvt: F2I/I2F/F2F/FRND conversions; int: integer and address
  instructions (IMAD, IADD3, LEA, SHF, LOP3, ISETP, ...);
- outside loops: the kernel's static instructions outside every loop (setup and block reduction),
  paid once per thread, i.e. spread over the ~60 pixels a thread handles at 16x1x1024^2 on an H200.
With --opcodes it also lists each loop's opcodes per pixel.

Static counts on one architecture are a proxy, not a timing: they are what the SM must issue per
pixel when the loop is compute bound, as the equal float32 and bfloat16 timings in
benchmarks/results/loss_gpu.json showed it was before this report existed.
Exits 0 with only a note when nvcc or nvdisasm is missing (``pip download
nvidia-cuda-nvdisasm==13.*`` and unpack the wheel, or pass --nvdisasm).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRANSLATION_UNITS = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}
CPP_TYPES = {"float32": "float", "float64": "double", "bfloat16": "pneumoseg::BFloat16Raw",
             "float16": "pneumoseg::Half16", "uint8": "unsigned char"}
TYPE_BYTES = {"float": 4, "double": 8, "pneumoseg::BFloat16Raw": 2, "pneumoseg::Half16": 2, "unsigned char": 1}
MODE_NAMES = {0: "kNoFocal", 1: "kFocalSquare", 2: "kFocalPow"}
# The flags CMakeLists.txt gives every CUDA source (Release), so the SASS is the extension's.
NVCC_FLAGS = ["-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-std=c++17", "-DPNEUMOSEG_WITH_CUDA=1"]

_FUNC = re.compile(r"^\.text\.(\S+):\s*$")
_LABEL = re.compile(r"^(\.L_\w+|\$\S+):\s*$")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
_TARGET = re.compile(r"`\(([^)]+)\)")
_LOAD_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
_KERNEL = re.compile(r"(forward_partials_kernel|backward_kernel)<(.+), (.+), (\d), (true|false)>")


@dataclass
class Instr:
    addr: int
    pred: str
    op: str
    operands: str


@dataclass
class LoopCounts:
    kernel: str
    logits: str
    target: str
    mode: int
    vectorised: bool
    pixels_per_iteration: int = 0
    loop_instructions: int = 0  # static, slow-path blocks included
    outside_loops: int = 0  # static, the kernel body outside every loop: per-thread setup and epilogue
    fast_instructions: int = 0
    slow_path_instructions: int = 0
    slow_path_branches: int = 0
    fchk: int = 0
    mufu: dict[str, int] = field(default_factory=dict)
    f64: int = 0
    conversions: int = 0
    integer: int = 0
    per_pixel: dict[str, float] = field(default_factory=dict)
    opcodes: dict[str, int] = field(default_factory=dict)  # fast-path count per opcode (no modifiers)

    @property
    def key(self) -> str:
        return f"{self.kernel}<{self.logits},{self.target},{MODE_NAMES.get(self.mode, self.mode)}>"


def find_nvdisasm(explicit: str | None) -> str | None:
    """nvdisasm from --nvdisasm, $NVDISASM, PATH, the CUDA toolkit or a pip-installed nvidia-cuda-nvdisasm."""
    candidates = [explicit, os.environ.get("NVDISASM"), shutil.which("nvdisasm")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent / "nvdisasm"))
    site = sysconfig.get_paths().get("purelib", "")
    candidates += sorted(glob.glob(os.path.join(site, "nvidia", "*", "bin", "nvdisasm")))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def compile_cubin(source: Path, dtype: str, arch: str, out_dir: Path) -> Path:
    tu = source / "csrc" / "loss" / f"combo_loss_cuda_{TRANSLATION_UNITS[dtype]}.cu"
    out = out_dir / f"{tu.stem}_{arch}.cubin"
    cmd = ["nvcc", "-cubin", f"-arch={arch}", *NVCC_FLAGS, f"-I{source / 'csrc'}", str(tu), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"nvcc failed on {tu}:\n{done.stderr[-6000:]}")
    return out


def split_functions(sass: str) -> dict[str, list[str]]:
    """Mangled kernel name -> its lines (its own slow-path subroutines included) from `nvdisasm -c`."""
    funcs: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in sass.splitlines():
        m = _FUNC.match(line.strip())
        if m:
            current = funcs.setdefault(m.group(1), [])
            continue
        if current is not None:
            current.append(line)
    return funcs


def parse(lines: list[str]) -> tuple[list[Instr], dict[str, int]]:
    """Instructions, and each label's address (the next instruction's)."""
    instrs: list[Instr] = []
    pending: list[str] = []
    labels: dict[str, int] = {}
    for line in lines:
        m = _LABEL.match(line.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            instrs.append(Instr(addr, (m.group(2) or "").strip(), m.group(3), m.group(4)))
    return instrs, labels


def loops(instrs: list[Instr], labels: dict[str, int]) -> list[tuple[int, int]]:
    """(first, last) addresses of each loop: a branch back to an address at or before it."""
    spans = []
    for ins in instrs:
        if ins.op.startswith("BRA"):
            t = _TARGET.search(ins.operands)
            if t and t.group(1) in labels and labels[t.group(1)] <= ins.addr:
                spans.append((labels[t.group(1)], ins.addr))
    return spans


def hot_loop(instrs: list[Instr], spans: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The loop that loads the most bytes per iteration (the two-vector one; a 64-bit-index
    fallback or a tail loop loads less), the larger one on a tie."""
    def key(span):
        return (sum(load_bytes(i) for i in instrs if span[0] <= i.addr <= span[1]), span[1] - span[0])
    return max(spans, key=key) if spans else None


def cold_addresses(body: list[Instr], labels: dict[str, int]) -> tuple[set[int], int]:
    """Addresses of the basic blocks that call a slow-path routine, and how many such blocks."""
    starts = set(labels.values())
    blocks: list[list[Instr]] = []
    for ins in body:
        if not blocks or ins.addr in starts:
            blocks.append([])
        blocks[-1].append(ins)
        if ins.op.startswith(("BRA", "CALL", "EXIT", "RET")):
            blocks.append([])
    cold: set[int] = set()
    count = 0
    for b in blocks:
        if any(i.op.startswith("CALL") for i in b):
            cold.update(i.addr for i in b)
            count += 1
    return cold, count


def load_bytes(ins: Instr) -> int:
    if not ins.op.startswith("LDG"):
        return 0
    for part in ins.op.split(".")[1:]:
        if part in _LOAD_BYTES:
            return _LOAD_BYTES[part]
    return 4


def is_f64(ins: Instr) -> bool:
    return ins.op.split(".")[0] in {"DADD", "DMUL", "DFMA", "DSETP", "DMNMX", "DSET"} or ".F64" in ins.op


def is_conversion(ins: Instr) -> bool:
    return ins.op.split(".")[0] in {"F2I", "I2F", "F2F", "FRND"}


def is_integer(ins: Instr) -> bool:
    return ins.op.split(".")[0] in {"IMAD", "IADD3", "LEA", "SHF", "LOP3", "ISETP", "IMNMX", "PRMT", "SEL",
                                    "MOV", "IABS", "POPC", "FLO", "BREV", "LEA.HI", "IDP", "VIADD", "VIMNMX"}


def count_loop(lines: list[str], info: LoopCounts) -> LoopCounts | None:
    instrs, labels = parse(lines)
    spans = loops(instrs, labels)
    span = hot_loop(instrs, spans)
    if span is None:
        return None
    # The kernel's own body ends where its first slow-path subroutine starts.
    own = [i for i in instrs if not any(name.startswith("$") and labels[name] <= i.addr for name in labels)]
    cold_all, _ = cold_addresses(own, labels)
    info.outside_loops = sum(1 for i in own if i.addr not in cold_all and not any(a <= i.addr <= b for a, b in spans))
    body = [i for i in instrs if span[0] <= i.addr <= span[1]]
    cold, info.slow_path_branches = cold_addresses(body, labels)
    hot = [i for i in body if i.addr not in cold]
    px_bytes = TYPE_BYTES[info.logits] + TYPE_BYTES[info.target]
    loaded = sum(load_bytes(i) for i in body)
    if loaded == 0 or loaded % px_bytes:
        raise RuntimeError(f"{info.key}: {loaded} bytes loaded per iteration, not a whole number of pixels")
    info.pixels_per_iteration = loaded // px_bytes
    info.loop_instructions = len(body)
    info.fast_instructions = len(hot)
    info.slow_path_instructions = len(body) - len(hot)
    info.fchk = sum(i.op.startswith("FCHK") for i in hot)
    for i in hot:
        if i.op.startswith("MUFU"):
            sub = i.op.split(".")[1] if "." in i.op else "?"
            info.mufu[sub] = info.mufu.get(sub, 0) + 1
    for i in hot:
        base = i.op.split(".")[0]
        info.opcodes[base] = info.opcodes.get(base, 0) + 1
    info.f64 = sum(is_f64(i) for i in hot)
    info.conversions = sum(is_conversion(i) for i in hot)
    info.integer = sum(is_integer(i) for i in hot)
    n = info.pixels_per_iteration
    mufu = sum(info.mufu.values())
    info.per_pixel = {
        "instr": len(hot) / n,
        "mufu": mufu / n,
        "cost": (len(hot) + 7 * mufu) / n,
        "int": info.integer / n,
        "cvt": info.conversions / n,
        "f64": info.f64 / n,
    }
    return info


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return {}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    return dict(zip(names, out.splitlines()))


def analyse(sass: str, logits: str, target: str | None, modes: set[int]) -> list[LoopCounts]:
    funcs = split_functions(sass)
    pretty = demangle(list(funcs))
    rows = []
    for mangled, lines in funcs.items():
        m = _KERNEL.search(pretty.get(mangled, ""))
        if not m:
            continue
        kernel, lt, tt, mode, vec = m.group(1), m.group(2), m.group(3), int(m.group(4)), m.group(5) == "true"
        if lt != CPP_TYPES[logits] or tt != CPP_TYPES[target or logits] or mode not in modes or not vec:
            continue
        counted = count_loop(lines, LoopCounts(kernel, lt, tt, mode, vec))
        if counted:
            rows.append(counted)
    return sorted(rows, key=lambda r: (r.logits, r.mode, r.kernel))


def table(rows: list[LoopCounts], before: dict[str, dict] | None) -> str:
    header = ["kernel", "px/iter", "instr/px", "mufu/px", "cost/px", "int/px", "cvt/px", "f64/px", "slow br", "fchk",
              "outside loops"]
    if before:
        header[2:2] = ["before"]
        header[4:4] = ["before mufu"]
    out = []
    for r in rows:
        p = r.per_pixel
        line = [r.key, str(r.pixels_per_iteration), f"{p['instr']:.1f}", f"{p['mufu']:.2f}", f"{p['cost']:.1f}",
                f"{p['int']:.1f}", f"{p['cvt']:.2f}", f"{p['f64']:.2f}", str(r.slow_path_branches), str(r.fchk),
                str(r.outside_loops)]
        if before:
            b = before.get(r.key, {}).get("per_pixel")
            line[2:2] = [f"{b['instr']:.1f}" if b else "-"]
            line[4:4] = [f"{b['mufu']:.2f}" if b else "-"]
        out.append(line)
    widths = [max(len(x[i]) for x in [header] + out) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(x) for x in out])


def totals(rows: list[LoopCounts]) -> str:
    """Forward + backward per pixel for each (logits, mode): the figure issue 11's estimate used."""
    sums: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        s = sums.setdefault((r.logits, r.mode), [0.0, 0.0, 0.0])
        s[0] += r.per_pixel["instr"]
        s[1] += r.per_pixel["mufu"]
        s[2] += r.per_pixel["cost"]
    return "\n".join(f"forward+backward {lt}, {MODE_NAMES.get(m, m)}: {i:.1f} instr/px, {u:.2f} MUFU/px, "
                     f"cost {c:.1f}/px" for (lt, m), (i, u, c) in sorted(sums.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=ROOT, help="project root whose csrc/ to compile")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="logits dtypes (comma separated)")
    parser.add_argument("--target", choices=sorted(CPP_TYPES), help="target dtype (default: the logits')")
    parser.add_argument("--modes", default="0,1", help="focal modes: 0 none, 1 gamma 2, 2 any gamma")
    parser.add_argument("--nvdisasm", help="path to nvdisasm")
    parser.add_argument("--keep", type=Path, help="keep the cubins and SASS in this folder")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--compare", type=Path, help="a --json file from another revision: show its figures too")
    parser.add_argument("--opcodes", action="store_true", help="also list each loop's opcodes per pixel")
    args = parser.parse_args()

    nvdisasm = find_nvdisasm(args.nvdisasm)
    if not shutil.which("nvcc") or not nvdisasm:
        print("sass_loss_report: needs nvcc and nvdisasm (pip download nvidia-cuda-nvdisasm==13.*); skipped")
        return 0
    modes = {int(m) for m in args.modes.split(",")}
    work = args.keep or Path(tempfile.mkdtemp(prefix="pneumoseg-sass-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[LoopCounts] = []
    try:
        for dtype in args.dtypes.split(","):
            cubin = compile_cubin(args.source.resolve(), dtype, args.arch, work)
            sass = subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
            if args.keep:
                cubin.with_suffix(".sass").write_text(sass)
            rows += analyse(sass, dtype, args.target, modes)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    before = None
    if args.compare:
        before = {r["key"]: r for r in json.loads(args.compare.read_text())}
    print(table(rows, before))
    print(totals(rows))
    if args.opcodes:
        for r in rows:
            ops = sorted(r.opcodes.items(), key=lambda kv: -kv[1])
            print(f"{r.key}: " + ", ".join(f"{op} {n / r.pixels_per_iteration:.2f}" for op, n in ops))
    if args.json:
        args.json.write_text(json.dumps([{**asdict(r), "key": r.key} for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
