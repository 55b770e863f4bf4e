"""pneumoseg.models.fuse: eval-mode BatchNorm folded into the convolution before it computes the same
function (float64, random BatchNorm statistics) for every encoder family, classifier and segmenter;
only clean conv -> BN pairs are folded; the source model and the saved weights never change; the
torch backend's results with folding on and off agree."""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from pneumoseg.errors import InvalidInputError  # noqa: E402
from pneumoseg.infer import Predictor  # noqa: E402
from pneumoseg.models import create_classifier, create_encoder, create_segmenter, list_encoders  # noqa: E402
from pneumoseg.models.fuse import conv_bn_pairs, fold_conv_bn, fuse_batchnorm  # noqa: E402

from factories import randomize_model  # noqa: E402
from infer_helpers import file_digests, model_dir, phantom_images  # noqa: E402

_BN = nn.modules.batchnorm._BatchNorm


def batchnorms(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, _BN)]


def random_eval(model: nn.Module, seed: int = 0) -> nn.Module:
    """float64, random weights and BatchNorm statistics (means ~N(0, 0.2), variances in [0.75, 1.25],
    scales ~N(1, 0.2), shifts ~N(0, 0.2)): with the defaults (0, 1, 1, 0) a BatchNorm is the identity
    and folding it would prove nothing."""
    return randomize_model(model.double(), seed).eval()


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def assert_same_function(model: nn.Module, fused: nn.Module, x: torch.Tensor) -> None:
    for a, b in zip(outputs(model, x), outputs(fused, x), strict=True):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9 * float(a.abs().max().clamp(min=1.0))), \
            float((a - b).abs().max())


# --- which pairs: the whole registry, structurally (meta device: no memory, no arithmetic) ------------
@pytest.mark.parametrize("name", list_encoders())
def test_every_registered_encoder_folds_all_but_densenets_preactivation_norms(name):
    # the classifier has every module of the features_only encoder, and the head (EfficientNet's conv_head)
    with torch.device("meta"):
        model = create_encoder(name, in_channels=1, num_classes=1, features_only=False)
    pairs = conv_bn_pairs(model)
    folded = {bn for _, bn in pairs}
    left = [n for n in batchnorms(model) if n not in folded]
    assert pairs and len(folded) == len(pairs)
    modules = dict(model.named_modules())
    for conv, bn in pairs:
        assert isinstance(modules[conv], nn.Conv2d) and modules[conv].out_channels == modules[bn].num_features
    if name.startswith("densenet"):
        # pre-activation BN -> ReLU -> conv (norm1, the transitions' norm) and norm5 after a concat
        assert left and all(re.search(r"(denselayer\d+\.norm1|transition\d\.norm|norm5)$", n) for n in left)
        assert all(re.search(r"(features\.norm0|denselayer\d+\.norm2)$", bn) for bn in folded)
        assert name != "densenet121" or (len(folded), len(left)) == (1 + 58, 58 + 3 + 1)
    else:
        assert left == []


# --- folded == unfolded, float64, every family ----------------------------------------------------------
def small_seresnext() -> nn.Module:
    """seresnext50_32x4d's modules (Bottleneck, grouped 3x3, squeeze-excitation), at a fraction of its
    27.6 M parameters."""
    from pneumoseg.models.encoders.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, (1, 2, 1, 1), widths=(16, 32, 32, 32), stem_width=16, cardinality=4, base_width=16,
                  se=True, in_channels=1, num_classes=1)


@pytest.mark.parametrize("name", ["resnet_tiny", "seresnext (small)", "efficientnet_b0", "tf_efficientnet_b0",
                                  "densenet121", "legacy_xception"])
