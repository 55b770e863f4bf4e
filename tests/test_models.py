"""The shared model tester (as segmentation_models_pytorch's ``tests/models/base.py``): every registered
encoder x {unet, unet++} as a segmenter, and every encoder as a classifier, through the same checks:
forward shapes (square, non-square, batch 1 and 3, 1 and 3 input channels, 1 and 2 classes, the gate
head), the encode/classify/decode split, eval determinism, channels_last, autocast, gradients,
``torch.compile(fullgraph=True)`` (once per distinct encoder forward code, see ``COMPILED_ENCODERS``),
the size error and the config round trip. New encoders are covered as soon as they are registered.

The decoders are also checked against an outside reference: a float64 re-implementation written here,
from the U-Net / U-Net++ papers and smp's documented design (nearest x2 upsampling, concatenation
order, conv-BN-ReLU x2, scSE), with functional torch ops, fed the model's own weights. Where smp itself
is installed, smp's ``Unet``/``UnetPlusPlus`` state dicts load into ours and give the same output.

Model sizes: inputs are 64x64 / 64x96 so the biggest encoders stay well under a second a check; the
``backend="eager"`` compile of the big encoders (seconds each) and the inductor compiles are ``slow``.
"""

from __future__ import annotations

import copy
import json

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import pneumoseg  # noqa: E402
from factories import randomize_model  # noqa: E402
from pneumoseg.errors import InvalidInputError  # noqa: E402
from pneumoseg.models import (  # noqa: E402
    ARCHITECTURES, build_model, create_classifier, create_segmenter, list_encoders)

ENCODERS = list_encoders()
SMALL_ENCODER = "resnet_tiny"
# Every check of a real encoder's model takes a second or more on two cores (their compile traces
# several); the small encoder's are fast and run in any selection.
_MARKS = {e: () if e == SMALL_ENCODER else (pytest.mark.slow,) for e in ENCODERS}
SEGMENTER_CASES = [pytest.param((e, a), id=f"{e}-{a}", marks=_MARKS[e]) for e in ENCODERS for a in ARCHITECTURES]
CLASSIFIER_CASES = [pytest.param(e, id=e, marks=_MARKS[e]) for e in ENCODERS]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """64x64 inputs are too small to split across threads: on two shared cores OpenMP's barriers cost
    more than they save (7x the time, measured). Restored for the modules after this one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _calibrate_batchnorm(model, x, seed=0):
    """Untrained BatchNorm layers are nearly the identity in eval mode, so the activations of a random
    network drift in scale layer after layer. As after training, give every BatchNorm the statistics
    of real activations (those of ``x``, momentum 1) and random affine parameters, so the checks see
    every layer at a realistic scale."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.momentum = 1.0
        model.train()
        model(x)
        for m in norms:
            m.momentum = 0.1
    return model.eval()


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


class Case:
    """One model built once per module (pytest groups the tests by it) with its eval outputs on a
    batch of 3 non-square images and a batch of 1 square image."""

    def __init__(self, encoder, model, arch=None):
        in_channels = model.config["in_channels"]
        self.x3 = _inputs((3, in_channels, 64, 96), seed=1)
        self.x1 = _inputs((1, in_channels, 64, 64), seed=2)
        self.encoder, self.arch, self.model = encoder, arch, _calibrate_batchnorm(model, self.x3)
        with torch.no_grad():
            self.out3 = _as_tuple(self.model(self.x3))
            self.out1 = _as_tuple(self.model(self.x1))

    def copy(self):
        return copy.deepcopy(self.model)


def _check_channels_last(case, extra_modules=lambda model: []):
    """channels_last weights and input: every convolution's output (and the extra modules') stays
    channels_last, and the outputs equal the contiguous model's."""
    model = case.copy().to(memory_format=torch.channels_last)
    seen = []
    watched = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)] + list(extra_modules(model))
    for module in watched:
        module.register_forward_hook(lambda m, i, o: seen.extend(o if isinstance(o, (list, tuple)) else [o]))
    with torch.no_grad():
        got = _as_tuple(model(case.x3.contiguous(memory_format=torch.channels_last)))
    assert len(seen) >= len(watched)
    maps = seen + [o for o in got if o.dim() == 4]
    for t in maps:
        assert t.is_contiguous(memory_format=torch.channels_last), f"lost channels_last at shape {tuple(t.shape)}"
    for a, b in zip(got, case.out3):
        assert _rel_err(a, b) < 1e-3  # other convolution algorithms, amplified by a random network


