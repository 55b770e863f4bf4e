"""The two-stage pipeline end to end (pixels in memory -> RLE strings) and per stage, p50 / p95, against
what a user would otherwise run: plain PyTorch eager fp32 (the same network), sigmoid, a NumPy threshold
and the competition's Python RLE loop.

    pytest benchmarks/bench_pipeline.py --benchmark-json=pipeline.json   # timed (about 20 min on 2 cores)
    pytest benchmarks/bench_pipeline.py --benchmark-disable                # smoke: small models, one round

Cases on a CPU (timed run). A U-Net ResNet34 with a classification head on its encoder (the gate) at
512 from 1024x1024 radiographs, batch 1 and 16, and at 1024 batch 1 only: one batch of 16 at 1024
takes minutes on two cores, and the ratios between the pipelines do not depend on the batch. Pipelines:

- ``torch eager baseline``: preprocessing, the network on every image, bilinear resize of the logits,
  sigmoid, NumPy threshold at 0.5, the competition's per-pixel Python RLE loop;
- ``pneumoseg torch`` / ``onnxruntime fp32`` / ``onnxruntime int8``: the Predictor segmenting every image
  (``segment="all"``, the same work as the baseline), with the same threshold;
- ``pneumoseg onnxruntime int8, gated 22%``: the product path, the gate letting 22% of the images
  through to the decoder (the SIIM share of positives).

Weights are random for the timing cases (speed does not depend on them); int8 accuracy is measured on
a model trained with the ``demo`` recipe on the synthetic study set (Kaggle Dice of the onnxruntime fp32
and int8 pipelines on held-out studies). Targets on a CPU: onnxruntime fp32 >= 1.5x torch eager, int8
>= 2x onnxruntime fp32 with Kaggle Dice within 0.01. A timed run writes its table to
``benchmarks/results/pipeline_cpu.{txt,json}``. The GPU targets are the ``cuda`` test at the end.

On a shared machine torch's OpenMP pool degrades far more than onnxruntime's when other processes
compete for the cores (measured here: the same U-Net 3x slower with 2 torch threads than with 1), which
inflates every ratio against eager. ``PNEUMOSEG_BENCH_THREADS=1`` runs torch and onnxruntime on one
thread each, the comparison least sensitive to that (results to ``pipeline_cpu_threads1.*``):

    PNEUMOSEG_BENCH_THREADS=1 pytest benchmarks/bench_pipeline.py -k "512-b1-"
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from reference import competition_mask2rle  # noqa: E402
from pneumoseg.infer import Predictor  # noqa: E402
from stage_rounds import pedantic_with_stages  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
_ROOT = Path(tempfile.mkdtemp(prefix="pneumoseg-bench-pipeline-"))
BASELINE = "torch eager baseline"
PIPELINES = (BASELINE, "pneumoseg torch", "pneumoseg onnxruntime fp32", "pneumoseg onnxruntime int8",
             "pneumoseg onnxruntime int8, gated 22%")
#: the pipeline each group's ratios are taken against in report.py (the others are marked baselines)
OURS = "pneumoseg onnxruntime fp32"
POSITIVE_SHARE = 0.22
_ROWS: list[dict] = []
THREADS = int(os.environ.get("PNEUMOSEG_BENCH_THREADS", "0")) or None
if THREADS:
    torch.set_num_threads(THREADS)


@dataclass(frozen=True)
class Case:
    encoder: str
    size: int  # network input
    original: int  # radiograph size
    batch: int
    rounds: int

    @property
    def name(self) -> str:
        return f"U-Net {self.encoder} {self.size} from {self.original}, batch {self.batch}"


TIMED_CASES = (Case("resnet34", 512, 1024, 1, 7), Case("resnet34", 512, 1024, 16, 2), Case("resnet34", 1024, 1024, 1, 3))
SMOKE_CASES = (Case("resnet_tiny", 128, 256, 1, 1), Case("resnet_tiny", 128, 256, 4, 1))


def _smoke(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = SMOKE_CASES if _smoke(metafunc.config) else TIMED_CASES
        metafunc.parametrize("case", cases, ids=[f"{c.encoder}-{c.size}-b{c.batch}" for c in cases])


# --------------------------------------------------------------------------------------------------
# models and images (built once per session)


@functools.lru_cache(maxsize=None)
def images(original: int, n: int) -> tuple:
    from pneumoseg.data import chest_phantom

    return tuple(chest_phantom(original, np.random.default_rng([42, i]), bool(i % 3 == 0))[0] for i in range(n))


@functools.lru_cache(maxsize=None)
def timing_model(encoder: str, size: int, original: int) -> Path:
    """A random-weight U-Net with a gate head, exported to ONNX fp32 and int8 (calibrated on phantoms)."""
    from pneumoseg.export.onnx import export_onnx
    from pneumoseg.models import create_segmenter
    from pneumoseg.models.model_dir import save_model_dir

    torch.manual_seed(0)
    net = create_segmenter("unet", encoder, in_channels=1, aux_classifier=True).eval()
    thresholds = {"gate": 0.0, "top": None, "bottom": 0.5, "min_component_area": 0}  # as the baseline: p > 0.5
    md = save_model_dir(_ROOT / f"{encoder}-{size}", {"segmenter": net}, input_sizes={"segmenter": size},
                        thresholds=thresholds)
    calibration = list(images(original, 8))
    export_onnx(md.path, "fp32", validation=calibration[:2])
    # random weights give no meaningful masks to agree on: the agreement check is the trained-model test's
    export_onnx(md.path, "int8", calibrate=calibration, min_dice=0.0)
    return md.path


@functools.lru_cache(maxsize=None)
def predictor(path: Path, backend: str, precision: str, gated: bool, original: int) -> Predictor:
    threads = {"threads": THREADS} if backend == "onnxruntime" else {}
    p = Predictor.from_dir(path, backend=backend, precision=precision, segment="gated" if gated else "all", **threads)
    if gated:  # a gate that passes 22% of the images, as SIIM's share of positives
        scores = [q.score for q in p.predict(list(images(original, 9)))]
        p = Predictor.from_dir(path, backend=backend, precision=precision,
                               thresholds={"gate": float(np.quantile(scores, 1 - POSITIVE_SHARE))}, **threads)
    p.warmup()
    return p


def eager_baseline(path: Path, subpixel: bool = True):
    """What a user would otherwise run, with the same network (``subpixel=False``: its decoder blocks
    upsample, concatenate and convolve, as segmentation_models_pytorch's do)."""
    import torch.nn.functional as F

    from pneumoseg.data import preprocess
    from pneumoseg.models.decoders.blocks import set_subpixel_decoding
    from pneumoseg.models.model_dir import load_model_dir

    md = load_model_dir(path)
    net = md.build("segmenter")
    set_subpixel_decoding(net, subpixel)
    size = md.networks["segmenter"].input_size

    def run(batch, stages):
        t0 = time.perf_counter()
        x = preprocess(np.stack(batch), size)
        t1 = time.perf_counter()
        with torch.no_grad():
            out = net(x)
        logits = out[0] if isinstance(out, tuple) else out
        t2 = time.perf_counter()
        probs = torch.sigmoid(F.interpolate(logits, size=batch[0].shape, mode="bilinear", align_corners=False))
        masks = probs[:, 0].numpy() > 0.5
        t3 = time.perf_counter()
        h, w = batch[0].shape
        # the organisers' loop walks img[x][y] of the transposed 0/255 mask
        strings = [competition_mask2rle(m.T.astype(np.uint8) * 255, w, h) or "-1" for m in masks]
        t4 = time.perf_counter()
        stages.append({"preprocess": t1 - t0, "segment": t2 - t1, "postprocess": t3 - t2, "rle": t4 - t3, "total": t4 - t0})
        return strings

    return run


def _stats(stages: list[dict], batch: int) -> dict:
    keys = [k for k in ("preprocess", "classify", "segment", "postprocess", "rle", "total") if any(k in s for s in stages)]
    out = {}
    for k in keys:
        values = np.array([s[k] for s in stages if k in s]) * 1e3
        out[k] = {"p50_ms": float(np.percentile(values, 50)), "p95_ms": float(np.percentile(values, 95)),
                  "p50_ms_per_image": float(np.percentile(values, 50)) / batch}
    return out


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_pipeline(benchmark, case, pipeline):
    path = timing_model(case.encoder, case.size, case.original)
    pool = list(images(case.original, max(9, case.batch)))
    calls = {"n": 0}

    def next_batch():  # batch 1 walks through the pool, so a gated run sees both kinds of image
        k = calls["n"]
        calls["n"] += 1
        return [pool[(k * case.batch + i) % len(pool)] for i in range(case.batch)]

    if pipeline == BASELINE:
        run = eager_baseline(path)
        run(next_batch(), [])  # first call: kernel choices for these shapes

        def fn():
            stages: list[dict] = []
            return run(next_batch(), stages), stages[0]
    else:
        backend = "torch" if "torch" in pipeline else "onnxruntime"
        precision = "int8" if "int8" in pipeline else "fp32"
        p = predictor(path, backend, precision, "gated" in pipeline, case.original)
        # the first batches of this size (onnxruntime allocates a shape's memory plan on its second run)
        p.warmup(case.batch)

        def fn():
            preds = p.predict(next_batch(), batch_size=case.batch)
            return [q.rle for q in preds], {k: v / 1e3 for k, v in preds[0].timings.items() if k != "load"}

    benchmark.group = f"pipeline {case.name}"
    benchmark.extra_info.update(impl=pipeline, baseline=pipeline != OURS)
    strings, stages = pedantic_with_stages(benchmark, fn, case.rounds)
    assert len(strings) == case.batch and all(isinstance(s, str) for s in strings)
    stats = _stats(stages, case.batch)
    benchmark.extra_info["stages"] = stats
    _ROWS.append({"case": case.name, "pipeline": pipeline, "batch": case.batch, "rounds": case.rounds, **{
        f"{k}_{q}": v[q] for k, v in stats.items() for q in ("p50_ms", "p95_ms")}})


# --------------------------------------------------------------------------------------------------
# int8 accuracy on a trained model


@functools.lru_cache(maxsize=None)
def trained_model(smoke: bool) -> tuple[Path, Path]:
    """(model dir with fp32 and int8 ONNX, held-out study folder): the demo recipe on a synthetic set,
    int8 calibrated on the training images."""
    from pneumoseg.data import make_synthetic_siim
    from pneumoseg.export.onnx import export_onnx
    from pneumoseg.train import load_recipe, train

    n, size, held_out = (24, 64, 12) if smoke else (96, 256, 48)
    data = make_synthetic_siim(_ROOT / "train-set", n_images=n, size=size, seed=1).parent
    test = make_synthetic_siim(_ROOT / "held-out", n_images=held_out, size=size, seed=2).parent
    overrides = ["epochs=1", "classifier.epochs=1", "samples_per_epoch=16", "classifier.samples_per_epoch=16",
                 "data.image_size=64", "classifier.data.image_size=64", "data.folds=3"] if smoke else []
    result = train(load_recipe("demo", overrides, data={"root": data}), _ROOT / "trained", progress=False)
    path = result.out
    export_onnx(path, "fp32")
    from pneumoseg.data.siim import find_dicoms

    calibration = [str(p) for p in list(find_dicoms(data).values())[:32]]
    from pneumoseg.data import read_dicom

    export_onnx(path, "int8", calibrate=[read_dicom(p).pixels for p in calibration], min_dice=0.0 if smoke else None)
    return path, test


@functools.lru_cache(maxsize=None)
def tiny_two_stage() -> Path:
    """A classifier + segmenter small enough (32 px, 8-channel decoder) that the networks cost about
    as much as the pipeline around them."""
    from pneumoseg.models import create_classifier, create_segmenter
    from pneumoseg.models.model_dir import save_model_dir

    torch.manual_seed(0)
    networks = {"segmenter": create_segmenter("unet", "resnet_tiny", in_channels=1, decoder_channels=(8,) * 5).eval(),
                "classifier": create_classifier("resnet_tiny", num_classes=1, in_channels=1).eval()}
    return save_model_dir(_ROOT / "tiny-two-stage", networks, input_sizes={"segmenter": 32, "classifier": 32},
                          thresholds={"gate": 0.0, "top": 0.75, "min_area": 20, "bottom": 0.3}).path


@pytest.mark.parametrize("impl", ["pneumoseg torch, segment all", "the two networks alone",
                                  "pneumoseg around the networks (their outputs stored)"])
def test_predictor_fixed_cost_batch1(benchmark, impl):
    """Batch 1 from an in-memory 64x64 tensor with tiny networks: what the Predictor adds around the
    networks (input handling, preprocessing, post-processing, RLE, bookkeeping) is what decides a
    few-millisecond batch-1 latency on a GPU. The third case measures that directly, each network
    part answering with its stored outputs (``cpu_profile_predictor.py`` does the same, in thread
    time and against a git revision)."""
    path = tiny_two_stage()
    image = torch.from_numpy(images(64, 1)[0])
    benchmark.group = "predictor fixed cost, batch 1, tiny networks, cpu"
    benchmark.extra_info.update(impl=impl, baseline=impl != "pneumoseg torch, segment all", threads=torch.get_num_threads())
    if impl.startswith("pneumoseg"):
        p = Predictor.from_dir(path, backend="torch", device="cpu", segment="all")
        p.warmup(1)
        if "stored" in impl:
            from cpu_profile_predictor import _StoredOutputs

            p.backend.run = _StoredOutputs(p.backend.run)

        def fn():
            return p.predict(image, batch_size=1)[0].rle
    else:
        from pneumoseg.models.model_dir import load_model_dir

        md = load_model_dir(path)
        seg, cls = md.build("segmenter").eval(), md.build("classifier").eval()
        x = torch.randn(1, 1, 32, 32)

        def fn():
            with torch.no_grad():
                cls(x)
                return seg(x)

    fn()
    out = benchmark.pedantic(fn, rounds=100, iterations=3, warmup_rounds=5)
    assert out is not None


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_int8_accuracy_on_a_trained_model(benchmark, request, precision):
    from pneumoseg.data import read_rle_csv
    from pneumoseg.infer.evaluation import evaluate

    path, test = trained_model(_smoke(request.config))
    p = Predictor.from_dir(path, backend="onnxruntime", precision=precision, threads=THREADS)
    p.warmup()
    truth = read_rle_csv(test / "train-rle.csv")
    benchmark.group = "trained demo model (resnet_tiny U-Net 128), held-out synthetic studies, onnxruntime"
    benchmark.extra_info.update(impl=f"onnxruntime {precision}", baseline=precision == "fp32")
    preds = benchmark.pedantic(lambda: p.predict(test, batch_size=16), rounds=3, iterations=1, warmup_rounds=0)
    ev = evaluate({q.image_id: [q.rle] for q in preds}, truth, scores={q.image_id: q.score for q in preds})
    benchmark.extra_info.update(kaggle_dice=ev.kaggle_dice, empty_submission_dice=ev.empty_submission_dice,
                                auc=ev.classification()["auc"])
    _ROWS.append({"case": "trained demo model, held-out studies", "pipeline": f"pneumoseg onnxruntime {precision}",
                  "kaggle_dice": ev.kaggle_dice, "empty_submission_dice": ev.empty_submission_dice,
                  "seconds_per_run": float(np.median(benchmark.stats.stats.data)) if benchmark.stats else None})


# --------------------------------------------------------------------------------------------------
# the summary table


def _table(rows: list[dict]) -> tuple[str, dict]:
    lines = []
    summary: dict = {"cases": {}}
    for case in dict.fromkeys(r["case"] for r in rows if "total_p50_ms" in r):
        by = {r["pipeline"]: r for r in rows if r["case"] == case}
        lines.append(f"{case}  (ms per batch, p50/p95; network = classify + segment)")
        lines.append(f"  {'pipeline':<38} {'total':>15} {'preprocess':>13} {'network':>15} {'postprocess':>11} "
                     f"{'rle':>11} {'vs eager':>9} {'network vs eager':>17}")
        base = by.get(BASELINE)

        def network(r: dict, q: str) -> float:
            return r.get(f"segment_{q}", 0.0) + r.get(f"classify_{q}", 0.0)

        for name, r in by.items():
            ratio = base["total_p50_ms"] / r["total_p50_ms"] if base else float("nan")
            net = network(base, "p50_ms") / network(r, "p50_ms") if base else float("nan")
            pair = lambda k: f"{r.get(k + '_p50_ms', float('nan')):.0f}/{r.get(k + '_p95_ms', float('nan')):.0f}"  # noqa: E731
            lines.append(f"  {name:<38} {pair('total'):>15} {pair('preprocess'):>13} "
                         f"{network(r, 'p50_ms'):>7.0f}/{network(r, 'p95_ms'):<7.0f} {pair('postprocess'):>11} "
                         f"{pair('rle'):>11} {ratio:>8.2f}x {net:>16.2f}x")
        fp32, int8, eager = by.get("pneumoseg onnxruntime fp32"), by.get("pneumoseg onnxruntime int8"), base
        entry = {"rows": by}
        if fp32 and eager:
            entry["onnxruntime_fp32_vs_eager_end_to_end"] = eager["total_p50_ms"] / fp32["total_p50_ms"]
            entry["onnxruntime_fp32_vs_eager_network"] = eager["segment_p50_ms"] / (fp32["segment_p50_ms"] + fp32.get("classify_p50_ms", 0))
        if fp32 and int8:
            entry["int8_vs_fp32_end_to_end"] = fp32["total_p50_ms"] / int8["total_p50_ms"]
            entry["int8_vs_fp32_network"] = (fp32["segment_p50_ms"] + fp32.get("classify_p50_ms", 0)) / (
                int8["segment_p50_ms"] + int8.get("classify_p50_ms", 0))
        for key in ("onnxruntime_fp32_vs_eager_end_to_end", "onnxruntime_fp32_vs_eager_network",
                    "int8_vs_fp32_end_to_end", "int8_vs_fp32_network"):
            if key in entry:
                lines.append(f"  {key.replace('_', ' ')}: {entry[key]:.2f}x")
        summary["cases"][case] = entry
        lines.append("")
    acc = {r["pipeline"]: r for r in rows if "kaggle_dice" in r}
    if acc:
        lines.append("trained demo model (resnet_tiny U-Net at 128), held-out synthetic studies")
        for name, r in acc.items():
            lines.append(f"  {name:<40} Kaggle Dice {r['kaggle_dice']:.4f} (all-empty {r['empty_submission_dice']:.4f})")
        if len(acc) == 2:
            a, b = acc["pneumoseg onnxruntime fp32"], acc["pneumoseg onnxruntime int8"]
            summary["int8_kaggle_dice_difference"] = abs(a["kaggle_dice"] - b["kaggle_dice"])
            lines.append(f"  |int8 - fp32| Kaggle Dice: {summary['int8_kaggle_dice_difference']:.4f}")
        summary["accuracy"] = acc
    return "\n".join(lines), summary


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    if not _ROWS:
        return
    text, summary = _table(_ROWS)
    print("\n" + text)
    if not _smoke(request.config):
        RESULTS.mkdir(exist_ok=True)
        name = "pipeline_cpu" + (f"_threads{THREADS}" if THREADS else "")
        header = (f"# bench_pipeline.py, one CPU run: {platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} torch threads, onnxruntime threads {THREADS or 'physical cores'}; "
                  "shared machine, so the ratios are noisy\n")
        (RESULTS / f"{name}.txt").write_text(header + text + "\n")
        (RESULTS / f"{name}.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    shutil.rmtree(_ROOT, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# GPU targets (skipped without a CUDA device)


@pytest.mark.cuda
def test_gpu_latency_and_throughput():
    """End-to-end batch-1 latency at 1024 (pixels on the GPU -> RLE strings) with a U-Net ResNet34
    segmenter and an EfficientNet-B4 classifier at 512, against plain eager fp32 of the two networks;
    throughput at batch 32 with 22% of the images gated in. Figures (and whether the targets are met:
    <= 3 ms and >= 7x eager on an H100, >= 1000 images/s) to benchmarks/results/pipeline_gpu.json."""
    results = _latency_and_throughput("cuda", "fp16", seg=("resnet34", 1024), cls=("efficientnet_b4", 512),
                                      original=1024, pool_size=32, reps=100)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pipeline_gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    assert results["classifier + segmenter"]["torch"]["batch1_all_p50_ms"] > 0


def test_gpu_latency_code_runs_on_the_cpu():
    """The GPU test's own code on the CPU with small networks and images, so a GPU session's minutes
    are not spent discovering a bug in the benchmark."""
    results = _latency_and_throughput("cpu", "fp32", seg=("resnet_tiny", 64), cls=("resnet_tiny", 64),
                                      original=96, pool_size=6, reps=2)
    for config in ("classifier + segmenter", "segmenter with its own gate"):
        row = results[config]["torch"]
        assert row["batch1_all_p50_ms"] > 0 and row["batch_images_per_second"] > 0
        assert 1 <= row["batch_gated_in"] <= 6, row


def _latency_and_throughput(device: str, precision: str, seg: tuple, cls: tuple, original: int, pool_size: int,
                            reps: int) -> dict:
    """Two model directories (a classifier + a segmenter; a segmenter gating on its own encoder), each
    timed per backend: batch 1 with every image segmented (the worst case, the same work as the eager
    baseline), batch 1 walking the pool with a gate that passes ``POSITIVE_SHARE`` of it, and one batch of
    the whole pool gated."""
    from pneumoseg.models import create_classifier, create_segmenter
    from pneumoseg.models.model_dir import save_model_dir

    (seg_encoder, seg_size), (cls_encoder, cls_size) = seg, cls
    thresholds = {"gate": 0.0, "top": 0.75, "min_area": 2000, "bottom": 0.3}
    torch.manual_seed(0)
    configs = {
        "classifier + segmenter": save_model_dir(
            _ROOT / f"latency-{device}-two", {"segmenter": create_segmenter("unet", seg_encoder, in_channels=1).eval(),
                                              "classifier": create_classifier(cls_encoder, num_classes=1, in_channels=1).eval()},
            input_sizes={"segmenter": seg_size, "classifier": cls_size}, thresholds=thresholds, overwrite=True),
        "segmenter with its own gate": save_model_dir(
            _ROOT / f"latency-{device}-own", {"segmenter": create_segmenter("unet", seg_encoder, in_channels=1,
                                                                            aux_classifier=True).eval()},
            input_sizes={"segmenter": seg_size}, thresholds=thresholds, overwrite=True),
    }
    pool = [torch.from_numpy(img).to(device) for img in images(original, pool_size)]
    cuda = device == "cuda"

    def timed(fn, n):
        fn()
        if cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return float(np.median(times)), float(np.percentile(times, 95))

    backends = ["torch"]
    results = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
               "precision": precision, "original": original, "pool": pool_size, "positive_share": POSITIVE_SHARE}
    if cuda:
        try:
            import tensorrt  # noqa: F401

            backends.append("tensorrt")
        except ImportError:
            results["tensorrt"] = "not installed"
    for config, md in configs.items():
        # plain eager fp32: the directory's networks on one image already on the device
        nets = {name: md.build(name).to(device).eval() for name in md.networks}
        x = {name: torch.randn(1, 1, *md.networks[name].input_size, device=device) for name in md.networks}

        def eager():
            with torch.no_grad():
                if "classifier" in nets:
                    nets["classifier"](x["classifier"]).sigmoid()
                out = nets["segmenter"](x["segmenter"])
                (out[0] if isinstance(out, tuple) else out).sigmoid().gt(0.5).any()

        eager_s, _ = timed(eager, max(5, reps // 2))
        row_of = {"eager_fp32_networks_ms": eager_s * 1e3}
        nets.clear()  # frees the eager networks before the backends load theirs
        for backend in backends:
            if backend == "tensorrt":
                from pneumoseg.export.onnx import export_onnx
                from pneumoseg.export.tensorrt import export_tensorrt

                export_onnx(md.path, "fp16")
                export_tensorrt(md.path, "fp16", batch=f"1,8,{pool_size}")
            everything = Predictor.from_dir(md.path, backend=backend, device=device, precision=precision, segment="all")
            everything.warmup(1)
            all_p50, all_p95 = timed(lambda: everything.predict(pool[0], batch_size=1), reps)
            serial = {}
            if cuda and "classifier" in md.networks:  # the same with the networks one after the other
                everything.overlap_networks = False
                serial_p50, _ = timed(lambda: everything.predict(pool[0], batch_size=1), reps)
                everything.overlap_networks = True
                serial = {"batch1_all_networks_in_series_p50_ms": serial_p50 * 1e3}
            scores = [q.score for q in everything.predict(pool, batch_size=pool_size)]
            gate = float(np.quantile(scores, 1 - POSITIVE_SHARE))
            gated = Predictor.from_dir(md.path, backend=backend, device=device, precision=precision,
                                       thresholds={"gate": gate})
            for batch in (1, pool_size):  # both stages at both batch sizes, before any timing
                gated.warmup(batch)
            walk = iter(range(10**9))
            walk_p50, walk_p95 = timed(lambda: gated.predict(pool[next(walk) % pool_size], batch_size=1), reps)
            batch_s, _ = timed(lambda: gated.predict(pool, batch_size=pool_size), max(3, reps // 5))
            gated_in = sum(q.segmented for q in gated.predict(pool, batch_size=pool_size))
            row_of[backend] = {
                "batch1_all_p50_ms": all_p50 * 1e3, "batch1_all_p95_ms": all_p95 * 1e3, **serial,
                "batch1_gated_walk_p50_ms": walk_p50 * 1e3, "batch1_gated_walk_p95_ms": walk_p95 * 1e3,
                "speedup_vs_eager_fp32": eager_s / all_p50,
                "batch_images_per_second": pool_size / batch_s, "batch_gated_in": gated_in,
                "targets": {"latency_le_3ms_on_h100": all_p50 * 1e3 <= 3.0, "speedup_ge_7x": eager_s / all_p50 >= 7.0,
                            "throughput_ge_1000_per_s": pool_size / batch_s >= 1000},
            }
        results[config] = row_of
    return results
