"""Every encoder against timm (the outside reference, ../shared/reference): the classifier's state-dict
names, shapes and order equal timm's, the parameter count too, and under the formula weights it gives
timm's float64 logits. Skipped where the reference file is absent.

Encoders without a reference entry (EfficientNet B1-B3, tf_EfficientNet B0-B3) are checked by what
needs no timm: the parameter counts timm publishes (results/results-imagenet.csv, 0.01 M), and names
and shapes derived in this file from the EfficientNet paper's B0 table and timm's scaling rules; that
derivation is itself checked against the reference for B0 and B4. The tf_ variants have the non-tf
state dict (the reference shows it for B4) and differ only in padding and BatchNorm eps, whose
TensorFlow formula is tested here on its own. The features_only pyramids are checked against the
modules timm's ``feature_info`` names, by forward hooks on the classifier (what timm's feature
extraction does)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from pneumoseg.models import ENCODERS, create_classifier, create_encoder  # noqa: E402
from pneumoseg.models.encoders._layers import Conv2dSame, DropPath, create_conv2d  # noqa: E402
from pneumoseg.models.encoders.efficientnet import SCALING  # noqa: E402
from pneumoseg.models.encoders.xception import Xception  # noqa: E402
from timm_reference import formula_state_dict, load_reference, reference_input  # noqa: E402

TIMM_ENCODERS = sorted(name for name, spec in ENCODERS.items() if spec.timm_name is not None)

#: parameter counts in millions, as timm's results/results-imagenet.csv lists them (param_count)
TIMM_PARAM_COUNT_M = {
    "resnet34": 21.80, "resnet50": 25.56, "seresnext50_32x4d": 27.56, "densenet121": 7.98,
    "efficientnet_b0": 5.29, "efficientnet_b1": 7.79, "efficientnet_b2": 9.11, "efficientnet_b3": 12.23,
    "efficientnet_b4": 19.34, "tf_efficientnet_b0": 5.29, "tf_efficientnet_b1": 7.79,
    "tf_efficientnet_b2": 9.11, "tf_efficientnet_b3": 12.23, "tf_efficientnet_b4": 19.34,
    "legacy_xception": 22.86,
}

#: the modules timm's feature_info names for features_only (timm/models/{resnet,densenet,efficientnet,
#: xception}.py); xception's block*.rep.0 are ReLUs, so those levels are the previous block's output ReLU'd
TIMM_FEATURE_MODULES = {
    "ResNet": ["act1", "layer1", "layer2", "layer3", "layer4"],
    "DenseNet": ["features.norm0", "features.denseblock1", "features.denseblock2", "features.denseblock3",
                 "features.norm5"],
    "EfficientNet": ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"],
    "Xception": ["act2", "block2.rep.0", "block3.rep.0", "block12.rep.0", "act4"],
}


@pytest.fixture(scope="module")
def reference():
    ref = load_reference()
    if ref is None:
        pytest.skip("../shared/reference/timm_reference.json is not present")
    return ref


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", TIMM_ENCODERS)
def test_classifier_equals_timm(reference, name):
    entry = reference.get(ENCODERS[name].timm_name)
    if entry is None:
        pytest.skip(f"the reference file has no entry for {ENCODERS[name].timm_name}")
    model = create_classifier(name, num_classes=1000, in_channels=3).double().eval()
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == [(e[0], e[1]) for e in entry["state_dict"]]
    assert _trainable(model) == entry["params"]
    model.load_state_dict(formula_state_dict(entry["state_dict"]), strict=True)
    with torch.no_grad():
        logits = model(reference_input(entry["input"]))
    expected = torch.tensor(entry["logits"], dtype=torch.float64)
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


def test_reference_separates_tf_padding(reference):
    """tf_efficientnet_b4 and efficientnet_b4 share names and formula weights but not logits, so passing
    both reference checks pins the TF padding and BatchNorm eps, not just the weights."""
    tf, pt = reference.get("tf_efficientnet_b4"), reference.get("efficientnet_b4")
    if tf is None or pt is None:
        pytest.skip("the reference file lacks an EfficientNet-B4 entry")
    assert tf["state_dict"] == pt["state_dict"]
    a, b = torch.tensor(tf["logits"]), torch.tensor(pt["logits"])
    assert (a - b).abs().max() > 1e-3 * a.abs().max()


@pytest.mark.parametrize("name", TIMM_ENCODERS)
def test_parameter_count_as_timm_publishes(name):
    model = create_classifier(name, num_classes=1000, in_channels=3)
    assert round(_trainable(model) / 1e6, 2) == TIMM_PARAM_COUNT_M[name]


# ---------------------------------------------- EfficientNet names and shapes from the paper + timm's rules

#: EfficientNet-B0, Tan & Le 2019 table 1 (stages 2-8): repeats, kernel, output channels, expansion
B0_TABLE = [(1, 3, 16, 1), (2, 3, 24, 6), (2, 5, 40, 6), (3, 3, 80, 6), (3, 5, 112, 6), (4, 5, 192, 6), (1, 3, 320, 6)]


def _multiple_of_8(v: float) -> int:
    """timm's channel rounding, from its description: the nearest multiple of 8 (halves up), at least 8,
    one step up if rounding lost more than 10%."""
    r = max(8, 8 * math.floor(v / 8 + 0.5))
    return r + 8 if r < 0.9 * v else r


def efficientnet_expected(width: float, depth: float) -> list[tuple[str, list[int]]]:
    """timm's efficientnet_bN state dict: every width scaled by ``width`` and rounded to 8, each stage
    repeated ceil(repeats * depth) times; SE squeezes to a quarter of the block's input channels."""
    out: list[tuple[str, list[int]]] = []

    def conv(name, cout, cin, k, bias=False):
        out.append((f"{name}.weight", [cout, cin, k, k]))
        if bias:
            out.append((f"{name}.bias", [cout]))

    def bn(name, c):
        out.extend((f"{name}.{p}", [c]) for p in ("weight", "bias", "running_mean", "running_var"))
        out.append((f"{name}.num_batches_tracked", []))

    def se(name, c, squeezed):
        conv(f"{name}.conv_reduce", squeezed, c, 1, bias=True)
        conv(f"{name}.conv_expand", c, squeezed, 1, bias=True)

    stem = _multiple_of_8(32 * width)
    conv("conv_stem", stem, 3, 3)
    bn("bn1", stem)
    cin = stem
    for s, (repeats, k, channels, expansion) in enumerate(B0_TABLE):
        cout = _multiple_of_8(channels * width)
        for b in range(math.ceil(repeats * depth)):
            p = f"blocks.{s}.{b}"
            if expansion == 1:
                conv(f"{p}.conv_dw", cin, 1, k)
                bn(f"{p}.bn1", cin)
                se(f"{p}.se", cin, cin // 4)
                conv(f"{p}.conv_pw", cout, cin, 1)
                bn(f"{p}.bn2", cout)
            else:
                mid = _multiple_of_8(cin * expansion)
                conv(f"{p}.conv_pw", mid, cin, 1)
                bn(f"{p}.bn1", mid)
                conv(f"{p}.conv_dw", mid, 1, k)
                bn(f"{p}.bn2", mid)
                se(f"{p}.se", mid, cin // 4)
                conv(f"{p}.conv_pwl", cout, mid, 1)
                bn(f"{p}.bn3", cout)
            cin = cout
    head = _multiple_of_8(1280 * width)
    conv("conv_head", head, cin, 1)
    bn("bn2", head)
    out += [("classifier.weight", [1000, head]), ("classifier.bias", [1000])]
    return out


@pytest.mark.parametrize("variant", ["b0", "b4"])
def test_efficientnet_derivation_matches_reference(reference, variant):
    entry = reference.get(f"efficientnet_{variant}")
    if entry is None:
        pytest.skip(f"the reference file has no entry for efficientnet_{variant}")
    assert efficientnet_expected(*SCALING[variant]) == [(e[0], e[1]) for e in entry["state_dict"]]


@pytest.mark.parametrize("variant", sorted(SCALING))
@pytest.mark.parametrize("prefix", ["", "tf_"])
def test_efficientnet_names_and_shapes(prefix, variant):
    model = create_classifier(f"{prefix}efficientnet_{variant}", num_classes=1000)
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == efficientnet_expected(*SCALING[variant])


# ----------------------------------------------------------------------------------- TF SAME padding

def _tf_same_total_pad(n: int, k: int, s: int) -> int:
    # TensorFlow's documented rule (tf.nn.convolution, "SAME"): pad so the output is ceil(n / s)
    return max(k - (s if n % s == 0 else n % s), 0)


@pytest.mark.parametrize("size", [(8, 8), (9, 9), (7, 12), (1, 5), (33, 64)])
@pytest.mark.parametrize("k,s", [(3, 2), (5, 2), (1, 2), (2, 2), (3, 3)])
def test_tf_same_padding_against_tensorflow_rule(size, k, s):
    torch.manual_seed(0)
    conv = Conv2dSame(4, 6, k, stride=s, bias=True).double()
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    ph, pw = _tf_same_total_pad(size[0], k, s), _tf_same_total_pad(size[1], k, s)
    expected = F.conv2d(F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)), conv.weight, conv.bias, s)
    out = conv(x)
    assert out.shape[-2:] == (math.ceil(size[0] / s), math.ceil(size[1] / s))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_tf_same_padding_static_where_symmetric():
    # stride 1 with an odd kernel pads symmetrically, so timm (and we) use a plain Conv2d there
    assert type(create_conv2d(4, 4, 3, padding="same")) is torch.nn.Conv2d
    assert type(create_conv2d(4, 4, 3, stride=2, padding="same")) is Conv2dSame
    tf = create_encoder("tf_efficientnet_b0")
    strided = [m for m in tf.modules() if isinstance(m, torch.nn.Conv2d) and m.stride != (1, 1)]
    assert strided and all(isinstance(m, Conv2dSame) for m in strided)
    assert all(m.eps == 1e-3 for m in tf.modules() if isinstance(m, torch.nn.BatchNorm2d))
    pt = create_encoder("efficientnet_b0")
    assert not any(isinstance(m, Conv2dSame) for m in pt.modules())
    assert all(m.eps == 1e-5 for m in pt.modules() if isinstance(m, torch.nn.BatchNorm2d))


