"""onnxruntime's telemetry stays off where pneumoseg loads onnxruntime, unless the user opts in.

onnxruntime 1.32 on Linux writes a device id and an event store under ~/.cache/Microsoft from the
import on, and uploads events (see pneumoseg/_onnxruntime.py). The real runs here are subprocesses
with a private HOME and no CI variable (onnxruntime skips telemetry where it sees one). They exit in
a few seconds, long before onnxruntime's first upload (about 9 s after its import), and their HOME
goes with tmp_path: the control run, which has telemetry on, sends nothing either.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from pneumoseg import _onnxruntime  # noqa: E402
from pneumoseg._onnxruntime import TELEMETRY_VARIABLES, import_onnxruntime, telemetry_wanted  # noqa: E402

# Where onnxruntime 1.32 sees any of these set to a true value it writes and sends nothing (each
# measured alone); the runs below need them gone to see what a clinical machine would see.
CI_VARIABLES = ("CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL",
                "CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR", "BITBUCKET_BUILD_NUMBER",
                "SYSTEM_TEAMFOUNDATIONCOLLECTIONURI", "ORT_RUNNING_UNIT_TESTS")
STORE = Path(".cache", "Microsoft")

# A one-node graph in a session, the way a program that uses onnxruntime directly would.
TINY_SESSION = """
import numpy as np
from onnx import TensorProto, helper
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "tiny",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
assert session.run(None, {"x": np.ones((1, 4), np.float32)})[0].sum() == 4
"""

REPORT = """
import json, os, sys
print(json.dumps({"imported": "onnxruntime" in sys.modules,
                  "environ": {name: os.environ.get(name) for name in %r}}))
