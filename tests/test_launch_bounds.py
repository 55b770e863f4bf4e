"""Every CUDA kernel in csrc/ declares ``__launch_bounds__`` matching the block size it is launched with.

Without a bound, ptxas may give a kernel more registers than its block size allows, and the launch then
fails at run time ("too many resources requested for launch"), which only a GPU shows. With a bound
equal to the launch's block size, such a kernel fails to compile instead (or spills, which
``benchmarks/ptxas_report.py`` shows). This test reads the sources; it needs neither nvcc nor a GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CUDA_SUFFIXES = (".cu", ".cuh")
HEADER_SUFFIXES = (".h", ".hpp", ".cuh")
_IDENT = re.compile(r"[A-Za-z_]\w*")


@dataclass
class KernelDecl:
    file: str
    name: str
    line: int
    bound: str | None  # first argument of __launch_bounds__ (max threads per block), normalised
    template_params: set[str] = field(default_factory=set)


@dataclass
class Launch:
    file: str
    name: str
    line: int
    block: str  # the second <<<...>>> argument, normalised
    offset: int = 0  # where in the file, to find the block variable's declaration before it


def strip_comments_and_strings(text: str) -> str:
    """Comments and string/char literals replaced by spaces; newlines kept so line numbers still hold."""
    pattern = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S)
    return pattern.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def normalise(expr: str) -> str:
    return re.sub(r"\s+", "", expr)


def _matching(text: str, start: int, open_: str, close: str) -> int:
    """Index of the bracket closing the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {open_}{close} at offset {start}")


def _split_top_level(args: str) -> list[str]:
    parts, depth, current = [], 0, []
    for c in args:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    parts.append("".join(current))
    return [p.strip() for p in parts]


def _matching_open_angle(text: str, close: int) -> int:
    """Index of the '<' that balances the '>' at ``close``, walking back; -1 if there is none."""
    depth = 0
    for i in range(close, -1, -1):
        if text[i] == ">":
            depth += 1
        elif text[i] == "<":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _template_params_before(text: str, pos: int) -> set[str]:
    """Names of the template parameters of a `template <...>` that ends right before ``pos``."""
    head = text[:pos].rstrip()
    if not head.endswith(">"):
        return set()
    i = _matching_open_angle(head, len(head) - 1)
    if not head[:i].rstrip().endswith("template"):
        return set()
    names = set()
    for param in _split_top_level(head[i + 1 : -1]):
        param = param.split("=")[0].strip()
        words = _IDENT.findall(param)
        if words:
            names.add(words[-1])
    return names


def find_kernels(text: str, file: str) -> list[KernelDecl]:
    """Every `__global__` function declaration: its name and its `__launch_bounds__`, which may stand
    before `__global__` or between it and the name."""
    kernels = []
    for m in re.finditer(r"\b__global__\b", text):
        # The declaration starts after the previous statement, block or template header.
        start = max(text.rfind(";", 0, m.start()), text.rfind("}", 0, m.start()), text.rfind("{", 0, m.start())) + 1
        prefix = text[start : m.start()]
        bound = None
        bm = re.search(r"__launch_bounds__\s*\(", prefix)
        if bm:
            close = _matching(prefix, bm.end() - 1, "(", ")")
            bound = prefix[bm.end() : close]
        i, last_ident = m.end(), None
        while i < len(text):
            if text.startswith("__launch_bounds__", i):
                open_ = text.index("(", i)
                close = _matching(text, open_, "(", ")")
                bound = text[open_ + 1 : close]
                i = close + 1
            elif text[i] == "(":
                break
            elif text[i] == "<":
                i = _matching(text, i, "<", ">") + 1
            elif text[i].isalpha() or text[i] == "_":
                ident = _IDENT.match(text, i)
                last_ident, i = ident.group(0), ident.end()
            else:
                i += 1
        if last_ident is None:
            continue
        kernels.append(KernelDecl(
            file=file, name=last_ident, line=text.count("\n", 0, m.start()) + 1,
            bound=None if bound is None else normalise(_split_top_level(bound)[0]),
            template_params=_template_params_before(text, m.start()) | _template_params_before(text, start),
        ))
    return kernels