def test_folded_classifier_computes_the_same_function(name):
    network = small_seresnext() if name == "seresnext (small)" else create_classifier(name, num_classes=1, in_channels=1)
    model = random_eval(network)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fuse_batchnorm(model)
    assert result.model is not model and len(result.folded) > 0
    # 70 px: odd stride-2 sizes, where tf's SAME padding is asymmetric
    assert_same_function(model, result.model, torch.randn(2, 1, 70, 70, dtype=torch.float64))
    # the source model is untouched: same modules, same tensors
    assert len(batchnorms(model)) == len(batchnorms(result.model)) + len(result.folded)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("arch, encoder, attention, aux", [
    ("unet", "resnet_tiny", None, False),
    ("unet", "resnet_tiny", "scse", True),
    ("unet++", "resnet_tiny", None, True),
    ("unet++", "resnet_tiny", "scse", False),
    ("unet", "efficientnet_b0", "scse", True),
    ("unet", "densenet121", None, True),
])
def test_folded_segmenter_computes_the_same_function(arch, encoder, attention, aux):
    model = random_eval(create_segmenter(arch, encoder, in_channels=1, decoder_channels=(16, 16, 8, 8, 8),
                                         attention=attention, aux_classifier=aux))
    result = fuse_batchnorm(model)
    decoder_bns = [n for n in batchnorms(model) if n.startswith("decoder.")]
    assert decoder_bns and {bn for _, bn in result.folded} >= set(decoder_bns)  # every decoder conv-BN-ReLU
    outs = outputs(result.model, torch.zeros(1, 1, 64, 64, dtype=torch.float64))
    assert len(outs) == (2 if aux else 1)
    assert_same_function(model, result.model, torch.randn(2, 1, 64, 64, dtype=torch.float64))
    # the split the two-stage pipeline runs: encode, classify, decode
    x = torch.randn(1, 1, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        f0, f1 = model.encode(x), result.model.encode(x)
        for a, b in zip(f0, f1, strict=True):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)
        assert torch.allclose(model.decode(f0), result.model.decode(f1), rtol=1e-9, atol=1e-9)


def test_no_batchnorm_is_left_in_a_resnet34_encoder_and_folding_is_in_place_on_request():
    model = random_eval(create_segmenter("unet", "resnet34", in_channels=1, decoder_channels=(16, 16, 8, 8, 8)))
    reference = fuse_batchnorm(model)  # a copy, for the comparison below
    result = fuse_batchnorm(model, inplace=True)
    assert result.model is model
    assert len(result.folded) == 36 + 10  # stem 1 + 16 blocks x 2 + 3 downsamples; decoder 5 blocks x 2
    assert batchnorms(model.encoder) == [] and batchnorms(model) == [] and result.kept == {}
    assert isinstance(model.encoder.bn1, nn.Identity) and model.encoder.conv1.bias is not None
    assert_same_function(reference.model, model, torch.randn(1, 1, 64, 64, dtype=torch.float64))
    # nothing left to fold a second time
    assert fuse_batchnorm(model).folded == []


def test_batchnormact_keeps_its_activation():
    model = create_encoder("efficientnet_b0", in_channels=1, features_only=True).eval()
    result = fuse_batchnorm(model)
    assert isinstance(result.model.bn1, nn.SiLU)  # conv_stem -> BN + SiLU becomes conv_stem -> SiLU
    assert isinstance(result.model.blocks[1][0].bn3, nn.Identity)  # the projection's BN has no activation


def test_float32_folding_stays_within_rounding():
    model = randomize_model(create_classifier("resnet34", num_classes=1, in_channels=1)).eval()
    x = torch.randn(1, 1, 64, 64)
    a, b = outputs(model, x)[0], outputs(fuse_batchnorm(model).model, x)[0]
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def test_fold_conv_bn_matches_the_formula_with_a_conv_bias():
    conv = nn.Conv2d(3, 4, 3, bias=True).double()
    bn = random_eval(nn.BatchNorm2d(4, eps=1e-3))
    nn.init.normal_(conv.bias)
    w, b = conv.weight.clone(), conv.bias.clone()
    fold_conv_bn(conv, bn)
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert torch.allclose(conv.weight, w * s[:, None, None, None], rtol=1e-12)
    assert torch.allclose(conv.bias, (b - bn.running_mean) * s + bn.bias, rtol=1e-12)


def test_fold_conv_bn_refuses_a_batchnorm_without_running_statistics():
    # it raised AttributeError on the missing running_var; the convolution must stay as it was
    conv = nn.Conv2d(3, 4, 3, bias=False)
    w = conv.weight.clone()
    with pytest.raises(InvalidInputError, match="no running statistics"):
        fold_conv_bn(conv, nn.BatchNorm2d(4, track_running_stats=False).eval())
    assert torch.equal(conv.weight, w) and conv.bias is None


