"""load_pretrained: checkpoints written in each naming convention (timm, torchvision, old torchvision
DenseNet, CheXNet, wrapped and prefixed containers, safetensors) from models with random weights load
into fresh models and reproduce their outputs; heads, stems, mismatches and hostile files."""

from __future__ import annotations

import argparse
import copy
import logging
import pickle
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from factories import randomize_model  # noqa: E402
from pneumoseg.errors import DataFormatError, InvalidInputError  # noqa: E402
from pneumoseg.models import (  # noqa: E402
    adapt_input_conv, create_classifier, create_encoder, create_segmenter, load_pretrained)

SMALL = "resnet_tiny"


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values in every parameter and BatchNorm statistic, so a load is told from an init."""
    return randomize_model(model, seed).eval()


def run(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return model.eval()(x)


def assert_same_outputs(a, b):
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v)
    else:
        torch.testing.assert_close(a, b)


def save(state, path: Path) -> Path:
    if path.name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def source():
    """A 1000-class resnet_tiny classifier (timm's layout) with random weights, and an input."""
    return randomize(create_classifier(SMALL, num_classes=1000)), torch.randn(2, 3, 64, 64)


# ------------------------------------------------------------------------------- formats, containers

@pytest.mark.parametrize("filename", ["w.pth", "w.pt", "w.bin", "model.pth.tar", "w.ckpt", "w.safetensors",
                                      "safetensors-named.bin", "no_suffix"])
def test_formats_round_trip(tmp_path, source, filename):
    model, x = source
    state = model.state_dict()
    if filename == "safetensors-named.bin":  # the format is recognised by content, not by suffix
        from safetensors.torch import save_file

        save_file(state, str(tmp_path / filename))
        path = tmp_path / filename
    else:
        path = save(state, tmp_path / filename)
    fresh = create_classifier(SMALL, num_classes=1000)
    result = load_pretrained(fresh, path)
    assert_same_outputs(run(fresh, x), run(model, x))
    assert set(result.loaded_keys) == set(state)
    assert not result.missing_keys and not result.unexpected_keys and not result.adapted_keys
    assert result.head_loaded is True and result.target == "model" and result.path == str(path)


def _wrap(state, how: str):
    def prefixed(p):
        return {p + k: v for k, v in state.items()}

    return {
        "state_dict": lambda: {"state_dict": state},
        "model": lambda: {"model": state},
        "model_state_dict": lambda: {"model_state_dict": state, "optimizer_state_dict": {"state": {}}},
        "nested": lambda: {"model": {"state_dict": state}},
        "timm-train": lambda: {"epoch": 3, "arch": "resnet_tiny", "state_dict": state,
                               "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
                               "args": argparse.Namespace(lr=0.1, model="resnet_tiny"), "version": 2},
        "DataParallel": lambda: prefixed("module."),
        "torch.compile": lambda: prefixed("_orig_mod."),
        "lightning": lambda: {"state_dict": prefixed("model."), "epoch": 1},
        "encoder-prefix": lambda: prefixed("encoder."),
        "ddp-of-lightning": lambda: {"state_dict": prefixed("module.model.")},
        "backbone-prefix": lambda: prefixed("backbone."),
    }[how]()


@pytest.mark.parametrize("how", ["state_dict", "model", "model_state_dict", "nested", "timm-train", "DataParallel",
                                 "torch.compile", "lightning", "encoder-prefix", "ddp-of-lightning", "backbone-prefix"])
def test_containers_and_prefixes(tmp_path, source, how):
    model, x = source
    path = save(_wrap(model.state_dict(), how), tmp_path / "w.pth")
    fresh = create_classifier(SMALL, num_classes=1000)
    result = load_pretrained(fresh, path)
    assert_same_outputs(run(fresh, x), run(model, x))
    assert not result.missing_keys and not result.unexpected_keys


def test_explicit_prefix(tmp_path, source):
    model, x = source
    path = save({"teacher.body." + k: v for k, v in model.state_dict().items()}, tmp_path / "w.pth")
    fresh = create_classifier(SMALL, num_classes=1000)
    load_pretrained(fresh, path, prefix="teacher.body.")
    assert_same_outputs(run(fresh, x), run(model, x))


def test_ema_weights_on_request(tmp_path, source):
    model, x = source
    ema = randomize(create_classifier(SMALL, num_classes=1000), seed=7)
    path = save({"state_dict": model.state_dict(), "state_dict_ema": ema.state_dict()}, tmp_path / "w.pth")
    fresh = create_classifier(SMALL, num_classes=1000)
    load_pretrained(fresh, path, use_ema=True)
    assert_same_outputs(run(fresh, x), run(ema, x))
    load_pretrained(fresh, path)
    assert_same_outputs(run(fresh, x), run(model, x))
    plain = save(model.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(InvalidInputError, match="no EMA weights"):
        load_pretrained(fresh, plain, use_ema=True)


def test_half_precision_checkpoint(tmp_path, source):
    model, x = source
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = save(half, tmp_path / "h.pth")
    fresh = create_classifier(SMALL, num_classes=1000)
    load_pretrained(fresh, path)
    assert fresh.conv1.weight.dtype == torch.float32
    torch.testing.assert_close(run(fresh, x), run(model, x), rtol=2e-2, atol=2e-2)


def test_cadene_last_linear_head(tmp_path, source):
    model, x = source
    state = {re.sub(r"^fc\.", "last_linear.", k): v for k, v in model.state_dict().items()}
    fresh = create_classifier(SMALL, num_classes=1000)
    result = load_pretrained(fresh, save(state, tmp_path / "w.pth"), head="load")
    assert_same_outputs(run(fresh, x), run(model, x))
    assert any("last_linear" in c for c in result.conversions)


# ------------------------------------------------------------------------- DenseNet: torchvision, CheXNet

def old_torchvision_densenet_key(key: str) -> str:
    # torchvision < 0.3 wrote denselayer modules as norm.1 / relu.1 / conv.1 (what its loader regex undoes)
    return re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", key)


@pytest.fixture(scope="module")
def chexnet():
    """CheXNet's layout: torchvision densenet121 inside a module ``densenet121`` whose classifier is
    Sequential(Linear(1024, 14), Sigmoid), trained under DataParallel, saved as {'state_dict': ...}."""
    model = randomize(create_classifier("densenet121", num_classes=14), seed=3)
    state = {}
    for k, v in model.state_dict().items():
        k = old_torchvision_densenet_key(k).replace("classifier.", "classifier.0.")
        if not k.endswith("num_batches_tracked"):  # 2017 checkpoints predate these buffers
            state["module.densenet121." + k] = v
    return model, state


def test_old_style_densenet_keys_are_the_ones_torchvision_used():
    assert old_torchvision_densenet_key("features.denseblock1.denselayer1.norm1.weight") == \
        "features.denseblock1.denselayer1.norm.1.weight"
    assert old_torchvision_densenet_key("features.transition1.norm.weight") == "features.transition1.norm.weight"


def test_torchvision_densenet_old_and_new_keys(tmp_path, chexnet):
    model, _ = chexnet
    x = torch.randn(1, 3, 64, 64)
    new = save(model.state_dict(), tmp_path / "tv.pth")
    old = save({old_torchvision_densenet_key(k): v for k, v in model.state_dict().items()}, tmp_path / "tv_old.pth")
    for path in (new, old):
        fresh = create_classifier("densenet121", num_classes=14)
        result = load_pretrained(fresh, path)
        assert_same_outputs(run(fresh, x), run(model, x))
        assert not result.missing_keys and not result.unexpected_keys
    assert any("norm.1 -> norm1" in c for c in result.conversions)


def test_chexnet_checkpoint(tmp_path, chexnet, caplog):
    model, state = chexnet
    path = save({"epoch": 99, "state_dict": state, "best_loss": torch.tensor(0.1),
                 "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]}},
                tmp_path / "model.pth.tar")
    x = torch.randn(1, 3, 64, 64)

    # 14 classes: the whole network, head included
    same = create_classifier("densenet121", num_classes=14)
    with caplog.at_level(logging.INFO, logger="pneumoseg.models.pretrained"):
        result = load_pretrained(same, path)
    assert_same_outputs(run(same, x), run(model, x))
    assert result.head_loaded is True and not result.missing_keys and not result.unexpected_keys
    assert str(path) in caplog.text and "densenet121." in caplog.text

    # 1 class (pneumothorax): the trunk loads, the 14-class head does not
    one = create_classifier("densenet121", num_classes=1)
    head_before = one.classifier.weight.clone()
    result = load_pretrained(one, path)
    assert result.head_loaded is False and set(result.skipped_keys) == {"classifier.weight", "classifier.bias"}
    assert not result.missing_keys
    assert torch.equal(one.classifier.weight, head_before)
    with torch.no_grad():
        torch.testing.assert_close(one.eval().forward_features(x), model.forward_features(x))


def test_chexnet_into_segmenter_and_features_only_encoder(tmp_path, chexnet):
    model, state = chexnet
    # float64 throughout: random weights through 121 layers make float32 rounding of the summed stem visible
    state = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    path = save({"state_dict": state}, tmp_path / "model.pth.tar")
    grey = torch.randn(1, 1, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = copy.deepcopy(model).double().forward_features(grey.repeat(1, 3, 1, 1))

    segmenter = create_segmenter("unet", encoder="densenet121", in_channels=1).double()
    result = load_pretrained(segmenter, path)
    assert result.target == "model.encoder" and result.adapted_keys == ("features.conv0.weight",)
    assert set(result.skipped_keys) == {"classifier.weight", "classifier.bias"}
    assert not result.missing_keys and not result.unexpected_keys and result.head_loaded is None
    torch.testing.assert_close(run(segmenter.encoder, grey)[-1], expected, rtol=1e-10, atol=1e-10)

    encoder = create_encoder("densenet121", in_channels=1).double()
    load_pretrained(encoder, path)
    assert_same_outputs(run(encoder, grey), run(segmenter.encoder, grey))


def test_features_only_skips_what_it_does_not_build(tmp_path):
    classifier = randomize(create_classifier("efficientnet_b0", num_classes=1000))
    encoder = create_encoder("efficientnet_b0")
    result = load_pretrained(encoder, save(classifier.state_dict(), tmp_path / "b0.pth"))
    assert {k.split(".")[0] for k in result.skipped_keys} == {"conv_head", "bn2", "classifier"}
    assert not result.unexpected_keys and not result.missing_keys
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        trunk = classifier.blocks(classifier.bn1(classifier.conv_stem(x)))
    torch.testing.assert_close(run(encoder, x)[-1], trunk)


def test_whole_segmenter_checkpoint(tmp_path):
    trained = randomize(create_segmenter("unet", encoder=SMALL, in_channels=1, aux_classifier=True), seed=5)
    path = save({"module." + k: v for k, v in trained.state_dict().items()}, tmp_path / "seg.pth")
    fresh = create_segmenter("unet", encoder=SMALL, in_channels=1, aux_classifier=True)
    result = load_pretrained(fresh, path)
    assert result.target == "model" and not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 1, 64, 64)
    assert_same_outputs(run(fresh, x), run(trained, x))


# ------------------------------------------------------------------------------------ head policies

def test_head_policies(tmp_path, source):
    model, x = source
    path = save(model.state_dict(), tmp_path / "imagenet.pth")

    one = create_classifier(SMALL, num_classes=1)
    result = load_pretrained(one, path)  # auto: a 1000-class head is not loaded into a 1-class model
    assert result.head_loaded is False and set(result.skipped_keys) == {"fc.weight", "fc.bias"}
    assert "head not loaded" in result.summary()

    with pytest.raises(InvalidInputError) as err:
        load_pretrained(create_classifier(SMALL, num_classes=1), path, head="load")
    message = str(err.value)
    assert "fc.weight" in message and "(1000, 128)" in message and "(1, 128)" in message and str(path) in message

    same = create_classifier(SMALL, num_classes=1000)
    fc_before = same.fc.weight.clone()
    result = load_pretrained(same, path, head="drop")
    assert result.head_loaded is False and torch.equal(same.fc.weight, fc_before)
    assert not result.missing_keys

    with pytest.raises(InvalidInputError, match="no classifier layer"):
        load_pretrained(create_encoder(SMALL), path, head="load")
    headless = save({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}, tmp_path / "trunk.pth")
    with pytest.raises(InvalidInputError, match="has no 'fc' weights"):
        load_pretrained(create_classifier(SMALL, num_classes=1000), headless, head="load")
    result = load_pretrained(create_classifier(SMALL, num_classes=1000), headless)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"}


def test_shape_mismatch_is_refused_and_nothing_loads(tmp_path, source):
    model, _ = source
    state = dict(model.state_dict())
    state["layer2.0.conv1.weight"] = torch.zeros(8, 16, 3, 3)
    path = save(state, tmp_path / "bad.pth")
    fresh = create_classifier(SMALL, num_classes=1000)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(InvalidInputError) as err:
        load_pretrained(fresh, path)
    message = str(err.value)
    assert "layer2.0.conv1.weight" in message and "(8, 16, 3, 3)" in message and "(32, 16, 3, 3)" in message
    assert str(path) in message
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize("filename", ["bad.pth", "bad.safetensors"])
@pytest.mark.parametrize("key, value, match", [
    ("layer2.0.conv1.weight", lambda w: w.to(torch.complex64), "is torch.complex64 in the checkpoint"),
    ("layer2.0.conv1.weight", lambda w: (w > 0), "is torch.bool in the checkpoint"),
    ("layer2.0.conv1.weight", lambda w: w.to(torch.int32), "is torch.int32 in the checkpoint"),
    ("layer2.0.conv1.weight", lambda w: w.index_fill(0, torch.tensor([3]), float("nan")), "holds NaN or infinity"),
    ("bn1.running_var", lambda w: w.index_fill(0, torch.tensor([0]), float("inf")), "holds NaN or infinity"),
])
def test_weights_that_would_be_cast_or_are_not_finite_are_refused(tmp_path, source, filename, key, value, match):
    """load_state_dict would cast them silently (complex to real, bool and integers to float) or load
    NaN; the error names the file and the key, and nothing loads."""
    if filename.endswith(".safetensors") and "complex" in match:  # older ones cannot write (or read) it
        pytest.importorskip("safetensors", minversion="0.7")  # the first to write complex tensors
    model, _ = source
    state = dict(model.state_dict())
    state[key] = value(state[key])
    path = save(state, tmp_path / filename)
    fresh = create_classifier(SMALL, num_classes=1000)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(InvalidInputError, match=match) as err:
        load_pretrained(fresh, path)
    assert f"'{key}'" in str(err.value) and str(path) in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_low_precision_weights_and_counters_of_any_real_type_load(tmp_path, source):
    model, x = source
    state = {k: v.to(torch.float8_e4m3fn) if k == "fc.bias" else v for k, v in model.state_dict().items()}
    state["bn1.num_batches_tracked"] = state["bn1.num_batches_tracked"].float()
    fresh = create_classifier(SMALL, num_classes=1000)
    load_pretrained(fresh, save(state, tmp_path / "w.pth"))
    assert torch.equal(fresh.fc.bias, model.fc.bias.to(torch.float8_e4m3fn).float())


def test_other_network_is_refused(tmp_path, source):
    model, _ = source
    path = save(model.state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(InvalidInputError, match="no tensor of .* fits"):
        load_pretrained(create_classifier("densenet121"), path)


def test_strict_and_reported_keys(tmp_path, source, caplog):
    model, _ = source
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("layer4.")}
    state["extra.weight"] = torch.zeros(3)
    path = save(state, tmp_path / "partial.pth")
    with pytest.raises(InvalidInputError, match="strict loading"):
        load_pretrained(create_classifier(SMALL, num_classes=1000), path, strict=True)
    with caplog.at_level(logging.WARNING, logger="pneumoseg.models.pretrained"):
        result = load_pretrained(create_classifier(SMALL, num_classes=1000), path)
    assert result.unexpected_keys == ("extra.weight",)
    assert result.missing_keys and all(k.startswith("layer4.") for k in result.missing_keys)
    assert not any(k.endswith("num_batches_tracked") for k in result.missing_keys)
    assert "extra.weight" in caplog.text


# ------------------------------------------------------------------------------------ stem adaptation

def test_stem_summed_for_one_channel(tmp_path):
    rgb = randomize(create_classifier(SMALL, num_classes=1000)).double()
    path = save(rgb.state_dict(), tmp_path / "rgb.pth")
    grey_model = create_classifier(SMALL, num_classes=1000, in_channels=1).double()
    result = load_pretrained(grey_model, path)
    assert result.adapted_keys == ("conv1.weight",)
    torch.testing.assert_close(grey_model.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True), rtol=0, atol=0)
    grey = torch.randn(2, 1, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(run(grey_model, grey), run(rgb, grey.repeat(1, 3, 1, 1)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels", [2, 4, 7])
def test_stem_repeated_and_scaled(tmp_path, source, channels):
    model, _ = source
    path = save(model.state_dict(), tmp_path / "rgb.pth")
    multi = create_classifier(SMALL, num_classes=1000, in_channels=channels)
    load_pretrained(multi, path)
    w = model.conv1.weight
    expected = torch.stack([w[:, c % 3] for c in range(channels)], 1) * (3.0 / channels)
    torch.testing.assert_close(multi.conv1.weight, expected)


def test_stem_adaptation_only_from_three_channels(tmp_path):
    grey_ckpt = save(create_classifier(SMALL, num_classes=1000, in_channels=1).state_dict(), tmp_path / "grey.pth")
    with pytest.raises(InvalidInputError, match=r"conv1\.weight.*\(16, 1, 7, 7\).*\(16, 3, 7, 7\)"):
        load_pretrained(create_classifier(SMALL, num_classes=1000), grey_ckpt)
    with pytest.raises(InvalidInputError, match="adapt_input_conv needs"):
        adapt_input_conv(torch.zeros(4, 2, 3, 3), 1)
    assert adapt_input_conv(torch.ones(4, 3, 3, 3, dtype=torch.float16), 1).dtype == torch.float16


# --------------------------------------------------------------------------------- hostile and bad files

class _Payload:
    """Unpickling this would create ``marker``: the test checks it never exists."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("container", ["torch.save", "plain pickle"])
def test_malicious_pickle_is_refused_unexecuted(tmp_path, container):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": {"conv1.weight": torch.zeros(1)}, "x": _Payload(marker)}
    if container == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(DataFormatError, match="refused") as err:
        load_pretrained(create_classifier(SMALL), path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_bad_files(tmp_path, source):
    model, _ = source
    net = create_classifier(SMALL)
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_pretrained(net, tmp_path / "missing.pth")
    with pytest.raises(InvalidInputError, match="is not a file"):
        load_pretrained(net, tmp_path)
    with pytest.raises(InvalidInputError, match="path must be a file path"):
        load_pretrained(net, 42)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(DataFormatError, match="empty"):
        load_pretrained(net, tmp_path / "empty.pth")
    (tmp_path / "garbage.pth").write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(DataFormatError, match="garbage.pth"):
        load_pretrained(net, tmp_path / "garbage.pth")
    good = save(model.state_dict(), tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataFormatError, match="truncated.pth"):
        load_pretrained(net, tmp_path / "truncated.pth")
    st = save(model.state_dict(), tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(st[: len(st) // 2])
    with pytest.raises(DataFormatError, match="truncated.safetensors"):
        load_pretrained(net, tmp_path / "truncated.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(DataFormatError, match="holds a list"):
        load_pretrained(net, tmp_path / "list.pth")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "no-weights.pth")
    with pytest.raises(DataFormatError, match="no tensors.*epoch"):
        load_pretrained(net, tmp_path / "no-weights.pth")


def test_bad_arguments(tmp_path, source):
    model, _ = source
    path = save(model.state_dict(), tmp_path / "w.pth")
    with pytest.raises(InvalidInputError, match="head must be one of"):
        load_pretrained(create_classifier(SMALL), path, head="maybe")
    with pytest.raises(InvalidInputError, match="torch.nn.Module"):
        load_pretrained("resnet", path)
    with pytest.raises(InvalidInputError, match=r"\.encoder"):
        load_pretrained(nn.Linear(3, 3), path)
    with pytest.raises(InvalidInputError, match="prefix"):
        load_pretrained(create_classifier(SMALL), path, prefix="")
