"""The decoder blocks' sub-pixel convolution (``upsample_conv3x3``, the default path of ``DecoderBlock``)
against the formulation it replaces, nearest x2 upsampling + concatenation + 3x3 convolution, written
here with functional torch ops in float64: single blocks (odd channel counts, batch 1 and 3, non-square,
no skip, with and without a bias, channels_last), gradients, whole segmenters (U-Net, U-Net++, scSE on
and off), BatchNorm folding, autocast, ``torch.compile(fullgraph=True)`` and an ONNX round trip."""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from factories import randomize_model  # noqa: E402
from pneumoseg.models import create_segmenter  # noqa: E402
from pneumoseg.models.decoders import DecoderBlock, set_subpixel_decoding, subpixel_decoding, upsample_conv3x3  # noqa: E402
from pneumoseg.models.decoders.blocks import freeze_subpixel_weights, unfreeze_subpixel_weights  # noqa: E402
from pneumoseg.models.fuse import fuse_batchnorm  # noqa: E402

TINY_DECODER = (16, 12, 8, 8, 4)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny inputs: OpenMP's barriers on two shared cores cost more than they save
    yield
    torch.set_num_threads(threads)


def reference_upsample_conv3x3(x, skip, weight, bias=None):
    """What a decoder block computed before: upsample, concatenate, convolve (float64)."""
    up = F.interpolate(x.double(), scale_factor=2.0, mode="nearest")
    if skip is not None:
        up = torch.cat([up, skip.double()], dim=1)
    return F.conv2d(up, weight.double(), None if bias is None else bias.double(), padding=1)


def _randn(*shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _block_inputs(batch, channels, skip_channels, out_channels, height, width, bias, dtype, seed=0):
    x = _randn(batch, channels, height, width, seed=seed, dtype=dtype)
    skip = _randn(batch, skip_channels, 2 * height, 2 * width, seed=seed + 1, dtype=dtype) if skip_channels else None
    weight = _randn(out_channels, channels + skip_channels, 3, 3, seed=seed + 2, dtype=dtype)
    b = _randn(out_channels, seed=seed + 3, dtype=dtype) if bias else None
    return x, skip, weight, b


# (batch, channels, skip channels, out channels, height, width): odd counts, 1x1 maps, non-square, no skip
BLOCK_SHAPES = [(1, 8, 4, 6, 4, 4), (3, 5, 3, 7, 3, 5), (1, 1, 1, 1, 1, 1), (3, 7, 0, 5, 5, 2), (1, 16, 0, 3, 2, 6),
                (3, 3, 9, 2, 6, 3)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_block_equals_upsample_concatenate_convolve_in_float64(shape, bias):
    x, skip, weight, b = _block_inputs(*shape, bias, torch.float64)
    want = reference_upsample_conv3x3(x, skip, weight, b)
    got = upsample_conv3x3(x, skip, weight, b)
    assert got.shape == want.shape == (shape[0], shape[3], 2 * shape[4], 2 * shape[5])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", BLOCK_SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
def test_block_float32_and_memory_format(shape, memory_format):
    x, skip, weight, b = _block_inputs(*shape, True, torch.float32)
    x = x.contiguous(memory_format=memory_format)
    skip = None if skip is None else skip.contiguous(memory_format=memory_format)
    got = upsample_conv3x3(x, skip, weight, b)
    want = reference_upsample_conv3x3(x, skip, weight, b)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [BLOCK_SHAPES[1], BLOCK_SHAPES[3]], ids=["skip", "no-skip"])
def test_traced_path_equals_eager_path(shape):
    """Under torch.compile and export the phases are interleaved by pixel_shuffle + crop, in eager
    runs by writes into the output's pixels: both are the reference function."""
    x, skip, weight, b = _block_inputs(*shape, True, torch.float64)
    compiled = torch.compile(upsample_conv3x3, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, skip, weight, b), reference_upsample_conv3x3(x, skip, weight, b),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [BLOCK_SHAPES[1], BLOCK_SHAPES[3]], ids=["skip", "no-skip"])
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "compiled"])
def test_block_gradients_equal_the_reference_gradients(shape, traced):
    inputs = _block_inputs(*shape, True, torch.float64)
    fast = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    slow = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    fn = torch.compile(upsample_conv3x3, backend="eager", fullgraph=True) if traced else upsample_conv3x3
    out_fast, out_slow = fn(*fast), reference_upsample_conv3x3(*slow)
    upstream = _randn(*out_slow.shape, seed=7)
    (out_fast * upstream).sum().backward()
    (out_slow * upstream).sum().backward()
    for got, want in zip(fast, slow):
        if want is not None:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-11, atol=1e-11)


