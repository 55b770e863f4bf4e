"""Review of the sub-pixel decoder blocks' frozen phase weights (``freeze_subpixel_weights``): every way
a user or a library changes a frozen model's weights must give the outputs of the same model unfrozen
(computed from the weights it has now), never outputs of the weights it was frozen from.

The reference is the same model, deep-copied and unfrozen: its blocks derive their weights on every
forward from ``conv1``'s current weight (``test_subpixel_decoder.py`` checks that path against a float64
upsample-concatenate-convolve reference), so frozen and reference outputs must agree bit for bit."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
import torch.autograd.forward_ad as fwAD  # noqa: E402

from factories import randomize_model  # noqa: E402
from pneumoseg.models import create_segmenter  # noqa: E402
from pneumoseg.models.decoders import DecoderBlock  # noqa: E402
from pneumoseg.models.decoders.blocks import freeze_subpixel_weights, unfreeze_subpixel_weights  # noqa: E402
from pneumoseg.models.fuse import fuse_batchnorm  # noqa: E402

TINY_DECODER = (16, 12, 8, 8, 4)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny inputs: two shared cores
    yield
    torch.set_num_threads(threads)


def _frozen_segmenter(seed=0):
    model = randomize_model(create_segmenter("unet", "resnet_tiny", decoder_channels=TINY_DECODER), seed).eval()
    model = fuse_batchnorm(model, inplace=True).model
    assert freeze_subpixel_weights(model) == 5
    return model


def _input(seed=1):
    return torch.randn((2, 1, 32, 64), generator=torch.Generator().manual_seed(seed))


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, DecoderBlock)]


def _unfrozen_output(model, x):
    """What ``model`` computes from its current weights (a deep copy of it, unfrozen)."""
    reference = copy.deepcopy(model)
    unfreeze_subpixel_weights(reference)
    with torch.no_grad():
        return reference(x)


def _small_step(model, optimizer_cls, x, **options):
    optimizer = optimizer_cls(model.parameters(), lr=1e-3, **options)
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


FUSED = [(torch.optim.Adam, {"fused": True}), (torch.optim.AdamW, {"fused": True}),
         (torch.optim.SGD, {"fused": True, "momentum": 0.9})]


@pytest.mark.parametrize("optimizer_cls,options", FUSED, ids=lambda v: getattr(v, "__name__", ""))
def test_a_fused_optimizer_step_in_training_mode_is_seen(optimizer_cls, options):
    """Fused optimizers write the parameters without moving their version counters: the frozen
    weights must not outlive the switch to training mode."""
    model, x = _frozen_segmenter(), _input()
    weight = _blocks(model)[0].conv1[0].weight
    before = (weight._version, weight.detach().clone())
    model.train()
    _small_step(model, optimizer_cls, x, **options)
    assert weight._version == before[0] and not torch.equal(weight.detach(), before[1])  # the premise
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _unfrozen_output(model, x), rtol=0, atol=0)


def test_a_fused_optimizer_step_in_eval_mode_is_seen():
    """Fine-tuning in eval mode (frozen BatchNorm statistics) with a fused optimizer: the forward that
    wants conv1's gradient ends the frozen weights, so the no-grad evaluation after the step is right."""
    model, x = _frozen_segmenter(), _input()
    _small_step(model, torch.optim.Adam, x, fused=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _unfrozen_output(model, x), rtol=0, atol=0)


def test_writes_through_data_during_training_are_seen():
    """Hand-written updates (``p.data.add_``: their own version counter) of a model trained after it was
    frozen."""
    model, x = _frozen_segmenter(), _input()
    model.train()
    model(x).square().mean().backward()
    for p in model.parameters():
        p.data.add_(p.grad, alpha=-1e-3)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _unfrozen_output(model, x), rtol=0, atol=0)


def test_a_compiled_frozen_model_sees_a_training_step():
    """A compiled trace cannot read version counters; a training step between two compiled
    evaluations must still reach the second one (training mode drops the frozen weights, which the
    compiled code guards on)."""
    model, x = _frozen_segmenter(), _input()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        first = compiled(x)
    model.train()
    _small_step(compiled, torch.optim.SGD, x)
    model.eval()
    with torch.no_grad():
        second = compiled(x)
    want = _unfrozen_output(model, x)
    assert not torch.allclose(first, want)  # the step changed the function
    torch.testing.assert_close(second, want, rtol=1e-6, atol=1e-6)


# How the old weight's memory goes before a new tensor is put in through ``.data``.
_LET_GO = {
    # the storage is dropped by the parameter (freezing's alias still holds it)
    "replaced": lambda weight: setattr(weight, "data", torch.empty(0)),
    # FSDP frees a parameter's memory in place, which also moves freezing's alias
    "freed in place": lambda weight: weight.untyped_storage().resize_(0),
}


@pytest.mark.parametrize("let_go", list(_LET_GO))
def test_a_weight_replaced_through_data_is_seen_even_at_a_reused_address(let_go):
    """``param.data = new`` keeps the parameter's version counter; a new tensor allocated where the old
    one was freed then has the same data pointer, version, shape and strides: that must not pass for
    the old weight. After a free in place only the alias, no longer at that address, tells them apart."""
    model, x = _frozen_segmenter(), _input()
    generator = torch.Generator().manual_seed(5)
    for _ in range(8):
        for block in _blocks(model):
            weight = block.conv1[0].weight
            shape = weight.shape
            _LET_GO[let_go](weight)
            new = torch.empty(shape)
            new.normal_(generator=generator).mul_(0.1)
            weight.data = new
            del new
        with torch.no_grad():
            torch.testing.assert_close(model(x), _unfrozen_output(model, x), rtol=0, atol=0)
        freeze_subpixel_weights(model)