# --- what is refused or left alone ------------------------------------------------------------------------
def test_a_training_mode_model_is_refused_and_a_training_mode_pair_is_kept():
    model = create_classifier("resnet_tiny", num_classes=1, in_channels=1)
    with pytest.raises(InvalidInputError, match="training mode"):
        fuse_batchnorm(model.train())
    model.eval()
    model.layer1[0].bn2.train()
    result = fuse_batchnorm(model)
    assert "layer1.0.bn2" in result.kept and "training" in result.kept["layer1.0.bn2"]
    assert ("layer1.0.conv2", "layer1.0.bn2") not in result.folded and len(result.folded) == 11
    assert isinstance(result.model.layer1[0].bn2, nn.BatchNorm2d)
    with pytest.raises(InvalidInputError, match="Module"):
        fuse_batchnorm("resnet34")


def test_structures_that_are_not_a_clean_pair_are_left_alone():
    class Tapped(nn.Sequential):  # reads the convolution's output itself
        def forward(self, x):
            y = self[0](x)
            return self[1](y) + y

    class ConvWithItsOwnForward(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(
        Tapped(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)),
        nn.Sequential(ConvWithItsOwnForward(3, 3, 1), nn.BatchNorm2d(3)),
        nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1)),  # pre-activation
        nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.BatchNorm2d(3)),  # not directly after
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)),
    )
    model = random_eval(model)
    result = fuse_batchnorm(model)
    assert result.folded == []
    assert sorted(result.kept) == ["0.1", "1.1", "2.0", "3.2", "4.1"]
    assert "running statistics" in result.kept["4.1"]
    assert_same_function(model, result.model, torch.randn(1, 2, 9, 9, dtype=torch.float64))


def test_a_fold_that_would_overflow_the_run_dtype_is_kept():
    block = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2)).eval()
    with torch.no_grad():
        block[0].weight.fill_(100.0)
        block[1].running_var.fill_(0.0)
        block[1].weight.fill_(1000.0)  # scale 1000 / sqrt(1e-5) ~ 3e5: weights ~3e7, beyond fp16's 65504
    assert "overflow" in fuse_batchnorm(block, dtype=torch.float16).kept["1"]
    assert fuse_batchnorm(block, dtype=torch.float32).folded == [("0", "1")]


# --- the torch backend --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["classifier", "aux"])
def test_predictor_results_equal_with_folding_on_and_off(kind):
    images = phantom_images(4, seed=3)
    folder = model_dir(kind)
    digests = file_digests(folder)
    on = Predictor.from_dir(folder)
    off = Predictor.from_dir(folder, fuse_batchnorm=False)
    a = on.predict(images, return_masks=True, batch_size=2)
    b = off.predict(images, return_masks=True, batch_size=2)
    for p, q in zip(a, b, strict=True):
        assert p.score == pytest.approx(q.score, abs=1e-5)
        assert np.array_equal(p.mask, q.mask) and p.rle == q.rle
    assert any(p.rle != "-1" for p in a) and any(p.rle == "-1" for p in a)  # both outcomes are compared
    d_on, d_off = on.describe(), off.describe()
    assert d_on["fuse_batchnorm"] is True and d_off["fuse_batchnorm"] is False and "batchnorms_folded" not in d_off
    folded = d_on["batchnorms_folded"]
    assert folded["segmenter"] == 12 + 10  # resnet_tiny: all 12; decoder: 5 blocks x 2
    if kind == "classifier":
        assert folded["classifier"] == 12
    # the backend folded its own copy: the directory's networks still hold their BatchNorms
    assert len(batchnorms(on.model_dir.build("segmenter"))) == 22
    assert batchnorms(on.backend._modules[on.parts["segment"]]) == []
    assert file_digests(folder) == digests


def test_fuse_batchnorm_option_must_be_a_bool():
    with pytest.raises(InvalidInputError, match="fuse_batchnorm"):
        Predictor.from_dir(model_dir("plain"), fuse_batchnorm="yes")


