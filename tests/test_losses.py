from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import pneumoseg  # noqa: E402
from pneumoseg.losses import ComboLoss, combo_loss  # noqa: E402
from reference import ref_combo_loss  # noqa: E402

WEIGHTS = [
    dict(bce_weight=1.0, dice_weight=1.0),
    dict(bce_weight=3.0, dice_weight=1.0, focal_weight=4.0),
    dict(bce_weight=0.0, dice_weight=1.0),
    dict(bce_weight=1.0, dice_weight=0.0),
    dict(bce_weight=0.0, dice_weight=0.0, focal_weight=1.0, focal_gamma=0.5),
    dict(bce_weight=0.5, dice_weight=2.0, focal_weight=1.0, focal_gamma=3.0, smooth=0.0),
]
SHAPES = [(1, 1, 1, 1), (1, 1, 7, 9), (3, 1, 17, 31), (2, 33, 65), (4, 1, 97, 45)]


def make(shape, kind, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    if kind == "hard":
        target = (torch.rand(shape, generator=g) > 0.6).float()
    elif kind == "soft":
        target = torch.rand(shape, generator=g, dtype=torch.float64).float()
    elif kind == "empty":
        target = torch.zeros(shape)
    else:
        target = torch.ones(shape)
    return logits, target


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def loss_and_grad(fn, logits, target, **kw):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, target, **kw)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["hard", "soft", "empty", "full"])
@pytest.mark.parametrize("kw", WEIGHTS)
@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("pos_weight", [None, 3.0])
def test_float32_matches_float64_reference(shape, kind, kw, per_image, pos_weight):
    # Seeds from the parameters themselves: hash() of a tuple changes with every process.
    logits, target = make(shape, kind, seed=SHAPES.index(shape) * 10 + ["hard", "soft", "empty", "full"].index(kind))
    kw = dict(kw, per_image=per_image, pos_weight=pos_weight)
    loss, grad = loss_and_grad(combo_loss, logits, target, **kw)
    ref_loss, ref_grad = loss_and_grad(ref_combo_loss, logits.double(), target.double(), **kw)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert rel_err(loss, ref_loss) <= 1e-6
    assert rel_err(grad, ref_grad) <= 1e-6


def test_bce_part_equals_torch_with_pos_weight():
    logits, target = make((2, 1, 33, 17), "soft", dtype=torch.float64)
    target = target.double()
    for pw in (None, 0.25, 7.0):
        ours = combo_loss(logits, target, dice_weight=0.0, pos_weight=pw)
        theirs = F.binary_cross_entropy_with_logits(
            logits, target, pos_weight=None if pw is None else torch.tensor([pw], dtype=torch.float64)
        )
        assert abs(ours.item() - theirs.item()) <= 1e-12 * abs(theirs.item())


def test_extreme_logits_are_stable():
    logits = torch.tensor([[-200.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 200.0, 88.0, -88.0]]).reshape(1, 1, 1, 9)
    target = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]]).reshape(1, 1, 1, 9)
    for kw in WEIGHTS:
        loss, grad = loss_and_grad(combo_loss, logits, target, **kw)
        ref_loss, ref_grad = loss_and_grad(ref_combo_loss, logits.double(), target.double(), **kw)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        # For gamma < 1 the reference's autograd is 0 * inf = NaN at saturated pixels, where the
        # true derivative (and ours) is 0: compare where the reference is defined.
        defined = torch.isfinite(ref_grad)
        assert defined.sum() >= 7
        assert rel_err(loss, ref_loss) <= 1e-6 and rel_err(grad[defined], ref_grad[defined]) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw", WEIGHTS[:3])
