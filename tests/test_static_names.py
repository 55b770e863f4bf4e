"""Every name the package, its tests and its benchmarks use is defined: pyflakes' undefined-name
check over the source. Code that runs only on a GPU (the GPU benchmarks, CUDA-only branches) is
never executed on a CPU box, so a name lost in a refactor would otherwise surface as a NameError
in the middle of a scarce GPU session."""

from __future__ import annotations

from pathlib import Path

import pytest

pyflakes_checker = pytest.importorskip("pyflakes.checker")
pyflakes_messages = pytest.importorskip("pyflakes.messages")

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("pneumoseg", "tests", "benchmarks")
UNDEFINED = (pyflakes_messages.UndefinedName, pyflakes_messages.UndefinedLocal, pyflakes_messages.UndefinedExport)


def _sources() -> list[Path]:
    return sorted(p for folder in FOLDERS if (ROOT / folder).is_dir() for p in (ROOT / folder).rglob("*.py"))


def test_the_source_tree_is_found():
    names = {p.relative_to(ROOT).as_posix() for p in _sources()}
    assert {"pneumoseg/__init__.py", "benchmarks/bench_loss.py", "tests/test_static_names.py"} <= names


def test_no_undefined_names():
    import ast

    problems = []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        checker = pyflakes_checker.Checker(tree, filename=str(path))
        problems += [f"{path.relative_to(ROOT)}:{m.lineno}: {m.message % m.message_args}"
                     for m in checker.messages if isinstance(m, UNDEFINED)]
    assert not problems, "undefined names:\n" + "\n".join(problems)