def find_launches(text: str, file: str) -> list[Launch]:
    """Every `name<template args><<<grid, block, ...>>>` launch."""
    launches = []
    for m in re.finditer(r"<<<", text):
        j = m.start() - 1
        while j >= 0 and text[j].isspace():
            j -= 1
        if text[j] == ">":  # template arguments: walk back over the balanced <...>
            j = _matching_open_angle(text, j) - 1
            while j >= 0 and text[j].isspace():
                j -= 1
        end = j + 1
        while j >= 0 and (text[j].isalnum() or text[j] == "_"):
            j -= 1
        name = text[j + 1 : end]
        close = text.index(">>>", m.end())
        args = _split_top_level(text[m.end() : close])
        if name and len(args) >= 2:
            launches.append(Launch(file=file, name=name, line=text.count("\n", 0, m.start()) + 1,
                                   block=normalise(args[1]), offset=m.start()))
    return launches


def compile_time_constants(text: str) -> dict[str, str]:
    """Names declared `constexpr`, `#define`d or enumerated, with their expressions (normalised)."""
    consts = {}
    # `constexpr int kA = 1, kB{2};`: every declarator of the statement
    for m in re.finditer(r"\bconstexpr\s+(?:static\s+)?(?:const\s+)?[\w:<>]+\s+([^;]+);", text):
        for declarator in _split_top_level(m.group(1)):
            d = re.fullmatch(r"(\w+)\s*(?:=\s*(.+)|\{(.*)\})", declarator, re.S)
            if d:
                consts[d.group(1)] = normalise(d.group(2) if d.group(2) is not None else d.group(3))
    for m in re.finditer(r"^\s*#\s*define\s+(\w+)\s+(.+)$", text, re.M):
        consts[m.group(1)] = normalise(m.group(2))
    for m in re.finditer(r"\benum\b[^{;]*\{([^}]*)\}", text):
        for item in m.group(1).split(","):
            name = item.split("=")[0].strip()
            if name:
                consts[name] = normalise(item.split("=")[1]) if "=" in item else name
    return consts


def _evaluate(expr: str, consts: dict[str, str], depth: int = 0) -> int | None:
    """The integer value of a constant expression of literals and known constants, else None."""
    if depth > 8:
        return None
    expr = re.sub(r"(?<=\d)(?:[uU]?[lL]{0,2}|[lL]{1,2}[uU])\b", "", expr)
    expr = re.sub(r"\bstatic_cast<\w+>", "", expr)
    for name in set(_IDENT.findall(expr)):
        if name not in consts:
            return None
        value = _evaluate(consts[name], consts, depth + 1)
        if value is None:
            return None
        expr = re.sub(rf"\b{name}\b", str(value), expr)
    if not re.fullmatch(r"[\d\s+\-*/%()<>|&^~]+", expr):
        return None
    try:
        return int(eval(expr.replace("/", "//"), {"__builtins__": {}}))  # digits and operators only
    except Exception:
        return None


def _dim3_threads(args: str, consts: dict[str, str]) -> int | None:
    """Threads of a `dim3(x, y, z)` from its argument list, when each argument is a constant."""
    values = [_evaluate(a, consts) for a in _split_top_level(args)]
    if not values or None in values:
        return None
    product = 1
    for v in values:
        product *= v
    return product


def block_threads(block: str, text: str, offset: int, consts: dict[str, str]) -> tuple[int | None, str]:
    """The block size of a launch as a number when it is a compile-time constant: a constant
    expression, `dim3(...)` of constants, or a `dim3` variable declared (before the launch) from
    constants, e.g. `const dim3 tiles = ..., block(kTile, kRows);`. Also the text it was read from."""
    value = _evaluate(block, consts)
    if value is not None:
        return value, block
    m = re.fullmatch(r"dim3\((.*)\)", block)
    if m:
        return _dim3_threads(m.group(1), consts), block
    if not _IDENT.fullmatch(block):
        return None, block
    found: tuple[int | None, str] = (None, block)
    for d in re.finditer(rf"\b{block}\s*(?:=\s*dim3\s*)?([({{])", text[:offset]):
        statement_start = max(text.rfind(c, 0, d.start()) for c in ";{}") + 1
        if not re.search(r"\bdim3\b", text[statement_start : d.start()] + text[d.start() : d.end()]):
            continue
        close = _matching(text, d.end() - 1, d.group(1), ")" if d.group(1) == "(" else "}")
        args = text[d.end() : close]
        found = (_dim3_threads(args, consts), normalise(f"dim3({args})"))  # the last one before the launch wins
    return found


