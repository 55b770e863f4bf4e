"""The GPU benchmarks' and GPU scripts' own code, run on the CPU so that it cannot rot unseen: code
that runs only on a GPU has otherwise never run since its last edit (a deleted helper once turned
into a NameError half-way through a GPU session).

Each cuda-marked benchmark runs at small sizes under ``fake_cuda`` (tensors on the CPU, torch.cuda
stand-ins, cupy mapped onto NumPy/scipy), writes its results file, and ``gpu_summary.py``'s reader
for that file must read it: the writer's keys and the reader's agree. ``gpu_sanitize.py`` runs with
``--cpu-dry-run``, ``gpu_profile_loss.py`` on a tiny input, and ``gpu_check.sh`` must parse and name
benchmark files that exist. (bench_models.py's GPU code has its own CPU run there: it branches on
the input's device alone.) bench_models' GPU run is also checked here for what it keeps across
sessions (it skips what models_gpu.json holds for the GPU model, merges after every model, orders the
missing cases first), and gpu_session.sh's schedule by its dry run. None of this measures or checks
anything about the GPU itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
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


# --------------------------------------------------------------------------------------------------
# bench_models' GPU run keeps what earlier sessions measured: it plans only what models_gpu.json lacks
# for this GPU model, in priority order, and merges its records in after every model.


SEGMENTER_SIZE = 32  # the smallest input of a stride-32 encoder: these tests check records, not speed


def _segmenter_record(bench, encoder, arch, impl, mode, device=DEVICE_NAME, size=SEGMENTER_SIZE, **extra):
    record = dict(encoder=encoder, arch=arch, impl=impl, mode=mode, images_per_s=100.0, device=device, size=size,
                  batch=2, run="an earlier run", date="2026-11-27")
    if impl == bench.REFERENCE_DECODER:
        record["subpixel_images_per_s"] = 130.0
    return {**record, **extra}


def test_models_gpu_plan_measures_only_what_this_gpu_lacks_missing_cases_first():
    bench = pytest.importorskip("bench_models")
    ours, timm, ref = bench.OURS, bench.TIMM_PLAIN, bench.REFERENCE_DECODER
    fwd, both = "forward", tuple(bench.MODES)

    def rec(*args, **kw):
        return _segmenter_record(bench, *args, **kw)

    records = [
        *(rec("resnet34", "unet", impl, m) for impl in (ours, timm) for m in both),  # lacks its reference decoder
        *(rec("densenet121", "unet", impl, m) for impl in (ours, timm, ref) for m in both),  # complete
        rec("efficientnet_b4", "unet", ours, fwd), rec("efficientnet_b4", "unet", timm, fwd),
        rec("efficientnet_b4", "unet", ours, "forward+backward"),  # timm's forward+backward is missing
        *(rec("resnet50", "unet", impl, m, device="NVIDIA H200") for impl in (ours, timm, ref) for m in both),
        *(rec("legacy_xception", "unet", impl, m, size=1024) for impl in (ours, timm) for m in both),
        dict(rec("resnet_tiny", "unet", ours, None), images_per_s=None, error="RuntimeError: out of memory"),
        {k: v for k, v in rec("resnet34", "unet++", ref, fwd).items() if k != "subpixel_images_per_s"},
    ]
    for r in records:
        if r.get("images_per_s") is None:
            del r["images_per_s"]
    done = bench.recorded_cases(records, DEVICE_NAME, SEGMENTER_SIZE, 2)
    assert ("resnet50", "unet", ours, fwd) not in done  # another GPU's record counts for nothing here
    assert ("legacy_xception", "unet", ours, fwd) not in done  # nor another size's
    assert ("resnet34", "unet++", ref, fwd) not in done  # a reference figure without its sub-pixel partner
    cases = [("resnet50", "unet"), ("resnet34", "unet"), ("densenet121", "unet"), ("efficientnet_b4", "unet"),
             ("legacy_xception", "unet"), ("resnet_tiny", "unet"), ("resnet34", "unet++")]
    plan = bench.plan_gpu_cases(cases, done, bench.has_timm_twin, elsewhere={("resnet50", "unet")})
    assert [(c.encoder, c.arch, c.ours, c.reference, c.timm) for c in plan] == [
        ("resnet34", "unet", (), both, ()),  # SUBPIXEL_FIRST: the default segmenter's sub-pixel speed-up
        ("legacy_xception", "unet", both, (), both),  # nothing on any GPU
        ("resnet_tiny", "unet", both, (), ()),  # an error is no figure; no timm twin
        ("resnet34", "unet++", both, both, ()),
        ("resnet50", "unet", both, both, both),  # only another GPU's figures
        ("efficientnet_b4", "unet", ("forward+backward",), both, ("forward+backward",)),  # ours again: one run's ratio
    ]
    assert [c.models for c in plan] == [1, 2, 1, 1, 2, 2]
    assert plan[0].short == "resnet34 unet (pneumoseg, reference decoder)" and plan[1].short == "legacy_xception unet"


@pytest.fixture
def models_bench(monkeypatch, results):
    """bench_models at 32x32 under fake CUDA, on resnet_tiny (given a stand-in timm twin: timm does
    not import here), with the models it builds logged."""
    bench = _module(monkeypatch, "bench_models", results)
    from pneumoseg.models import create_segmenter

    for name, value in {"GPU_SIZE": SEGMENTER_SIZE, "GPU_BATCH": 2, "GPU_WARMUP": 1, "GPU_REPS": 1, "GPU_SECONDS": 600,
                        "GPU_CASES": [("resnet_tiny", "unet"), ("resnet_tiny", "unet++")],
                        "SUBPIXEL_GPU_ENCODERS": ("resnet_tiny",), "SUBPIXEL_FIRST": ("resnet_tiny", "unet++"),
                        "_timm_available": lambda: True, "has_timm_twin": lambda encoder, arch: arch == "unet"}.items():
        monkeypatch.setattr(bench, name, value)
    monkeypatch.delenv("PNEUMOSEG_BENCH_GPU_RESULTS", raising=False)
    monkeypatch.delenv("PNEUMOSEG_BENCH_GPU_REMEASURE", raising=False)
    bench.built = []

    def ours(arch, encoder, **kw):
        bench.built.append((encoder, arch, bench.OURS))
        return create_segmenter(arch, encoder, **kw)

    def timm_twin(encoder):
        bench.built.append((encoder, "unet", bench.TIMM_PLAIN))
        enc = create_segmenter("unet", encoder).encoder
        return bench.PlainUnet(enc, enc.out_channels)

    monkeypatch.setattr(bench, "create_segmenter", ours)
    monkeypatch.setattr(bench, "timm_plain_unet", timm_twin)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny inputs split across threads crawl on a loaded machine (bench_models' smoke run)
    yield bench
    torch.set_num_threads(threads)


def test_models_gpu_run_skips_recorded_cases_and_merges(models_bench, results):
    bench = models_bench
    ours, timm, ref = bench.OURS, bench.TIMM_PLAIN, bench.REFERENCE_DECODER
    both = list(bench.MODES)
    # An earlier session's file, in the layout before records carried their device (as the H200's was):
    # the U-Net's pneumoseg and timm figures on this GPU; the U-Net++ measured on another GPU only.
    legacy = [{"encoder": "resnet_tiny", "arch": "unet", "impl": impl, "mode": m, "images_per_s": 50.0 + i}
              for i, (impl, m) in enumerate((impl, m) for impl in (ours, timm) for m in both)]
    other_gpu = [_segmenter_record(bench, "resnet_tiny", "unet++", ours, m, device="NVIDIA H200") for m in both]
    (results / "models_gpu.json").write_text(json.dumps(
        {"device": DEVICE_NAME, "size": SEGMENTER_SIZE, "batch": 2, "results": legacy, "other_records": other_gpu}))

    bench.test_segmenters_gpu_against_timm_plain_unet()
    # the U-Net++ first (SUBPIXEL_FIRST), then the U-Net's reference decoder: no timm model, nothing twice
    assert bench.built == [("resnet_tiny", "unet++", ours), ("resnet_tiny", "unet", ours)]
    data = json.loads((results / "models_gpu.json").read_text())
    kept = [r for r in data["results"] if r["run"] != data["run"]]
    assert [{k: r[k] for k in legacy[0]} for r in kept] == legacy  # the earlier figures, untouched
    assert all(r["device"] == DEVICE_NAME and r["size"] == SEGMENTER_SIZE for r in kept)
    assert data["other_records"] == other_gpu  # another GPU's records are kept, and did not count
    new = [r for r in data["results"] if r["run"] == data["run"]]
    assert sorted((r["arch"], r["impl"], r["mode"]) for r in new) == sorted(
        [("unet", ref, m) for m in both] + [("unet++", impl, m) for impl in (ours, ref) for m in both])
    assert all(r["device"] == DEVICE_NAME and r["date"] and r["model_s"] > 0 and r["batch"] == 2 for r in new)
    # ours / timm from the earlier run's own pair; sub-pixel / reference from this run's
    assert data["speedup_vs_timm_plain"]["resnet_tiny unet forward"] == pytest.approx(50.0 / 52.0)
    assert set(data["subpixel_speedup"]) == {f"resnet_tiny {a} {m}" for a in ("unet", "unet++") for m in both}
    assert data["not_run_over_budget"] == [] and data["still_to_measure"] == [] and data["models_this_run"] == 2
    text = read_back(results, "models_gpu.json")
    assert "sub-pixel decoder speed-up resnet_tiny unet++ forward" in text and "x timm" in text

    # A second session on this GPU has nothing left to measure, and keeps every record.
    bench.built.clear()
    bench.test_segmenters_gpu_against_timm_plain_unet()
    assert bench.built == []
    again = json.loads((results / "models_gpu.json").read_text())
    assert again["results"] == data["results"] and again["other_records"] == data["other_records"]

    # PNEUMOSEG_BENCH_GPU_REMEASURE: everything again; the new figures replace this GPU's, the others stay.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PNEUMOSEG_BENCH_GPU_REMEASURE", "1")
        bench.test_segmenters_gpu_against_timm_plain_unet()
    assert bench.built == [("resnet_tiny", "unet++", ours), ("resnet_tiny", "unet", ours),
                           ("resnet_tiny", "unet", timm)]
    fresh = json.loads((results / "models_gpu.json").read_text())
    assert {r["run"] for r in fresh["results"]} == {fresh["run"]} and len(fresh["results"]) == 10
    assert fresh["other_records"] == other_gpu


def test_models_gpu_run_over_budget_lists_the_rest_and_loses_nothing(models_bench, results, monkeypatch):
    bench = models_bench
    monkeypatch.setattr(bench, "GPU_SECONDS", 0.0)
    earlier = [_segmenter_record(bench, "resnet_tiny", "unet", bench.OURS, "forward", device="NVIDIA H200")]
    (results / "models_gpu.json").write_text(json.dumps({"device": "NVIDIA H200", "results": earlier}))
    bench.test_segmenters_gpu_against_timm_plain_unet()
    assert bench.built == []
    data = json.loads((results / "models_gpu.json").read_text())
    assert data["not_run_over_budget"] == ["resnet_tiny unet++", "resnet_tiny unet"]  # in the plan's order
    assert data["results"] == [] and data["other_records"] == earlier


def test_models_gpu_run_stopped_mid_run_keeps_every_finished_model(models_bench, results, monkeypatch):
    """The device call's time limit kills the run during its second model: the file holds the first's."""
    bench = models_bench
    timed = bench._images_per_s
    calls = []

    def killed_on_the_fifth_timing(*args):
        calls.append(args)
        if len(calls) == 5:  # 4 timings of the U-Net++ (2 modes x sub-pixel and reference), then the U-Net
            raise KeyboardInterrupt("the device call's time limit")
        return timed(*args)

    monkeypatch.setattr(bench, "_images_per_s", killed_on_the_fifth_timing)
    with pytest.raises(KeyboardInterrupt):
        bench.test_segmenters_gpu_against_timm_plain_unet()
    data = json.loads((results / "models_gpu.json").read_text())
    assert sorted((r["arch"], r["impl"], r["mode"]) for r in data["results"]) == sorted(
        ("unet++", impl, m) for impl in (bench.OURS, bench.REFERENCE_DECODER) for m in bench.MODES)
    assert data["not_run_over_budget"] == ["resnet_tiny unet"]
    assert not (results / "models_gpu.json.partial").exists()


def test_models_gpu_plan_cli_reads_the_committed_results():
    run = subprocess.run([sys.executable, str(HERE / "bench_models.py"), "--gpu-plan", "NVIDIA H100 80GB HBM3"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert "0 figures recorded" in lines[0] and lines[1].startswith("  resnet34 unet:"), run.stdout


def test_gpu_session_schedule_gives_the_segmenters_the_first_call(tmp_path):
    """gpu_session.sh's dry run (each step takes its whole limit): the kernel checks first, then the
    segmenters with what is left, and a second call named for what did not fit."""
    run = subprocess.run(["bash", str(HERE / "gpu_session.sh")], capture_output=True, text=True, timeout=120,
                         env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "OUT": str(tmp_path / "out"),
                              "GPU_SESSION_DRY_RUN": "1"}, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    steps = re.findall(r"^dry run: (.+?) \(limit (\d+)s\): (.*)$", run.stdout, re.M)
    assert [s[0] for s in steps] == ["gpu_check.sh (kernels)", "bench_models.py (segmenters, issue 8)"], run.stdout
    (_, kernel_limit, kernel_cmd), (_, model_limit, model_cmd) = steps
    assert int(kernel_limit) == 270 and "GPU_CHECK_DEADLINE=270" in kernel_cmd
    budget = int(re.search(r"PNEUMOSEG_BENCH_GPU_SECONDS=(\d+)", model_cmd).group(1))
    assert int(model_limit) == 585 - 270 - 15 and budget == int(model_limit) - 25
    assert "timeout --kill-after=5 295 python3 -m pytest -m cuda benchmarks/bench_models.py -q -s" in model_cmd
    assert "GPU_SESSION_STEPS=models,profile,ablate,compile,apps bash benchmarks/gpu_session.sh" in run.stdout
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "# ---- segmenters (issue 8)" in summary and "still to measure on" in summary

    # A later session with the segmenters done: the pipeline's steps get the time again.
    run = subprocess.run(["bash", str(HERE / "gpu_session.sh")], capture_output=True, text=True, timeout=120,
                         env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "OUT": str(tmp_path / "out2"),
                              "GPU_SESSION_DRY_RUN": "1", "GPU_SESSION_STEPS": "kernels,profile,ablate,compile,apps",
                              "GPU_SESSION_KERNEL_SECONDS": "230"}, cwd=ROOT)
    steps = re.findall(r"^dry run: (.+?) \(limit (\d+)s\)", run.stdout, re.M)
    assert steps == [("gpu_check.sh (kernels)", "230"), ("gpu_profile_pipeline.py", "70"),
                     ("gpu_profile_pipeline.py --ablate", "60"), ("gpu_profile_pipeline.py --compile", "150")], run.stdout