def _check_low_precision(model, x, observe, device_type, dtype):
    """Autocast runs, gives finite ``dtype`` outputs, and is as close to float32 as the same network
    cast to ``dtype`` throughout (plain PyTorch in that dtype: the flash-attention way of judging a
    low-precision path, since random deep networks amplify rounding and a fixed tolerance would
    measure the network's conditioning, not the code). ``observe(model, x)`` returns the outputs and
    the large maps compared (masks, the deepest features: a handful of class logits is too few
    numbers for a stable relative error)."""
    with torch.no_grad():
        outputs, expected = observe(model, x)
        with torch.autocast(device_type, dtype=dtype):
            outputs_low, got = observe(model, x)
        _, baseline = observe(copy.deepcopy(model).to(dtype), x.to(dtype))
    for out in outputs_low:
        assert out.dtype == dtype and torch.isfinite(out).all()
    for a, ref, b in zip(got, baseline, expected):
        assert torch.isfinite(a).all()
        if torch.isfinite(ref).all():
            assert _rel_err(a, b) <= 3 * _rel_err(ref, b) + 2e-2, (_rel_err(a, b), _rel_err(ref, b))


def _observe_segmenter(model, x):
    features = model.encode(x)
    masks, logits = model.decode(features), model.classify(features)
    return (masks, logits), (masks, features[-1])


def _observe_classifier(model, x):
    features = model.forward_features(x)
    return (model.forward_head(features),), (features,)


def _check_gradients(case, module_groups):
    """Every parameter gets a finite gradient; each group of modules (a decoder block, a head) a
    non-zero one (single parameters may see exact zeros: a 2-unit scSE bottleneck behind a ReLU, or
    the residual branches behind timm's zero-initialised last BatchNorm)."""
    model = case.copy().train()
    outputs = _as_tuple(model(case.x3[:2]))
    loss = sum((o * _inputs(o.shape, seed=5)).mean() for o in outputs)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), name
    for name, module in module_groups(model):
        assert any(p.grad.abs().sum() > 0 for p in module.parameters()), f"{name} gets a zero gradient"


def _check_compile_eager_fullgraph(case):
    """dynamo traces the whole model (any graph break is an error) without generating code."""
    torch._dynamo.reset()
    compiled = torch.compile(case.model, backend="eager", fullgraph=True)
    with torch.no_grad():
        for a, b in zip(_as_tuple(compiled(case.x1)), case.out1):
            torch.testing.assert_close(a, b)


def _check_config_round_trip(case):
    config = json.loads(json.dumps(case.model.config))
    assert config == case.model.config
    rebuilt = build_model(config)
    assert rebuilt.config == case.model.config
    rebuilt.load_state_dict(case.model.state_dict(), strict=True)
    with torch.no_grad():
        for a, b in zip(_as_tuple(rebuilt.eval()(case.x1)), case.out1):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# Segmenters (every encoder x every architecture; scSE and the gate head on, so every module runs).


UNET_CASES = [p for p in SEGMENTER_CASES if p.values[0][1] == "unet"]
SMALL_ENCODER_CASES = [p for p in SEGMENTER_CASES if p.values[0][0] == SMALL_ENCODER and p.values[0][1] != "unet"]


@pytest.fixture(scope="module", params=SEGMENTER_CASES)
def seg(request):
    encoder, arch = request.param
    torch.manual_seed(0)
    model = create_segmenter(arch, encoder, in_channels=1, classes=1, aux_classifier=True, attention="scse")
    return Case(encoder, model, arch)


def _decoder_blocks(model):
    blocks = model.decoder.blocks
    return list(blocks.values()) if isinstance(blocks, torch.nn.ModuleDict) else list(blocks)


