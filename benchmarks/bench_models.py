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

With ``--benchmark-disable`` (CI's smoke run) the inputs shrink to 64x64 so every model still runs.
On a shared machine torch's thread pool degrades under load; ``PNEUMOSEG_BENCH_THREADS=1`` runs torch
on one thread for this module (as ``bench_pipeline.py``), the figure least sensitive to it.
"""

from __future__ import annotations

import functools
import json
import os
import time
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


# U-Net on every encoder (the timm comparison is U-Net's), U-Net++ on the CPU set's three; every model
# of the registry with PNEUMOSEG_BENCH_ALL_MODELS=1. A wall-clock budget (PNEUMOSEG_BENCH_GPU_SECONDS,
# default 240) keeps the run inside a short GPU session: models past it are listed as not run.
GPU_CASES = [(e, a) for e, a in (
    [(e, a) for e in list_encoders() for a in ARCHITECTURES] if os.environ.get("PNEUMOSEG_BENCH_ALL_MODELS")
    else [(e, "unet") for e in list_encoders()] + [(e, "unet++") for e in CPU_UNETPP])]
# The recipes' encoders first, so a short budget still measures the models people train.
GPU_FIRST = ("resnet34", "efficientnet_b4", "densenet121", "seresnext50_32x4d", "resnet50")
GPU_CASES.sort(key=lambda case: (GPU_FIRST.index(case[0]) if case[0] in GPU_FIRST else len(GPU_FIRST), case[1] != "unet"))
GPU_SECONDS = float(os.environ.get("PNEUMOSEG_BENCH_GPU_SECONDS", "240"))
# Segmenters also timed with the reference decoder formulation (sub-pixel blocks off): the ratio is
# ``subpixel_speedup`` (images/s sub-pixel / reference) in models_gpu.json.
SUBPIXEL_GPU_ENCODERS = GPU_FIRST
REFERENCE_DECODER = "pneumoseg, reference decoder"


@pytest.mark.cuda
def test_segmenters_gpu_against_timm_plain_unet():
    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        _compare_with_timm("cuda", GPU_SIZE, GPU_BATCH, GPU_CASES, GPU_SECONDS, RESULTS / "models_gpu")
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark


def test_gpu_comparison_runs_on_the_cpu(tmp_path, capsys):
    """The GPU comparison's own code, on the CPU at 64x64 with two small models: a GPU session's few
    minutes are not spent discovering a bug in the benchmark."""
    out = _compare_with_timm("cpu", SMOKE_SIZE, 2, [("resnet_tiny", "unet"), ("resnet34", "unet++")], 600,
                             tmp_path / "models")
    assert {(r["encoder"], r["arch"], r["mode"]) for r in out["results"] if r["impl"] == "pneumoseg"} == {
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
    for _ in range(3):
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


def _compare_with_timm(device, size, batch, cases, budget_s, stem: Path) -> dict:
    """images/s of each (encoder, arch) in fp16 autocast (bf16 on a CPU) + channels_last, forward and
    forward+backward, and of timm's encoder + the plain decoder for U-Nets where timm is installed.
    One failing model is recorded with its error and the rest still run; so is the budget running out."""
    x = torch.randn(batch, 1, size, size, device=device).contiguous(memory_format=torch.channels_last)
    reps = 10 if device == "cuda" else 1
    with_timm = _timm_available()
    rows, skipped, t_start = [], [], time.perf_counter()
    for encoder, arch in cases:
        if time.perf_counter() - t_start > budget_s:
            skipped.append(f"{encoder} {arch}")
            continue
        builders = {"pneumoseg": lambda: create_segmenter(arch, encoder)}
        if arch == "unet" and ENCODERS[encoder].timm_name is not None and with_timm:
            builders["timm + plain decoder"] = lambda: timm_plain_unet(encoder)
        for impl, build in builders.items():
            try:
                torch.manual_seed(0)
                model = build().to(device).to(memory_format=torch.channels_last)
                for mode, train in (("forward", False), ("forward+backward", True)):
                    rows.append(dict(encoder=encoder, arch=arch, impl=impl, mode=mode,
                                     images_per_s=_images_per_s(model, x, train, reps)))
                    if impl == "pneumoseg" and encoder in SUBPIXEL_GPU_ENCODERS:
                        # the same model on the reference decoder formulation, timed right after
                        set_subpixel_decoding(model, False)
                        rows.append(dict(encoder=encoder, arch=arch, impl=REFERENCE_DECODER, mode=mode,
                                         images_per_s=_images_per_s(model, x, train, reps)))
                        set_subpixel_decoding(model, True)
            except Exception as exc:  # noqa: BLE001 - one model's failure is a finding, not the end of the run
                rows.append(dict(encoder=encoder, arch=arch, impl=impl, error=f"{type(exc).__name__}: {exc}"[:300]))
            model = None
            if device == "cuda":
                torch.cuda.empty_cache()
    ratios = {}
    for r in rows:
        if r["impl"] == "timm + plain decoder" and "images_per_s" in r:
            ours = [o for o in rows if o["impl"] == "pneumoseg" and "images_per_s" in o and o["encoder"] == r["encoder"]
                    and o["arch"] == r["arch"] and o["mode"] == r["mode"]]
            if ours:
                ratios[f"{r['encoder']} {r['arch']} {r['mode']}"] = ours[0]["images_per_s"] / r["images_per_s"]
    subpixel = {}
    for r in rows:
        if r["impl"] == REFERENCE_DECODER and "images_per_s" in r:
            ours = [o for o in rows if o["impl"] == "pneumoseg" and "images_per_s" in o and o["encoder"] == r["encoder"]
                    and o["arch"] == r["arch"] and o["mode"] == r["mode"]]
            if ours:
                subpixel[f"{r['encoder']} {r['arch']} {r['mode']}"] = ours[0]["images_per_s"] / r["images_per_s"]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    out = {"device": name, "size": size, "batch": batch,
           "dtype": "float16 autocast" if device == "cuda" else "bfloat16 autocast",
           "memory_format": "channels_last", "timm": with_timm, "results": rows, "speedup_vs_timm_plain": ratios,
           "subpixel_speedup": subpixel, "not_run_over_budget": skipped, "budget_s": budget_s}
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    timed_rows = [r for r in rows if "images_per_s" in r]
    title = f"segmenters, {size}x{size} batch {batch}, {out['dtype']} + channels_last, {name}"
    draw(timed_rows, stem.with_suffix(".png"), title)
    print(json.dumps(out, indent=2))
    failed = [r for r in rows if "error" in r]
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


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="images/s per segmenter from a pytest-benchmark JSON")
    parser.add_argument("json")
    parser.add_argument("--png", default=str(RESULTS / "models_cpu.png"))
    args = parser.parse_args()
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