def test_bad_shapes_are_a_clear_error():
    x, skip, weight, _ = _block_inputs(1, 4, 2, 3, 4, 4, False, torch.float32)
    with pytest.raises(ValueError, match=r"3x3 weight over 4 \+ 0 input channels"):
        upsample_conv3x3(x, None, weight)  # a block with skip channels called without its skip features
    with pytest.raises(ValueError, match="twice its size"):
        upsample_conv3x3(x, skip[:, :, :7], weight)
    with pytest.raises(ValueError, match="3x3 weight"):
        upsample_conv3x3(x, skip, weight[..., :2])


def test_a_half_precision_weight_has_its_taps_summed_in_float32():
    x, skip, weight, _ = _block_inputs(1, 6, 2, 4, 3, 5, False, torch.float32)
    weight = weight.bfloat16()
    got = upsample_conv3x3(x.bfloat16(), skip.bfloat16(), weight)
    want = reference_upsample_conv3x3(x.bfloat16(), skip.bfloat16(), weight)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=0.05, atol=0.15)  # bf16 inputs and output


# --------------------------------------------------------------------------------------------------
# Whole segmenters


def _segmenter(arch, encoder="resnet_tiny", attention=None, seed=0, **kw):
    kw.setdefault("decoder_channels", TINY_DECODER)
    return randomize_model(create_segmenter(arch, encoder, attention=attention, **kw), seed).double().eval()


def _subpixel_blocks(model):
    """The blocks that take the sub-pixel path: all but those with skip features and scSE before conv1."""
    blocks = [m for m in model.modules() if isinstance(m, DecoderBlock)]
    return blocks, [b for b in blocks if not b.has_skip or type(b.attention1.attention).__name__ == "Identity"]


SEGMENTERS = [("unet", "resnet_tiny", None), ("unet", "resnet_tiny", "scse"), ("unet++", "resnet_tiny", None),
              ("unet++", "resnet_tiny", "scse"), ("unet", "resnet34", None), ("unet++", "efficientnet_b0", None)]


@pytest.mark.parametrize("arch, encoder, attention", SEGMENTERS, ids=["-".join(map(str, s)) for s in SEGMENTERS])
def test_segmenter_outputs_equal_the_reference_formulation(arch, encoder, attention):
    model = _segmenter(arch, encoder, attention, aux_classifier=True)
    blocks, fast = _subpixel_blocks(model)
    assert len(fast) == (1 if attention else len(blocks))  # with scSE only the last block (no skip)
    x = _randn(3, 1, 64, 96, seed=3)
    with torch.no_grad():
        got = model(x)
        with subpixel_decoding(model, False):
            want = model(x)
    assert all(b.subpixel for b in blocks)  # restored
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_set_subpixel_decoding_switches_every_block_and_calls_the_reference_path(monkeypatch):
    model = _segmenter("unet++")
    blocks, _ = _subpixel_blocks(model)
    assert set_subpixel_decoding(model, False) == len(blocks) and not any(b.subpixel for b in blocks)
    import pneumoseg.models.decoders.blocks as blocks_module

    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    real = blocks_module.upsample_conv3x3
    monkeypatch.setattr(blocks_module, "upsample_conv3x3", spy)
    with torch.no_grad():
        model(_randn(1, 1, 32, 64, seed=0))
        assert calls == []
        set_subpixel_decoding(model, True)
        model(_randn(1, 1, 32, 64, seed=0))
    assert len(calls) == len(blocks)