class TestSegmenter:
    def test_forward_shapes(self, seg):
        (m3, c3), (m1, c1) = seg.out3, seg.out1
        assert m3.shape == (3, 1, 64, 96) and c3.shape == (3, 1)
        assert m1.shape == (1, 1, 64, 64) and c1.shape == (1, 1)
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in (m3, c3, m1, c1))

    def test_encode_classify_decode_compose_to_forward_and_eval_is_deterministic(self, seg):
        model = seg.model
        with torch.no_grad():
            features = model.encode(seg.x3)
            assert [f.shape[1] for f in features] == list(model.encoder.out_channels)
            assert [tuple(f.shape[-2:]) for f in features] == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
            masks, logits = model.decode(features), model.classify(features)
            assert torch.equal(masks, seg.out3[0]) and torch.equal(logits, seg.out3[1])
            # stage 2 decodes only the images the gate lets through: decoding is per image
            subset = model.decode([f[1:] for f in features])
        torch.testing.assert_close(subset, masks[1:], rtol=1e-5, atol=1e-5 * masks.abs().max().item())

    def test_channels_last_is_kept_and_matches_contiguous(self, seg):
        _check_channels_last(seg, lambda m: [m.encoder, *_decoder_blocks(m)])

    def test_autocast_bfloat16_is_close_to_float32(self, seg):
        _check_low_precision(seg.model, seg.x3, _observe_segmenter, "cpu", torch.bfloat16)

    def test_every_parameter_gets_a_gradient(self, seg):
        _check_gradients(seg, lambda m: [*m.decoder.blocks.named_children(), ("segmentation_head", m.segmentation_head),
                                         ("classification_head", m.classification_head), ("encoder", m.encoder)])

    def test_input_size_not_divisible_by_32(self, seg):
        for shape in [(1, 1, 64, 100), (1, 1, 40, 64), (1, 1, 16, 16)]:
            with pytest.raises(InvalidInputError, match=rf"multiples of 32, got {shape[2]}x{shape[3]}"):
                seg.model(torch.zeros(shape))
        with pytest.raises(InvalidInputError, match="1 input channel"):
            seg.model(torch.zeros(1, 3, 64, 64))
        with pytest.raises(InvalidInputError, match="4-D"):
            seg.model(torch.zeros(1, 64, 64))

    # build_model reads the architecture's fields and the encoder's name: every architecture (on the
    # small encoder) and every encoder (in one architecture) once.
    @pytest.mark.parametrize("seg", UNET_CASES + SMALL_ENCODER_CASES, indirect=True)
    def test_config_round_trips_through_build_model(self, seg):
        _check_config_round_trip(seg)

    # The encoder is the same module in both architectures: one check per encoder.
    @pytest.mark.parametrize("seg", UNET_CASES, indirect=True)
    def test_encoder_keys_are_the_classifiers_minus_its_head(self, seg):
        classifier = create_classifier(seg.encoder, num_classes=1, in_channels=1)
        head = tuple(f"{m}." for m in classifier.head_modules)
        expected = {k: v.shape for k, v in classifier.state_dict().items() if not k.startswith(head)}
        state = seg.model.state_dict()
        ours = {k.removeprefix("encoder."): v.shape for k, v in state.items() if k.startswith("encoder.")}
        assert ours == expected
        # so a classifier checkpoint (minus its head) loads into the segmenter's encoder
        missing, unexpected = seg.copy().encoder.load_state_dict(classifier.state_dict(), strict=False)
        assert not missing and all(k.startswith(head) for k in unexpected)


# ``fullgraph=True`` fails on a graph break in some module's forward, so one encoder per distinct
# forward code covers every encoder (widths and depths change what dynamo inlines, not what it can
# trace): resnet_tiny (ResNet + BasicBlock, as resnet34), seresnext50_32x4d (Bottleneck with grouped
# convolutions and SEModule; resnet50 is the same Bottleneck without the SE call), densenet121,
# legacy_xception, efficientnet_b0 (B1-B4 repeat its blocks at other widths) and tf_efficientnet_b0
# (Conv2dSame's input-dependent padding, as tf B1-B4). The same for the classifiers (forward_features
# and forward_head). New encoders not listed here are compiled too.
# The encoder is traced the same way in both architectures and U-Net++'s decoder uses every module
# U-Net's does, so one compile per encoder (U-Net++) plus the small U-Net covers every code path.
# The cases are the ``seg`` fixture's own params (indirect), so pytest runs each compile in that
# fixture's group and it reuses the model built there instead of building and calibrating it again.
SAME_FORWARD_AS_A_COMPILED_ENCODER = {"resnet34", "resnet50", *(f"{tf}efficientnet_b{i}" for tf in ("", "tf_")
                                                                for i in range(1, 5))}
