"""combo_loss against hostile tensors that once crashed the process: a target on a device with no
memory beside CPU logits, FakeTensors (no data), each in its own process so a segfault fails one test.
Plus the leaner host path's behaviour pinned against the float64 reference (tests/reference.py) on
the paths it shares with torch (checkpointing, saved-tensor hooks, torch.func, autocast)."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

import pneumoseg  # noqa: E402
from pneumoseg.losses import combo_loss  # noqa: E402
from isolated import run_isolated  # noqa: E402
from reference import ref_combo_loss  # noqa: E402


def check(code: str) -> None:
    result = run_isolated(code)
    assert result.returncode == 0 and "OK" in result.stdout, result.describe()


@pytest.mark.parametrize("logits_device, target_device", [("cpu", "meta"), ("meta", "cpu")])
def test_a_tensor_on_a_device_without_memory_is_refused_not_read(logits_device, target_device):
    # CPU logits with a meta target passed the device check (both report get_device() == -1) and the
    # native core read the target through a null pointer: a segfault
    check(f"""
        import torch, pneumoseg
        from pneumoseg.losses import combo_loss
        try:
            combo_loss(torch.zeros(1, 1, 3, 3, device="{logits_device}"), torch.zeros(1, 1, 3, 3, device="{target_device}"))
        except pneumoseg.InvalidInputError as exc:
            assert "meta" in str(exc), exc
            print("OK")
    """)


def test_under_fake_tensor_mode_the_loss_is_traced_not_run():
    # FakeTensorMode (shape propagation, memory estimation) gave FakeTensors whose data_ptr() is 0 to
    # the native core: a segfault. Now the op's fake implementation answers, as under torch.compile.
    check("""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from pneumoseg.losses import combo_loss
        with FakeTensorMode():
            x = torch.randn(2, 1, 8, 8, requires_grad=True)
            loss = combo_loss(x, torch.zeros(2, 1, 8, 8), focal_weight=1.0)
            assert loss.shape == () and loss.dtype == torch.float32
            (grad,) = torch.autograd.grad(loss, x)
            assert grad.shape == x.shape and grad.dtype == x.dtype
        print("OK")
    """)


def test_a_fake_tensor_outside_its_mode_is_refused_not_read():
    check("""
        import torch, pneumoseg
        from torch._subclasses.fake_tensor import FakeTensorMode
        from pneumoseg.losses import _run_forward, _plain_params
        fake = FakeTensorMode().from_tensor(torch.zeros(1, 1, 4, 4))
        try:
            _run_forward(fake, torch.zeros(1, 1, 4, 4), _plain_params(1.0, 1.0, 0.0, 2.0, 1.0, None, False))
        except pneumoseg.InvalidInputError as exc:
            assert "no data" in str(exc), exc
            print("OK")
    """)


def test_make_fx_traces_the_custom_op():
    from torch.fx.experimental.proxy_tensor import make_fx

    x, t = torch.randn(2, 1, 6, 5), (torch.rand(2, 1, 6, 5) > 0.5).float()
    graph = make_fx(lambda a, b: combo_loss(a, b, per_image=True), tracing_mode="fake")(x, t)
    assert "pneumoseg.combo_loss_forward" in str(graph.graph)
    torch.testing.assert_close(graph(x, t), combo_loss(x, t, per_image=True), rtol=0, atol=0)


# --- the eager host path beside torch's machinery, against the float64 reference ------------------------
def _data(seed=0, shape=(3, 1, 9, 7)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 3, (torch.rand(shape, generator=g) > 0.5).double()


def _ref(x, t, **kw):
    x = x.double().detach().requires_grad_()
    loss = ref_combo_loss(x, t.double(), **kw)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


@pytest.mark.parametrize("how", ["plain", "checkpoint", "checkpoint_reentrant", "save_on_cpu", "pack_hooks",
                                 "func_grad", "anomaly"])
def test_gradient_through_torch_machinery_equals_the_reference(how):
    import torch.utils.checkpoint as cp

    x0, t = _data()
    kw = dict(bce_weight=3.0, dice_weight=1.0, focal_weight=4.0, per_image=True, pos_weight=2.0)
    ref_loss, ref_grad = _ref(x0 * 2, t, **kw)
    ref_grad = ref_grad * 2
    x = x0.clone().requires_grad_()

    def f(a):
        return combo_loss(a * 2, t, **kw)

    if how == "func_grad":
        grad, loss = torch.func.grad_and_value(f)(x0)
    else:
        if how == "plain":
            loss = f(x)
        elif how.startswith("checkpoint"):
            loss = cp.checkpoint(f, x, use_reentrant=how.endswith("reentrant"))
        elif how == "save_on_cpu":
            with torch.autograd.graph.save_on_cpu():
                loss = f(x)
        elif how == "pack_hooks":
            with torch.autograd.graph.saved_tensors_hooks(lambda v: v.clone(), lambda v: v):
                loss = f(x)
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Anomaly Detection has been enabled")
                with torch.autograd.detect_anomaly():
                    loss = f(x)
                    loss.backward()
        if how != "anomaly":
            loss.backward()
        grad = x.grad
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-15)


def test_autocast_bfloat16_logits_and_an_int_upstream_gradient():
    x0, t = _data(1)
    conv = torch.nn.Conv2d(1, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x0.float())
        assert y.dtype == torch.bfloat16
        loss = combo_loss(y, t.bool())
    assert loss.dtype == torch.float32
    (g,) = torch.autograd.grad(loss, y, grad_outputs=torch.tensor(2))
    ref_loss, ref_grad = _ref(y.detach(), t)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(g.double(), 2 * ref_grad, rtol=2e-2, atol=1e-5)


def test_a_weight_tensor_that_requires_grad_is_refused_not_silently_cut():
    # A learnable loss weight got no gradient and no word: the weights are read as constants.
    x0, t = _data(2)
    w = torch.tensor(2.0, requires_grad=True)
    with pytest.raises(pneumoseg.InvalidInputError, match="bce_weight.*requires grad"):
        combo_loss(x0, t, bce_weight=w)
    with pytest.raises(pneumoseg.InvalidInputError, match="pos_weight.*requires grad"):
        combo_loss(x0, t, pos_weight=torch.tensor([3.0], requires_grad=True))
    # a plain tensor weight is still taken
    assert combo_loss(x0, t, bce_weight=w.detach()).item() == combo_loss(x0, t, bce_weight=2.0).item()