@pytest.mark.parametrize("per_image", [False, True])
def test_half_precision_error_at_most_twice_the_composite(dtype, kw, per_image):
    logits, target = make((3, 1, 40, 24), "hard", dtype=dtype, seed=5, scale=2.0)
    kw = dict(kw, per_image=per_image)
    ref_loss, ref_grad = loss_and_grad(ref_combo_loss, logits.double(), target.double(), **kw)
    loss, grad = loss_and_grad(combo_loss, logits, target, **kw)
    comp_loss, comp_grad = loss_and_grad(lambda x, t, **k: ref_combo_loss(x, t, dtype=dtype, **k), logits, target, **kw)
    assert grad.dtype == dtype
    # Floors at float32 resolution keep a lucky exact composite from demanding the impossible.
    assert rel_err(loss, ref_loss) <= max(2 * rel_err(comp_loss, ref_loss), 1e-6)
    assert rel_err(grad, ref_grad) <= max(2 * rel_err(comp_grad, ref_grad), 2 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("kw", WEIGHTS)
@pytest.mark.parametrize("per_image", [False, True])
def test_gradcheck_float64(kw, per_image):
    logits, target = make((2, 1, 3, 5), "soft", dtype=torch.float64, seed=7, scale=1.5)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: combo_loss(z, target.double(), per_image=per_image, pos_weight=2.0, **kw), (x,), eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.bool, torch.float16, torch.float64])
def test_integer_and_other_float_targets(target_dtype):
    logits, target = make((2, 1, 19, 23), "hard")
    expected = loss_and_grad(combo_loss, logits, target, focal_weight=1.0)
    got = loss_and_grad(combo_loss, logits, target.to(target_dtype), focal_weight=1.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_three_d_input_and_module():
    logits, target = make((3, 1, 11, 13), "soft")
    a = combo_loss(logits, target, bce_weight=3, dice_weight=1, focal_weight=4)
    b = combo_loss(logits[:, 0], target[:, 0], bce_weight=3, dice_weight=1, focal_weight=4)
    c = ComboLoss(bce_weight=3, dice_weight=1, focal_weight=4)(logits, target)
    assert a.item() == b.item() == c.item()
    assert "focal_weight=4.0" in repr(ComboLoss(focal_weight=4))


def test_non_contiguous_logits_and_no_grad_target():
    logits, target = make((2, 1, 16, 20), "hard")
    t_logits = logits.transpose(2, 3)
    t_target = target.transpose(2, 3).requires_grad_()
    loss = combo_loss(t_logits.requires_grad_(), t_target)
    loss.backward()
    assert t_target.grad is None
    ref = ref_combo_loss(t_logits.double(), t_target.double())
    assert rel_err(loss, ref) <= 1e-6


def test_gradient_accumulation_pattern_scales_the_gradient():
    """``loss /= accum_steps`` in place, and two losses summed: the upstream gradient reaches the
    native backward (which reads it from memory) and scales the result exactly."""
    logits, target = make((3, 1, 17, 9), "soft", seed=5)
    x1 = logits.clone().requires_grad_()
    loss = combo_loss(x1, target, focal_weight=2.0)
    loss /= 4
    loss.backward()
    x2 = logits.clone().requires_grad_()
    (combo_loss(x2, target, focal_weight=2.0) * 0.25).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    x3 = logits.clone().requires_grad_()
    (combo_loss(x3, target, focal_weight=2.0) + combo_loss(x3, target, focal_weight=2.0)).backward()
    torch.testing.assert_close(x3.grad, 8 * x2.grad, rtol=1e-6, atol=0)


def test_lazily_negated_views_are_read_as_their_values():
    """torch's neg bit (e.g. ``conj().imag`` of a complex tensor) leaves -x in memory: the native core
    must not read the raw bytes (it silently gave another loss)."""
    logits, target = make((2, 1, 9, 7), "soft", seed=4)
    x = logits.clone().requires_grad_()
    view = torch._neg_view(-x)
    assert view.is_neg()
    loss = combo_loss(view, torch._neg_view(-target), focal_weight=1.0)
    ref, ref_grad = loss_and_grad(combo_loss, logits, target, focal_weight=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-6, atol=0)


def test_tensor_left_over_from_a_torch_func_transform_is_read_as_its_value():
    """A tensor kept from inside a finished ``torch.func.grad`` is a dead functorch wrapper: the eager
    path (which calls torch's C ``apply`` itself) unwraps it as ``autograd.Function.apply`` does."""
    logits, target = make((2, 1, 8, 8), "soft", seed=6)
    kept = []
    torch.func.grad(lambda a: (kept.append(a), combo_loss(a, target))[1])(logits)
    assert torch._C._functorch.is_functorch_wrapped_tensor(kept[0])
    assert combo_loss(kept[0], target).item() == combo_loss(logits, target).item()


def test_backward_twice_needs_retain_graph_like_any_torch_op():
    logits, target = make((2, 1, 8, 8), "hard", seed=7)
    x = logits.clone().requires_grad_()
    loss = combo_loss(x, target, focal_weight=1.0)
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * once, rtol=0, atol=0)
    loss = combo_loss(x, target, focal_weight=1.0)
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_deterministic():
    logits, target = make((4, 1, 300, 301), "soft")
    a = loss_and_grad(combo_loss, logits, target, focal_weight=1.0)
    b = loss_and_grad(combo_loss, logits, target, focal_weight=1.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_large_image_accumulation():
    logits, target = make((2, 1, 1024, 1024), "hard", seed=3)
    loss, grad = loss_and_grad(combo_loss, logits, target, bce_weight=3, dice_weight=1, focal_weight=4)
    ref_loss, ref_grad = loss_and_grad(ref_combo_loss, logits.double(), target.double(), bce_weight=3,
                                       dice_weight=1, focal_weight=4)
    assert rel_err(loss, ref_loss) <= 1e-6 and rel_err(grad, ref_grad) <= 1e-6


def test_opcheck_registrations():
    from pneumoseg.losses import _combo_forward

    logits, target = make((2, 6, 5), "soft")
    x = logits.reshape(2, -1).requires_grad_()
    t = target.reshape(2, -1)
    for args in [(x, t, 1.0, 1.0, 0.0, 2.0, 1.0, 1.0, False), (x, t, 3.0, 1.0, 4.0, 2.0, 1.0, 2.0, True)]:
        torch.library.opcheck(_combo_forward, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))