COMPILED_ENCODERS = [e for e in ENCODERS if e not in SAME_FORWARD_AS_A_COMPILED_ENCODER]
COMPILE_CASES = [p for p in SEGMENTER_CASES if p.values[0][0] in COMPILED_ENCODERS
                 and (p.values[0][1] == "unet++" or p.values[0][0] == SMALL_ENCODER)]
COMPILE_CLASSIFIER_CASES = [p for p in CLASSIFIER_CASES if p.values[0] in COMPILED_ENCODERS]


@pytest.mark.parametrize("seg", COMPILE_CASES, indirect=True)
def test_segmenter_compiles_fullgraph(seg):
    _check_compile_eager_fullgraph(seg)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("attention", [None, "scse"])
def test_segmenter_three_channels_two_classes_no_gate(arch, attention):
    model = create_segmenter(arch, SMALL_ENCODER, in_channels=3, classes=2, attention=attention).eval()
    for shape in [(1, 3, 64, 64), (3, 3, 96, 64)]:
        with torch.no_grad():
            out = model(_inputs(shape))
        assert isinstance(out, torch.Tensor) and out.shape == (shape[0], 2, *shape[2:]) and torch.isfinite(out).all()


def test_size_error_under_torch_compile():
    """Plain torch.compile falls back to Python for the raise, so the error is ours; with
    fullgraph=True dynamo refuses to trace a raise and reports it naming our error (torch 2.13 also quotes
    its message; 2.7 and 2.8, within pyproject's torch>=2.7, name the class only)."""
    model = create_segmenter("unet", SMALL_ENCODER).eval()
    x = torch.zeros(1, 1, 64, 80)
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(InvalidInputError, match="got 64x80"):
        torch.compile(model, backend="eager")(x)
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match="InvalidInputError"):
        torch.compile(model, backend="eager", fullgraph=True)(x)


@pytest.mark.cuda
@pytest.mark.parametrize("case", SEGMENTER_CASES)
def test_segmenter_cuda_float16_channels_last(case):
    encoder, arch = case
    torch.manual_seed(0)
    x = _inputs((2, 1, 128, 96), seed=8)
    model = _calibrate_batchnorm(create_segmenter(arch, encoder, aux_classifier=True, attention="scse"), x).cuda()
    x = x.cuda()
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    _check_low_precision(model, x, _observe_segmenter, "cuda", torch.float16)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        assert model(x)[0].is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------------
# Classifiers (every encoder with its pooling + linear head; 3 input channels and 2 classes here, so
# both stems and head widths are covered between the two testers).


@pytest.fixture(scope="module", params=CLASSIFIER_CASES)
def cls(request):
    torch.manual_seed(0)
    return Case(request.param, create_classifier(request.param, num_classes=2, in_channels=3))


class TestClassifier:
    def test_forward_shapes_and_determinism(self, cls):
        assert cls.out3[0].shape == (3, 2) and cls.out1[0].shape == (1, 2)
        assert torch.isfinite(cls.out3[0]).all()
        with torch.no_grad():
            assert torch.equal(cls.model(cls.x3), cls.out3[0])

    def test_channels_last_is_kept_and_matches_contiguous(self, cls):
        _check_channels_last(cls)

    def test_autocast_bfloat16_is_close_to_float32(self, cls):
        _check_low_precision(cls.model, cls.x3, _observe_classifier, "cpu", torch.bfloat16)

    def test_every_parameter_gets_a_gradient(self, cls):
        _check_gradients(cls, lambda m: [("classifier", m)])

    @pytest.mark.parametrize("cls", COMPILE_CLASSIFIER_CASES, indirect=True)
    def test_compile_fullgraph(self, cls):
        _check_compile_eager_fullgraph(cls)

    def test_config_round_trips_through_build_model(self, cls):
        assert cls.model.config["kind"] == "classifier"
        _check_config_round_trip(cls)


