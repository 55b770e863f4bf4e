"""soak_memory.py runs end to end at tiny counts (no figures: a few rounds cannot tell a plateau from a
leak; what it measures is in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow  # about 10 s on 2 cores: a fresh process builds the tiny model and starts a node
def test_soak_memory_samples_both_scenarios(tmp_path):
    pytest.importorskip("highdicom")
    pytest.importorskip("pynetdicom")
    out = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, str(HERE / "soak_memory.py"), "--rounds", "2", "--every", "1", "--batch", "2",
                           "--sizes", "64", "--images", "8", "--masks", "--tracemalloc", "--trim", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "== predictor" in done.stdout and "== node" in done.stdout and "RSS start / middle / end" in done.stdout
    report = json.loads(out.read_text())
    # predictor: a sample before round 0 and after each of the 2; node: before the first and after the last of 8
    assert [r["step"] for r in report["predictor"]["samples"]] == [0, 1, 2]
    assert [r["step"] for r in report["node"]["samples"]][-1] == 8
    for scenario in ("predictor", "node"):
        row = report[scenario]["samples"][-1]
        assert row["rss_mib"] > 0 and row["threads"] >= 1 and row["fds"] >= 3 and row["py_heap_mib"] > 0
        assert "top_growth" in report[scenario]["verdict"]