# ----------------------------------------------------------------------- features_only and the stem

ALL_ENCODERS = sorted(ENCODERS)


def _features_only(name: str, *, timm_stem: bool = False):
    if name == "legacy_xception" and timm_stem:
        # timm's unpadded stem, to compare against the classifier (see Xception's docstring)
        return Xception(features_only=True, pad_stem=False)
    return create_encoder(name, features_only=True)


@pytest.mark.parametrize("name", ALL_ENCODERS)
def test_features_only_is_the_classifier_minus_head_at_timms_taps(name):
    torch.manual_seed(0)
    classifier = create_classifier(name, num_classes=5).eval()
    encoder = _features_only(name, timm_stem=True).eval()
    head = tuple(f"{m}." for m in classifier.head_modules)
    trunk = {k: v for k, v in classifier.state_dict().items() if not k.startswith(head)}
    assert [(k, v.shape) for k, v in encoder.state_dict().items()] == [(k, v.shape) for k, v in trunk.items()]
    encoder.load_state_dict(trunk, strict=True)

    taps = TIMM_FEATURE_MODULES[type(classifier).__name__]
    modules = dict(classifier.named_modules())
    seen: dict[str, torch.Tensor] = {}
    for tap in taps:
        modules[tap].register_forward_hook(lambda m, i, o, tap=tap: seen.setdefault(tap, o.clone()))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        classifier(x)
        pyramid = encoder(x)
    assert len(pyramid) == 5
    for tap, level in zip(taps, pyramid):
        torch.testing.assert_close(level, seen[tap], rtol=1e-5, atol=1e-5)
    assert [f.shape[1] for f in pyramid] == list(encoder.out_channels)