# --------------------------------------------------------------------------------------------------
# Outside reference for the decoders: written from the U-Net (Ronneberger et al., 2015) and U-Net++
# (Zhou et al., 2018) papers as smp implements them, float64, functional ops, the model's weights.


def _ref_conv_bn_relu(x, sd, key):
    x = F.conv2d(x, sd[key + ".0.weight"], padding=1)
    x = F.batch_norm(x, sd[key + ".1.running_mean"], sd[key + ".1.running_var"], sd[key + ".1.weight"],
                     sd[key + ".1.bias"], training=False, eps=1e-5)
    return F.relu(x)


def _ref_scse(x, sd, key):
    """x * sigmoid(W2 relu(W1 avgpool(x))) + x * sigmoid(w . x): channel and spatial excitation."""
    pooled = x.mean(dim=(2, 3), keepdim=True)
    channel = torch.sigmoid(F.conv2d(F.relu(F.conv2d(pooled, sd[key + ".cSE.1.weight"], sd[key + ".cSE.1.bias"])),
                                     sd[key + ".cSE.3.weight"], sd[key + ".cSE.3.bias"]))
    spatial = torch.sigmoid(F.conv2d(x, sd[key + ".sSE.0.weight"], sd[key + ".sSE.0.bias"]))
    return x * channel + x * spatial


def _ref_block(x, skips, sd, key, attention):
    """Upsample x2 (nearest), concatenate [upsampled, *skips], [scSE], conv-BN-ReLU twice, [scSE]."""
    x = F.interpolate(x, scale_factor=2, mode="nearest")
    if skips:
        x = torch.cat([x, *skips], dim=1)
        if attention:
            x = _ref_scse(x, sd, key + ".attention1.attention")
    x = _ref_conv_bn_relu(_ref_conv_bn_relu(x, sd, key + ".conv1"), sd, key + ".conv2")
    if attention:
        x = _ref_scse(x, sd, key + ".attention2.attention")
    return x


def _ref_unet(E, sd, attention):
    """E[i]: encoder features at level i (stride 2^(i+1)). Up the levels 3..0, each with its skip,
    then one block to full resolution without a skip."""
    x = E[4]
    for block, level in enumerate([3, 2, 1, 0]):
        x = _ref_block(x, [E[level]], sd, f"decoder.blocks.{block}", attention)
    return _ref_block(x, [], sd, "decoder.blocks.4", attention)


def _ref_unetplusplus(E, sd, attention):
    """The paper's nodes X[i, j] (level i, j-th node along the level): X[i, 0] = E[i] and
    X[i, j] = H([U(X[i+1, j-1]), X[i, j-1], ..., X[i, 1], X[i, 0]]) for i + j <= 4 (smp orders the
    concatenation newest node first). smp names node X[i, j] ``x_{4-i-j}_{3-i}``. Then one block brings
    X[0, 4] to full resolution."""
    X = {(i, 0): E[i] for i in range(5)}
    for j in range(1, 5):
        for i in range(0, 5 - j):
            skips = [X[(i, k)] for k in range(j - 1, -1, -1)]
            X[(i, j)] = _ref_block(X[(i + 1, j - 1)], skips, sd, f"decoder.blocks.x_{4 - i - j}_{3 - i}", attention)
    return _ref_block(X[(0, 4)], [], sd, "decoder.blocks.x_0_4", attention)


def _ref_segmenter_heads(decoded, deepest, sd, pooling):
    masks = F.conv2d(decoded, sd["segmentation_head.0.weight"], sd["segmentation_head.0.bias"], padding=1)
    pooled = deepest.mean(dim=(2, 3)) if pooling == "avg" else deepest.amax(dim=(2, 3))
    return masks, F.linear(pooled, sd["classification_head.3.weight"], sd["classification_head.3.bias"])


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("attention", [None, "scse"])
@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_decoder_matches_float64_reference(arch, attention, pooling):
    torch.manual_seed(0)
    model = create_segmenter(arch, SMALL_ENCODER, in_channels=1, classes=2, aux_classifier=True, attention=attention,
                             decoder_channels=(48, 40, 24, 16, 8), aux_pooling=pooling)
    model = randomize_model(model.double(), seed=11).eval()
    sd = {k: v for k, v in model.state_dict().items()}
    x = _inputs((2, 1, 64, 96), seed=12, dtype=torch.float64)
    with torch.no_grad():
        features = model.encode(x)
        masks, logits = model(x)
    reference = (_ref_unet if arch == "unet" else _ref_unetplusplus)(features, sd, attention)
    ref_masks, ref_logits = _ref_segmenter_heads(reference, features[-1], sd, pooling)
    assert masks.shape == ref_masks.shape == (2, 2, 64, 96)
    torch.testing.assert_close(masks, ref_masks, rtol=1e-10, atol=1e-10 * ref_masks.abs().max().item())
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-12)