# torch's forward AD loads its JIT-scripted decompositions on first use
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_ad_through_the_weights():
    """A JVP with respect to the weights (dual parameters through functional_call, not torch.func):
    the frozen weights hold no tangent, so they must not be used."""
    model, x = _frozen_segmenter(), _input()
    reference = copy.deepcopy(model)
    unfreeze_subpixel_weights(reference)
    generator = torch.Generator().manual_seed(3)
    tangents = {k: torch.randn(v.shape, generator=generator) for k, v in model.named_parameters()}

    def jvp(m):
        with torch.no_grad(), fwAD.dual_level():
            duals = {k: fwAD.make_dual(v.detach(), tangents[k]) for k, v in m.named_parameters()}
            return fwAD.unpack_dual(torch.func.functional_call(m, duals, (x,))).tangent

    torch.testing.assert_close(jvp(model), jvp(reference), rtol=0, atol=0)
    # a dual input only: the weights have no tangent, so the frozen ones still serve
    def input_jvp(m):
        with torch.no_grad(), fwAD.dual_level():
            return fwAD.unpack_dual(m(fwAD.make_dual(x, torch.ones_like(x)))).tangent

    with torch.no_grad():
        assert all(b._frozen_weights_apply(b.has_skip) for b in _blocks(model))
    torch.testing.assert_close(input_jvp(model), input_jvp(reference), rtol=0, atol=0)

@pytest.mark.parametrize("convert", ["half", "double", "channels_last", "share_memory"])
def test_a_conversion_drops_the_frozen_weights(convert):
    """``.to()`` / ``.half()`` replace conv1's weights: the frozen weights (which the conversion would
    otherwise cast and keep, unused, beside the old weights) are dropped; a no-op ``.to()`` keeps them."""
    model, x = _frozen_segmenter(), _input()
    model.to("cpu").to(torch.float32)  # nothing changes
    with torch.no_grad():
        assert all(b._frozen_weights_apply(b.has_skip) for b in _blocks(model))
    if convert == "half":
        model.half()
        x = x.half()
    elif convert == "double":
        model.double()
        x = x.double()
    elif convert == "channels_last":
        model.to(memory_format=torch.channels_last)
    else:
        model.share_memory()
    assert all(b._frozen_phase_weight is None for b in _blocks(model))
    assert unfreeze_subpixel_weights(model) == 0
    if convert != "half":  # CPU half convolutions: not every build has them
        with torch.no_grad():
            torch.testing.assert_close(model(x), _unfrozen_output(model, x), rtol=0, atol=0)
    assert freeze_subpixel_weights(model) == 5


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_carries_no_dead_frozen_weights(how):
    """A copy's weights are new tensors, so frozen weights copied with it would never apply there: it
    is not frozen (nothing held twice), it computes the same outputs, and it can be frozen itself."""
    import io

    model, x = _frozen_segmenter(), _input()
    if how == "deepcopy":
        clone = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)  # our own object, written just above
    assert all(b._frozen_phase_weight is not None for b in _blocks(model))  # the original stays frozen
    assert unfreeze_subpixel_weights(clone) == 0
    assert all(b._frozen_sources is None for b in _blocks(clone))
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(clone(x), want, rtol=0, atol=0)
        assert freeze_subpixel_weights(clone) == 5
        torch.testing.assert_close(clone(x), want, rtol=0, atol=0)


def test_functional_call_with_another_models_frozen_buffers():
    """The frozen weights are buffers, so ``named_buffers()`` lists them and ``functional_call`` swaps in
    another frozen model's: they must not be used with this model's conv1 weights."""
    model, other, x = _frozen_segmenter(), _frozen_segmenter(seed=7), _input()
    params = dict(model.named_parameters())
    with torch.no_grad():
        want = model(x)
        # another model's buffers (its BatchNorm statistics, folded here: only its frozen weights)
        torch.testing.assert_close(torch.func.functional_call(model, dict(other.named_buffers()), (x,)), want,
                                   rtol=0, atol=0)
        # every tensor of the other model: its function, whatever this model froze
        both = {**dict(other.named_parameters()), **dict(other.named_buffers())}
        torch.testing.assert_close(torch.func.functional_call(model, both, (x,)), other(x), rtol=0, atol=0)
        # this model's own tensors, frozen ones included: still frozen, same function
        own = {**params, **dict(model.named_buffers())}
        torch.testing.assert_close(torch.func.functional_call(model, own, (x,)), want, rtol=0, atol=0)
        assert all(b._frozen_weights_apply(b.has_skip) for b in _blocks(model))


@pytest.mark.parametrize("frozen", [False, True], ids=["computed", "frozen"])
def test_wrong_channel_counts_are_a_clear_error_on_both_paths(frozen):
    """Frozen weights reach the convolution without upsample_conv3x3's check: a wrong input or skip
    width must still be a ValueError naming the channels, not conv2d's message about a derived
    (4 O, C, 2, 2) weight the user never made."""
    block = DecoderBlock(8, 4, 6, None).eval()
    if frozen:
        assert freeze_subpixel_weights(block) == 1
    generator = torch.Generator().manual_seed(0)
    for x_channels, skip_channels in [(8, 5), (7, 4), (8, 3)]:
        x = torch.randn((1, x_channels, 4, 4), generator=generator)
        skip = torch.randn((1, skip_channels, 8, 8), generator=generator)
        with torch.no_grad(), pytest.raises(ValueError, match=f"{x_channels} \\+ {skip_channels}"):
            block(x, skip)