def test_training_mode_output_and_gradients_equal_the_reference():
    """Training (BatchNorm on batch statistics): the loss and every parameter's gradient, conv1's 3x3
    weights included, are the reference path's (float64)."""
    model = _segmenter("unet", aux_classifier=True).train()
    reference = copy.deepcopy(model)
    set_subpixel_decoding(reference, False)
    x = _randn(3, 1, 64, 32, seed=5)
    for net in (model, reference):
        torch.manual_seed(0)  # the same dropout mask in the classification head
        masks, logits = net(x)
        (masks.square().mean() + logits.sum()).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11, msg=name)
    for (name, b), (_, c) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-12, msg=name)  # same running statistics


@pytest.mark.parametrize("arch, attention", [("unet", None), ("unet++", "scse")])
def test_batchnorm_folded_segmenter_equals_the_unfolded_one(arch, attention):
    """Folding gives conv1 a bias and turns its BatchNorm into Identity: the bias is added once."""
    model = _segmenter(arch, attention=attention)
    folded = fuse_batchnorm(model).model
    blocks, fast = _subpixel_blocks(folded)
    assert all(b.conv1[0].bias is not None and type(b.conv1[1]).__name__ == "Identity" for b in blocks)
    x = _randn(1, 1, 64, 64, seed=2)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(folded(x), want, rtol=1e-10, atol=1e-10)
        with subpixel_decoding(folded, False):
            torch.testing.assert_close(folded(x), want, rtol=1e-10, atol=1e-10)


def test_state_dict_is_unchanged():
    model = _segmenter("unet")
    reference = copy.deepcopy(model)
    set_subpixel_decoding(reference, False)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    model.load_state_dict(reference.state_dict(), strict=True)


