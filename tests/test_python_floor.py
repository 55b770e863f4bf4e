"""pyproject's requires-python (>= 3.10) against the source, while CI runs a newer Python.

A 3.11 construct fails on 3.10 at import (syntax) or at the call (a missing name), and CI never runs
3.10. mypy (python_version = "3.10") catches the package's standard-library names but reads neither
tests/ nor benchmarks/, and no type checker reads grammar at another version, so this reads the source.

The grammar: ``ast.parse(feature_version=(3, 10))`` refuses ``except*``, ``type`` aliases and PEP 695
generics; it accepts PEP 646's ``*Ts`` (checked here by hand) and, from Python 3.12 on, PEP 701's
f-strings. Where a python3.10 is on PATH, the last test compiles every file with it, which misses none.

The names: the public names of these modules (and the builtins) in 3.11.7 and not in 3.10.13, by
comparing dir() of each; re-derive them when requires-python moves."""

from __future__ import annotations

import ast
import functools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("pneumoseg", "tests", "benchmarks")
FLOOR = (3, 10)

MODULES_AFTER_FLOOR = {"tomllib", "wsgiref.types"}
NAMES_AFTER_FLOOR = {
    "typing": {
        "LiteralString", "Never", "NotRequired", "Required", "Self", "TypeVarTuple", "Unpack", "assert_never",
        "assert_type", "clear_overloads", "dataclass_transform", "get_overloads", "reveal_type",
    },
    "datetime": {"UTC"},
    "enum": {
        "CONFORM", "CONTINUOUS", "EJECT", "EnumCheck", "EnumType", "FlagBoundary", "KEEP", "NAMED_FLAGS", "ReprEnum",
        "STRICT", "StrEnum", "UNIQUE", "global_enum", "member", "nonmember", "property", "show_flag_values", "verify",
    },
    "asyncio": {"Barrier", "BrokenBarrierError", "Runner", "TaskGroup", "Timeout", "timeout", "timeout_at"},
    "hashlib": {"file_digest"},
    "contextlib": {"chdir"},
    "operator": {"call"},
    "math": {"cbrt", "exp2"},
    "inspect": {"getmembers_static", "ismethodwrapper"},
    "re": {"NOFLAG"},
    "logging": {"getLevelNamesMapping"},
    "sys": {"exception"},
    "locale": {"getencoding"},
    "os": {"login_tty"},
    "sqlite3": {"Blob"},
    "http": {"HTTPMethod"},
}
BUILTINS_AFTER_FLOOR = {"BaseExceptionGroup", "ExceptionGroup"}


def _sources() -> list[Path]:
    return sorted(p for folder in FOLDERS if (ROOT / folder).is_dir() for p in (ROOT / folder).rglob("*.py"))


@functools.lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    """The file as the floor's grammar reads it (a SyntaxError where it cannot)."""
    return ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=FLOOR)


def _guarded(tree: ast.AST) -> set[int]:
    """ids of the nodes that run only where the name may be missing: the body of a ``try`` that catches
    ImportError / AttributeError, or of an ``if`` on ``sys.version_info``."""
    nodes: set[int] = set()
    for node in ast.walk(tree):
        body: list[ast.stmt] = []
        if isinstance(node, ast.Try):
            caught = {n.id for h in node.handlers for n in ast.walk(h.type) if isinstance(n, ast.Name)} \
                if all(h.type is not None for h in node.handlers) else {"BaseException"}
            if caught & {"ImportError", "ModuleNotFoundError", "AttributeError", "Exception", "BaseException"}:
                body = node.body
        elif isinstance(node, ast.If) and "version_info" in ast.unparse(node.test):
            body = node.body + node.orelse
        nodes.update(id(n) for stmt in body for n in ast.walk(stmt))
    return nodes


