"""The CUDA combo-loss kernels, their very source, run on the CPU.

tests/cuda_emu/loss_emu.cpp runs csrc/loss/combo_loss_cuda_kernels.cuh and combo_loss_cuda_finalize.cuh
through the CUDA emulation of tests/cuda_emu/cuda_emu.h (threads of a block as OS threads, shared
memory, __syncthreads_or, warp shuffles that every lane must reach), with forward_cuda's and
backward_cuda's launch sequence: forward partials -> finalize -> backward, built with AddressSanitizer
and UBSan (its alignment check fails a vector load from a misaligned address). Blocks per image are
combo_loss_cuda.cu's, for an H100's 132 multiprocessors, capped at a few so that several blocks, each
looping, run at a fraction of the emulation's cost.

Checked against the float64 reference (tests/reference.py) at test_cuda_matches_reference's tolerances,
and against the CPU op: loss, gradient and the per-image state, for every logits dtype, float / uint8 /
bool / half targets, focal off / gamma 2 / gamma 1.5, per-image Dice on and off, on the vector and the
scalar paths (sizes not a multiple of the vector, misaligned base pointers, mixed dtypes whose vectors
need more alignment), many small images, one image over several blocks with two vectors per iteration
and a tail, the 64-bit index fallback, bad targets and non-finite logits.

The device math differs from the GPU's only in rcp.approx.ftz.f32, which is correctly rounded here (the
GPU's is within 1 ulp, before the Newton step that follows it), and in NaN payloads of the half
conversions; tests/test_loss_device_math.py bounds the formulas at rcp.approx's worst case.
"""

from __future__ import annotations

import struct
import subprocess
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pneumoseg.losses import combo_loss  # noqa: E402
from emulation import EMULATOR_BUILDS, emulation_compiler  # noqa: E402
from reference import ref_combo_loss  # noqa: E402

pytestmark = pytest.mark.slow

# pneumoseg::DType values (csrc/common/tensor_view.h)
DTYPE_CODES = {torch.bool: 0, torch.uint8: 2, torch.float16: 9, torch.bfloat16: 10, torch.float32: 11,
               torch.float64: 12}
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
H100_SMS = 132
STATE_COLS = 11
BAD_TARGETS = 5
GRAD_IN = 0.75  # the incoming gradient, read by the backward kernel from memory


@pytest.fixture(scope="module")
def emulators(tmp_path_factory) -> dict:
    """One executable per logits dtype (a quarter of the kernel variants each), built in the background
    from the start of the session or in parallel now (tests/emulation.py)."""
    cxx = emulation_compiler(tmp_path_factory.mktemp("loss-emu"), "loss/combo_loss_cuda_kernels.cuh")
    names = {d: f"loss_emu_{str(d).removeprefix('torch.')}" for d in LOGIT_DTYPES}
    built = EMULATOR_BUILDS.get(cxx, names.values())
    return {d: built[name] for d, name in names.items()}