def test_decoder_keys_are_smps():
    """smp's key layout, written out: U-Net blocks 0..4, U-Net++ nodes x_{d}_{l}; conv-BN pairs at
    ``.0``/``.1``; scSE under ``attentionN.attention``; heads at ``segmentation_head.0`` and
    ``classification_head.3``; no attention before the last block's convolutions (it has no skip)."""
    unet = create_segmenter("unet", SMALL_ENCODER, attention="scse", aux_classifier=True).state_dict()
    blocks = sorted({k.split(".")[2] for k in unet if k.startswith("decoder.blocks.")})
    assert blocks == ["0", "1", "2", "3", "4"]
    assert "decoder.blocks.0.attention1.attention.cSE.1.weight" in unet
    assert "decoder.blocks.4.attention2.attention.sSE.0.weight" in unet
    assert not any(k.startswith("decoder.blocks.4.attention1") for k in unet)
    assert unet["decoder.blocks.0.conv1.0.weight"].shape == (256, 128 + 64, 3, 3)
    assert unet["segmentation_head.0.weight"].shape == (1, 16, 3, 3)
    assert unet["classification_head.3.weight"].shape == (1, 128)
    plus = create_segmenter("unet++", SMALL_ENCODER).state_dict()
    nodes = sorted({k.split(".")[2] for k in plus if k.startswith("decoder.blocks.")})
    assert nodes == sorted([f"x_{d}_{layer}" for layer in range(4) for d in range(layer + 1)] + ["x_0_4"])


def test_weight_init_is_smps():
    """Decoder convolutions Kaiming-uniform (fan in, ReLU gain: bound sqrt(6 / fan_in)), BatchNorm 1/0,
    head convolution and linear Xavier-uniform (bound sqrt(6 / (fan_in + fan_out))) with zero bias."""
    torch.manual_seed(0)
    model = create_segmenter("unet", SMALL_ENCODER, attention="scse", aux_classifier=True)

    def check_uniform(w, bound):
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound  # fills the interval
        assert abs(w.std().item() - bound / 3**0.5) < 0.1 * bound / 3**0.5

    for m in model.decoder.modules():
        if isinstance(m, torch.nn.Conv2d) and m.weight.numel() >= 1000:
            check_uniform(m.weight, (6.0 / m.weight[0].numel()) ** 0.5)
            assert m.bias is None or not m.bias.any()
        elif isinstance(m, torch.nn.BatchNorm2d):
            assert (m.weight == 1).all() and not m.bias.any()
    for head in (model.segmentation_head[0], model.classification_head[3]):
        fan_out, fan_in = head.weight.shape[0], head.weight[0].numel()
        receptive = head.weight[0, 0].numel()
        bound = (6.0 / (fan_in + fan_out * receptive)) ** 0.5
        assert head.weight.abs().max() <= bound and not head.bias.any()


