"""Every CUDA op of pneumoseg on small torch inputs, each result checked against the CPU op: the
workload for compute-sanitizer (memcheck, racecheck, synccheck), kept small so that it runs in seconds
even instrumented. Exit status 1 on any mismatch or error; every check runs regardless.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        --print-limit 20 python3 benchmarks/gpu_sanitize.py

(PYTORCH_NO_CUDA_MEMORY_CACHING makes each torch tensor its own allocation, so an access past one
tensor's end is not hidden inside torch's cached blocks.) Covered: rle.encode_batch (dtypes, strides,
empty/full/odd shapes, a dense mask whose text outgrows the 16 KB per-image speculative window, both
styles), rle.decode_batch to CUDA (unions too), combo_loss forward + backward (fp32/bf16/fp16/fp64,
float/uint8/bool targets, with and without focal, per_image, validate=True), label_components (4 and
8 connectivity), remove_small_components, triplet_threshold, gate and the fused postprocess
(triplet, min area, gating, logits, to_rle).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import numpy as np
import torch

import pneumoseg
from pneumoseg import postprocess as pp
from pneumoseg import rle
from pneumoseg.losses import combo_loss

FAILURES: list[str] = []
CHECKS = 0


def check(name: str):
    """Run the decorated function now as one named check; record a failure instead of stopping."""

    def run(fn):
        global CHECKS
        CHECKS += 1
        t0 = time.perf_counter()
        try:
            fn()
            print(f"ok    {name} ({time.perf_counter() - t0:.2f} s)", flush=True)
        except Exception:
            FAILURES.append(name)
            print(f"FAIL  {name}\n{traceback.format_exc()}", flush=True)
        return fn

    return run


def to_host(x):
    """A torch tensor (CUDA or CPU) as NumPy; NumPy as is (decode_batch to "cpu" answers in NumPy)."""
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else x


def masks(rng: np.random.Generator) -> dict[str, np.ndarray]:
    blocky = np.zeros((3, 37, 53), np.uint8)
    blocky[0, 5:20, 10:40] = 1
    blocky[1, :, 52] = 1
    blocky[2] = 1
    dense = (rng.random((2, 256, 256)) < 0.5).astype(np.uint8)  # ~80 KB of text per image
    dense[1] = 0  # one dense, one empty: only one image takes the retry path
    return {
        "odd 3x37x53": (rng.random((3, 37, 53)) < 0.3).astype(np.uint8),
        "blocky/full/column": blocky,
        "empty 2x16x16": np.zeros((2, 16, 16), np.uint8),
        "one pixel 1x1x1": np.ones((1, 1, 1), np.uint8),
        "dense > 16 KB text": dense,
    }


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--cpu-dry-run", action="store_true", help="run the checks with 'cuda' replaced by the CPU "
                    "(checks this script, not the kernels)")
DEVICE = "cpu" if parser.parse_args().cpu_dry_run else "cuda"
rng = np.random.default_rng(0)
if DEVICE == "cuda":
    if not pneumoseg.cuda_available():
        sys.exit("pneumoseg.cuda_available() is False: a CUDA build and a device are needed")
    print(f"pneumoseg {pneumoseg.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)

# ---- RLE encode -----------------------------------------------------------------------------------
MASKS = masks(rng)
for name, m in MASKS.items():
    for style in ("siim", "absolute"):

        @check(f"rle.encode_batch {name} uint8 {style}")
        def _():
            got = rle.encode_batch(torch.from_numpy(m).to(DEVICE), style=style)
            want = rle.encode_batch(m, style=style)
            assert got == want, f"first difference at image {next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)}"
            if name.startswith("dense"):
                assert len(want[0]) > 16 << 10, len(want[0])

m = MASKS["odd 3x37x53"]
for dtype in (torch.bool, torch.float32, torch.float16, torch.int64, torch.int32):

    @check(f"rle.encode_batch odd mask {dtype}")
    def _():
        t = torch.from_numpy(m).to(dtype)
        assert rle.encode_batch(t.to(DEVICE)) == rle.encode_batch(t.numpy())


@check("rle.encode_batch transposed (non-contiguous) and strided views")
def _():
    t = torch.from_numpy(MASKS["dense > 16 KB text"]).to(DEVICE)
    for view in (t.transpose(1, 2), t[:, ::2, 1::3], t.flip(0)):
        assert rle.encode_batch(view) == rle.encode_batch(view.cpu().numpy())


@check("rle.encode (one mask) on CUDA")
def _():
    t = torch.from_numpy(MASKS["blocky/full/column"][0]).to(DEVICE)
    assert rle.encode(t) == rle.encode(t.cpu().numpy())


# ---- RLE decode to CUDA ---------------------------------------------------------------------------
@check("rle.decode_batch to cuda (plain, empty, unions, absolute)")
def _():
    for style in ("siim", "absolute"):
        for name, m in MASKS.items():
            texts = rle.encode_batch(m, style=style)
            shape = m.shape[1:]
            got = np.asarray(to_host(rle.decode_batch(texts, shape, device=DEVICE, style=style)))
            assert np.array_equal(got, rle.decode_batch(texts, shape, style=style))
            assert np.array_equal(got, (m != 0).astype(np.uint8))
        a, b = MASKS["odd 3x37x53"][0], MASKS["odd 3x37x53"][1]
        ta, tb = rle.encode(a, style=style), rle.encode(b, style=style)
        union = to_host(rle.decode_batch([[ta, tb], ta, ""], a.shape, device=DEVICE, style=style))
        assert np.array_equal(union[0], a | b) and np.array_equal(union[1], a) and not union[2].any()


# ---- combo loss -----------------------------------------------------------------------------------
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def loss_and_grad(x: torch.Tensor, t: torch.Tensor, **kw):
    x = x.detach().clone().requires_grad_()
    loss = combo_loss(x, t, **kw)
    loss.backward()
    return loss.detach().double().cpu(), x.grad.double().cpu()


for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    for kw in (dict(), dict(bce_weight=3.0, dice_weight=1.0, focal_weight=4.0),
               dict(focal_weight=1.0, focal_gamma=1.5, per_image=True, pos_weight=2.0)):
        for target_kind in ("float", "uint8", "bool"):

            @check(f"combo_loss fwd+bwd {dtype} {kw or 'defaults'} target {target_kind}")
            def _():
                g = torch.Generator().manual_seed(1)
                x = (torch.randn((3, 1, 37, 53), generator=g) * 3).to(dtype)
                t = torch.rand((3, 1, 37, 53), generator=g) > 0.7
                t = {"float": t.to(dtype), "uint8": t.to(torch.uint8), "bool": t}[target_kind]
                loss_cpu, grad_cpu = loss_and_grad(x, t, **kw)
                loss_gpu, grad_gpu = loss_and_grad(x.to(DEVICE), t.to(DEVICE), **kw)
                tol = TOLERANCE[dtype]
                torch.testing.assert_close(loss_gpu, loss_cpu, rtol=tol, atol=tol)
                scale = float(grad_cpu.abs().max())
                torch.testing.assert_close(grad_gpu, grad_cpu, rtol=tol, atol=tol * scale)


@check("combo_loss validate=True on CUDA: bad targets raise, good ones pass; one-pixel and batch-of-one")
def _():
    x = torch.randn(2, 1, 8, 8, device=DEVICE)
    combo_loss(x, torch.ones_like(x), validate=True)
    try:
        combo_loss(x, torch.full_like(x, 2.0), validate=True)
    except ValueError:
        pass
    else:
        raise AssertionError("targets of 2.0 were accepted")
    for shape in ((1, 1, 1, 1), (1, 5, 7)):
        x = torch.randn(shape)
        t = (torch.rand(shape) > 0.5).float()
        a, ga = loss_and_grad(x, t, focal_weight=2.0)
        b, gb = loss_and_grad(x.to(DEVICE), t.to(DEVICE), focal_weight=2.0)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)


# ---- labelling and post-processing ----------------------------------------------------------------
LABEL_INPUTS = {**{k: v for k, v in MASKS.items() if not k.startswith("dense")},
                "noise 2x64x65": (rng.random((2, 64, 65)) < 0.5).astype(np.uint8)}
for name, m in LABEL_INPUTS.items():
    for connectivity in (4, 8):

        @check(f"label_components {name} connectivity {connectivity}")
        def _():
            labels, areas = pp.label_components(torch.from_numpy(m).to(DEVICE), connectivity)
            want_labels, want_areas = pp.label_components(m, connectivity)
            assert np.array_equal(labels.cpu().numpy(), want_labels)
            assert len(areas) == len(want_areas)
            for a, b in zip(areas, want_areas):
                assert np.array_equal(a.cpu().numpy(), b)


probs = rng.random((4, 48, 40)).astype(np.float32)
probs[1] *= 0.5  # no pixel above 0.75: the triplet rule empties it
probs[2, 10:30, 5:25] = 0.95  # a confident block
logits = np.log(np.clip(probs, 1e-6, 1 - 1e-6) / (1 - np.clip(probs, 1e-6, 1 - 1e-6))).astype(np.float32)
scores = np.array([0.9, 0.2, 0.7, 0.5], np.float32)  # the last one exactly at the gate threshold
PP_CASES = {
    "threshold only": dict(top=None, bottom=0.5),
    "triplet": dict(top=0.75, min_area=30, bottom=0.4),
    "triplet + min area + 4-conn": dict(top=0.75, min_area=30, bottom=0.4, min_component_area=5, connectivity=4),
    "gated + min area": dict(top=None, bottom=0.5, min_component_area=3, scores=scores),
    "everything, to_rle": dict(top=0.75, min_area=30, bottom=0.3, min_component_area=4, scores=scores, to_rle=True),
    "from logits, to_rle": dict(from_logits=True, top=0.75, min_area=30, bottom=0.3, min_component_area=4, to_rle=True),
    "component counts, no area filter": dict(top=None, bottom=0.5, scores=scores, return_components=True),
    "component counts, to_rle": dict(top=0.75, min_area=30, bottom=0.3, min_component_area=4, to_rle=True,
                                     return_components=True),
}
for name, kw in PP_CASES.items():

    @check(f"postprocess {name}")
    def _():
        kw_gpu, kw_cpu = dict(kw), dict(kw)
        if "scores" in kw:
            kw_gpu["scores"] = torch.from_numpy(kw["scores"]).to(DEVICE)
        x = logits if kw.get("from_logits") else probs
        got = pp.postprocess(torch.from_numpy(x).to(DEVICE), **kw_gpu)
        want = pp.postprocess(x, **kw_cpu)
        if kw.get("return_components"):
            (got, got_counts), (want, want_counts) = got, want
            assert got_counts.cpu().tolist() == want_counts.tolist()
        if kw.get("to_rle"):
            assert got == want
        else:
            assert np.array_equal(got.cpu().numpy(), want)


@check("remove_small_components, triplet_threshold, gate on CUDA")
def _():
    m = LABEL_INPUTS["noise 2x64x65"]
    got = pp.remove_small_components(torch.from_numpy(m).to(DEVICE), 4, connectivity=4).cpu().numpy()
    assert np.array_equal(got, pp.remove_small_components(m, 4, connectivity=4))
    got = pp.triplet_threshold(torch.from_numpy(probs).to(DEVICE), 0.75, 30, 0.4).cpu().numpy()
    assert np.array_equal(got, pp.triplet_threshold(probs, 0.75, 30, 0.4))
    masks4 = (probs > 0.5).astype(np.uint8)
    got = pp.gate(torch.from_numpy(masks4).to(DEVICE), torch.from_numpy(scores).to(DEVICE), 0.6).cpu().numpy()
    assert np.array_equal(got, pp.gate(masks4, scores, 0.6))


if DEVICE == "cuda":
    torch.cuda.synchronize()
print(f"\n{CHECKS - len(FAILURES)}/{CHECKS} checks passed", flush=True)
if FAILURES:
    print("failed:\n  " + "\n  ".join(FAILURES), flush=True)
    sys.exit(1)