def emulate(emulators, tmp_path, logits, target, *, bce_weight=1.0, dice_weight=1.0, focal_weight=0.0,
            focal_gamma=2.0, smooth=1.0, pos_weight=1.0, per_image=False, offsets=(0, 0, 0), cap=2,
            index_limit=0):
    """Forward, finalize and backward on the emulator; offsets are the logits', targets' and gradient's
    byte offsets from a 256-byte boundary."""
    n = logits.shape[0]
    pixels = logits[0].numel()
    double = logits.dtype == torch.float64
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(src, "wb") as f:
        f.write(struct.pack("13q", n, pixels, DTYPE_CODES[logits.dtype], DTYPE_CODES[target.dtype], per_image,
                            double, double, *offsets, H100_SMS, cap, index_limit))
        f.write(struct.pack("7d", bce_weight, dice_weight, focal_weight, focal_gamma, smooth, pos_weight, GRAD_IN))
        for a in (logits, target):
            f.write(a.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    done = subprocess.run([str(emulators[logits.dtype]), str(src), str(dst)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stderr[-4000:]}"
    raw = dst.read_bytes()
    blocks, forward_vectorised, backward_vectorised, index32 = struct.unpack("4q", raw[:32])
    (loss,) = struct.unpack("d", raw[32:40])
    state_end = 40 + 8 * n * STATE_COLS
    state = np.frombuffer(raw[40:state_end], np.float64).reshape(n, STATE_COLS)
    grad = torch.frombuffer(bytearray(raw[state_end:]), dtype=torch.uint8).view(logits.dtype).reshape(logits.shape)
    return SimpleNamespace(blocks=blocks, forward_vectorised=bool(forward_vectorised),
                           backward_vectorised=bool(backward_vectorised), index32=bool(index32),
                           loss=torch.tensor(loss, dtype=torch.float64), state=state, grad=grad)


def loss_and_grad(fn, logits, target, **kw):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, target, **kw)
    (g,) = torch.autograd.grad(loss, x, grad_outputs=torch.tensor(GRAD_IN, dtype=loss.dtype))
    return loss.detach(), g


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def spec_sums(logits, target, pos_weight, focal_gamma):
    """Per image, in float64 from the definitions: sum bce, focal, p t, p, t, bad targets, mismatch."""
    x = logits.double().reshape(logits.shape[0], -1)
    t = target.double().reshape(logits.shape[0], -1)
    p = torch.sigmoid(x)
    bce = (1 - t) * x + (1 + (pos_weight - 1) * t) * -torch.nn.functional.logsigmoid(x)
    mismatch = p * (1 - t) + (1 - p) * t
    focal = mismatch**focal_gamma * bce if focal_gamma is not None else torch.zeros_like(bce)
    bad = ~((t >= 0) & (t <= 1))
    return torch.stack([bce.sum(1), focal.sum(1), (p * t).sum(1), p.sum(1), t.sum(1), bad.sum(1).double(),
                        mismatch.sum(1)], 1).numpy()


def make(shape, logits_dtype, target_dtype, soft=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(logits_dtype)
    target = torch.rand(shape, generator=g, dtype=torch.float64)
    if not soft:
        target = target > 0.6
    return logits, target.to(target_dtype)


@dataclass
class Case:
    shape: tuple
    logits: torch.dtype
    target: torch.dtype
    gamma: float | None  # focal gamma, None: no focal term
    per_image: bool
    vectorised: bool  # the path both passes must take
    offsets: tuple = (0, 0, 0)
    soft: bool = False
    cap: int = 2


F16, BF16, F32, F64, U8, BOOL = torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.bool
CASES = {
    "one pixel": Case((1, 1, 1, 1), F32, F32, None, False, False),
    "8x8 bfloat16, bool target (one 8-pixel vector a thread)": Case((1, 1, 8, 8), BF16, BOOL, 2.0, True, True),
    "8x8 float16, soft float32 target (32-byte vectors)": Case((1, 1, 8, 8), F16, F32, 1.5, False, True, soft=True),
    "3x1x97x45 float32, uint8 target (odd size: scalar path)": Case((3, 1, 97, 45), F32, U8, 2.0, True, False),
    "3x1x17x31 float16, soft bfloat16 target": Case((3, 1, 17, 31), F16, BF16, 1.5, False, False, soft=True),
    "3x1x17x31 float64, float32 target": Case((3, 1, 17, 31), F64, F32, None, True, False),
    "100 px float16 (a multiple of 4, not 8: scalar)": Case((2, 1, 10, 10), F16, U8, 2.0, False, False),
    "100 px float32, float16 target (a multiple of 4: vectorised)": Case((2, 1, 10, 10), F32, F16, None, True, True,
                                                                        soft=True),
    "float64 logits and targets, vectorised": Case((2, 1, 16, 16), F64, F64, 2.0, False, True, soft=True),
    "float16 logits, float64 targets (64-byte vectors)": Case((1, 1, 16, 16), F16, F64, None, True, True),
    "float16 logits, float64 targets 32 bytes off (scalar)": Case((1, 1, 16, 16), F16, F64, 2.0, False, False,
                                                                  offsets=(0, 32, 0)),
    "10 images of 9 px": Case((10, 1, 3, 3), F32, U8, 2.0, True, False),
    "10 images of 8 px, bfloat16": Case((10, 1, 2, 4), BF16, F32, 1.5, True, True, soft=True),
    # 5300 px = 1325 float32 vectors over 2 blocks of 256 threads: pairs at i and i + 512, then a tail
    "one image over 2 blocks, two vectors an iteration and a tail": Case((1, 1, 53, 100), F32, F32, 2.0, True, True,
                                                                         soft=True),
    "the same for bfloat16 (1325 vectors of 8)": Case((1, 1, 53, 200), BF16, U8, 1.5, False, True),
    # uncapped: combo_loss_cuda.cu's own 33 blocks (one vector a thread), so finalize's lanes stride
    # over the partials more than once
    "33 blocks, as combo_loss_cuda.cu sizes them": Case((1, 1, 182, 182), F32, U8, None, False, True, cap=0),
    "float32 logits 4 bytes off (scalar)": Case((2, 1, 16, 16), F32, F32, 2.0, False, False, offsets=(4, 0, 4)),
    "bfloat16 logits 2 bytes off (scalar)": Case((2, 1, 16, 16), BF16, U8, None, True, False, offsets=(2, 0, 2)),
    "float16 logits, float32 target 16 bytes off (scalar: needs 32)": Case((2, 1, 16, 16), F16, F32, 2.0, True, False,
                                                                           offsets=(0, 16, 0)),
    "bfloat16 16 bytes off, uint8 target 8 off (vectorised)": Case((2, 1, 16, 16), BF16, U8, 2.0, False, True,
                                                                   offsets=(16, 8, 16)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_emulated_kernels_match_the_reference(emulators, tmp_path, name):
    c = CASES[name]
    logits, target = make(c.shape, c.logits, c.target, soft=c.soft, seed=list(CASES).index(name))
    kw = dict(bce_weight=3.0, dice_weight=1.0, focal_weight=4.0 if c.gamma is not None else 0.0,
              focal_gamma=c.gamma if c.gamma is not None else 2.0, per_image=c.per_image, pos_weight=2.0)
    got = emulate(emulators, tmp_path, logits, target, offsets=c.offsets, cap=c.cap, **kw)
    assert got.forward_vectorised == got.backward_vectorised == c.vectorised

    ref_loss, ref_grad = loss_and_grad(ref_combo_loss, logits.double(), target.double(), **kw)
    cpu_loss, cpu_grad = loss_and_grad(combo_loss, logits, target, **kw)
    tol = 1e-6 if c.logits in (F32, F64) else 2 * torch.finfo(c.logits).eps
    assert rel_err(got.loss, ref_loss) <= 1e-6
    assert rel_err(got.grad, ref_grad) <= max(tol, rel_err(cpu_grad, ref_grad) * 1.01)
    assert abs(got.loss.item() - cpu_loss.item()) <= 1e-6 * abs(cpu_loss.item())
    # The per-image sums: each image's partials reach its own state row.
    sums = spec_sums(logits, target, 2.0, c.gamma)
    np.testing.assert_allclose(got.state[:, :7], sums, rtol=1e-5, atol=1e-5 * np.abs(sums).max())


def test_several_blocks_run_both_loops_of_the_vector_walk(emulators, tmp_path):
    """The geometry the two-vectors-an-iteration case relies on: 2 blocks (combo_loss_cuda.cu's sizing
    asks for 6, the cap keeps 2), 1325 vectors, so threads below 301 run a pair and the tail."""
    logits, target = make((1, 1, 53, 100), F32, F32, soft=True)
    got = emulate(emulators, tmp_path, logits, target, cap=2)
    stride = got.blocks * 256
    assert got.blocks == 2 and 2 * stride < 5300 // 4 < 3 * stride and got.index32


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_the_64_bit_index_fallback_gives_the_same_bits(emulators, tmp_path, dtype):
    """Images of 2^31 vectors are out of reach here, so the emulator lowers the kernels' INT32_MAX: the
    64-bit walk (one vector an iteration) must visit the same vectors in the same order per thread."""
    logits, target = make((2, 1, 53, 100 if dtype == F32 else 200), dtype, F32, soft=True, seed=3)
    kw = dict(focal_weight=1.0, focal_gamma=1.5, per_image=True)
    narrow = emulate(emulators, tmp_path, logits, target, **kw)
    wide = emulate(emulators, tmp_path, logits, target, index_limit=1000, **kw)
    assert narrow.index32 and not wide.index32 and wide.backward_vectorised
    assert wide.loss.item() == narrow.loss.item()
    np.testing.assert_array_equal(wide.state, narrow.state)
    assert torch.equal(wide.grad.view(torch.int16 if dtype == BF16 else torch.int32),
                       narrow.grad.view(torch.int16 if dtype == BF16 else torch.int32))


def test_a_misaligned_gradient_sends_only_the_backward_pass_to_the_scalar_path(emulators, tmp_path):
    logits, target = make((2, 1, 16, 16), F32, U8)
    got = emulate(emulators, tmp_path, logits, target, focal_weight=1.0, offsets=(0, 0, 4))
    assert got.forward_vectorised and not got.backward_vectorised
    ref_loss, ref_grad = loss_and_grad(ref_combo_loss, logits.double(), target.double(), focal_weight=1.0)
    assert rel_err(got.loss, ref_loss) <= 1e-6 and rel_err(got.grad, ref_grad) <= 1e-6


BAD = [2.0, float("nan"), -0.5, float("inf")]


@pytest.mark.parametrize("logits_dtype, target_dtype, shape", [
    (F32, F32, (2, 1, 53, 100)),  # vectorised, 2 blocks an image: bad values in either block and the tail
    (F16, F32, (3, 1, 17, 31)),  # scalar
    (BF16, BF16, (2, 1, 53, 200)),  # vectorised 8 a vector, bfloat16 NaN
])
def test_bad_targets_give_nan_and_are_counted_per_image(emulators, tmp_path, logits_dtype, target_dtype, shape):
    """As on the CPU: the loss is NaN and the state counts each image's targets outside [0, 1] or NaN
    (losses.py's validate=True reports that count)."""
    logits, target = make(shape, logits_dtype, target_dtype, soft=True, seed=9)
    flat = target.view(shape[0], -1)
    pixels = flat.shape[1]
    flat[0, [0, pixels - 1, pixels // 2 + 1]] = torch.tensor(BAD[:3], dtype=target_dtype)
    flat[-1, [3, pixels - 5]] = torch.tensor(BAD[1:3] if target_dtype == BF16 else BAD[2:], dtype=target_dtype)
    got = emulate(emulators, tmp_path, logits, target, focal_weight=1.0, per_image=True)
    assert torch.isnan(got.loss)
    with pytest.raises(ValueError, match=r"target has 5 values outside"):
        combo_loss(logits, target, focal_weight=1.0, per_image=True)
    expected = [3] + [0] * (shape[0] - 2) + [2]
    assert got.state[:, BAD_TARGETS].tolist() == expected


@pytest.mark.parametrize("dtype, focal, nan", [(d, f, False) for d in LOGIT_DTYPES for f in (0.0, 4.0)]
                         + [(F32, 4.0, True), (BF16, 0.0, True)])
def test_non_finite_logits_behave_as_on_the_cpu(emulators, tmp_path, dtype, focal, nan):
    """+-inf logits (against targets 0 and 1) and NaN logits on the vector path give the CPU op's loss
    (NaN or inf) and its gradient: NaN, +-inf and finite in the same places, the finite values within
    the dtype's tolerance."""
    logits, target = make((2, 1, 4, 8), dtype, F32, seed=5)
    flat = logits.view(2, -1)
    flat[0, :4] = torch.tensor([float("inf"), float("-inf"), float("inf"), float("-inf")], dtype=dtype)
    target.view(2, -1)[0, :4] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    if nan:
        flat[1, 7] = float("nan")
    kw = dict(bce_weight=1.0, dice_weight=1.0, focal_weight=focal, pos_weight=2.0, per_image=True)
    got = emulate(emulators, tmp_path, logits, target, **kw)
    assert got.forward_vectorised
    cpu_loss, cpu_grad = loss_and_grad(combo_loss, logits, target, **kw)
    assert not torch.isfinite(cpu_loss)  # what is compared here is how each is not finite
    assert torch.isnan(got.loss).item() == torch.isnan(cpu_loss).item()
    assert got.loss.item() == cpu_loss.item() or torch.isnan(cpu_loss)
    g, c = got.grad.double(), cpu_grad.double()
    assert torch.equal(torch.isnan(g), torch.isnan(c)) and torch.equal(torch.isinf(g), torch.isinf(c))
    assert torch.equal(g[torch.isinf(g)], c[torch.isinf(c)])
    finite = torch.isfinite(c)
    tol = 1e-6 if dtype in (F32, F64) else 2 * torch.finfo(dtype).eps
    if finite.any():
        assert rel_err(g[finite], c[finite]) <= tol
