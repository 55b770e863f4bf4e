"""pyproject's floors against what was found running the suite at them.

pyproject promises numpy>=1.23, while CI installs the newest numpy (2.x): code, tests and benchmarks
must use only NumPy names that exist across that whole range. A name from one end fails with an
AttributeError deep in a call at the other (np.trapezoid, NumPy 2.0+, broke ten metrics tests under
numpy 1.23.2). CI never runs the old numpy, so this reads the source instead.

The lists were derived by comparing the public names (dir(), then getattr without a warning) of
numpy 1.23.2, the first 1.23 with a Python 3.11 wheel, and numpy 2.4.6; re-derive them when the
numpy floor in pyproject.toml moves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("pneumoseg", "tests", "benchmarks")

# Not in numpy 1.23 (or only as a deprecated alias of a Python builtin: bool, long).
ADDED_AFTER_FLOOR = {
    "": {
        "acos", "acosh", "asin", "asinh", "astype", "atan", "atan2", "atanh", "bitwise_count",
        "bitwise_invert", "bitwise_left_shift", "bitwise_right_shift", "bool", "concat", "cumulative_prod",
        "cumulative_sum", "dtypes", "exceptions", "isdtype", "long", "matrix_transpose", "matvec",
        "permute_dims", "pow", "show_runtime", "strings", "trapezoid", "ulong", "unique_all",
        "unique_counts", "unique_inverse", "unique_values", "unstack", "vecdot", "vecmat",
    },
    "linalg": {
        "cross", "diagonal", "matmul", "matrix_norm", "matrix_transpose", "outer", "svdvals", "tensordot",
        "trace", "vecdot", "vector_norm",
    },
}
# In numpy 1.23, gone from 2.4 (the NumPy 2.0 namespace clean-up and later removals).
REMOVED_SINCE_FLOOR = {
    "": {
        "ALLOW_THREADS", "AxisError", "BUFSIZE", "CLIP", "ComplexWarning", "DataSource", "ERR_CALL",
        "ERR_DEFAULT", "ERR_IGNORE", "ERR_LOG", "ERR_PRINT", "ERR_RAISE", "ERR_WARN", "FLOATING_POINT_SUPPORT",
        "FPE_DIVIDEBYZERO", "FPE_INVALID", "FPE_OVERFLOW", "FPE_UNDERFLOW", "Inf", "Infinity", "MAXDIMS",
        "MAY_SHARE_BOUNDS", "MAY_SHARE_EXACT", "ModuleDeprecationWarning", "NAN", "NINF", "NZERO", "NaN",
        "PINF", "PZERO", "RAISE", "RankWarning", "SHIFT_DIVIDEBYZERO", "SHIFT_INVALID", "SHIFT_OVERFLOW",
        "SHIFT_UNDERFLOW", "Tester", "TooHardError", "UFUNC_BUFSIZE_DEFAULT", "UFUNC_PYVALS_NAME",
        "VisibleDeprecationWarning", "WRAP", "add_docstring", "add_newdoc", "add_newdoc_ufunc", "alltrue",
        "asfarray", "bool8", "byte_bounds", "bytes0", "cast", "cfloat", "chararray", "clongfloat",
        "compare_chararrays", "compat", "complex_", "cumproduct", "deprecate", "deprecate_with_doc", "disp",
        "fastCopyAndTranspose", "find_common_type", "float_", "format_parser", "get_array_wrap", "geterrobj",
        "in1d", "infty", "int0", "issctype", "issubclass_", "issubsctype", "kernel_version", "longcomplex",
        "longfloat", "lookfor", "mat", "math", "maximum_sctype", "msort", "nbytes", "numarray", "obj2sctype",
        "object0", "oldnumeric", "product", "recfromcsv", "recfromtxt", "round_", "safe_eval", "sctype2char",
        "sctypes", "set_numeric_ops", "set_string_function", "seterrobj", "singlecomplex", "sometrue",
        "source", "str0", "string_", "tracemalloc_domain", "trapz", "uint0", "unicode_", "use_hugepage",
        "void0", "who",
    },
    "linalg": set(),
}
NUMPY_ALIASES = {"np", "numpy"}


def _sources() -> list[Path]:
    return sorted(p for folder in FOLDERS if (ROOT / folder).is_dir() for p in (ROOT / folder).rglob("*.py"))


def _numpy_names(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, namespace, name) of every np.NAME, np.linalg.NAME, `from numpy[.linalg] import NAME`
    and `import numpy.NAME` in the tree ('' is numpy's own namespace)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            base = node.value
            if isinstance(base, ast.Name) and base.id in NUMPY_ALIASES:
                found.append((node.lineno, "", node.attr))
            elif (isinstance(base, ast.Attribute) and base.attr == "linalg" and isinstance(base.value, ast.Name)
                  and base.value.id in NUMPY_ALIASES):
                found.append((node.lineno, "linalg", node.attr))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in ("numpy", "numpy.linalg"):
            space = "" if node.module == "numpy" else "linalg"
            found += [(node.lineno, space, alias.name) for alias in node.names]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [(node.lineno, "", m.split(".")[1]) for m in modules if m.startswith("numpy.")]
    return found


def _offenders(tree: ast.AST) -> list[str]:
    out = []
    for line, space, name in sorted(_numpy_names(tree)):
        prefix = "np." + (space + "." if space else "")
        if name in ADDED_AFTER_FLOOR[space]:
            out.append(f"{line}: {prefix}{name} is not in numpy 1.23 (pyproject's floor)")
        elif name in REMOVED_SINCE_FLOOR[space]:
            out.append(f"{line}: {prefix}{name} is gone from numpy 2.x")
    return out


def test_the_scan_finds_names_from_either_end_of_the_range():
    source = (
        "import numpy as np\nfrom numpy import trapz\nimport numpy.exceptions\n"
        "a = np.trapezoid(y, x)\nb = np.linalg.vector_norm(a)\nc = np.float_(1)\n"
        "d = np.trapz(y, x) + np.linalg.norm(a) + np.unique(a) + np.bool_(1)\n"
    )
    assert _offenders(ast.parse(source)) == [
        "2: np.trapz is gone from numpy 2.x",
        "3: np.exceptions is not in numpy 1.23 (pyproject's floor)",
        "4: np.trapezoid is not in numpy 1.23 (pyproject's floor)",
        "5: np.linalg.vector_norm is not in numpy 1.23 (pyproject's floor)",
        "6: np.float_ is gone from numpy 2.x",
        "7: np.trapz is gone from numpy 2.x",
    ]


def test_no_numpy_name_outside_the_supported_range():
    problems = []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        problems += [f"{path.relative_to(ROOT)}:{o}" for o in _offenders(tree)]
    assert not problems, "NumPy names that fail at one end of numpy>=1.23:\n" + "\n".join(problems)


# The first release of each that works with pneumoseg, found by running the suite at pyproject's floors
# (Python 3.11, torch 2.13): a floor below these installs a version that fails.
FIRST_WORKING = {
    # 3.0.0's `import pydicom` downloads five example files (pydicom.examples): ~100 s of retries offline
    "pydicom": "3.0.1",
    # 0.4.0 and 0.4.1 refuse float8 weights (their torch loader has no F8 types)
    "safetensors": "0.4.2",
    # torch 2.11+ exports through onnxscript's torch_2_11 API and onnx_ir.schemas (onnx_ir 0.1.16, which
    # onnxscript requires from 0.7; onnxscript 0.6+ requires onnx 1.17)
    "onnxscript": "0.7",
    "onnx": "1.17",
    # 1.18.0 allows numpy 2 but is built for numpy 1: `import onnxruntime` fails there
    "onnxruntime": "1.18.1",
    # found on Python 3.10: 2.4 cannot import pneumoseg.losses or build a segmenter
    # (register_load_state_dict_pre_hook), 2.5 and 2.6 cannot run one (torch.compiler.is_exporting)
    "torch": "2.7",
}


def _pyproject() -> dict:
    """pyproject.toml, read by tomllib (3.11+) or, on Python 3.10, by tomli: pytest itself depends on tomli
    there, so the checks below run on the floor too (CI's core venv)."""
    try:
        import tomllib
    except ModuleNotFoundError:
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _floors() -> list[tuple[str, str, str]]:
    """(where, package, floor) for every `name>=X` requirement of pyproject.toml: the dependencies and each
    extra."""
    from packaging.requirements import Requirement

    project = _pyproject()["project"]
    groups = {"dependencies": project["dependencies"], **project["optional-dependencies"]}
    floors = []
    for where, requirements in groups.items():
        for text in requirements:
            req = Requirement(text)
            floors += [(where, req.name.lower(), spec.version) for spec in req.specifier if spec.operator == ">="]
    return floors


def test_no_floor_in_pyproject_admits_a_version_known_to_fail():
    from packaging.version import Version

    floors = _floors()
    assert {("dependencies", "pydicom"), ("onnx", "onnxruntime"), ("dev", "onnxscript")} <= {f[:2] for f in floors}
    low = [f"{where}: {name}>={floor}, but {name} works from {FIRST_WORKING[name]}"
           for where, name, floor in floors if name in FIRST_WORKING and Version(floor) < Version(FIRST_WORKING[name])]
    assert not low, "\n".join(low)


def test_the_lists_were_derived_for_the_numpy_floor_in_pyproject():
    dependencies = _pyproject()["project"]["dependencies"]
    assert "numpy>=1.23" in dependencies, "the numpy floor moved: re-derive ADDED_AFTER_FLOOR for it"