def _included_headers(text: str, path: Path) -> list[Path]:
    found = []
    for inc in re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, re.M):
        for base in (path.parent, CSRC):
            candidate = base / inc
            if candidate.is_file():
                found.append(candidate)
                break
    return found


def check_sources(sources: dict[str, str], headers: dict[str, str] | None = None) -> list[str]:
    """Problems found in ``sources`` (file name -> text): kernels with no bound, bounds that are not
    compile-time constants, and launches whose block size is not the kernel's bound."""
    headers = headers or {}
    problems: list[str] = []
    all_kernels: dict[str, list[KernelDecl]] = {}
    launches: list[Launch] = []
    consts_of: dict[str, dict[str, str]] = {}
    texts: dict[str, str] = {}
    for file, raw in sources.items():
        text = texts[file] = strip_comments_and_strings(raw)
        consts = {}
        for header_text in headers.get(file, []):
            consts.update(compile_time_constants(strip_comments_and_strings(header_text)))
        consts.update(compile_time_constants(text))
        consts_of[file] = consts
        for k in find_kernels(text, file):
            all_kernels.setdefault(k.name, []).append(k)
        launches.extend(find_launches(text, file))

    for name, decls in sorted(all_kernels.items()):
        bounded = [d for d in decls if d.bound is not None]
        if not bounded:
            d = decls[0]
            problems.append(f"{d.file}:{d.line}: kernel {name} has no __launch_bounds__")
            continue
        d = bounded[0]
        consts = consts_of[d.file]
        from_template = set(_IDENT.findall(d.bound)) <= d.template_params and _IDENT.findall(d.bound)
        if not from_template and _evaluate(d.bound, consts) is None:
            problems.append(f"{d.file}:{d.line}: kernel {name}'s __launch_bounds__({d.bound}) is not a compile-time "
                            "constant of that file (a constexpr, #define, enum or literal)")
            continue
        for launch in (x for x in launches if x.name == name):
            if launch.block == d.bound or launch.block in (f"dim3({d.bound})", f"dim3({d.bound},1,1)"):
                continue
            if from_template:
                continue  # the bound is a template parameter: which instance is launched is not parsed
            launch_consts = consts_of[launch.file]
            bound_value = _evaluate(d.bound, launch_consts | consts)
            block_value, block_text = block_threads(launch.block, texts[launch.file], launch.offset, launch_consts)
            if block_value is not None:
                if block_value == bound_value:
                    continue
                problems.append(f"{launch.file}:{launch.line}: {name} is launched with block size {launch.block} "
                                f"= {block_value} threads, but its __launch_bounds__ is {d.bound} = {bound_value}")
            elif not set(_IDENT.findall(d.bound)) & set(_IDENT.findall(block_text)):
                # A run-time block size is fine when it is written in terms of the bound (min(n, kThreads)).
                problems.append(f"{launch.file}:{launch.line}: {name} is launched with block size {launch.block}, "
                                f"which is neither a compile-time constant nor written in terms of its "
                                f"__launch_bounds__ ({d.bound})")
    return sorted(problems, key=lambda p: (p.split(":")[0], int(p.split(":")[1])))


def _csrc_sources() -> tuple[dict[str, str], dict[str, list[str]]]:
    sources, headers = {}, {}
    for path in sorted(CSRC.rglob("*")):
        if path.suffix in CUDA_SUFFIXES:
            rel = str(path.relative_to(CSRC.parent))
            text = path.read_text()
            sources[rel] = text
            headers[rel] = [h.read_text() for h in _included_headers(text, path) if h.suffix in HEADER_SUFFIXES]
    return sources, headers


