"""Adversarial review of pneumoseg.models: each test failed before its fix (silent picks between two
checkpoint keys that name one weight, a half-loaded head, a stem adapted one rounding away from timm's,
sparse weights, negative BatchNorm variances, hooks the sub-pixel path skipped, vmap ensembling, unclear
errors for unhashable arguments, empty images and integer inputs)."""

from __future__ import annotations

import copy
import math
import re

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from factories import randomize_model  # noqa: E402
from pneumoseg.errors import DataFormatError, InvalidInputError  # noqa: E402
from pneumoseg.models import (  # noqa: E402
    adapt_input_conv, build_model, create_classifier, create_encoder, create_segmenter, load_pretrained)
from pneumoseg.models.decoders import DecoderBlock, set_subpixel_decoding, subpixel_decoding  # noqa: E402

SMALL = "resnet_tiny"


@pytest.fixture(scope="module")
def source():
    return randomize_model(create_classifier(SMALL, num_classes=1, in_channels=3), 0).eval()


def _fresh(in_channels: int = 3, num_classes: int = 1) -> nn.Module:
    return randomize_model(create_classifier(SMALL, num_classes=num_classes, in_channels=in_channels), 1).eval()


# ------------------------------------------------------------- two checkpoint keys naming one weight

def test_a_wrapper_prefixed_key_beside_the_same_plain_key_is_refused(tmp_path, source):
    sd = source.state_dict()
    state = {**{"module." + k: v for k, v in sd.items()}, "conv1.weight": torch.zeros_like(sd["conv1.weight"])}
    torch.save(state, tmp_path / "both.pth")
    with pytest.raises(DataFormatError, match=r"module\.conv1\.weight.*conv1\.weight"):
        load_pretrained(_fresh(), tmp_path / "both.pth")


def test_an_explicit_prefix_that_makes_two_keys_one_is_refused(tmp_path, source):
    sd = source.state_dict()
    state = {**{"net2." + k: v for k, v in sd.items()}, "conv1.weight": torch.zeros_like(sd["conv1.weight"])}
    torch.save(state, tmp_path / "both.pth")
    with pytest.raises(DataFormatError, match=r"net2\.conv1\.weight.*conv1\.weight"):
        load_pretrained(_fresh(), tmp_path / "both.pth", prefix="net2.")


def test_old_and_new_densenet_keys_for_one_weight_are_refused(tmp_path):
    model = randomize_model(create_classifier("densenet121", num_classes=1), 0)
    sd = model.state_dict()
    key = "features.denseblock1.denselayer1.norm1.weight"
    state = dict(sd)
    state[key.replace("norm1", "norm.1")] = torch.zeros_like(sd[key])
    torch.save(state, tmp_path / "both.pth")
    with pytest.raises(DataFormatError, match=r"norm\.1\.weight.*norm1\.weight"):
        load_pretrained(create_classifier("densenet121", num_classes=1), tmp_path / "both.pth")


def test_a_sequential_head_beside_the_plain_head_is_refused(tmp_path, source):
    sd = source.state_dict()
    state = {**sd, "fc.0.weight": torch.zeros_like(sd["fc.weight"]), "fc.0.bias": torch.zeros_like(sd["fc.bias"])}
    torch.save(state, tmp_path / "both.pth")
    with pytest.raises(DataFormatError, match=r"fc\.0\.weight.*fc\.weight"):
        load_pretrained(_fresh(), tmp_path / "both.pth")


# ------------------------------------------------------------------------------ head, values, stem

def test_a_head_without_its_bias_is_not_half_loaded(tmp_path, source):
    state = dict(source.state_dict())
    del state["fc.bias"]
    torch.save(state, tmp_path / "nobias.pth")
    model = _fresh()
    head_before = copy.deepcopy(model.fc.state_dict())
    result = load_pretrained(model, tmp_path / "nobias.pth")
    assert result.head_loaded is False and "fc.weight" in result.skipped_keys
    torch.testing.assert_close(model.fc.state_dict(), head_before, rtol=0, atol=0)
    with pytest.raises(InvalidInputError, match="fc.bias"):
        load_pretrained(_fresh(), tmp_path / "nobias.pth", head="load")


