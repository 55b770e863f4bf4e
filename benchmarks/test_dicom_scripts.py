"""The DICOM output scripts run end to end at tiny sizes (no figures: what they measure is in
benchmarks/results/dicom_outputs_cpu.txt). No test ran them, and dicom_seg_cost.py broke unnoticed when
the SEG writer began checking a prediction's source_uid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_dicom_seg_cost_times_every_writer():
    pytest.importorskip("highdicom")
    out = _run("dicom_seg_cost.py", "--repeats", "1")
    for writer in ("overlay", "seg", "dicom-overlay"):
        assert f"  {writer} " in out and "median" in out
    assert "SEG / PNG overlay:" in out


def test_dicom_node_throughput_runs_both_senders():
    pytest.importorskip("highdicom")
    pytest.importorskip("pynetdicom")
    out = _run("dicom_node_throughput.py", "--n", "8", "--size", "64", "--repeats", "1")
    assert "Nagle on" in out and "TCP_NODELAY" in out and "Predictor.predict" in out


def test_dicom_node_derive_cost_times_both_ways():
    pytest.importorskip("highdicom")
    pytest.importorskip("pynetdicom")
    out = _run("dicom_node_derive_cost.py", "--repeats", "1")
    assert "read once" in out and "read by each builder" in out and "saved by reading once" in out