@pytest.mark.parametrize("arch", ["unet", "unet++"])
def test_channels_last_autocast_and_compiled_fullgraph(arch):
    model = _segmenter(arch).float().to(memory_format=torch.channels_last)
    x = _randn(3, 1, 64, 96, seed=4, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model.double()(x.double())
        model.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager = model(x)
            compiled = torch.compile(model, backend="eager", fullgraph=True)(x)
            with subpixel_decoding(model, False):
                old = model(x)
    scale = want.abs().max()
    for out in (eager, compiled):
        assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
        # bf16 autocast: no further from float64 than the reference formulation under the same autocast
        assert (out.double() - want).abs().max() <= 2 * (old.double() - want).abs().max() + 1e-3 * scale


@pytest.mark.slow
def test_inductor_compiles_the_subpixel_block():
    """inductor (the torch.compile default) on one block: the weight's phase taps and the interleave
    compile and compute the reference function (about 25 s on two cores, the C++ build of its kernels;
    test_models' inductor U-Net has scSE, where only the last block takes this path)."""
    block = randomize_model(DecoderBlock(6, 4, 5, None), seed=1).eval()
    x, skip = _randn(2, 6, 4, 6, seed=1, dtype=torch.float32), _randn(2, 4, 8, 12, seed=2, dtype=torch.float32)
    with torch.no_grad():
        got = torch.compile(block, fullgraph=True)(x, skip)
        with subpixel_decoding(block, False):
            want = block.double()(x.double(), skip.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_onnx_export_round_trip_on_tensorrts_operators():
    """A BatchNorm-folded U-Net (conv1 with a bias) exported as the export module does (dynamo, opset,
    dynamic batch): onnx.checker, TensorRT's operator list, and onnxruntime against torch."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import numpy as np

    from pneumoseg.export.onnx import OPSET, check_tensorrt_ops

    model = fuse_batchnorm(_segmenter("unet").float()).model
    x = _randn(2, 1, 64, 96, seed=6, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.onnx's own deprecation warnings (the export module hides them too)
        program = torch.onnx.export(model, (x,), dynamo=True, opset_version=OPSET, input_names=["image"],
                                    output_names=["mask_logits"], dynamic_shapes={"x": {0: batch}}, optimize=True,
                                    verbose=False)
    # onnxscript before 0.7.2 (pyproject allows 0.7) mistranslates aten.repeat_interleave: with onnxscript
    # 0.7.0 this export failed until the phase bias was built from reshape + expand instead
    traced = {str(node.target) for node in program.exported_program.graph.nodes if node.op == "call_function"}
    assert not [t for t in traced if "repeat_interleave" in t], traced
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    ops = check_tensorrt_ops(proto, "sub-pixel U-Net")
    assert "Resize" not in ops and "ConstantOfShape" not in ops  # no upsampling; no scatter of slices
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        xn = _randn(n, 1, 64, 96, seed=n, dtype=torch.float32)
        with torch.no_grad():
            want = model(xn).numpy()
        np.testing.assert_allclose(session.run(None, {"image": xn.numpy()})[0], want, rtol=1e-4, atol=1e-4)


def test_a_hook_on_conv1_keeps_the_reference_path():
    """The sub-pixel path reads conv1's weight without calling the module: a block whose conv1 has a
    hook (a forward hook, the old weight_norm's pre-hook) runs the reference path so the hook runs."""
    block = randomize_model(DecoderBlock(4, 2, 3, None), seed=2).double().eval()
    x, skip = _randn(1, 4, 3, 5, seed=1), _randn(1, 2, 6, 10, seed=2)
    with torch.no_grad():
        plain = block(x, skip)
    block.conv1[0].register_forward_hook(lambda module, args, out: out * 2)
    with torch.no_grad():
        hooked = block(x, skip)
        with subpixel_decoding(block, False):
            want = block(x, skip)
    torch.testing.assert_close(hooked, want, rtol=0, atol=0)
    assert not torch.allclose(hooked, plain)


# --------------------------------------------------------------------------------------------------
# Frozen inference weights (freeze_subpixel_weights): computed once, the same outputs bit for bit


def _folded_float_segmenter(arch, attention=None, seed=0, memory_format=torch.contiguous_format):
    model = randomize_model(create_segmenter(arch, "resnet_tiny", attention=attention, decoder_channels=TINY_DECODER),
                            seed).eval()
    return fuse_batchnorm(model, inplace=True).model.to(memory_format=memory_format)


def _outputs(model, x):
    with torch.inference_mode():
        with unfreezing(model):
            plain = model(x)
        frozen = model(x)
    return plain, frozen


class unfreezing:
    """Runs a frozen model unfrozen inside the block and freezes it again after (same weights)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        unfreeze_subpixel_weights(self.model)

    def __exit__(self, *exc):
        freeze_subpixel_weights(self.model)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("arch,attention", [("unet", None), ("unet", "scse"), ("unet++", None)])
def test_frozen_weights_give_bit_identical_outputs(arch, attention, memory_format):
    model = _folded_float_segmenter(arch, attention, memory_format=memory_format)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    blocks, subpixel = _subpixel_blocks(model)
    assert freeze_subpixel_weights(model) == len(subpixel) > 0
    assert all((b._frozen_phase_weight is not None) == (b in subpixel) for b in blocks)
    assert all(b._frozen_skip_weight.is_contiguous(memory_format=memory_format) for b in subpixel if b.has_skip)
    # the phase weight too: conv2d would convert a weight of the other format on every call
    assert all(b._frozen_phase_weight.is_contiguous(memory_format=memory_format) for b in subpixel)
    x = _randn(2, 1, 64, 96, seed=4, dtype=torch.float32).contiguous(memory_format=memory_format)
    plain, frozen = _outputs(model, x)
    torch.testing.assert_close(frozen, plain, rtol=0, atol=0)
    state = model.state_dict()  # non-persistent buffers: the state dict is the same
    assert state.keys() == keys.keys() and all(torch.equal(state[k], v) for k, v in keys.items())


def test_frozen_half_precision_weights_are_bit_identical():
    """Frozen after the cast (as the backend does): the taps are summed in float32 and cast, as on
    every unfrozen forward; freezing before the cast would fall back to computing."""
    model = _folded_float_segmenter("unet")
    freeze_subpixel_weights(model)
    model.half()
    x = _randn(1, 1, 32, 64, seed=5, dtype=torch.float16)
    blocks, subpixel = _subpixel_blocks(model)
    assert all(not b._frozen_weights_apply(b.has_skip) for b in subpixel)  # the cast replaced the weights
    assert freeze_subpixel_weights(model) == len(subpixel)
    assert all(b._frozen_phase_weight.dtype == torch.float16 for b in subpixel)
    plain, frozen = _outputs(model, x)
    torch.testing.assert_close(frozen, plain, rtol=0, atol=0)


def test_frozen_weights_are_never_stale():
    """A changed weight (in place, loaded, trained) is used, not what was frozen from the old one."""
    model = _folded_float_segmenter("unet")
    other = _folded_float_segmenter("unet", seed=7)
    x = _randn(1, 1, 32, 64, seed=6, dtype=torch.float32)
    block = [b for b in model.modules() if isinstance(b, DecoderBlock)][0]
    assert freeze_subpixel_weights(model) == 5

    def unfrozen_output():
        with torch.no_grad(), unfreezing(model):
            return model(x)

    with torch.no_grad():
        block.conv1[0].weight.mul_(1.5)  # in place: the version counter moves
        torch.testing.assert_close(model(x), unfrozen_output(), rtol=0, atol=0)
        block.conv1[0].bias.add_(0.25)
        torch.testing.assert_close(model(x), unfrozen_output(), rtol=0, atol=0)
    freeze_subpixel_weights(model)
    model.load_state_dict(other.state_dict())  # drops the frozen weights
    assert unfreeze_subpixel_weights(model) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), other(x), rtol=0, atol=0)

    # eval mode with weight gradients (fine-tuning with frozen BatchNorm statistics): conv1 gets them
    freeze_subpixel_weights(model)
    model.zero_grad()
    model(x).sum().backward()
    assert block.conv1[0].weight.grad is not None and block.conv1[0].weight.grad.abs().sum() > 0
    # training mode ignores them too, and an optimizer step is seen afterwards in eval mode
    model.train()
    out = model(x)
    out.sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(1e-3 * p.grad)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), unfrozen_output(), rtol=0, atol=0)


def test_frozen_weights_follow_functional_call_and_copies():
    model = _folded_float_segmenter("unet")
    freeze_subpixel_weights(model)
    x = _randn(1, 1, 32, 64, seed=8, dtype=torch.float32)
    copy_ = copy.deepcopy(model)  # its weights are new tensors: it computes until frozen itself
    params = {k: v * 0.5 for k, v in model.named_parameters()}
    with torch.no_grad():
        torch.testing.assert_close(copy_(x), model(x), rtol=0, atol=0)
        got = torch.func.functional_call(model, params, (x,))
        with unfreezing(model):
            want = torch.func.functional_call(model, params, (x,))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, model(x).detach())


def test_frozen_weights_under_compile_fullgraph():
    model = _folded_float_segmenter("unet", memory_format=torch.channels_last)
    freeze_subpixel_weights(model)
    x = _randn(1, 1, 32, 64, seed=9, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = model(x)
        got = torch.compile(model, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # the trace reads the frozen buffers (not a recomputation): a marked phase weight shows in its output
    block = [b for b in model.modules() if isinstance(b, DecoderBlock)][0]
    with torch.inference_mode():
        block._frozen_phase_weight.mul_(0.5)
        marked = model(x)
        torch._dynamo.reset()
        got = torch.compile(model, backend="eager", fullgraph=True)(x)
    assert not torch.allclose(marked, want)
    torch.testing.assert_close(got, marked, rtol=1e-6, atol=1e-6)


def test_weights_frozen_under_inference_mode_serve_an_input_gradient():
    """Frozen inside inference_mode, used for a saliency map (gradient of the input, weights fixed)."""
    model = _folded_float_segmenter("unet").requires_grad_(False)
    with torch.inference_mode():
        assert freeze_subpixel_weights(model) == 5
    blocks = [b for b in model.modules() if isinstance(b, DecoderBlock)]
    assert not any(b._frozen_phase_weight.is_inference() or b._frozen_phase_weight.requires_grad for b in blocks)
    x = _randn(1, 1, 32, 64, seed=10, dtype=torch.float32).requires_grad_(True)
    assert all(b._frozen_weights_apply(b.has_skip) for b in blocks)
    model(x).sum().backward()
    frozen_grad = x.grad.clone()
    x.grad = None
    with unfreezing(model):
        model(x).sum().backward()
    torch.testing.assert_close(frozen_grad, x.grad, rtol=0, atol=0)
