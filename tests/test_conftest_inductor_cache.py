"""tests/conftest.py gives each test session its own torch.compile cache folder and removes it at the
session's end, and only its own: one ``pneumoseg-inductor-*`` folder per pytest run used to pile up in
/tmp (hundreds on the development machine). Checked on child pytest sessions (collection only, of a
small file) whose TMPDIR is this test's folder, with a plugin that records the folder they used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = '''
import json, os

def pytest_collection_finish(session):
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with open(os.environ["PNEUMOSEG_PROBE_OUT"], "w") as f:
        json.dump({"cache": cache, "existed": bool(cache) and os.path.isdir(cache)}, f)
'''


def child_session(tmp_path: Path, cache: str | None) -> dict:
    (tmp_path / "plugins").mkdir(exist_ok=True)
    (tmp_path / "plugins" / "inductor_probe.py").write_text(PROBE)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    if cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
    env["TMPDIR"] = str(tmp_path / "tmp")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "plugins"), env.get("PYTHONPATH", "")])
    env["PNEUMOSEG_PROBE_OUT"] = str(tmp_path / "probe.json")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "inductor_probe",
                          "--collect-only", "tests/test_infer_helpers.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads((tmp_path / "probe.json").read_text())


def test_a_session_removes_its_own_cache_folder_and_no_other(tmp_path):
    someone = tmp_path / "tmp" / "pneumoseg-inductor-someone"  # another session's, running or not
    someone.mkdir(parents=True)
    seen = child_session(tmp_path, None)
    cache = Path(seen["cache"])
    assert seen["existed"] and cache.parent == tmp_path / "tmp" and cache.name.startswith("pneumoseg-inductor-")
    assert not cache.exists()
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == ["pneumoseg-inductor-someone"]


def test_a_cache_folder_the_caller_set_is_used_and_kept(tmp_path):
    mine = tmp_path / "my-inductor-cache"
    mine.mkdir()
    (mine / "compiled").write_text("kept")
    seen = child_session(tmp_path, str(mine))
    assert seen == {"cache": str(mine), "existed": True}
    assert (mine / "compiled").read_text() == "kept"
    assert list((tmp_path / "tmp").glob("pneumoseg-inductor-*")) == []  # none made beside it either