@pytest.mark.parametrize("name", ALL_ENCODERS)
def test_pyramid_strides_and_one_channel_stem(name):
    encoder = create_encoder(name, in_channels=1).eval()
    rgb = create_encoder(name, in_channels=3)
    differing = [k for k, v in encoder.state_dict().items() if v.shape != rgb.state_dict()[k].shape]
    assert differing == list(encoder.stem_weights)
    assert all(encoder.state_dict()[k].shape[1] == 1 for k in encoder.stem_weights)
    with torch.no_grad():
        pyramid = encoder(torch.randn(1, 1, 64, 96))
    assert [tuple(f.shape[1:]) for f in pyramid] == [
        (c, 64 // s, 96 // s) for c, s in zip(encoder.out_channels, (2, 4, 8, 16, 32))]


def test_xception_stem_padding():
    # timm's unpadded stem gives 31-pixel maps at stride 2 of a 64-pixel image; the default
    # features_only stem pads, for exact size / stride maps (checked above); the classifier stays timm's
    assert Xception(features_only=True, pad_stem=False)(torch.randn(1, 3, 64, 64))[0].shape[-1] == 29
    assert create_classifier("legacy_xception").conv1.padding == (0, 0)
    assert create_encoder("legacy_xception").conv1.padding == (1, 1)


def test_drop_path_rate_trains_and_evaluates():
    torch.manual_seed(0)
    x = torch.randn(16, 8, 4, 4)
    dp = DropPath(0.25)
    assert torch.equal(dp.eval()(x), x)
    y = dp.train()(x)
    kept = y.flatten(1).abs().sum(1) > 0
    assert 0 < kept.sum() < 16
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    plain = create_encoder("efficientnet_b0").eval()
    from pneumoseg.models.encoders.efficientnet import efficientnet_b0
    dropped = efficientnet_b0(features_only=True, drop_path_rate=0.2).eval()
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(plain(x), dropped(x)):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="drop-path"):
        DropPath(1.0)
