"""The GPU benchmarks' and GPU scripts' own code, run on the CPU so that it cannot rot unseen: code
that runs only on a GPU has otherwise never run since its last edit (a deleted helper once turned
into a NameError half-way through a GPU session).

Each cuda-marked benchmark runs at small sizes under ``fake_cuda`` (tensors on the CPU, torch.cuda
stand-ins, cupy mapped onto NumPy/scipy), writes its results file, and ``gpu_summary.py``'s reader
for that file must read it: the writer's keys and the reader's agree. ``gpu_sanitize.py`` runs with
``--cpu-dry-run``, ``gpu_profile_loss.py`` on a tiny input, and ``gpu_check.sh`` must parse and name
benchmark files that exist. (bench_models.py's GPU code has its own CPU run there: it branches on
the input's device alone.) None of this measures or checks anything about the GPU itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from fake_cuda import DEVICE_NAME, fake_cuda, fake_cupy_modules  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@pytest.fixture
def results(monkeypatch, tmp_path):
    """A results folder for the benchmark under test, with CUDA faked."""
    with fake_cuda(monkeypatch):
        yield tmp_path


def read_back(folder: Path, name: str) -> str:
    """The file the benchmark wrote, printed by gpu_summary.py's section for it (its own errors
    propagate: main() would hide a KeyError as 'could not read')."""
    import gpu_summary

    data = json.loads((folder / name).read_text())
    assert data["device"] == DEVICE_NAME
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        gpu_summary.SECTIONS[name](data)
    return out.getvalue()


def _module(monkeypatch, name: str, folder: Path):
    module = pytest.importorskip(name)
    monkeypatch.setattr(module, "RESULTS", folder)
    return module


def test_loss_gpu_benchmark(monkeypatch, results):
    bench = _module(monkeypatch, "bench_loss", results)
    monkeypatch.setattr(bench, "SHAPES", {"8x512": (2, 1, 16, 24), "16x1024": (3, 1, 16, 16)})
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # compiling is torch's code, not the plumbing
    monkeypatch.setattr(bench, "_compiled", {})
    bench.test_loss_gpu_against_eager_compile_and_bandwidth_floor()
    text = read_back(results, "loss_gpu.json")
    assert "16x1024" in text and "graph replay" in text and "could not be captured" not in text


def test_rle_gpu_benchmark(monkeypatch, results):
    _module(monkeypatch, "bench_rle", results).test_gpu_encode_batch_64_vs_one_copy()
    assert "masks/s" in read_back(results, "rle_gpu.json")


def test_postprocess_gpu_benchmarks(monkeypatch, results):
    pytest.importorskip("scipy")
    for name, module in fake_cupy_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    bench = _module(monkeypatch, "bench_postprocess", results)
    batches = bench._host_probability_batches
    monkeypatch.setattr(bench, "GPU_BATCH", 2)
    monkeypatch.setattr(bench, "gpu_probability_batches",
                        lambda torch, n=2: {k: torch.from_numpy(v).cuda() for k, v in batches(n).items()})
    bench.test_gpu_label_batch_64_against_cupyx_loop()
    bench.test_gpu_postprocess_batch_64_against_cupyx_loop()
    bench.test_gpu_postprocess_and_rle_one_logit_map()
    assert "realistic" in read_back(results, "label_gpu.json")
    assert "realistic" in read_back(results, "postprocess_gpu.json")
    assert "postprocess alone" in read_back(results, "postprocess_rle_batch1_gpu.json")


@pytest.mark.slow
def test_pipeline_gpu_benchmark(monkeypatch, results):
    bench = _module(monkeypatch, "bench_pipeline", results)
    monkeypatch.setattr(bench, "_ROOT", results / "models")
    full = bench._latency_and_throughput

    def small(device, precision, **_):  # the CUDA branches (graphs, two streams), tiny networks; fp16 is slow on a CPU
        return full(device, "fp32", seg=("resnet_tiny", 64), cls=("resnet_tiny", 64), original=96, pool_size=4, reps=2)

    monkeypatch.setattr(bench, "_latency_and_throughput", small)
    from_dir = bench.Predictor.from_dir.__func__  # CUDA graphs for batches of 1, 2 and 4 only, not up to 32
    monkeypatch.setattr(bench.Predictor, "from_dir",
                        classmethod(lambda cls, *a, **kw: from_dir(cls, *a, **{"max_batch": 4, **kw})))
    bench.test_gpu_latency_and_throughput()
    text = read_back(results, "pipeline_gpu.json")
    assert "networks in series" in text and "segmenter with its own gate" in text


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning")
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_training_gpu_benchmark(monkeypatch, results, tmp_path_factory):
    pytest.importorskip("yaml")
    bench = _module(monkeypatch, "bench_train", results)
    monkeypatch.setattr(bench, "GPU", bench.SMOKE)
    full = bench._engine_against_plain_loop
    monkeypatch.setattr(bench, "_engine_against_plain_loop",
                        lambda device, p, study_set, tmp, workers, amp: full(device, p, study_set, tmp, 0, amp))
    monkeypatch.setattr(bench, "_draw", lambda out, path: path.write_bytes(b"png"))

    def study_set(n, size):
        from pneumoseg.data import make_synthetic_siim

        root = tmp_path_factory.mktemp("study")
        make_synthetic_siim(root, n_images=n, size=size, positive_fraction=0.3, seed=0)
        return root

    out = results / "run"
    out.mkdir()
    try:
        bench.test_training_throughput_gpu(study_set, out)
    except AssertionError as exc:  # the speed-up target: a timing, meaningless here; the file is written first
        assert "speedup" in str(exc)
    assert "speed-up" in read_back(results, "train_gpu.json")


def test_gpu_profile_loss_script(monkeypatch, results, capsys):
    monkeypatch.setattr(sys, "argv", ["gpu_profile_loss.py", "--steps", "2", "--shape", "2,1,8,8"])
    runpy.run_path(str(HERE / "gpu_profile_loss.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "per step, unprofiled" in out and "host overhead per call" in out


@pytest.mark.slow
def test_gpu_sanitize_cpu_dry_run():
    run = subprocess.run([sys.executable, str(HERE / "gpu_sanitize.py"), "--cpu-dry-run"], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert re.search(r"^(\d+)/\1 checks passed$", run.stdout, re.M), run.stdout[-2000:]


@pytest.mark.parametrize("name, expected", [
    ("gpu_check.sh", {"benchmarks/bench_loss.py", "benchmarks/gpu_sanitize.py", "benchmarks/gpu_summary.py"}),
    ("gpu_session.sh", {"benchmarks/gpu_check.sh", "benchmarks/gpu_profile_pipeline.py",
                        "benchmarks/bench_pipeline.py", "benchmarks/bench_train.py", "benchmarks/bench_models.py"}),
])
def test_gpu_scripts_parse_and_name_existing_files(name, expected):
    script = HERE / name
    run = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    text = script.read_text()
    named = set(re.findall(r"benchmarks/[\w.]+\.(?:py|sh)", text))
    assert expected <= named
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"{name} names files that do not exist: {missing}"


def test_cpu_sanitize_script_parses_and_names_existing_tests():
    # benchmarks/cpu_sanitize.sh (ASan + UBSan build of the CPU kernels) is too slow for CI: check
    # that it parses and that every test file it runs still exists.
    script = HERE / "cpu_sanitize.sh"
    run = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    named = set(re.findall(r"tests/[\w.]+\.py", script.read_text()))
    assert "tests/test_rle.py" in named
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"cpu_sanitize.sh names test files that do not exist: {missing}"


def test_gpu_profile_pipeline_runs_on_the_cpu():
    """The pipeline profile's own code, small, on the CPU (its torch.profiler part is GPU-only)."""
    run = subprocess.run([sys.executable, str(HERE / "gpu_profile_pipeline.py"), "--device", "cpu", "--small",
                          "--reps", "2"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("stage timings") == 2 and "part segmenter alone" in run.stdout, run.stdout


def test_gpu_profile_pipeline_ablation_runs_on_the_cpu():
    """The rewrites' A/B table, small, on the CPU: four rows per model directory, and every rewrite
    gives the plain pipeline's RLE."""
    run = subprocess.run([sys.executable, str(HERE / "gpu_profile_pipeline.py"), "--device", "cpu", "--small",
                          "--reps", "3", "--ablate", "--only", "own"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if "x plain" in line]
    assert len(rows) == 4 and all("same RLE" in row for row in rows), run.stdout