def test_every_cuda_kernel_has_launch_bounds_matching_its_launches():
    sources, headers = _csrc_sources()
    if not sources:
        pytest.skip("no CUDA sources under csrc/ (not a source checkout)")
    kernels = [k for f, t in sources.items() for k in find_kernels(strip_comments_and_strings(t), f)]
    assert kernels, "no __global__ kernels found in csrc/*.cu: the parser or the layout changed"
    problems = check_sources(sources, headers)
    if problems:
        pytest.fail(f"{len(problems)} CUDA kernel(s) without matching __launch_bounds__:\n  " + "\n  ".join(problems),
                    pytrace=False)


# The checker itself, on made-up sources.

GOOD = """
constexpr int kThreads = 256;
constexpr int kScanThreads = 4 * kThreads;  // 1024
template <typename T, int Mode>
__global__ void __launch_bounds__(kThreads) scale_kernel(const T* x, T* y, int64_t n) {}
__launch_bounds__(kScanThreads) __global__ void scan_kernel(int64_t* v) {}
constexpr int kTile = 32, kRows = 8;
constexpr int kTileThreads = kTile * kRows;
__global__ void __launch_bounds__(kTileThreads, 4) tile_kernel(int* v) {}
template <int Threads>
__global__ void __launch_bounds__(Threads, 2) tiled_kernel(float* v) {}
void launch(cudaStream_t s) {
  scale_kernel<float, decltype(mode)::value><<<dim3(blocks, n), kThreads, 0, s>>>(x, y, n);
  scan_kernel<<<n, kScanThreads, 0, s>>>(v);   // a comment with <<<x, 7>>> in it
  scan_kernel<<<1, 1024, 0, s>>>(v);
  tiled_kernel<128><<<g, 128, 0, s>>>(v);
  const dim3 tiles = grid_of(g), block(kTile, kRows), flat = flat_of(g);
  tile_kernel<<<tiles, block, 0, s>>>(v);
  tile_kernel<<<tiles, dim3(kTile, kRows), 0, s>>>(v);
  scale_kernel<float, 0><<<g, std::min<int>(n, kThreads), 0, s>>>(x, y, n);
}
"""

BAD = """
constexpr int kThreads = 256;
constexpr int kScanThreads = 1024;
__global__ void unbounded_kernel(int* v) {}
__global__ void __launch_bounds__(kThreads) wrong_block_kernel(int* v) {}
__global__ void __launch_bounds__(threads_at_run_time) runtime_bound_kernel(int* v) {}
constexpr int kTile = 32;
__global__ void __launch_bounds__(kThreads) tile_kernel(int* v) {}
void launch(int threads_at_run_time) {
  const dim3 block(kTile, kTile);
  tile_kernel<<<g, block>>>(v);
  unbounded_kernel<<<1, kThreads>>>(v);
  wrong_block_kernel<<<n, kScanThreads, 0, stream>>>(v);
  runtime_bound_kernel<<<n, threads_at_run_time>>>(v);
}
"""


def test_checker_accepts_bounds_that_match_their_launches():
    assert check_sources({"good.cu": GOOD}) == []
    names = {k.name: k.bound for k in find_kernels(strip_comments_and_strings(GOOD), "good.cu")}
    assert names == {"scale_kernel": "kThreads", "scan_kernel": "kScanThreads", "tile_kernel": "kTileThreads",
                     "tiled_kernel": "Threads"}
    launches = find_launches(strip_comments_and_strings(GOOD), "good.cu")
    assert [(x.name, x.block) for x in launches] == [
        ("scale_kernel", "kThreads"), ("scan_kernel", "kScanThreads"), ("scan_kernel", "1024"), ("tiled_kernel", "128"),
        ("tile_kernel", "block"), ("tile_kernel", "dim3(kTile,kRows)"), ("scale_kernel", "std::min<int>(n,kThreads)"),
    ]


def test_checker_names_each_kernel_that_is_missing_or_mismatched():
    problems = check_sources({"bad.cu": BAD})
    assert len(problems) == 4, problems
    assert "bad.cu:4: kernel unbounded_kernel has no __launch_bounds__" in problems
    assert any("tile_kernel is launched with block size block = 1024 threads, but its __launch_bounds__ is kThreads = 256"
               in p for p in problems)
    assert any("wrong_block_kernel is launched with block size kScanThreads" in p for p in problems)
    assert any("runtime_bound_kernel's __launch_bounds__(threads_at_run_time) is not a compile-time" in p for p in problems)