""" % (TELEMETRY_VARIABLES,)


def clinic_env(home: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in CI_VARIABLES and k not in TELEMETRY_VARIABLES and k != "XDG_CACHE_HOME"}
    env.update(HOME=str(home), **settings)
    return env


def run(code: str, home: Path, **settings: str) -> dict:
    home.mkdir()
    done = subprocess.run([sys.executable, "-c", code], env=clinic_env(home, **settings), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def store_files(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in (home / STORE).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def bare_onnxruntime(tmp_path_factory) -> list[str]:
    """What onnxruntime itself writes under HOME, used alone, without pneumoseg (the control)."""
    home = tmp_path_factory.mktemp("bare") / "home"
    run("import onnxruntime as ort\n" + TINY_SESSION + REPORT, home)
    written = store_files(home)
    if not written:  # else "pneumoseg's runs write nothing" would hold without the switch too
        pytest.skip(f"onnxruntime {onnxruntime.__version__} alone writes nothing under HOME: no telemetry to switch off")
    return written


def test_cli_predict_with_onnxruntime_writes_nothing_under_home(tmp_path, bare_onnxruntime):
    pytest.importorskip("torch")
    from pneumoseg.data import make_synthetic_siim

    from infer_helpers import exported_model_dir

    studies = tmp_path / "siim"
    make_synthetic_siim(studies, n_images=2, size=64, positive_fraction=0.5, seed=3)
    out = tmp_path / "out"
    report = run("from pneumoseg.cli import main\n"
                 f"assert main(['predict', {str(studies)!r}, '--model', {str(exported_model_dir('plain'))!r}, "
                 f"'--backend', 'onnxruntime', '--out', {str(out)!r}, '--no-overlays', '--no-progress']) == 0\n"
                 + REPORT, tmp_path / "home")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["predictor"]["backend"] == "onnxruntime" and summary["images"] == 2
    assert report["imported"]
    assert store_files(tmp_path / "home") == [], f"onnxruntime alone wrote {bare_onnxruntime}"
    assert report["environ"] == {"ORT_DISABLE_TELEMETRY": "1", "ORT_TELEMETRY_DISABLED": "1"}


def test_export_loads_onnxruntime_with_telemetry_off(tmp_path, bare_onnxruntime):
    """Export sets the variables before torch.onnx or onnxscript can import onnxruntime; the check
    stops at the missing model directory, and a session made afterwards writes nothing either."""
    pytest.importorskip("torch")
    code = ("from pneumoseg.errors import PneumosegError\nfrom pneumoseg.export import export_onnx\n"
            f"try:\n    export_onnx({str(tmp_path / 'absent')!r})\nexcept PneumosegError:\n    pass\n"
            "else:\n    raise SystemExit('export_onnx accepted a missing model directory')\n"
            "import sys\nort = sys.modules['onnxruntime']\n" + TINY_SESSION + REPORT)
    report = run(code, tmp_path / "home")
    assert report["imported"]
    assert store_files(tmp_path / "home") == [], f"onnxruntime alone wrote {bare_onnxruntime}"
    assert report["environ"] == {"ORT_DISABLE_TELEMETRY": "1", "ORT_TELEMETRY_DISABLED": "1"}


@pytest.mark.parametrize("opt_in", ["0", "false"])
def test_opting_in_leaves_onnxruntime_as_it_is(tmp_path, bare_onnxruntime, opt_in):
    code = "from pneumoseg.export.sessions import import_onnxruntime\nort = import_onnxruntime()\n" + TINY_SESSION + REPORT
    report = run(code, tmp_path / "home", ORT_DISABLE_TELEMETRY=opt_in)
    assert store_files(tmp_path / "home") == bare_onnxruntime
    # the later variable is left unset: an onnxruntime that reads it would otherwise override the opt-in
    assert report["environ"] == {"ORT_DISABLE_TELEMETRY": opt_in, "ORT_TELEMETRY_DISABLED": None}


def test_importing_pneumoseg_loads_no_onnxruntime_and_sets_nothing(tmp_path):
    report = run("import pneumoseg\n" + REPORT, tmp_path / "home")
    assert report == {"imported": False, "environ": {name: None for name in TELEMETRY_VARIABLES}}


# --------------------------------------------------------------------------------------------------
# the choice, in this process, with a stand-in onnxruntime that records its calls


@pytest.fixture
def fake_onnxruntime(monkeypatch):
    """A stand-in onnxruntime module (so also the case of a program that imported it before pneumoseg)
    and the environment as a test sets it, both put back afterwards."""
    calls: list[str] = []
    module = types.ModuleType("onnxruntime")
    module.disable_telemetry_events = lambda: calls.append("disable")  # type: ignore[attr-defined]
    module.enable_telemetry_events = lambda: calls.append("enable")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "onnxruntime", module)
    monkeypatch.setattr(_onnxruntime, "_events_disabled", False)
    for name in TELEMETRY_VARIABLES:
        monkeypatch.setenv(name, "")  # records the value to restore, then:
        monkeypatch.delenv(name)
    return module, calls


@pytest.mark.parametrize("settings, after, disabled", [
    ({}, {"ORT_DISABLE_TELEMETRY": "1", "ORT_TELEMETRY_DISABLED": "1"}, True),
    ({"ORT_DISABLE_TELEMETRY": " "}, {"ORT_DISABLE_TELEMETRY": "1", "ORT_TELEMETRY_DISABLED": "1"}, True),
    ({"ORT_DISABLE_TELEMETRY": "Yes"}, {"ORT_DISABLE_TELEMETRY": "Yes", "ORT_TELEMETRY_DISABLED": "1"}, True),
    ({"ORT_TELEMETRY_DISABLED": "true"}, {"ORT_DISABLE_TELEMETRY": "1", "ORT_TELEMETRY_DISABLED": "true"}, True),
    ({"ORT_DISABLE_TELEMETRY": "0"}, {"ORT_DISABLE_TELEMETRY": "0", "ORT_TELEMETRY_DISABLED": None}, False),
    ({"ORT_TELEMETRY_DISABLED": "0"}, {"ORT_DISABLE_TELEMETRY": None, "ORT_TELEMETRY_DISABLED": "0"}, False),
    # conflicting: neither is changed, and the events are stopped (the safe reading)
    ({"ORT_DISABLE_TELEMETRY": "0", "ORT_TELEMETRY_DISABLED": "1"},
     {"ORT_DISABLE_TELEMETRY": "0", "ORT_TELEMETRY_DISABLED": "1"}, True),
])
def test_user_settings_are_kept_and_decide(fake_onnxruntime, monkeypatch, settings, after, disabled):
    module, calls = fake_onnxruntime
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    assert import_onnxruntime() is module
    assert {name: os.environ.get(name) for name in TELEMETRY_VARIABLES} == after
    assert calls == (["disable"] if disabled else [])
    assert telemetry_wanted() is not disabled


def test_events_are_stopped_once_so_a_later_enable_by_the_program_stands(fake_onnxruntime):
    module, calls = fake_onnxruntime
    import_onnxruntime()
    module.enable_telemetry_events()
    import_onnxruntime()
    assert calls == ["disable", "enable"]


def test_an_onnxruntime_without_the_switch_still_loads(fake_onnxruntime):
    module, calls = fake_onnxruntime
    del module.disable_telemetry_events
    assert import_onnxruntime() is module
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "1"
