"""The GPU's per-pixel combo-loss math (csrc/loss/combo_loss_device_math.h), checked without a GPU.

The CUDA kernels compute 1 / (1 + e) and e / (2 + e) with rcp.approx.ftz.f32 plus one Newton /
quotient-correction step instead of IEEE divisions, exp(-|x|) with a base-2 reduction and a degree-6
polynomial, and log1p(e) with a degree-4 polynomial in s^2. Here those formulas are modelled line by
line in NumPy float32 (each model function names the C++ function it mirrors: change both together),
with rcp.approx pushed to the worst case the PTX ISA documents (9.1, 9.7.3.13: "maximum ulp error is
1 across the full range of inputs"), as a fixed offset of either sign and as random offsets per
element. nvcc may fuse any a * b + c into one FMA; the model evaluates every such expression either
rounded twice or fused, and both must pass. Loss terms and gradients are compared with float64 over
x in [-100, 100] (+-0 included), hard and soft targets, pos_weight 1, 2 and 0.3, at the tolerance
tests/test_losses.py::test_cuda_matches_reference applies to float32 (1e-6 relative), each term
judged against the size of the parts it is computed from (so a soft target's near-cancellation is
judged as the float formula can do, on the CPU too).

test_model_is_the_device_code compiles the header itself for the CPU (tests/cuda_emu/
loss_device_math_host.cpp, rcp correctly rounded, no FMA contraction) and requires the unperturbed,
unfused model to agree with it bit for bit, so the model cannot drift from the code.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
F32 = np.float32
ONE, TWO = F32(1.0), F32(2.0)

# Documented worst case (PTX ISA 9.1, 9.7.3.13): rcp.approx.f32 "maximum ulp error is 1 across the
# full range of inputs".
RCP_ULPS = 1
# Below exp(-87) both the portable and the device exp return ~1.6e-38 instead of a subnormal
# (combo_loss_math.h): terms that small are off by up to that much in absolute terms.
CLAMP_FLOOR = 2e-38
TOL = 1e-6  # test_cuda_matches_reference's float32 tolerance


def ulp_steps(v: np.ndarray, steps) -> np.ndarray:
    """v moved by `steps` float32 ulps (an int or an array of ints, of either sign)."""
    v = np.array(v, dtype=F32)
    steps = np.broadcast_to(np.asarray(steps), v.shape)
    for _ in range(int(np.abs(steps).max(initial=0))):
        up, down = steps > 0, steps < 0
        v = np.where(up, np.nextafter(v, F32(np.inf)), np.where(down, np.nextafter(v, F32(-np.inf)), v))
        steps = steps - np.sign(steps)
    return v


class Hardware:
    """rcp.approx: the correctly rounded reciprocal, moved by a given number of ulps."""

    def __init__(self, rcp_ulps=0):
        self.rcp_ulps = rcp_ulps

    def rcp(self, v):
        return ulp_steps((1.0 / v.astype(np.float64)).astype(F32), self.rcp_ulps)


def fma(a, b, c):
    """fmaf, correctly rounded: the float32 product is exact in float64, TwoSum gives the sum as
    hi + lo exactly, and rounding hi to float32 is right unless hi is itself halfway between two
    floats, where lo decides."""
    a, b, c = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (a, b, c)))
    prod = a * b
    hi = prod + c
    z = hi - prod
    lo = (prod - (hi - z)) + (c - z)
    r = hi.astype(F32)
    r64 = r.astype(np.float64)
    with np.errstate(invalid="ignore"):
        toward = np.nextafter(r, np.where(hi > r64, F32(np.inf), F32(-np.inf)))
        halfway = (hi != r64) & (hi - r64 == (toward.astype(np.float64) - r64) / 2)
        beyond = halfway & (lo != 0) & (np.sign(lo) == np.sign(hi - r64))
    return np.where(beyond, toward, r)


def mad(a, b, c, fused: bool):
    """a * b + c as nvcc may compile it: fused into an FMA, or rounded twice."""
    return fma(a, b, c) if fused else F32(a) * F32(b) + F32(c)


# --- the model: one function per device_math function, statement by statement -------------------


def exp_nonpositive(x):  # device_math::exp_nonpositive
    xc = np.where(np.isnan(x), x, np.maximum(x, F32(-87.0)))  # max_keep_nan(x, -87)
    shifted = fma(xc, F32(1.44269502), F32(12582912.0))
    k = shifted - F32(12582912.0)
    r = fma(xc, F32(1.92596299e-8), fma(xc, F32(1.44269502), -k))
    poly = fma(r, F32(1.53533515e-4), F32(1.33988738e-3))
    poly = fma(r, poly, F32(9.61843785e-3))
    poly = fma(r, poly, F32(5.55033237e-2))
    poly = fma(r, poly, F32(2.40226477e-1))
    poly = fma(r, poly, F32(6.93147182e-1))
    poly = fma(r, poly, ONE)
    scale = ((shifted.view(np.uint32) << np.uint32(23)) + np.uint32(0x3F800000)).view(F32)
    return poly * scale


def reciprocal_1_to_3(a, hw):  # device_math::reciprocal_1_to_3
    r = hw.rcp(a)
    return fma(r, fma(-a, r, ONE), r)


def log1p_unit(e, hw):  # device_math::log1p_unit
    b = TWO + e
    r = hw.rcp(b)
    s0 = e * r
    s = fma(r, fma(-b, s0, e), s0)
    z = s * s
    poly = fma(z, F32(0.28011897), F32(0.2800182))
    poly = fma(z, poly, F32(0.40021527))
    poly = fma(z, poly, F32(0.6666642))
    poly = fma(z, poly, TWO)
    return s * poly


def sigmoid_parts(x, hw):  # device_math::sigmoid_parts -> (e, p, q)
    e = exp_nonpositive(-np.abs(x))
    inv = reciprocal_1_to_3(ONE + e, hw)
    small = e * inv
    nonneg = x >= 0
    return e, np.where(nonneg, inv, small), np.where(nonneg, small, inv)


def bce_pixel(x, t, w_minus_1, lp, fused):  # device_math::bce_pixel
    pos = np.fmax(x, F32(0.0))  # fmaxf: NaN -> 0
    neg = pos - x
    return mad(w_minus_1 * t, lp + neg, mad(-x, t, pos, fused) + lp, fused)


def pixel_forward_square(x, t, w_minus_1, hw, fused):  # device_math::pixel_forward<kFocalSquare>
    e, p, q = sigmoid_parts(x, hw)
    bce = bce_pixel(x, t, w_minus_1, log1p_unit(e, hw), fused)
    mismatch = mad(p, ONE - t, q * t, fused)
    focal = (mismatch * mismatch) * bce
    return dict(e=e, p=p, q=q, bce=bce, mismatch=mismatch, focal=focal)


def pixel_gradient(x, t, w, w_minus_1, c, hw, fused, focal: bool):  # device_math::pixel_gradient
    e, p, q = sigmoid_parts(x, hw)
    pq = p * q
    u = ONE - t
    dbce = mad(-(w * t), q, u * p, fused)
    dice = mad(c["dice_t"], t, c["dice_c"], fused)
    if not focal:  # kNoFocal
        return mad(c["bce"], dbce, dice * pq, fused)
    bce = bce_pixel(x, t, w_minus_1, log1p_unit(e, hw), fused)  # kFocalSquare
    m = mad(p, u, q * t, fused)
    modulated = mad(c["focal"], m * m, c["bce"], fused)
    slope = m * mad(-4 * c["focal"], t, 2 * c["focal"], fused)
    return mad(dbce, modulated, pq * mad(slope, bce, dice, fused), fused)


# --- the float64 reference (combo_loss_math.h's formulas with exact exp / log1p) --------------------


def reference(x, t, w, c):
    x, t, w = (np.asarray(v, np.float64) for v in (x, t, w))
    e = np.exp(-np.abs(x))
    p = np.where(x >= 0, 1 / (1 + e), e / (1 + e))
    q = np.where(x >= 0, e / (1 + e), 1 / (1 + e))
    lp = np.log1p(e)
    pos, neg = np.maximum(x, 0), np.maximum(-x, 0)
    bce = pos - x * t + lp + (w - 1) * t * (lp + neg)
    m = q * t + p * (1 - t)
    pq = p * q
    dbce = (1 - t) * p - w * t * q
    g0 = c["bce"] * dbce + (c["dice_t"] * t + c["dice_c"]) * pq
    dfocal = 2 * m * (1 - 2 * t) * pq * bce + m * m * dbce
    # The size of what each value sums (its rounding scale): a result near a cancellation is judged
    # against the parts it was computed from.
    bce_scale = pos + np.abs(x * t) + lp + np.abs((w - 1) * t) * (lp + neg)
    g0_scale = np.abs(c["bce"]) * ((1 - t) * p + np.abs(w * t) * q) + np.abs(c["dice_t"] * t + c["dice_c"]) * pq
    g2_scale = g0_scale + np.abs(c["focal"]) * (2 * m * np.abs(1 - 2 * t) * pq * bce_scale + m * m * (
        (1 - t) * p + np.abs(w * t) * q))
    return dict(e=e, p=p, q=q, lp=lp, bce=bce, mismatch=m, focal=m * m * bce, grad0=g0,
                grad2=g0 + c["focal"] * dfocal, bce_scale=bce_scale, g0_scale=g0_scale, g2_scale=g2_scale)


# --- inputs ---------------------------------------------------------------------------------------


def logits_grid() -> np.ndarray:
    rng = np.random.default_rng(0)
    dense = np.linspace(-100, 100, 20_001)
    # Where round(x log2e) changes (the reduction's edges), the clamp, zero and tiny values.
    edges = (np.arange(-126, 1) + 0.5) / np.log2(np.e)
    special = [0.0, -0.0, 1e-30, -1e-30, 1e-45, -1e-45, 1e-7, -1e-7, 87.0, -87.0, 87.5, -87.5, 88.0, -88.0,
               100.0, -100.0, np.log(2), -np.log(2)]
    x = np.concatenate([dense, edges, -edges, np.nextafter(edges, 0), np.nextafter(edges, -200), special,
                        rng.normal(0, 4, 10_000), rng.normal(0, 30, 10_000)])
    return x.astype(F32)


TARGETS = [0.0, 1.0, 0.5, 0.25, 0.999, 1e-3, "random"]
COEFS = dict(bce=F32(0.75), focal=F32(1.25), dice_t=F32(-2.0), dice_c=F32(1.3))
HARDWARE = {"exact": Hardware(0), "rcp +1 ulp": Hardware(RCP_ULPS), "rcp -1 ulp": Hardware(-RCP_ULPS)}


def random_hardware(n: int, seed: int) -> Hardware:
    return Hardware(np.random.default_rng(seed).integers(-RCP_ULPS, RCP_ULPS + 1, n))


def targets(kind, n: int) -> np.ndarray:
    if kind == "random":
        return np.random.default_rng(1).random(n).astype(F32)
    return np.full(n, kind, F32)


def rel(a, b):
    return np.abs(np.asarray(a, np.float64) - b) / np.abs(b)


# --- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw_name", [*HARDWARE, "random offsets"])
def test_exp_sigmoid_and_log1p_within_a_few_ulp(hw_name):
    x = logits_grid()
    hw = HARDWARE.get(hw_name) or random_hardware(x.size, 2)
    e, p, q = sigmoid_parts(x, hw)
    lp = log1p_unit(e, hw)
    ref = reference(x, np.zeros_like(x), F32(1), COEFS)
    inside = np.abs(x.astype(np.float64)) <= 87  # outside, the clamp answers (checked below)
    # About 1-2 ulp, as the portable float code (whose NumPy model reaches 1.6e-7, 2.2e-7, 2.2e-7 and
    # 2.9e-7 on this grid); here 8.3e-8, 1.7e-7, 1.8e-7 and 2.4e-7, whatever rcp's error.
    bounds = dict(e=1.0e-7, p=2.0e-7, q=2.0e-7, lp=2.6e-7)
    for name, value in (("e", e), ("p", p), ("q", q), ("lp", lp)):
        err = rel(value, ref[name])[inside]
        assert err.max() <= bounds[name], (name, err.max(), x[inside][err.argmax()])
    clamped = ~inside
    assert (np.abs(e[clamped].astype(np.float64) - ref["e"][clamped]) <= CLAMP_FLOOR).all()
    assert (rel(np.maximum(p, q), np.maximum(ref["p"], ref["q"])) <= 3e-7).all()


@pytest.mark.parametrize("fused", [False, True], ids=["rounded twice", "fused"])
@pytest.mark.parametrize("hw_name", [*HARDWARE, "random offsets"])
@pytest.mark.parametrize("w", [1.0, 2.0, 0.3])
def test_loss_terms_and_gradients_match_float64(w, hw_name, fused):
    grid = logits_grid()
    x = np.tile(grid, len(TARGETS))  # every logit with every kind of target
    t = np.concatenate([targets(kind, grid.size) for kind in TARGETS])
    w = F32(w)
    hw = HARDWARE.get(hw_name) or random_hardware(x.size, 3)
    ref = reference(x, t, w, COEFS)
    fwd = pixel_forward_square(x, t, w - ONE, hw, fused)
    g0 = pixel_gradient(x, t, w, w - ONE, COEFS, hw, fused, focal=False)
    g2 = pixel_gradient(x, t, w, w - ONE, COEFS, hw, fused, focal=True)
    checks = [("bce", fwd["bce"], ref["bce"], ref["bce_scale"]),
              ("mismatch", fwd["mismatch"], ref["mismatch"], ref["mismatch"]),
              ("focal", fwd["focal"], ref["focal"], ref["mismatch"] ** 2 * ref["bce_scale"]),
              ("p", fwd["p"], ref["p"], ref["p"]),
              ("grad, no focal", g0, ref["grad0"], ref["g0_scale"]),
              ("grad, gamma 2", g2, ref["grad2"], ref["g2_scale"])]
    for name, got, want, scale in checks:
        err = np.abs(got.astype(np.float64) - want)
        bound = TOL * scale + CLAMP_FLOOR * (1 + 3 * np.abs(np.float64(w)))
        worst = np.argmax(err - bound)
        assert (err <= bound).all(), f"{name}: x={x[worst]!r} t={t[worst]!r}: {got[worst]!r} vs {want[worst]!r}"


def _combo_loss(bce_sum, focal_sum, p_sum, t_sum, pt_sum, mismatch_sum, pixels, smooth=1.0):
    den = p_sum + t_sum + smooth
    weights = dict(bce=3.0, dice=1.0, focal=4.0)
    loss = weights["bce"] * bce_sum / pixels + weights["focal"] * focal_sum / pixels + weights["dice"] * (
        mismatch_sum / den)
    coefs = dict(bce=weights["bce"] / pixels, focal=weights["focal"] / pixels, dice_t=weights["dice"] * -2.0 / den,
                 dice_c=weights["dice"] * (2.0 * pt_sum + smooth) / den**2)
    return loss, coefs


@pytest.mark.parametrize("soft", [False, True], ids=["hard targets", "soft targets"])
@pytest.mark.parametrize("hw_name", ["rcp +1 ulp", "rcp -1 ulp", "random offsets"])
def test_whole_loss_and_gradient_within_the_cuda_tests_tolerance(hw_name, soft):
    """As test_cuda_matches_reference judges a float32 run: loss and gradient (max-normalised) within
    1e-6 of float64, with bce 3 / dice 1 / focal 4, gamma 2, pos_weight 2 (sums taken in float64)."""
    rng = np.random.default_rng(4)
    x = (rng.normal(0, 3, 200_000) + rng.choice([-6.0, 0.0, 6.0], 200_000)).astype(F32)
    t = (rng.random(x.size) if soft else (rng.random(x.size) < 0.3)).astype(F32)
    w = F32(2.0)
    hw = HARDWARE.get(hw_name) or random_hardware(x.size, 5)
    ref = reference(x, t, w, COEFS)
    fwd = pixel_forward_square(x, t, w - ONE, hw, fused=True)
    sums = lambda d: (d["bce"].sum(dtype=np.float64), d["focal"].sum(dtype=np.float64),
                      d["p"].sum(dtype=np.float64), t.sum(dtype=np.float64),
                      (d["p"].astype(np.float64) * t).sum(), d["mismatch"].sum(dtype=np.float64))
    ref_loss, ref_coefs = _combo_loss(*sums(ref), x.size)
    loss, _ = _combo_loss(*sums(fwd), x.size)
    assert abs(loss - ref_loss) <= TOL * abs(ref_loss)
    coefs32 = {k: F32(v) for k, v in ref_coefs.items()}
    grad = pixel_gradient(x, t, w, w - ONE, coefs32, hw, fused=True, focal=True)
    want = reference(x, t, w, ref_coefs)["grad2"]
    assert np.abs(grad - want).max() <= TOL * np.abs(want).max()


def test_nan_logits_give_nan_everywhere():
    x = np.array([np.nan, -np.nan], F32)
    t = np.array([1.0, 0.0], F32)
    hw = HARDWARE["exact"]
    fwd = pixel_forward_square(x, t, F32(0), hw, fused=True)
    assert all(np.isnan(v).all() for v in fwd.values())
    for focal in (False, True):
        assert np.isnan(pixel_gradient(x, t, ONE, F32(0), COEFS, hw, fused=True, focal=focal)).all()


def test_model_is_the_device_code(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++ compiler")
    exe = tmp_path / "device_math_host"
    src = ROOT / "tests" / "cuda_emu" / "loss_device_math_host.cpp"
    built = subprocess.run([cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-Wno-psabi", f"-I{ROOT / 'csrc'}", str(src),
                            "-o", str(exe)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-4000:]
    x = logits_grid()
    t = np.concatenate([targets(k, x.size // len(TARGETS) + 1) for k in TARGETS])[: x.size]
    w = F32(2.0)
    header = struct.pack("<q5f", x.size, w, COEFS["bce"], COEFS["focal"], COEFS["dice_t"], COEFS["dice_c"])
    done = subprocess.run([str(exe)], input=header + x.tobytes() + t.tobytes(), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    cpp = np.frombuffer(done.stdout, F32).reshape(x.size, 9)
    hw = HARDWARE["exact"]
    fwd = pixel_forward_square(x, t, w - ONE, hw, fused=False)
    model = np.stack([fwd["e"], fwd["p"], fwd["q"], log1p_unit(fwd["e"], hw), fwd["bce"], fwd["mismatch"],
                      fwd["focal"], pixel_gradient(x, t, w, w - ONE, COEFS, hw, fused=False, focal=False),
                      pixel_gradient(x, t, w, w - ONE, COEFS, hw, fused=False, focal=True)], axis=1)
    same = (cpp.view(np.uint32) == model.view(np.uint32)) | (np.isnan(cpp) & np.isnan(model))
    names = ["e", "p", "q", "log1p", "bce", "mismatch", "focal", "grad, no focal", "grad, gamma 2"]
    for k, name in enumerate(names):
        bad = np.flatnonzero(~same[:, k])
        assert bad.size == 0, f"{name}: {bad.size} differ, e.g. x={x[bad[0]]!r} t={t[bad[0]]!r}: " \
                              f"C++ {cpp[bad[0], k]!r}, model {model[bad[0], k]!r}"