class TinySegmenter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch.manual_seed(0)
    model = TinySegmenter()
    images, target = torch.randn(2, 1, 24, 20), (torch.rand(2, 1, 24, 20) > 0.5).float()

    def step(x, t):
        return combo_loss(model(x), t, bce_weight=3, dice_weight=1, focal_weight=4, per_image=True)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    eager_loss = step(images, target)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    comp_loss = compiled(images, target)
    comp_grads = torch.autograd.grad(comp_loss, list(model.parameters()))
    torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-6, atol=1e-7)
    for a, b in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_args, match",
    [
        (lambda: (torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5)), "differs from logits shape"),
        (lambda: (torch.zeros(2, 1, 4, 4, dtype=torch.int32), torch.zeros(2, 1, 4, 4)), "logits must be a floating"),
        (lambda: (torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.int64)), "target must be float"),
        (lambda: (torch.zeros(0, 1, 4, 4), torch.zeros(0, 1, 4, 4)), "empty batch"),
        (lambda: (torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)), "one channel"),
        (lambda: (torch.zeros(4, 4), torch.zeros(4, 4)), r"\(N, 1, H, W\) or \(N, H, W\)"),
        (lambda: (torch.zeros(2, 1, 0, 4), torch.zeros(2, 1, 0, 4)), "no pixels"),
        (lambda: (torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 1.5)), r"2 \* 16|32 values outside \[0, 1\]"),
        (lambda: (torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), float("nan"))), r"outside \[0, 1\] \(or NaN\)"),
        (lambda: (torch.zeros(1, 1, 2, 2), -torch.ones(1, 1, 2, 2) * 0.1), r"4 values outside"),
        (lambda: (torch.zeros(1, 1, 2, 2).numpy(), torch.zeros(1, 1, 2, 2)), "must be torch tensors"),
    ],
)
def test_bad_input_is_a_value_error(make_args, match):
    logits, target = make_args()
    with pytest.raises(pneumoseg.InvalidInputError, match=match) as info:
        combo_loss(logits, target)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(bce_weight=-1.0), r"bce_weight must be in \[0, inf\)"),
        (dict(dice_weight=float("nan")), "dice_weight must be a finite number"),
        (dict(focal_gamma=-2.0), "focal_gamma"),
        (dict(smooth=-1.0), "smooth"),
        (dict(pos_weight=-3.0), "pos_weight"),
        (dict(pos_weight=torch.tensor([1.0, 2.0])), "one-element tensor"),
        (dict(focal_weight="a lot"), "focal_weight must be a real number, got str"),
    ],
)
def test_bad_weights(kw, match):
    logits, target = make((1, 1, 3, 3), "hard")
    with pytest.raises(pneumoseg.InvalidInputError, match=match):
        combo_loss(logits, target, **kw)
    with pytest.raises(pneumoseg.InvalidInputError, match=match):
        ComboLoss(**{k: v for k, v in kw.items()})(logits, target)


