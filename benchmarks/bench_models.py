"""Segmenter throughput: forward (inference mode) and forward + backward (training step without the
optimiser) images/s of ``create_segmenter(arch, encoder)`` at 512x512, batch 2, fp32, on the CPU; on a
GPU at 1024x1024 in fp16 (autocast) + channels_last against the same network written the way a user
would without pneumoseg: a ``timm.create_model(..., features_only=True)`` encoder and a plain U-Net
decoder.

    pytest benchmarks/bench_models.py --benchmark-json=models.json && python benchmarks/bench_models.py models.json

The second command prints images/s per model (``extra_info["images_per_s"]``, from the median) and
draws them to ``benchmarks/results/models_cpu.png``.

CPU set: the U-Net on every encoder costs minutes per pass on two cores, so it runs on a subset that
spans the registry's compute range and every encoder family: resnet_tiny, resnet34 (the default),
resnet50, seresnext50_32x4d, densenet121, efficientnet_b0, efficientnet_b4, tf_efficientnet_b4,
legacy_xception; U-Net++ (2-6x the decoder cost) on resnet_tiny, resnet34 and efficientnet_b0.
efficientnet_b1..b3 lie between b0 and b4, and tf_efficientnet_bN is efficientnet_bN with TF "SAME"
padding (the same convolutions). ``PNEUMOSEG_BENCH_ALL_MODELS=1`` runs every encoder x architecture.
The CPU also compares resnet34's U-Net with the same network written as a plain decoder over the same
encoder (the ratio shows what our smp-compatible module structure costs: nothing, ideally).

Sub-pixel decoder blocks (``DecoderBlock``'s default: the upsample-concatenate-convolve step as one
sub-pixel convolution) against the reference formulation (``set_subpixel_decoding(model, False)``):
``test_subpixel_decoder_cpu`` times the demo recipe's segmenter (resnet_tiny, decoder 64-8) and the
resnet34 U-Net at 512, batch 1 and 2, 1 and 2 threads, forward and forward+backward. Each round runs
the reference step (timed in the round's setup) and then the sub-pixel step on the same model and
input, so both see the same load on a shared machine; ``extra_info`` holds both medians and
``subpixel_speedup`` (reference median / sub-pixel median). Only these:

    pytest benchmarks/bench_models.py -k subpixel --benchmark-json=subpixel.json
    python benchmarks/bench_models.py subpixel.json --png /tmp/subpixel.png   # prints the ratios

The GPU comparison times both formulations of the recipes' encoders' segmenters too
(``subpixel_speedup`` in ``models_gpu.json``).

GPU figures accumulate across sessions: a GPU run (``pytest -m cuda benchmarks/bench_models.py``)
measures only the cases ``benchmarks/results/models_gpu.json`` lacks for its GPU model, the missing
ones first, within ``PNEUMOSEG_BENCH_GPU_SECONDS``, and merges its records into that file after every
model (see the GPU section below). What the next run on a GPU would measure, and about how long it
would take:

    python benchmarks/bench_models.py --gpu-plan ["NVIDIA H100 80GB HBM3"]

With ``--benchmark-disable`` (CI's smoke run) the inputs shrink to 64x64 so every model still runs.
On a shared machine torch's thread pool degrades under load; ``PNEUMOSEG_BENCH_THREADS=1`` runs torch
on one thread for this module (as ``bench_pipeline.py``), the figure least sensitive to it.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pneumoseg.models import ARCHITECTURES, ENCODERS, create_segmenter, list_encoders  # noqa: E402
from pneumoseg.models.decoders import set_subpixel_decoding  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CPU_SIZE, CPU_BATCH = 512, 2
GPU_SIZE, GPU_BATCH = 1024, 4
SMOKE_SIZE = 64
DECODER_CHANNELS = (256, 128, 64, 32, 16)

CPU_UNET = ["resnet_tiny", "resnet34", "resnet50", "seresnext50_32x4d", "densenet121", "efficientnet_b0",
            "efficientnet_b4", "tf_efficientnet_b4", "legacy_xception"]
CPU_UNETPP = ["resnet_tiny", "resnet34", "efficientnet_b0"]
if os.environ.get("PNEUMOSEG_BENCH_ALL_MODELS"):
    CPU_CASES = [(e, a) for e in list_encoders() for a in ARCHITECTURES]
else:
    CPU_CASES = [(e, "unet") for e in CPU_UNET] + [(e, "unet++") for e in CPU_UNETPP]
CPU_CASES = [(e, a) for e, a in CPU_CASES if e in ENCODERS]


THREADS = int(os.environ.get("PNEUMOSEG_BENCH_THREADS", "0")) or None


@pytest.fixture(scope="module", autouse=True)
def _threads(request):
    before = torch.get_num_threads()
    # the smoke run's 64x64 inputs are too small to split across threads (7x slower on a loaded box)
    smoke = request.config.getoption("benchmark_disable", default=False)
    threads = THREADS or (1 if smoke else None)
    if threads:
        torch.set_num_threads(threads)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# The baseline network: the same U-Net written plainly (no smp module structure), over any encoder
# that returns the five feature maps at strides 2..32 (timm's features_only models do).


class PlainUnet(nn.Module):
    def __init__(self, encoder: nn.Module, encoder_channels, decoder_channels=DECODER_CHANNELS, classes=1):
        super().__init__()
        self.encoder = encoder
        skips = list(encoder_channels)[::-1][1:] + [0]
        ins = [list(encoder_channels)[-1], *decoder_channels[:-1]]

        def conv_bn_relu(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.blocks = nn.ModuleList(
            nn.Sequential(*conv_bn_relu(i + s, o), *conv_bn_relu(o, o)) for i, s, o in zip(ins, skips, decoder_channels)
        )
        self.head = nn.Conv2d(decoder_channels[-1], classes, 3, padding=1)

    def forward(self, x):
        features = self.encoder(x)[::-1]
        y = features[0]
        for i, block in enumerate(self.blocks):
            y = F.interpolate(y, scale_factor=2.0, mode="nearest")
            if i + 1 < len(features):
                y = torch.cat([y, features[i + 1]], dim=1)
            y = block(y)
        return self.head(y)


def ours_as_plain(encoder: str) -> nn.Module:
    enc = create_segmenter("unet", encoder).encoder
    return PlainUnet(enc, enc.out_channels)


def timm_plain_unet(encoder: str) -> nn.Module:
    import timm

    timm_name = ENCODERS[encoder].timm_name
    enc = timm.create_model(timm_name, pretrained=False, features_only=True, in_chans=1)
    return PlainUnet(enc, enc.feature_info.channels())


# --------------------------------------------------------------------------------------------------
# CPU


def _forward(model, x):
    with torch.inference_mode():
        return model(x)


def _forward_backward(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    out.float().mean().backward()
    return out


MODES = {"forward": (_forward, False), "forward+backward": (_forward_backward, True)}


def _run(benchmark, model, mode, size, batch, rounds):
    step, train = MODES[mode]
    model.train(train)
    x = torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(0))
    step(model, x)  # warm-up (oneDNN primitive caches)
    out = benchmark.pedantic(step, args=(model, x), rounds=rounds, iterations=1, warmup_rounds=0)
    assert out.shape == (batch, 1, size, size) and torch.isfinite(out.float()).all()
    if not benchmark.disabled:
        benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median


@functools.lru_cache(maxsize=1)
def _segmenter(encoder, arch):
    """The forward and forward+backward tests of one model run one after the other: build it once."""
    torch.manual_seed(0)
    return create_segmenter(arch, encoder)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("encoder, arch", [pytest.param(e, a, id=f"{e}-{a}") for e, a in CPU_CASES])
def test_segmenter_cpu(benchmark, encoder, arch, mode):
    size = SMOKE_SIZE if benchmark.disabled else CPU_SIZE
    benchmark.group = f"segmenter {mode} {CPU_SIZE}x{CPU_SIZE} batch {CPU_BATCH} fp32 cpu"
    benchmark.extra_info.update(impl=f"{arch} {encoder}", encoder=encoder, arch=arch, mode=mode, size=size,
                                batch=CPU_BATCH, threads=torch.get_num_threads())
    _run(benchmark, _segmenter(encoder, arch), mode, size, CPU_BATCH, rounds=3)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("impl", ["pneumoseg", "plain decoder"])
def test_resnet34_unet_against_plain_decoder_cpu(benchmark, impl, mode):
    size = SMOKE_SIZE if benchmark.disabled else CPU_SIZE
    benchmark.group = f"resnet34 U-Net {mode} {CPU_SIZE}x{CPU_SIZE} batch {CPU_BATCH} fp32 cpu"
    benchmark.extra_info.update(impl=impl, baseline=impl != "pneumoseg", mode=mode, size=size, batch=CPU_BATCH,
                                threads=torch.get_num_threads())
    torch.manual_seed(0)
    model = create_segmenter("unet", "resnet34") if impl == "pneumoseg" else ours_as_plain("resnet34")
    _run(benchmark, model, mode, size, CPU_BATCH, rounds=3)


# The demo recipe's segmenter (pneumoseg/train/recipes/demo.yaml) and the default U-Net.
SUBPIXEL_MODELS = {"demo resnet_tiny": dict(arch="unet", encoder="resnet_tiny", decoder_channels=(64, 32, 16, 16, 8)),
                   "resnet34": dict(arch="unet", encoder="resnet34")}
SUBPIXEL_ROUNDS = 5


@functools.lru_cache(maxsize=1)
def _subpixel_model(name):
    torch.manual_seed(0)
    return create_segmenter(**SUBPIXEL_MODELS[name])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(SUBPIXEL_MODELS))
def test_subpixel_decoder_cpu(benchmark, name, mode, batch, threads):
    """Sub-pixel decoder blocks against the reference formulation, interleaved round by round."""
    size = SMOKE_SIZE if benchmark.disabled else CPU_SIZE
    if benchmark.disabled and (batch, threads) != (1, 1):
        pytest.skip("the smoke run checks each model and mode once")
    step, train = MODES[mode]
    model = _subpixel_model(name).train(train)
    x = torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    reference_s = []

    def reference_round():
        set_subpixel_decoding(model, False)
        start = time.perf_counter()
        step(model, x)
        reference_s.append(time.perf_counter() - start)
        set_subpixel_decoding(model, True)

    try:
        with torch.no_grad():
            set_subpixel_decoding(model, False)
            want = model.eval()(x)
            set_subpixel_decoding(model, True)
            got = model(x)
        model.train(train)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # the same network either way
        for formulation in (False, True):  # warm-up: oneDNN primitive caches for both
            set_subpixel_decoding(model, formulation)
            step(model, x)
        benchmark.group = f"sub-pixel decoder: {name} U-Net {mode} {CPU_SIZE}x{CPU_SIZE} fp32 cpu"
        benchmark.extra_info.update(impl=f"{name} sub-pixel", model=name, mode=mode, size=size, batch=batch,
                                    threads=threads)
        out = benchmark.pedantic(step, args=(model, x), setup=reference_round, rounds=SUBPIXEL_ROUNDS, iterations=1,
                                 warmup_rounds=0)
    finally:
        set_subpixel_decoding(model, True)
        torch.set_num_threads(before)
    assert out.shape == (batch, 1, size, size)
    if not benchmark.disabled:
        reference = sorted(reference_s)[len(reference_s) // 2]
        benchmark.extra_info.update(reference_median_s=reference, subpixel_median_s=benchmark.stats.stats.median,
                                    subpixel_speedup=reference / benchmark.stats.stats.median)


def test_plain_unet_is_the_same_network():
    """The baseline computes what ours computes, given our weights (so the ratio compares like with like)."""
    torch.manual_seed(0)
    ours = create_segmenter("unet", "resnet_tiny").eval()
    plain = PlainUnet(ours.encoder, ours.encoder.out_channels).eval()
    plain_state = {}
    for i, block in enumerate(ours.decoder.blocks):
        for j, conv in enumerate((block.conv1, block.conv2)):
            for k, name in ((0, "0"), (1, "1")):
                for key, value in conv[k].state_dict().items():
                    plain_state[f"blocks.{i}.{3 * j + k}.{key}"] = value
    plain_state.update({f"head.{k}": v for k, v in ours.segmentation_head[0].state_dict().items()})
    plain_state.update({f"encoder.{k}": v for k, v in ours.encoder.state_dict().items()})
    plain.load_state_dict(plain_state, strict=True)
    x = torch.randn(2, 1, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ours(x))


# --------------------------------------------------------------------------------------------------
# GPU: fp16 autocast + channels_last at 1024 against timm + the plain decoder.
#
# GPU sessions are rare and short (one device call after the kernel checks), so the figures accumulate in
# models_gpu.json across sessions instead of being measured again each time. Every record carries its
# device (torch.cuda.get_device_name()), size, batch, date and run; a run measures only the (encoder,
# arch, impl, mode) cases that the file lacks for its own GPU model at its size and batch (a record from
# another GPU counts for nothing here), the missing ones first, and merges its records into the file after
# every model, so a run stopped at its time limit keeps what it measured. Ratios (ours / timm, sub-pixel /
# reference decoder) only ever divide figures of one run. PNEUMOSEG_BENCH_GPU_RESULTS names another file
# (read and merged into); PNEUMOSEG_BENCH_GPU_REMEASURE=1 measures every case again (after a change to
# the networks), still keeping the other devices' records.

OURS, TIMM_PLAIN, REFERENCE_DECODER = "pneumoseg", "timm + plain decoder", "pneumoseg, reference decoder"
# U-Net on every encoder (the timm comparison is U-Net's), U-Net++ on the CPU set's three; every model
# of the registry with PNEUMOSEG_BENCH_ALL_MODELS=1. All U-Nets come before the U-Net++s (issue 8 asks
# for every encoder against timm), the recipes' encoders first, then the registry's order.
GPU_CASES = [(e, a) for e, a in (
    [(e, a) for e in list_encoders() for a in ARCHITECTURES] if os.environ.get("PNEUMOSEG_BENCH_ALL_MODELS")
    else [(e, "unet") for e in list_encoders()] + [(e, "unet++") for e in CPU_UNETPP])]
GPU_FIRST = ("resnet34", "efficientnet_b4", "densenet121", "seresnext50_32x4d", "resnet50")
GPU_CASES.sort(key=lambda case: (case[1] != "unet", GPU_FIRST.index(case[0]) if case[0] in GPU_FIRST else len(GPU_FIRST)))
# Segmenters of these encoders are also timed with the reference decoder formulation (sub-pixel blocks
# off) right after the sub-pixel one, on the same model: ``subpixel_speedup`` in models_gpu.json.
SUBPIXEL_GPU_ENCODERS = GPU_FIRST
SUBPIXEL_FIRST = ("resnet34", "unet")  # the default segmenter's speed-up comes before anything else
# Wall-clock budget of one run: a model that would end past it (at the mean seconds per model so far)
# is not started, and is listed in ``not_run_over_budget``.
GPU_SECONDS = float(os.environ.get("PNEUMOSEG_BENCH_GPU_SECONDS", "240"))
GPU_WARMUP, GPU_REPS = 3, 10  # per mode: the first warm-up step autotunes cuDNN (cudnn.benchmark)
# Seconds per model (build, cuDNN autotuning, 2 x 13 steps) until the file holds timings of this GPU
# model (``model_s``). From the H200 runs, which checked their budget before each case: with 85 s, 5
# models ended inside it and 7 past it (12.1-17 s per model: resnet34 U-Net and U-Net++,
# efficientnet_b4, densenet121, each with its timm twin but the U-Net++); with 90 s, 8 inside and 10
# past it (9.0-11.3 s: densenet121, efficientnet_b0..b3 and their twins).
MODEL_SECONDS_GUESS = 12.0


def gpu_results_stem() -> Path:
    path = os.environ.get("PNEUMOSEG_BENCH_GPU_RESULTS")
    return Path(path).with_suffix("") if path else RESULTS / "models_gpu"


def has_timm_twin(encoder: str, arch: str) -> bool:
    """Whether the case has a timm + plain decoder network to compare with (U-Nets of timm's encoders)."""
    return arch == "unet" and ENCODERS[encoder].timm_name is not None


@dataclass
class GpuCase:
    """One (encoder, arch) and the modes still to measure for each implementation. ``reference`` is
    timed on the pneumoseg model (sub-pixel blocks off) right after its sub-pixel formulation."""

    encoder: str
    arch: str
    ours: tuple = ()
    reference: tuple = ()
    timm: tuple = ()

    @property
    def label(self) -> str:
        return f"{self.encoder} {self.arch}"

    @property
    def short(self) -> str:
        """The label, naming what is missing where pneumoseg's own figures are not (e.g. the reference decoder)."""
        if self.ours:
            return self.label
        return f"{self.label} ({', '.join(i for i, m in ((REFERENCE_DECODER, self.reference), (TIMM_PLAIN, self.timm)) if m)})"

    @property
    def models(self) -> int:
        return int(bool(self.ours or self.reference)) + int(bool(self.timm))

    def describe(self) -> str:
        parts = [f"{impl} {'/'.join(modes)}" for impl, modes in
                 ((OURS, self.ours), (REFERENCE_DECODER, self.reference), (TIMM_PLAIN, self.timm)) if modes]
        return f"{self.label}: " + "; ".join(parts)


def load_gpu_records(path: Path) -> list[dict]:
    """Every record of a models_gpu.json (this device's and the others'), each with its device, size,
    batch and run: files written before records carried them hold them once, at the top level."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    defaults = {key: data.get(key) for key in ("device", "size", "batch")}
    defaults["run"] = data.get("run", f"{data.get('device')} (run not recorded)")
    return [{**defaults, **r} for r in [*data.get("results", []), *data.get("other_records", [])]]


def _same_setup(record: dict, device: str, size: int, batch: int) -> bool:
    return (record.get("device"), record.get("size"), record.get("batch")) == (device, size, batch)


def _measured(record: dict) -> bool:
    if "images_per_s" not in record:
        return False
    return record["impl"] != REFERENCE_DECODER or "subpixel_images_per_s" in record


def recorded_cases(records: list[dict], device: str, size: int, batch: int) -> set:
    """(encoder, arch, impl, mode) measured on this GPU model at this size and batch."""
    return {(r["encoder"], r["arch"], r["impl"], r["mode"]) for r in records
            if _same_setup(r, device, size, batch) and _measured(r)}


def plan_gpu_cases(cases, done: set, timm_twin=has_timm_twin, elsewhere: set = frozenset()) -> list[GpuCase]:
    """What each case still lacks, in the order to measure it: ``SUBPIXEL_FIRST``, then the cases with
    nothing recorded on any GPU, then those recorded only on another GPU (``elsewhere``: their
    (encoder, arch) pairs), then those partly recorded here; ``cases``' order within each."""
    modes = list(MODES)
    plan = []
    for encoder, arch in cases:
        def missing(impl):
            return tuple(m for m in modes if (encoder, arch, impl, m) not in done)

        timm = missing(TIMM_PLAIN) if timm_twin(encoder, arch) else ()
        # ours is timed again where timm's figure is missing: a ratio divides one run's figures
        ours = tuple(m for m in modes if m in timm or (encoder, arch, OURS, m) not in done)
        reference = missing(REFERENCE_DECODER) if encoder in SUBPIXEL_GPU_ENCODERS else ()
        if ours or reference or timm:
            plan.append(GpuCase(encoder, arch, ours, reference, timm))

    def tier(case: GpuCase) -> int:
        if (case.encoder, case.arch) == SUBPIXEL_FIRST:
            return 0
        if any(key[:2] == (case.encoder, case.arch) for key in done):
            return 3
        return 2 if (case.encoder, case.arch) in elsewhere else 1

    return sorted(plan, key=tier)


def model_seconds_estimate(records: list[dict], device: str) -> float:
    """Mean seconds per model of this GPU model's earlier runs (``model_s``), else the guess."""
    per_model = {(r["run"], r["encoder"], r["arch"], r["impl"] == TIMM_PLAIN): r["model_s"]
                 for r in records if r.get("device") == device and "model_s" in r}
    return statistics.mean(per_model.values()) if per_model else MODEL_SECONDS_GUESS


def merge_gpu_records(previous: list[dict], new: list[dict]) -> list[dict]:
    """``previous`` with ``new`` added: a new record replaces only the record of the same device, size,
    batch, case, impl and mode (and an earlier error of an impl tried again); nothing else is lost."""
    def key(r):
        return r["device"], r["size"], r["batch"], r["encoder"], r["arch"], r["impl"], r.get("mode")

    replaced = {key(r) for r in new}
    retried = {key(r)[:6] for r in new}
    kept = [r for r in previous if key(r) not in replaced and not ("error" in r and key(r)[:6] in retried)]
    return kept + new


def gpu_ratios(records: list[dict], device: str, size: int, batch: int) -> tuple[dict, dict]:
    """ours / timm (each pair from one run) and sub-pixel / reference decoder, keyed 'encoder arch mode'."""
    mine = [r for r in records if _same_setup(r, device, size, batch) and _measured(r)]
    ours = {(r["run"], r["encoder"], r["arch"], r["mode"]): r["images_per_s"] for r in mine if r["impl"] == OURS}
    timm, subpixel = {}, {}
    for r in mine:
        key = f"{r['encoder']} {r['arch']} {r['mode']}"
        if r["impl"] == TIMM_PLAIN and (r["run"], r["encoder"], r["arch"], r["mode"]) in ours:
            timm[key] = ours[r["run"], r["encoder"], r["arch"], r["mode"]] / r["images_per_s"]
        elif r["impl"] == REFERENCE_DECODER:
            subpixel[key] = r["subpixel_images_per_s"] / r["images_per_s"]
    return timm, subpixel


@pytest.mark.cuda
def test_segmenters_gpu_against_timm_plain_unet():
    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        _compare_with_timm("cuda", GPU_SIZE, GPU_BATCH, GPU_CASES, GPU_SECONDS, gpu_results_stem(),
                           remeasure=bool(os.environ.get("PNEUMOSEG_BENCH_GPU_REMEASURE")))
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark


def test_gpu_comparison_runs_on_the_cpu(tmp_path, capsys):
    """The GPU comparison's own code, on the CPU at 64x64 with two small models: a GPU session's few
    minutes are not spent discovering a bug in the benchmark (test_gpu_code_on_cpu.py checks the
    records it keeps, skips and merges)."""
    out = _compare_with_timm("cpu", SMOKE_SIZE, 2, [("resnet_tiny", "unet"), ("resnet34", "unet++")], 600,
                             tmp_path / "models")
    assert {(r["encoder"], r["arch"], r["mode"]) for r in out["results"] if r["impl"] == OURS} == {
        ("resnet_tiny", "unet", "forward"), ("resnet_tiny", "unet", "forward+backward"),
        ("resnet34", "unet++", "forward"), ("resnet34", "unet++", "forward+backward")}
    assert set(out["subpixel_speedup"]) == {"resnet34 unet++ forward", "resnet34 unet++ forward+backward"}
    import gpu_summary  # the GPU session's summary reads this file

    gpu_summary.models(json.loads((tmp_path / "models.json").read_text()))
    assert "sub-pixel decoder speed-up resnet34 unet++ forward" in capsys.readouterr().out
    assert all(r["images_per_s"] > 0 for r in out["results"] if "images_per_s" in r)
    assert (tmp_path / "models.json").is_file() and (tmp_path / "models.png").is_file()


def _images_per_s(model, x, train, reps):
    device = x.device.type
    amp = torch.autocast(device, dtype=torch.float16 if device == "cuda" else torch.bfloat16)

    def step():
        with amp:
            if train:
                model.zero_grad(set_to_none=True)
                out = model(x)
                out = out[0] if isinstance(out, tuple) else out
                out.float().mean().backward()
            else:
                with torch.inference_mode():
                    model(x)

    model.train(train)
    for _ in range(GPU_WARMUP):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return x.shape[0] * reps / (time.perf_counter() - start)


def _timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except Exception:  # not installed, or (on the CPU machines) torchvision failing to import under it
        return False
    return True


def _build_on(device: str, build) -> nn.Module:
    """The network made on the device itself where its builder allows (no CPU initialisation and
    host-to-device copy of ~100 MB per model), else made on the CPU and moved."""
    if device != "cpu":
        try:
            with torch.device(device):
                return build().to(device).to(memory_format=torch.channels_last)
        except Exception:  # noqa: BLE001 - a builder that insists on CPU tensors: the slower way below
            pass
    return build().to(device).to(memory_format=torch.channels_last)


def _free(device: str) -> None:
    """The last model's weights, gradients and cached blocks go back before the next model is built."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _measure_case(case: GpuCase, device: str, x, reps: int, common: dict, over_budget, model_seconds: list):
    """Yields the records of each model of one case: the pneumoseg model (sub-pixel, then the reference
    formulation on the same model), then timm's; each is built once for both modes, and not built when
    ``over_budget()`` (one record with ``not_run``)."""
    jobs = []
    if case.ours or case.reference:
        jobs.append((OURS, lambda: create_segmenter(case.arch, case.encoder), case.ours + case.reference))
    if case.timm:
        jobs.append((TIMM_PLAIN, lambda: timm_plain_unet(case.encoder), case.timm))
    for kind, build, wanted in jobs:
        if over_budget():
            yield [dict(common, impl=kind, not_run="over budget")]
            continue
        start, model, rows, impl, build_s = time.perf_counter(), None, [], kind, None
        try:
            torch.manual_seed(0)
            model = _build_on(device, build)
            build_s = time.perf_counter() - start
            for mode, (_, train) in MODES.items():
                if mode not in wanted:
                    continue
                impl = kind
                images_per_s = _images_per_s(model, x, train, reps)
                if kind == TIMM_PLAIN or mode in case.ours:
                    rows.append(dict(common, impl=kind, mode=mode, images_per_s=images_per_s))
                if kind == OURS and mode in case.reference:
                    impl = REFERENCE_DECODER
                    set_subpixel_decoding(model, False)
                    try:
                        reference = _images_per_s(model, x, train, reps)
                    finally:
                        set_subpixel_decoding(model, True)
                    rows.append(dict(common, impl=REFERENCE_DECODER, mode=mode, images_per_s=reference,
                                     subpixel_images_per_s=images_per_s))
        except Exception as exc:  # noqa: BLE001 - one model's failure is a finding, not the end of the run
            rows.append(dict(common, impl=impl, error=f"{type(exc).__name__}: {exc}"[:300]))
        finally:
            model = None
            _free(device)
        seconds = time.perf_counter() - start
        model_seconds.append(seconds)
        date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for r in rows:
            r.update(date=date, model_s=round(seconds, 2))
            if build_s is not None and "error" not in r:
                r["build_s"] = round(build_s, 2)
        yield rows


def _compare_with_timm(device, size, batch, cases, budget_s, stem: Path, remeasure: bool = False) -> dict:
    """images/s of each (encoder, arch) in fp16 autocast (bf16 on a CPU) + channels_last, forward and
    forward+backward, and of timm's encoder + the plain decoder for U-Nets where timm is installed: the
    cases ``stem``.json lacks for this device (all of them with ``remeasure``), merged into it after each
    model. One failing model is recorded with its error and the rest still run; so is the budget running out."""
    path = stem.with_suffix(".json")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    run = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    previous = load_gpu_records(path)
    done = set() if remeasure else recorded_cases(previous, name, size, batch)
    elsewhere = {(r["encoder"], r["arch"]) for r in previous if r.get("device") != name and _measured(r)}
    work = plan_gpu_cases(cases, done, has_timm_twin, elsewhere)
    with_timm = _timm_available() if any(c.timm for c in work) else None  # None: not needed (or not asked)
    if with_timm is False:
        work = plan_gpu_cases(cases, done, lambda e, a: False, elsewhere)
    estimate = model_seconds_estimate(previous, name)
    print(f"models_gpu ({name}): {len({(e, a) for e, a, *_ in done})} case(s) recorded before, "
          f"{sum(c.models for c in work)} model(s) to build, about {estimate * sum(c.models for c in work):.0f} s "
          f"at {estimate:.1f} s per model (budget {budget_s:.0f} s):")
    for case in work:
        print(f"  {case.describe()}")

    x = torch.randn(batch, 1, size, size, device=device).contiguous(memory_format=torch.channels_last) if work else None
    reps = GPU_REPS if device == "cuda" else 1
    model_seconds, new, t_start = [], [], time.perf_counter()

    def over_budget() -> bool:
        per_model = statistics.mean(model_seconds) if model_seconds else estimate
        return time.perf_counter() - t_start + per_model > budget_s

    def write() -> dict:
        records = merge_gpu_records(previous, [r for r in new if "not_run" not in r])
        here = [r for r in records if _same_setup(r, name, size, batch)]
        timm_ratios, subpixel = gpu_ratios(records, name, size, batch)
        still_missing = plan_gpu_cases(cases, recorded_cases(records, name, size, batch),
                                       has_timm_twin if with_timm is not False else (lambda e, a: False))
        out = {"device": name, "size": size, "batch": batch,
               "dtype": "float16 autocast" if device == "cuda" else "bfloat16 autocast",
               "memory_format": "channels_last", "timm": with_timm, "run": run, "results": here,
               "other_records": [r for r in records if not _same_setup(r, name, size, batch)],
               "speedup_vs_timm_plain": timm_ratios, "subpixel_speedup": subpixel,
               "not_run_over_budget": [c.short for c in still_missing],
               "still_to_measure": [c.describe() for c in still_missing],
               "budget_s": budget_s, "models_this_run": len(model_seconds),
               "model_s_this_run": [round(s, 2) for s in model_seconds]}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(out, indent=2) + "\n")
        partial.replace(path)  # atomic: a run killed mid-write leaves the last whole file
        return out

    for case in work:
        common = dict(encoder=case.encoder, arch=case.arch, device=name, size=size, batch=batch, run=run,
                      torch=torch.__version__)
        for model_rows in _measure_case(case, device, x, reps, common, over_budget, model_seconds):
            new += model_rows
            write()
    out = write()  # also when nothing was left to measure: the file in this run's layout
    this_run = [r for r in new if "not_run" not in r]
    timed_rows = [r for r in out["results"] if "images_per_s" in r]
    if timed_rows:
        title = f"segmenters, {size}x{size} batch {batch}, {out['dtype']} + channels_last, {name} (all runs)"
        draw(timed_rows, stem.with_suffix(".png"), title)
    print(json.dumps({"this_run": this_run, "speedup_vs_timm_plain": out["speedup_vs_timm_plain"],
                      "subpixel_speedup": out["subpixel_speedup"], "still_to_measure": out["still_to_measure"],
                      "model_s_this_run": out["model_s_this_run"]}, indent=2))
    failed = [r for r in this_run if "error" in r]
    assert not failed, failed
    return out


# --------------------------------------------------------------------------------------------------
# Report: images/s from a pytest-benchmark JSON (python benchmarks/bench_models.py models.json).


def draw(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 0.3 * len(rows) / len(modes) + 1.8), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sel = [r for r in rows if r["mode"] == mode]
        labels = [f"{r['arch']} {r['encoder']}" + ("" if r["impl"] == "pneumoseg" else f" ({r['impl']})") for r in sel]
        colors = [{"pneumoseg": "tab:blue", REFERENCE_DECODER: "tab:cyan"}.get(r["impl"], "tab:gray") for r in sel]
        ax.barh(range(len(sel)), [r["images_per_s"] for r in sel], color=colors)
        ax.set_yticks(range(len(sel)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("images/s (higher is better)")
        ax.set_title(mode)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gpu_plan(path: Path, device: str | None = None) -> list[GpuCase]:
    """Prints what a GPU run on ``device`` (default: the file's last) would measure, in order, and
    about how long it would take, from what ``path`` (a models_gpu.json) holds."""
    records = load_gpu_records(path)
    device = device or (json.loads(path.read_text()).get("device") if path.is_file() else None)
    done = recorded_cases(records, device, GPU_SIZE, GPU_BATCH)
    elsewhere = {(r["encoder"], r["arch"]) for r in records if r.get("device") != device and _measured(r)}
    work = plan_gpu_cases(GPU_CASES, done, has_timm_twin, elsewhere)
    estimate = model_seconds_estimate(records, device)
    models = sum(c.models for c in work)
    print(f"{path} on {device}: {len(done)} figures recorded at {GPU_SIZE}x{GPU_SIZE} batch {GPU_BATCH}; "
          f"{len(work)} case(s) still to measure, {models} model(s), about {models * estimate:.0f} s at "
          f"{estimate:.1f} s per model (plus about 15 s to start):")
    for case in work:
        print(f"  {case.describe()}")
    return work


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="images/s per segmenter from a pytest-benchmark JSON; with "
                                     "--gpu-plan, what the GPU run would measure next")
    parser.add_argument("json", nargs="?", help="pytest-benchmark JSON (with --gpu-plan: a models_gpu.json)")
    parser.add_argument("--png", default=str(RESULTS / "models_cpu.png"))
    parser.add_argument("--gpu-plan", nargs="?", const="", metavar="DEVICE",
                        help="GPU model name as torch.cuda.get_device_name() gives it (default: the file's device)")
    args = parser.parse_args()
    if args.gpu_plan is not None:
        gpu_plan(Path(args.json) if args.json else gpu_results_stem().with_suffix(".json"), args.gpu_plan or None)
        return
    if not args.json:
        parser.error("the pytest-benchmark JSON is required")
    data = json.loads(Path(args.json).read_text())
    rows, threads = [], set()
    for b in data["benchmarks"]:
        extra = b.get("extra_info", {})
        threads.add(extra.get("threads"))
        if "images_per_s" in extra and "encoder" in extra:
            rows.append(dict(encoder=extra["encoder"], arch=extra["arch"], impl="pneumoseg", mode=extra["mode"],
                             images_per_s=extra["images_per_s"]))
    for r in sorted(rows, key=lambda r: (r["mode"], r["arch"], -r["images_per_s"])):
        print(f"{r['mode']:<17} {r['arch']:<7} {r['encoder']:<20} {r['images_per_s']:8.2f} images/s")
    subpixel = [b["extra_info"] for b in data["benchmarks"] if "subpixel_speedup" in b.get("extra_info", {})]
    if subpixel:
        print("sub-pixel decoder blocks against upsample + concatenate + 3x3 conv (medians, interleaved rounds):")
    for e in sorted(subpixel, key=lambda e: (e["model"], e["mode"], e["batch"], e["threads"])):
        print(f"  {e['model']:<17} {e['mode']:<17} batch {e['batch']} threads {e['threads']}: reference "
              f"{e['reference_median_s'] * 1e3:8.1f} ms, sub-pixel {e['subpixel_median_s'] * 1e3:8.1f} ms, "
              f"speed-up {e['subpixel_speedup']:.2f}x")
    if not rows:
        return
    machine = data.get("machine_info", {})
    n_threads = "/".join(str(t) for t in sorted(threads, key=str))
    draw(rows, args.png, f"segmenters, {CPU_SIZE}x{CPU_SIZE} batch {CPU_BATCH}, fp32, CPU, {n_threads} torch thread(s) "
         f"({machine.get('cpu', {}).get('brand_raw', '?')}, one run: a shared, noisy machine)")
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