def test_smp_checkpoint_unused_attention_keys_load_strictly():
    """smp builds an scSE before the last block's convolutions that it never calls; its keys in an smp
    checkpoint are dropped on loading, so the checkpoint loads with strict=True."""
    model = create_segmenter("unet", SMALL_ENCODER, attention="scse")
    state = dict(model.state_dict())
    c = model.decoder.blocks[4].conv1[0].in_channels
    unused = {"decoder.blocks.4.attention1.attention.cSE.1.weight": torch.ones(max(1, c // 16), c, 1, 1),
              "decoder.blocks.4.attention1.attention.sSE.0.bias": torch.ones(1)}
    result = model.load_state_dict({**state, **unused}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with pytest.raises(RuntimeError, match="Unexpected key"):
        model.load_state_dict({**state, "decoder.blocks.3.bogus": torch.ones(1)}, strict=True)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_same_function_as_smp(arch):
    smp = pytest.importorskip("segmentation_models_pytorch")
    cls = smp.Unet if arch == "unet" else smp.UnetPlusPlus
    theirs = cls("resnet34", encoder_weights=None, in_channels=1, classes=1, decoder_attention_type="scse",
                 aux_params=dict(classes=1)).eval()
    ours = create_segmenter(arch, "resnet34", attention="scse", aux_classifier=True).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # smp's resnets have torchvision's names = ours
    x = _inputs((2, 1, 64, 96), seed=13)
    with torch.no_grad():
        for a, b in zip(ours(x), theirs(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Real compilation (inductor) of the small models, and argument checking.


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unet", "classifier"])
def test_inductor_compile_small_models(kind):
    """Code generation too, for inference: 10-70 s of CPU a model (mostly the C++ build of the
    kernels), so the U-Net (U-Net++ only repeats its decoder blocks: 1.5x the build; dynamo's trace of
    it is checked above) and one classifier; a training graph would double it. The build is the
    number of kernels: the scSE blocks are most of the U-Net's; a narrow decoder saved nothing."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    if kind == "classifier":
        model = create_classifier(SMALL_ENCODER, num_classes=1, in_channels=1)
    else:
        model = create_segmenter(kind, SMALL_ENCODER, aux_classifier=True, attention="scse")
    x = _inputs((2, 1, 64, 64), seed=14)
    model = _calibrate_batchnorm(model, x)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for a, b in zip(_as_tuple(compiled(x)), _as_tuple(model(x))):
            assert _rel_err(a, b) < 1e-4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(arch="fpn"), "unknown segmenter architecture 'fpn'"),
        (dict(encoder="resnet9000"), "unknown encoder 'resnet9000'"),
        (dict(attention="cbam"), "unknown attention 'cbam'"),
        (dict(decoder_channels=(256, 128, 64, 32)), "decoder_channels must be 5"),
        (dict(decoder_channels=(256, 128, 64, 32, 0)), "decoder_channels entries must be an integer >= 1"),
        (dict(classes=0), "classes must be an integer >= 1"),
        (dict(in_channels=0), "in_channels must be an integer >= 1"),
        (dict(aux_classifier="yes"), "aux_classifier must be True or False"),
        (dict(aux_pooling="median"), "aux_pooling must be 'avg' or 'max'"),
        (dict(aux_dropout=1.0), r"aux_dropout must be a number in \[0, 1\)"),
    ],
)
def test_create_segmenter_rejects_bad_arguments(kwargs, match):
    args = dict(encoder=SMALL_ENCODER, **kwargs) if "encoder" not in kwargs else kwargs
    with pytest.raises(InvalidInputError, match=match):
        create_segmenter(**args)


def test_classify_without_gate_head_is_a_clear_error():
    model = create_segmenter("unet", SMALL_ENCODER).eval()
    with torch.no_grad():
        features = model.encode(torch.zeros(1, 1, 64, 64))
    with pytest.raises(InvalidInputError, match="no classification head"):
        model.classify(features)


@pytest.mark.parametrize(
    "config, match",
    [
        ([("kind", "segmenter")], "must be a mapping"),
        ({"arch": "unet"}, "'kind' must be one of classifier, segmenter, got None"),
        ({"kind": "detector"}, "got 'detector'"),
        ({"kind": "segmenter", "encoder": SMALL_ENCODER, "depth": 4}, "unknown key.*'depth'"),
        ({"kind": "classifier", "encoder": SMALL_ENCODER, "classes": 1}, "unknown key.*'classes'"),
        ({"kind": "segmenter", "encoder": SMALL_ENCODER, "arch": "linknet"}, "unknown segmenter architecture"),
    ],
)
def test_build_model_rejects_bad_configs(config, match):
    with pytest.raises(InvalidInputError, match=match):
        build_model(config)


def test_models_module_loads_lazily():
    assert "models" in pneumoseg.__all__ and pneumoseg.models.create_segmenter is create_segmenter