def test_pos_weight_one_element_tensor_accepted():
    logits, target = make((1, 1, 5, 5), "hard")
    a = combo_loss(logits, target, pos_weight=torch.tensor([2.5]))
    b = combo_loss(logits, target, pos_weight=2.5)
    assert a.item() == b.item()


def test_unvalidated_bad_targets_give_nan_not_a_number():
    logits = torch.zeros(1, 1, 2, 2)
    loss = combo_loss(logits, torch.full((1, 1, 2, 2), 2.0), validate=False)
    assert torch.isnan(loss)


# --- CUDA (skipped without a GPU) ----------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kw, per_image", list(itertools.product(WEIGHTS, [False, True])))
def test_cuda_matches_reference(dtype, kw, per_image):
    logits, target = make((3, 1, 97, 45), "hard", dtype=dtype, seed=11)
    kw = dict(kw, per_image=per_image, pos_weight=2.0)
    ref_loss, ref_grad = loss_and_grad(ref_combo_loss, logits.double(), target.double(), **kw)
    cpu_loss, cpu_grad = loss_and_grad(combo_loss, logits, target, **kw)
    loss, grad = loss_and_grad(combo_loss, logits.cuda(), target.cuda(), **kw)
    assert loss.is_cuda and grad.dtype == dtype
    tol = 1e-6 if dtype in (torch.float32, torch.float64) else 2 * torch.finfo(dtype).eps
    assert rel_err(loss.cpu(), ref_loss) <= 1e-6
    assert rel_err(grad.cpu(), ref_grad) <= max(tol, rel_err(cpu_grad, ref_grad) * 1.01)
    assert abs(loss.item() - cpu_loss.item()) <= 1e-6 * abs(cpu_loss.item())


@pytest.mark.cuda
def test_cuda_large_uint8_target_stream_and_compile():
    logits, target = make((8, 1, 512, 512), "hard", seed=12)
    x, t = logits.cuda(), target.to(torch.uint8).cuda()
    ref = ref_combo_loss(logits.double(), target.double(), bce_weight=3, dice_weight=1, focal_weight=4)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        loss = combo_loss(x, t, bce_weight=3, dice_weight=1, focal_weight=4)
    s.synchronize()
    assert rel_err(loss.cpu(), ref) <= 1e-6
    model = TinySegmenter().cuda()
    step = torch.compile(lambda a, b: combo_loss(model(a), b, per_image=True), fullgraph=True)
    step(x[:2], t[:2]).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_capture_replays_to_the_eager_answer(dtype):
    """A training step captured in a CUDA graph (as users' own graphs and torch.compile's
    "reduce-overhead" mode do) replays on new inputs to the eager answer: the native forward and
    backward launch on the capturing stream, and their scratch memory is a graph allocation."""
    logits, target = make((4, 1, 64, 48), "soft", dtype=dtype, seed=21)
    x, t = logits.cuda().requires_grad_(), target.cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph asks
        for _ in range(2):
            x.grad = None
            combo_loss(x, t, focal_weight=2.0).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        loss = combo_loss(x, t, focal_weight=2.0)
        loss.backward()
    for seed in (22, 23):
        new_logits, new_target = make((4, 1, 64, 48), "soft", dtype=dtype, seed=seed)
        with torch.no_grad():
            x.copy_(new_logits)
            t.copy_(new_target)
        graph.replay()
        ref_loss, ref_grad = loss_and_grad(combo_loss, new_logits.cuda(), new_target.cuda(), focal_weight=2.0)
        assert loss.item() == ref_loss.item()
        torch.testing.assert_close(x.grad, ref_grad, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_reduce_overhead_compile_matches_eager():
    model = TinySegmenter().cuda()
    x = make((2, 1, 32, 32), "soft", seed=24)[0].cuda()
    t = (torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(25)) > 0.5).float().cuda()
    eager = combo_loss(model(x), t, per_image=True)
    step = torch.compile(lambda a, b: combo_loss(model(a), b, per_image=True), mode="reduce-overhead")
    for _ in range(3):  # the third call replays the recorded graph
        compiled = step(x, t)
    assert rel_err(compiled.detach().cpu(), eager.detach().cpu()) <= 1e-6


