"""An optional package that is installed but fails to import is reported as such, with its reason, not
as "not installed: pip install ..." (pneumoseg/_optional.py): onnxruntime, onnx, onnxscript, tensorrt.

The broken installs are stood in for by a meta path finder that raises what a broken package raises
while it loads, and by packages written here whose ``__init__`` fails."""

from __future__ import annotations

import sys

import pytest

from pneumoseg._optional import import_optional, not_installed
from pneumoseg.errors import InvalidInputError


class FailingImport:
    """``import <name>`` raises ``error`` (the package found, failing while it loads)."""

    def __init__(self, name: str, error: ImportError) -> None:
        self.name, self.error = name, error

    def find_spec(self, name, path=None, target=None):
        if name == self.name:
            raise self.error
        return None


@pytest.fixture
def failing_import(monkeypatch):
    def install(name: str, error: ImportError) -> None:
        monkeypatch.delitem(sys.modules, name, raising=False)  # put back afterwards, as imported before
        monkeypatch.setattr(sys, "meta_path", [FailingImport(name, error), *sys.meta_path])
    return install


NUMPY_ABI = ImportError("numpy.core.multiarray failed to import")
NO_LIBRARY = ImportError("libnvinfer.so.10: cannot open shared object file: No such file or directory")


def test_not_installed_is_only_the_package_itself_missing():
    assert not_installed(ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime"), "onnxruntime")
    assert not not_installed(ModuleNotFoundError("No module named 'onnx_ir'", name="onnx_ir"), "onnxscript")
    assert not not_installed(ModuleNotFoundError("No module named 'onnxruntime.capi'", name="onnxruntime.capi"),
                             "onnxruntime")
    assert not not_installed(NUMPY_ABI, "onnxruntime")


def test_a_missing_onnxruntime_says_how_to_install(monkeypatch):
    from pneumoseg.export.sessions import import_onnxruntime

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime`: ModuleNotFoundError
    with pytest.raises(InvalidInputError) as info:
        import_onnxruntime()
    assert str(info.value) == "backend='onnxruntime' needs onnxruntime, which is not installed: pip install 'pneumoseg[onnx]'"
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_broken_onnxruntime_is_not_called_missing(failing_import):
    from pneumoseg.export.sessions import import_onnxruntime

    failing_import("onnxruntime", NUMPY_ABI)
    with pytest.raises(InvalidInputError) as info:
        import_onnxruntime()
    message = str(info.value)
    assert message.startswith("backend='onnxruntime' needs onnxruntime, which is installed but failed to import "
                              "(ImportError: numpy.core.multiarray failed to import)")
    assert "not installed" not in message and "pip install" not in message
    assert info.value.__cause__ is NUMPY_ABI  # the whole traceback stays reachable


@pytest.mark.parametrize("broken, error, reason", [
    ("onnxruntime", NUMPY_ABI, "ImportError: numpy.core.multiarray failed to import"),
    ("onnx", ImportError("DLL load failed"), "ImportError: DLL load failed"),
    # onnxscript installed without a dependency of its own: that dependency is named, not onnxscript
    ("onnxscript", ModuleNotFoundError("No module named 'onnx_ir'", name="onnx_ir"),
     "ModuleNotFoundError: No module named 'onnx_ir'"),
])
def test_onnx_export_names_the_broken_package_and_why(failing_import, broken, error, reason):
    pytest.importorskip("onnxscript")
    from pneumoseg.export.onnx import _require_onnx

    failing_import(broken, error)
    with pytest.raises(InvalidInputError, match="^ONNX export needs ") as info:
        _require_onnx()
    assert str(info.value).startswith(f"ONNX export needs {broken}, which is installed but failed to import ({reason})")


@pytest.mark.parametrize("missing", ["onnxruntime", "onnx", "onnxscript"])
def test_onnx_export_names_the_missing_package(monkeypatch, missing):
    pytest.importorskip("onnxscript")
    from pneumoseg.export.onnx import _require_onnx

    monkeypatch.setitem(sys.modules, missing, None)
    with pytest.raises(InvalidInputError) as info:
        _require_onnx()
    assert str(info.value) == (f"ONNX export needs {missing}, which is not installed: "
                               "pip install 'pneumoseg[onnx]' (onnx, onnxscript and onnxruntime)")


def test_tensorrt_broken_and_missing(failing_import, monkeypatch):
    from pneumoseg.export.tensorrt import import_tensorrt

    failing_import("tensorrt", NO_LIBRARY)
    with pytest.raises(InvalidInputError, match=r"needs tensorrt, which is installed but failed to import \(ImportError: "
                                                r"libnvinfer\.so\.10: cannot open shared object file"):
        import_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(InvalidInputError, match=r"needs tensorrt, which is not installed: pip install 'pneumoseg\[tensorrt\]'"):
        import_tensorrt()


@pytest.mark.parametrize("init, reason", [
    ("raise ImportError('libfoo.so: cannot open shared object file')",
     "ImportError: libfoo.so: cannot open shared object file"),
    # a half-removed install: the package is there, a module of its own is not
    ("from . import _core", "ImportError: cannot import name '_core' from partially initialized module"),
    ("import {name}._core", "ModuleNotFoundError: No module named '{name}._core'"),
    # onnxruntime 1.18.0 under numpy 2 raises an ImportError with no message: where it came from instead
    ("raise ImportError()", "ImportError without a message, raised at {init}:1"),
])
def test_a_real_package_that_fails_while_it_loads(tmp_path, monkeypatch, init, reason):
    name = "pneumoseg_test_broken_package"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(init.format(name=name) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, module)
    with pytest.raises(InvalidInputError) as info:
        import_optional(name, needed_for="this test", install="pip install nothing")
    init_file = tmp_path / name / "__init__.py"
    assert str(info.value).startswith(f"this test needs {name}, which is installed but failed to import "
                                      f"({reason.format(name=name, init=init_file)}")


def test_a_package_that_is_not_there(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InvalidInputError) as info:
        import_optional("pneumoseg_test_absent_package", needed_for="this test", install="pip install nothing")
    assert str(info.value) == "this test needs pneumoseg_test_absent_package, which is not installed: pip install nothing"


def test_the_demo_reports_a_broken_onnxruntime_in_one_line_before_any_work(tmp_path, failing_import, capsys):
    pytest.importorskip("torch")
    from pneumoseg.cli import main

    failing_import("onnxruntime", NUMPY_ABI)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs onnxruntime, which is installed but failed to import" in err, err
    assert not out.exists()


@pytest.mark.parametrize("missing, message", [
    ("matplotlib", "this command needs matplotlib, which is not installed: pip install 'pneumoseg[train]'"),
    # a module of an installed package missing: a broken install, reported with its reason
    ("matplotlib.ft2font", "this command needs matplotlib, which is installed but failed to import "
                           "(ModuleNotFoundError: No module named 'matplotlib.ft2font')"),
])
def test_the_cli_tells_a_broken_optional_package_from_a_missing_one(tmp_path, monkeypatch, capsys, missing, message):
    import pneumoseg.cli.evaluate as evaluate_command
    from pneumoseg.cli import main

    def run(args):  # an import the command makes itself, outside import_optional
        raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)

    monkeypatch.setattr(evaluate_command, "run", run)
    assert main(["evaluate", "--pred", str(tmp_path / "pred.csv"), "--truth", str(tmp_path / "truth.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
