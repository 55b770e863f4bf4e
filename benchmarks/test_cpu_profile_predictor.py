"""cpu_profile_predictor.py, run small: its worker times and counts a batch-1 predict, and on the
Predictor's CUDA path (under fake_cuda) the host waits for the GPU are the ones the Predictor is
designed to have: the end mark's event in segment="all", plus the gate's decisions in
segment="gated". Nothing here times anything against a target."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import cpu_profile_predictor as profiler


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    return profiler.Worker(profiler.make_model_dirs(tmp_path_factory.mktemp("models")))


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_timing_and_aten_counts(worker):
    for stub in (False, True):
        assert worker.time("two-stage, all, uint8 tensor", stub, calls=2) > 0
    counted = worker.aten_ops("two-stage, all, uint8 tensor", "cpu")
    assert counted["aten_ops"] > 10 and "aten::aminmax" in counted["by_name"]
    assert "host_reads" not in counted


@pytest.mark.parametrize("case, waits", [
    ("two-stage, all, uint8 tensor", {"Event.synchronize": 1}),
    ("two-stage, all, float32 array", {"Event.synchronize": 1}),
    ("own gate, gated, uint8 tensor", {"Event.synchronize": 1, "Tensor.tolist": 1}),  # the gate's decisions
])
def test_host_waits_for_the_gpu_on_the_cuda_path(worker, case, waits):
    reads = worker.aten_ops(case, "cuda")["host_reads"]
    assert {k: v for k, v in reads.items() if v} == waits


def test_stored_outputs_answer_as_the_networks(worker):
    p = profiler._predictor(worker.dirs, "own gate, gated, uint8 tensor", stub=False)
    image = profiler._image("tensor")
    want = p.predict(image)[0]
    p.backend.run = profiler._StoredOutputs(p.backend.run)
    for _ in range(2):
        got = p.predict(image)[0]
        assert (got.rle, got.score) == (want.rle, want.score)


@pytest.mark.slow
def test_baseline_run_against_this_checkout(tmp_path):
    """--baseline HEAD end to end: a second process on git's pneumoseg/ sources, rounds in turn."""
    root = Path(__file__).resolve().parents[1]
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, check=False).returncode != 0:
        pytest.skip("not a git checkout")
    out = tmp_path / "figures.json"
    run = subprocess.run([sys.executable, str(Path(profiler.__file__)), "--baseline", "HEAD", "--calls", "2",
                          "--rounds", "1", "--json", str(out)], cwd=root, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "before/after" in run.stdout and out.exists()