def test_a_sparse_weight_is_a_clear_error(tmp_path, source):
    state = dict(source.state_dict())
    state["conv1.weight"] = state["conv1.weight"].to_sparse()
    torch.save(state, tmp_path / "sparse.pth")
    for channels in (3, 1):
        with pytest.raises(InvalidInputError, match=r"conv1\.weight.*sparse"):
            load_pretrained(_fresh(channels), tmp_path / "sparse.pth")


def test_a_negative_batchnorm_variance_is_refused(tmp_path, source):
    state = dict(source.state_dict())
    state["bn1.running_var"] = state["bn1.running_var"] * 0 - 1  # every output would be NaN
    torch.save(state, tmp_path / "var.pth")
    with pytest.raises(InvalidInputError, match=r"bn1\.running_var.*negative"):
        load_pretrained(_fresh(), tmp_path / "var.pth")


def test_a_non_finite_counter_is_refused(tmp_path, source):
    state = dict(source.state_dict())
    state["bn1.num_batches_tracked"] = torch.tensor(float("nan"))  # became -2**63
    torch.save(state, tmp_path / "nbt.pth")
    with pytest.raises(InvalidInputError, match=r"num_batches_tracked.*NaN"):
        load_pretrained(_fresh(), tmp_path / "nbt.pth")


def _timm_adapt_input_conv(in_chans: int, conv_weight: torch.Tensor) -> torch.Tensor:
    # timm/models/_manipulate.py adapt_input_conv, for 3-channel weights (the reference)
    conv_type = conv_weight.dtype
    conv_weight = conv_weight.float()
    if in_chans == 1:
        conv_weight = conv_weight.sum(dim=1, keepdim=True)
    elif in_chans != 3:
        conv_weight = conv_weight.repeat(1, int(math.ceil(in_chans / 3)), 1, 1)[:, :in_chans, :, :]
        conv_weight *= 3 / float(in_chans)
    return conv_weight.to(conv_type)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("channels", [1, 2, 4, 5])
def test_stem_adaptation_is_bit_identical_to_timms(dtype, channels):
    weight = (torch.randn(64, 3, 7, 7, generator=torch.Generator().manual_seed(channels)) * 0.3).to(dtype)
    got = adapt_input_conv(weight, channels)
    want = _timm_adapt_input_conv(channels, weight)
    assert got.dtype == want.dtype
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


# ------------------------------------------------------------------------------- building, inputs

@pytest.mark.parametrize("kwargs, words", [({"arch": ["unet"]}, "architecture ['unet']"),
                                           ({"aux_pooling": ["avg"]}, "aux_pooling must be"),
                                           ({"attention": {"scse": 1}}, "attention {'scse': 1}")])
def test_unhashable_arguments_are_a_clear_error(kwargs, words):
    # a clear error names the argument and shows the value, not a TypeError from a set lookup
    with pytest.raises(InvalidInputError, match=re.escape(words)):
        create_segmenter(encoder=SMALL, **kwargs)
    with pytest.raises(InvalidInputError, match=re.escape(words)):
        build_model({"kind": "segmenter", "encoder": SMALL, **kwargs})


@pytest.mark.parametrize("name, suggestion", [("efficientnet-b0", "efficientnet_b0"), ("resnet-34", "resnet34"),
                                              ("densenet_121", "densenet121")])
def test_an_unknown_encoder_name_suggests_the_close_one(name, suggestion):
    with pytest.raises(InvalidInputError, match=f"did you mean '{suggestion}'"):
        create_encoder(name)


@pytest.mark.parametrize("shape", [(1, 1, 0, 0), (1, 1, 0, 64), (1, 1, 64, 0)])
def test_an_image_without_pixels_names_its_size(shape):
    seg = create_segmenter(encoder=SMALL).eval()
    with pytest.raises(InvalidInputError, match=f"{shape[2]}x{shape[3]}"):
        seg(torch.zeros(shape))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool, torch.float64])
