"""Forward + backward of the combo loss (SIIM winner's weights 3/1/4) against the eager PyTorch
composite and the same composite under torch.compile, in one session.

    pytest benchmarks/bench_loss.py --benchmark-json=loss.json && python benchmarks/report.py loss.json

On a GPU the CUDA test also measures the memory-bandwidth floor and writes benchmarks/results/loss_gpu.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from pneumoseg.losses import combo_loss  # noqa: E402
from reference import ref_combo_loss  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WEIGHTS = dict(bce_weight=3.0, dice_weight=1.0, focal_weight=4.0)
SHAPES = {"8x512": (8, 1, 512, 512), "16x1024": (16, 1, 1024, 1024)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def composite(x, t):
    return ref_combo_loss(x, t, dtype=x.dtype, **WEIGHTS)


def fused(x, t):
    return combo_loss(x, t, **WEIGHTS)


_compiled = {}


def compiled_composite(x, t):
    key = (tuple(x.shape), x.dtype, x.device.type)
    if key not in _compiled:
        _compiled[key] = torch.compile(composite)
    return _compiled[key](x, t)


def inputs(shape, dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2).to(dtype).to(device).requires_grad_()
    t = (torch.rand(shape, generator=g) > 0.9).to(dtype).to(device)
    return x, t


def step(fn, x, t):
    x.grad = None
    fn(x, t).backward()
    return x.grad


IMPLS = {"pneumoseg": (fused, False), "eager composite": (composite, True), "torch.compile composite": (compiled_composite, True)}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_loss_forward_backward_cpu(benchmark, impl, dtype, shape):
    fn, is_baseline = IMPLS[impl]
    benchmark.group = f"loss fwd+bwd {shape} {dtype} cpu"
    benchmark.extra_info.update(impl=impl, baseline=is_baseline)
    x, t = inputs(SHAPES[shape], DTYPES[dtype])
    step(fn, x, t)  # warm-up (and compilation)
    rounds = 3 if shape == "16x1024" else 8
    grad = benchmark.pedantic(step, args=(fn, x, t), rounds=rounds, iterations=1, warmup_rounds=1)
    assert torch.isfinite(grad.float()).all()


@pytest.mark.cuda
def test_loss_gpu_against_eager_compile_and_bandwidth_floor():
    results = []
    for shape_name, shape in SHAPES.items():
        for dtype_name, dtype in DTYPES.items():
            x, t = inputs(shape, dtype, "cuda")

            def timed(fn, reps=20):
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(reps):
                    fn()
                stop.record()
                stop.synchronize()
                return start.elapsed_time(stop) / 1e3 / reps

            fused_s = timed(lambda: step(fused, x, t))
            eager_s = timed(lambda: step(composite, x, t))
            compiled_s = timed(lambda: step(compiled_composite, x, t))
            # Bandwidth floor: forward reads logits + target, backward reads them again and writes
            # the gradient; over the device-to-device copy bandwidth measured now.
            elem = x.element_size()
            bytes_moved = x.numel() * (2 * elem + 2 * t.element_size() + elem)
            big = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(big)
            copy_s = timed(lambda: dst.copy_(big))
            bandwidth = 2 * big.numel() / copy_s  # read + write
            floor_s = bytes_moved / bandwidth
            results.append(dict(
                shape=shape_name, dtype=dtype_name, fused_s=fused_s, eager_s=eager_s, compiled_s=compiled_s,
                speedup_vs_eager=eager_s / fused_s, speedup_vs_compile=compiled_s / fused_s,
                bytes_moved=bytes_moved, d2d_bandwidth_bytes_per_s=bandwidth, floor_s=floor_s,
                fused_over_floor=fused_s / floor_s,
            ))
    RESULTS.mkdir(exist_ok=True)
    out = {"device": torch.cuda.get_device_name(), "weights": WEIGHTS, "results": results}
    (RESULTS / "loss_gpu.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
