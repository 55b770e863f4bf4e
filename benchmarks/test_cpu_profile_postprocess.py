"""cpu_profile_postprocess.py runs: every case once, the before/after comparison against the sources
at a git revision, and the cProfile. In a child process, as a user runs it (it sets torch's thread
count for its whole process). Measures nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "cpu_profile_postprocess.py"


def _run(*args: str) -> str:
    run = subprocess.run([sys.executable, str(SCRIPT), "--calls", "1", "--rounds", "1", *args],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_every_case_runs_and_is_written(tmp_path):
    out = tmp_path / "figures.json"
    text = _run("--json", str(out))
    figures = json.loads(out.read_text())
    for case in ("postprocess torch 1x32x32 scores components", "postprocess numpy 1x1024x1024 scores",
                 "postprocess torch 1x1024x1024 scores components to_rle", "encode_batch torch 1x32x32",
                 "decode_batch 1x1024x1024", "torch.sigmoid(x) (reference)"):
        assert figures[case]["median_us"] > 0, case
        assert case.replace(" (reference)", "") in text


def test_the_baseline_comparison_runs():
    root = HERE.parent
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, check=False).returncode:
        pytest.skip("not a git checkout")
    text = _run("--baseline", "HEAD", "-k", "32x32 scores components")
    assert "before us" in text and "postprocess numpy 1x32x32 scores components to_rle" in text


def test_the_profile_runs():
    assert "function calls" in _run("--profile", "encode_batch numpy 1x32x32")