def _late_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every module, module attribute and builtin in the tree that 3.10 lacks."""
    aliases: dict[str, str] = {}  # local name -> module, for `import typing as t`
    found: list[tuple[ast.AST, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES_AFTER_FLOOR:
                    found.append((node, a.name))
                if a.name in NAMES_AFTER_FLOOR:
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in MODULES_AFTER_FLOOR:
                found.append((node, node.module))
            for a in node.names:
                if a.name in NAMES_AFTER_FLOOR.get(node.module, ()) or f"{node.module}.{a.name}" in MODULES_AFTER_FLOOR:
                    found.append((node, f"{node.module}.{a.name}"))
        elif isinstance(node, ast.Name) and node.id in BUILTINS_AFTER_FLOOR:
            found.append((node, node.id))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            module = aliases[node.value.id]
            if node.attr in NAMES_AFTER_FLOOR[module]:
                found.append((node, f"{module}.{node.attr}"))
    guarded = _guarded(tree) if found else set()  # most files have nothing to excuse
    return sorted({(node.lineno, name) for node, name in found if id(node) not in guarded})


def _pep646_stars(tree: ast.AST) -> list[int]:
    """Lines of ``x[*a]`` and ``*args: *Ts``, which feature_version=(3, 10) lets through."""
    lines = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Subscript)
             and any(isinstance(e, ast.Starred) for e in (n.slice.elts if isinstance(n.slice, ast.Tuple) else [n.slice]))]
    lines += [n.vararg.lineno for n in ast.walk(tree) if isinstance(n, ast.arguments) and n.vararg is not None
              and isinstance(n.vararg.annotation, ast.Starred)]
    return sorted(lines)


def test_every_file_parses_with_the_floors_grammar():
    sources = _sources()
    assert len(sources) > 100  # the folders were found
    bad = []
    for path in sources:
        try:
            tree = _tree(path)
        except SyntaxError as e:
            bad.append(f"{path.relative_to(ROOT)}:{e.lineno}: {e.msg}")
            continue
        bad += [f"{path.relative_to(ROOT)}:{line}: PEP 646 star (3.11+)" for line in _pep646_stars(tree)]
    assert not bad, "\n".join(bad)


def test_no_standard_library_name_newer_than_the_floor():
    bad = []
    for path in _sources():
        try:
            tree = _tree(path)
        except SyntaxError:
            continue  # the grammar test names it
        bad += [f"{path.relative_to(ROOT)}:{line}: {name} (3.11+)" for line, name in _late_names(tree)]
    assert not bad, "\n".join(bad)


def test_the_checks_see_what_they_look_for():
    """The readers above on code that breaks 3.10, so a check that finds nothing means something."""
    with pytest.raises(SyntaxError):
        ast.parse("try:\n    pass\nexcept* OSError:\n    pass\n", feature_version=FLOOR)
    if sys.version_info >= (3, 11):  # the grammar that writes them
        assert _pep646_stars(ast.parse("def f(*args: *Ts) -> tuple[*Ts]: ...\nx = a[*b]\n")) == [1, 1, 2]
    late = ast.parse("import tomllib\nfrom typing import Self\nimport datetime as dt\nimport enum\n"
                     "dt.UTC\nclass C(enum.StrEnum): ...\nraise ExceptionGroup('x', [])\n"
                     "try:\n    import tomllib\nexcept ImportError:\n    tomllib = None\n"
                     "if sys.version_info >= (3, 11):\n    from typing import Never\n")
    assert _late_names(late) == [(1, "tomllib"), (2, "typing.Self"), (5, "datetime.UTC"), (6, "enum.StrEnum"),
                                 (7, "ExceptionGroup")]


def test_every_file_compiles_under_python_3_10():
    if sys.version_info[:2] == FLOOR:
        pytest.skip("this is 3.10: the suite itself imports every module")
    python = shutil.which("python3.10")
    # A pyenv shim is on PATH even where 3.10 is not the selected version, and then exits 127: ask first.
    probe = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True,
                           text=True, timeout=60) if python else None
    if probe is None or probe.returncode != 0 or probe.stdout.split() != ["3", "10"]:
        pytest.skip("no working python3.10 on PATH")
    # compile() only: nothing is imported, so 3.10 needs none of the dependencies. One process for all files.
    code = ("import sys\nbad = []\nfor p in sys.argv[1:]:\n    try:\n"
            "        compile(open(p, encoding='utf-8').read(), p, 'exec', dont_inherit=True)\n"
            "    except SyntaxError as e:\n        bad.append(f'{p}:{e.lineno}: {e.msg}')\nprint('\\n'.join(bad))\n")
    result = subprocess.run([python, "-c", code, *map(str, _sources())], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