@pytest.mark.cuda
def test_cuda_validate_true_raises():
    with pytest.raises(pneumoseg.InvalidInputError, match="outside"):
        combo_loss(torch.zeros(1, 1, 4, 4, device="cuda"), torch.full((1, 1, 4, 4), 3.0, device="cuda"), validate=True)
    assert torch.isnan(combo_loss(torch.zeros(1, 1, 4, 4, device="cuda"), torch.full((1, 1, 4, 4), 3.0, device="cuda")))


def test_baseline_and_avx2_builds_agree():
    """The SSE2 loops (forced by PNEUMOSEG_DISABLE_AVX2) give the reference result too."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, sys; sys.path.insert(0, 'tests');"
        "from reference import ref_combo_loss; from pneumoseg.losses import combo_loss;"
        "g = torch.Generator().manual_seed(1);"
        "x = (torch.randn(3, 1, 37, 29, generator=g) * 3).requires_grad_(); t = (torch.rand(3, 1, 37, 29, generator=g) > 0.7).float();"
        "kw = dict(bce_weight=3.0, dice_weight=1.0, focal_weight=4.0, per_image=True, pos_weight=2.0);"
        "l = combo_loss(x, t, **kw); (gx,) = torch.autograd.grad(l, x);"
        "xr = x.detach().double().requires_grad_(); r = ref_combo_loss(xr, t.double(), **kw); (gr,) = torch.autograd.grad(r, xr);"
        "assert abs(l.item() - r.item()) <= 1e-6 * abs(r.item()), (l.item(), r.item());"
        "assert ((gx.double() - gr).abs().max() / gr.abs().max()).item() <= 1e-6;"
        "print('ok')"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PNEUMOSEG_DISABLE_AVX2="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("bfloat16", [False, True])
def test_half_rounding_matches_numpy_and_torch(bfloat16):
    """The float -> float16 / bfloat16 conversion of the kernels (CPU and GPU share it): round to
    nearest even, overflow to inf, subnormals, NaN kept."""
    import numpy as np

    from pneumoseg._native import _C

    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0.0, -0.0, 1.0, -1.0, 65504.0, 65520.0, 65519.99, 1e-8, 6e-8, 3e-8, 5.96e-8, 1e30,
                        np.inf, -np.inf, np.nan, 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8],
                       dtype=np.float32)
    values = np.concatenate([bits.view(np.float32), special])
    ours = _C._round_to_half_bits(values, bfloat16)
    if bfloat16:
        expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    else:
        with np.errstate(over="ignore"):
            expected = values.astype(np.float16).view(np.uint16)
    nan = np.isnan(values)
    np.testing.assert_array_equal(ours[~nan], expected[~nan])
    # NaN stays NaN (payloads may differ)
    exp_mask, man_mask = (0x7F80, 0x007F) if bfloat16 else (0x7C00, 0x03FF)
    assert ((ours[nan] & exp_mask) == exp_mask).all() and ((ours[nan] & man_mask) != 0).all()