def test_an_input_of_another_dtype_names_both_dtypes(dtype):
    seg = create_segmenter(encoder=SMALL).eval()
    with pytest.raises(InvalidInputError, match=f"{dtype}.*float32|float32.*{dtype}"):
        seg(torch.zeros(1, 1, 64, 64, dtype=dtype))


def test_autocast_inputs_and_half_models_still_run():
    seg = create_segmenter(encoder=SMALL).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert seg(torch.randn(1, 1, 64, 64, dtype=torch.bfloat16)).shape == (1, 1, 64, 64)
    half = copy.deepcopy(seg).to(torch.float64)
    with torch.no_grad():
        assert half(torch.randn(1, 1, 64, 64, dtype=torch.float64)).dtype == torch.float64


def test_dtype_check_compiles_fullgraph():
    seg = create_segmenter(encoder=SMALL).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(seg, fullgraph=True, backend="eager")(x), seg(x))


# ----------------------------------------------------------------------------- sub-pixel decoding

def _block_and_inputs():
    block = randomize_model(DecoderBlock(4, 2, 3, None), seed=3).double().eval()
    gen = torch.Generator().manual_seed(4)
    return block, torch.randn(1, 4, 3, 5, generator=gen, dtype=torch.float64), \
        torch.randn(1, 2, 6, 10, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("where", ["conv1", "attention1", "attention1.attention"])
@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_hooks_on_the_modules_the_subpixel_path_skips_still_run(where, kind):
    """A Grad-CAM or feature-extraction hook on a block's conv1 (the Conv2dReLU) or attention1 was
    silently never called: the sub-pixel path calls neither module."""
    block, x, skip = _block_and_inputs()
    calls = []
    module = block.get_submodule(where)
    if kind == "forward":
        module.register_forward_hook(lambda m, args, out: calls.append(where))
    else:
        module.register_forward_pre_hook(lambda m, args: calls.append(where))
    with torch.no_grad():
        got = block(x, skip)
        with subpixel_decoding(block, False):
            want = block(x, skip)
    assert calls == [where, where]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_global_module_hook_still_sees_conv1():
    block, x, skip = _block_and_inputs()
    seen = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.append(m) if m is block.conv1[0] else None)
    try:
        with torch.no_grad():
            block(x, skip)
    finally:
        handle.remove()
    assert seen == [block.conv1[0]]


@pytest.mark.parametrize("arch", ["unet", "unet++"])
def test_vmap_model_ensembling_equals_each_model(arch):
    """torch.func.stack_module_state + vmap (PyTorch's model-ensembling recipe) failed in the sub-pixel
    blocks ('querying is_contiguous inside of vmap'); the reference path ran."""
    from torch.func import functional_call, stack_module_state

    models = [randomize_model(create_segmenter(arch, encoder=SMALL, decoder_channels=(16, 8, 8, 8, 4)), s).double().eval()
              for s in (0, 1)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def run(p, b, x):
        return functional_call(base, (p, b), (x,))

    x = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        got = torch.vmap(run, in_dims=(0, 0, None))(params, buffers, x)
        for i, model in enumerate(models):
            with subpixel_decoding(model, False):
                torch.testing.assert_close(got[i], model(x))


def test_functional_call_substituted_weight_reaches_the_phase_weight():
    block, x, skip = _block_and_inputs()
    new = {"conv1.0.weight": torch.randn_like(block.conv1[0].weight)}
    with torch.no_grad():
        got = torch.func.functional_call(block, new, (x, skip))
        with subpixel_decoding(block, False):
            want = torch.func.functional_call(block, new, (x, skip))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, block(x, skip))


@pytest.mark.parametrize("how", ["deepcopy", "save", "to"])
def test_the_subpixel_setting_survives_copies(tmp_path, how):
    seg = create_segmenter(encoder=SMALL)
    set_subpixel_decoding(seg, False)
    if how == "deepcopy":
        other = copy.deepcopy(seg)
    elif how == "to":
        other = seg.to(torch.float64)
    else:
        torch.save(seg, tmp_path / "m.pt")
        other = torch.load(tmp_path / "m.pt", weights_only=False)  # our own file, written just now
    assert {m.subpixel for m in other.modules() if isinstance(m, DecoderBlock)} == {False}


