"""Cases of the models layer (load_pretrained, BatchNorm folding, the sub-pixel decoder's frozen
weights, the encoders' pyramids) worked out from their documented behaviour, each added by the
mutation audit where a planted bug passed the other tests."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from factories import randomize_model  # noqa: E402
from pneumoseg.models import create_classifier, load_pretrained  # noqa: E402

SMALL = "resnet_tiny"


def _source(seed: int = 0) -> torch.nn.Module:
    return randomize_model(create_classifier(SMALL, num_classes=3), seed).eval()


def _save(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


def test_a_prefix_is_removed_only_where_that_makes_keys_match(tmp_path):
    # The model's own keys, plus one stray tensor under 'model.': removing 'model.' adds no match
    # (there is no 'extra' in the model either), so no conversion is applied or reported and the
    # stray key is reported under the name the file gives it.
    model = _source()
    state = dict(model.state_dict())
    state["model.extra"] = torch.zeros(2)
    fresh = create_classifier(SMALL, num_classes=3)
    result = load_pretrained(fresh, _save(state, tmp_path / "w.pth"))
    assert result.unexpected_keys == ("model.extra",)
    assert not any("model." in note for note in result.conversions)
    assert not result.missing_keys


def test_a_zero_running_variance_loads(tmp_path):
    # A BatchNorm channel that never varied has running_var 0: BatchNorm divides by
    # sqrt(0 + eps), a finite number, so the checkpoint is valid (only negative variances are refused).
    model = _source()
    with torch.no_grad():
        model.bn1.running_var[0] = 0.0
    fresh = create_classifier(SMALL, num_classes=3)
    result = load_pretrained(fresh, _save(model.state_dict(), tmp_path / "w.pth"))
    assert "bn1.running_var" in result.loaded_keys
    assert fresh.bn1.running_var[0].item() == 0.0
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(fresh.eval()(x)).all()


def _with_statistics(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def test_a_convolution_used_twice_is_not_folded():
    # One convolution module called at two places, each followed by its own BatchNorm: folding either
    # BatchNorm into it would change the other call too, so the function would change. Unfolded,
    # fuse_batchnorm must leave the outputs exactly as they were.
    from pneumoseg.models.fuse import fuse_batchnorm

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
    model = _with_statistics(torch.nn.Sequential(conv, torch.nn.BatchNorm2d(4), torch.nn.ReLU(), conv,
                                                 torch.nn.BatchNorm2d(4)))
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        want = model(x)
        result = fuse_batchnorm(model)
        got = result.model(x)
    assert result.folded == []
    assert "1" in result.kept
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_batchnorm_of_another_width_than_the_convolution_is_kept():
    # conv_bn_pairs lists structure only; a BatchNorm whose feature count is not the convolution's
    # output channels holds no per-channel map for it and is left alone (reported in kept).
    from pneumoseg.models.fuse import fuse_batchnorm

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(8)).eval()
    result = fuse_batchnorm(model)
    assert result.folded == []
    assert "8 features" in result.kept["1"]


def test_a_compiled_frozen_block_still_trains_conv1():
    # Frozen sub-pixel weights are precomputed constants: a forward that wants conv1's gradient must
    # not use them, compiled too (a trace cannot end the freeze, so it must compute from conv1's weight).
    # The reference: the same block unfrozen (reference formulation) in eager mode.
    import copy

    from pneumoseg.models.decoders import DecoderBlock, freeze_subpixel_weights

    torch.manual_seed(0)
    block = _with_statistics(DecoderBlock(4, 3, 5, None))
    reference = copy.deepcopy(block)
    reference.subpixel = False
    x, skip = torch.randn(2, 4, 5, 6), torch.randn(2, 3, 10, 12)
    reference(x, skip).square().sum().backward()

    assert freeze_subpixel_weights(block) == 1
    torch._dynamo.reset()
    torch.compile(block, backend="eager", fullgraph=True)(x, skip).square().sum().backward()
    torch._dynamo.reset()
    grad = block.conv1[0].weight.grad
    assert grad is not None
    torch.testing.assert_close(grad, reference.conv1[0].weight.grad, rtol=1e-4, atol=1e-5)