# --- hostile structures: folding must leave them alone, never change what they compute -----------------
def test_a_shared_or_aliased_convolution_is_not_folded():
    # folding writes the convolution's weight in place: every other use of it would get the BatchNorm too
    conv = nn.Conv2d(2, 2, 3, padding=1)
    shared = nn.Sequential(conv, nn.BatchNorm2d(2), nn.ReLU(), conv, nn.BatchNorm2d(2))

    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.tap = nn.Conv2d(2, 2, 3, padding=1)
            self.seq = nn.Sequential(self.tap, nn.BatchNorm2d(2))

        def forward(self, x):
            return self.seq(x) + self.tap(x)

    tied = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1))
    tied[2].weight = tied[0].weight  # tied weights, two modules
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    for model in (shared, Aliased(), tied):
        model = random_eval(model)
        result = fuse_batchnorm(model)
        assert result.folded == [] and any("shared" in why for why in result.kept.values()), result.kept
        assert_same_function(model, result.model, x)


def test_a_batchnorm_shared_by_two_convolutions_stays_right():
    # folding never writes the BatchNorm, so its other use still normalises (named_children lists a
    # shared child once: that one is folded, the other left as it was)
    bn = nn.BatchNorm2d(2)
    model = random_eval(nn.Sequential(nn.Conv2d(2, 2, 1), bn, nn.ReLU(), nn.Conv2d(2, 2, 1), bn))
    result = fuse_batchnorm(model)
    assert result.folded == [("0", "1")] and isinstance(result.model[4], nn.BatchNorm2d)
    assert_same_function(model, result.model, torch.randn(1, 2, 5, 5, dtype=torch.float64))


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm. is deprecated:FutureWarning")
def test_modules_with_hooks_are_not_folded():
    # the old weight_norm recomputes conv.weight in a forward pre-hook (the fold was lost, the BN removed);
    # a hook on the BatchNorm would be dropped with it; one on the convolution would see other values
    weight_normed = nn.utils.weight_norm(nn.Conv2d(2, 2, 3, padding=1))
    hooked_bn = nn.BatchNorm2d(2)
    hooked_bn.register_forward_hook(lambda module, args, out: out * 3)
    seen = []
    hooked_conv = nn.Conv2d(2, 2, 1)
    hooked_conv.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    x = torch.randn(1, 2, 7, 7, dtype=torch.float64)
    for model in (nn.Sequential(weight_normed, nn.BatchNorm2d(2)), nn.Sequential(nn.Conv2d(2, 2, 1), hooked_bn),
                  nn.Sequential(hooked_conv, nn.BatchNorm2d(2))):
        model = random_eval(model)
        if model[0] is weight_normed:  # its computed weight (before a no_grad forward) cannot be deep-copied
            with pytest.raises(InvalidInputError, match="inplace=True"):
                fuse_batchnorm(model)
        before = outputs(model, x)[0]
        result = fuse_batchnorm(model, inplace=True)
        assert result.folded == [] and "hook" in result.kept["1"], result.kept
        assert torch.equal(outputs(model, x)[0], before)
    assert torch.equal(seen[0], seen[1])  # the convolution's hook saw the same output before and after


def _overflowing_block(weight=100.0, mean=0.0, gamma=1000.0):
    block = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2)).eval()
    with torch.no_grad():
        block[0].weight.fill_(weight)
        block[1].running_mean.fill_(mean)
        block[1].running_var.fill_(0.0)
        block[1].weight.fill_(gamma)
    return block


def test_a_half_precision_model_is_checked_for_overflow_without_a_dtype():
    # the fold is cast back to the convolution's own dtype: a float16 model overflowed to inf silently
    block = _overflowing_block().half()
    result = fuse_batchnorm(block)
    assert result.folded == [] and "float16" in result.kept["1"]
    assert torch.isfinite(result.model[0].weight).all()


def test_a_folded_bias_that_would_overflow_float16_is_kept():
    # weights fine (1e-3 x 1 / sqrt(1e-5)), bias -mean x scale = -3e7: -inf in float16
    block = _overflowing_block(weight=1e-3, mean=1e5, gamma=1.0)
    assert "float16" in fuse_batchnorm(block, dtype=torch.float16).kept["1"]
    assert fuse_batchnorm(block, dtype=torch.bfloat16).folded == [("0", "1")]


@pytest.mark.parametrize("dtype", [torch.int8, torch.complex64, "float16", 16])
def test_the_run_dtype_must_be_a_floating_dtype(dtype):
    with pytest.raises(InvalidInputError, match="dtype"):
        fuse_batchnorm(_overflowing_block(), dtype=dtype)