def test_mixed_memory_formats_and_sliced_inputs_equal_the_reference():
    block, x, skip = _block_and_inputs()
    wide = torch.randn(1, 4, 3, 11, dtype=torch.float64)[:, :, :, ::2].clone()[:, :, :, :5]
    cases = [(x, skip.contiguous(memory_format=torch.channels_last)),
             (x.contiguous(memory_format=torch.channels_last), skip),
             (torch.randn(1, 8, 3, 5, dtype=torch.float64)[:, ::2], torch.randn(1, 2, 6, 20, dtype=torch.float64)[..., ::2]),
             (wide, skip)]
    for xi, si in cases:
        with torch.no_grad():
            got = block(xi, si)
            with subpixel_decoding(block, False):
                want = block(xi, si)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("wrapper, prefix", [("net.", None), ("backbone.", None), ("net.", "net."),
                                             ("lightning.", "lightning.")])
def test_a_whole_segmenter_under_a_wrapper_prefix_loads_whole(tmp_path, wrapper, prefix):
    """A whole-segmenter checkpoint under 'net.' was 'no tensor fits', and with prefix='net.' only its
    encoder loaded (the decoder's tensors were reported unexpected): the prefix was removed after
    deciding the checkpoint was an encoder's."""
    src = randomize_model(create_segmenter(encoder=SMALL, decoder_channels=(16, 8, 8, 8, 4)), 0).eval()
    torch.save({wrapper + k: v for k, v in src.state_dict().items()}, tmp_path / "seg.pth")
    model = create_segmenter(encoder=SMALL, decoder_channels=(16, 8, 8, 8, 4)).eval()
    result = load_pretrained(model, tmp_path / "seg.pth", prefix=prefix, strict=True)
    assert result.target == "model" and not result.unexpected_keys and not result.missing_keys
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("skip_channels", [2, 0])
def test_half_precision_weights_outside_autocast_are_within_rounding(dtype, skip_channels):
    block = randomize_model(DecoderBlock(4, skip_channels, 3, None), seed=3).to(dtype).eval()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 3, 5, generator=gen).to(dtype)
    skip = torch.randn(2, skip_channels, 6, 10, generator=gen).to(dtype) if skip_channels else None
    with torch.no_grad():
        got = block(x, skip)
        with subpixel_decoding(block, False):
            want = block(x, skip)
    # a few units in the last place of the output: the taps are summed before rounding to dtype
    ulp = torch.finfo(dtype).eps * want.abs().max().item()
    assert got.dtype == dtype and (got.double() - want.double()).abs().max().item() <= 2 * ulp


@pytest.mark.parametrize("how", ["inference_mode", "parametrize", "weight_norm", "input_grads"])
def test_modes_and_reparametrised_weights_equal_the_reference(how):
    block, x, skip = _block_and_inputs()
    ctx = torch.inference_mode if how == "inference_mode" else torch.no_grad
    if how == "parametrize":
        class Doubled(nn.Module):
            def forward(self, w):
                return 2 * w

        torch.nn.utils.parametrize.register_parametrization(block.conv1[0], "weight", Doubled())
    elif how == "weight_norm":
        block.conv1[0] = torch.nn.utils.parametrizations.weight_norm(block.conv1[0])
    if how == "input_grads":
        block.requires_grad_(False)
        x.requires_grad_(True)
        skip.requires_grad_(True)
        got = torch.autograd.grad(block(x, skip).square().sum(), (x, skip))
        with subpixel_decoding(block, False):
            want = torch.autograd.grad(block(x, skip).square().sum(), (x, skip))
    else:
        with ctx():
            got = block(x, skip)
            with subpixel_decoding(block, False):
                want = block(x, skip)
    torch.testing.assert_close(got, want)
