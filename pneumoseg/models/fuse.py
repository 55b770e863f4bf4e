"""Fold eval-mode BatchNorm into the convolution before it, for inference.

In eval mode a ``BatchNorm2d`` after a convolution is a per-channel affine map, so it can live in the
convolution's weight and bias: with ``s = gamma / sqrt(running_var + eps)``,
``w' = w * s`` (per output channel) and ``b' = (b - running_mean) * s + beta``. The BatchNorm is then
replaced by what it did after normalising: ``nn.Identity`` for a plain ``BatchNorm2d``, the activation
for our ``BatchNormAct2d``. The function computed is the same up to rounding (the folded weights are
computed in float64, then cast back). What it saves: on a CPU, oneDNN adds the bias inside the
convolution, so the BatchNorm pass is gone; on CUDA, torch's cuDNN path adds a convolution's bias with
its own in-place add, so each ``batch_norm_transform_input`` kernel (~16% of the pipeline's device time
in the H200 profile) becomes a cheaper broadcast add, not nothing.

Only pairs whose structure is evident from the module code are folded, and the convolution's output
must reach nothing but the BatchNorm:

- attribute pairs of the modules whose ``forward`` we wrote (exact type, so a subclass with another
  ``forward`` is left alone), listed in ``NAMED_PAIRS``:

  ===========================  ================================================================
  module                       pairs (convolution -> BatchNorm)
  ===========================  ================================================================
  ResNet / ResNeXt / SE        stem ``conv1 -> bn1``; BasicBlock ``conv{1,2} -> bn{1,2}``;
                               Bottleneck ``conv{1,2,3} -> bn{1,2,3}``
  EfficientNet (both flavours) ``conv_stem -> bn1``, ``conv_head -> bn2``; DepthwiseSeparableConv
                               ``conv_dw -> bn1``, ``conv_pw -> bn2``; InvertedResidual
                               ``conv_pw -> bn1``, ``conv_dw -> bn2``, ``conv_pwl -> bn3``
  legacy_xception              ``conv1 -> bn1``, ``conv2 -> bn2``, separable ``conv3``/``conv4``
                               (their ``pointwise``) ``-> bn3``/``bn4``; blocks ``skip -> skipbn``
  DenseNet                     DenseLayer ``conv1 -> norm2`` only
  ===========================  ================================================================

- neighbours in an ``nn.Sequential`` (or a subclass that keeps its ``forward``): a ``Conv2d`` (or a
  separable convolution, folded into its ``pointwise``) directly followed by a BatchNorm. This covers
  ResNet's ``downsample``, the Xception blocks' ``rep``, DenseNet's stem ``conv0 -> norm0`` and every
  decoder ``Conv2dReLU`` (U-Net and U-Net++, with or without scSE, which has no BatchNorm).

Left alone, by design: DenseNet's pre-activation BatchNorms (``norm1`` of each layer, the transitions'
``norm`` and ``norm5``) come after a concatenation or before their convolution, where no weight can
hold them. So every BatchNorm of the ResNets, EfficientNets, Xception and the decoders is folded,
and 59 of DenseNet-121's 121.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..errors import InvalidInputError
from .encoders._layers import BatchNormAct2d, Conv2dSame
from .encoders.densenet import DenseLayer
from .encoders.efficientnet import DepthwiseSeparableConv, EfficientNet, InvertedResidual
from .encoders.resnet import BasicBlock, Bottleneck, ResNet
from .encoders.xception import SeparableConv2d, Xception, XceptionBlock

__all__ = ["FuseResult", "NAMED_PAIRS", "fuse_batchnorm", "fold_conv_bn", "conv_bn_pairs"]

#: module type -> (convolution, BatchNorm) attribute paths its own ``forward`` chains with nothing
#: else reading the convolution's output (read from each forward; keep in step with them)
NAMED_PAIRS: dict[type, tuple[tuple[str, str], ...]] = {
    ResNet: (("conv1", "bn1"),),
    BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    EfficientNet: (("conv_stem", "bn1"), ("conv_head", "bn2")),
    DepthwiseSeparableConv: (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    InvertedResidual: (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
    Xception: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("conv4", "bn4")),
    XceptionBlock: (("skip", "skipbn"),),
    DenseLayer: (("conv1", "norm2"),),
}

# Convolutions whose forward is a plain conv2d of ``weight`` and ``bias`` (Conv2dSame pads first,
# which commutes with a per-output-channel affine map).
_CONVS = (nn.Conv2d, Conv2dSame)
# BatchNorms whose eval forward is exactly the affine map of their running statistics (+ activation).
_BATCHNORMS = (nn.BatchNorm2d, BatchNormAct2d)


@dataclass
class FuseResult:
    """What :func:`fuse_batchnorm` did: the model (the folded copy, or the model itself when
    ``inplace``), the folded ``(convolution, BatchNorm)`` module names, and the BatchNorms left as
    they were with the reason."""

    model: nn.Module
    folded: list[tuple[str, str]] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)


def _output_conv(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """The convolution whose output is ``module``'s output, if ``module`` ends in one."""
    if module is None:
        return None
    if type(module) in _CONVS:
        return module
    if type(module) is SeparableConv2d:  # depthwise, then pointwise: the pointwise is the last op
        return module.pointwise
    return None


def _keeps_sequential_forward(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """The ``(convolution, BatchNorm)`` module names in ``model`` that :func:`fuse_batchnorm` may fold
    (before its per-pair checks of mode, shape and type); the convolution name of a separable
    convolution is its ``pointwise``."""
    names = {id(m): n for n, m in model.named_modules()}
    pairs: list[tuple[str, str]] = []
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        for conv_attr, bn_attr in NAMED_PAIRS.get(type(module), ()):
            conv = _output_conv(getattr(module, conv_attr, None))
            bn = getattr(module, bn_attr, None)
            if conv is not None and type(bn) in _BATCHNORMS:
                pairs.append((names[id(conv)], f"{dot}{bn_attr}"))
        if _keeps_sequential_forward(module):
            children = list(module.named_children())
            for (_, first), (bn_name, bn) in zip(children, children[1:]):
                conv = _output_conv(first)
                if conv is not None and type(bn) in _BATCHNORMS:
                    pairs.append((names[id(conv)], f"{dot}{bn_name}"))
    # a module reached twice (shared) would be folded twice: keep each convolution and BatchNorm once
    seen: set[str] = set()
    unique = []
    for conv_name, bn_name in pairs:
        if conv_name in seen or bn_name in seen:
            continue
        seen.update((conv_name, bn_name))
        unique.append((conv_name, bn_name))
    return unique


@torch.no_grad()
def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded (weight, bias) in float64."""
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:
        # fuse_batchnorm keeps such a pair (_why_not); a direct fold_conv_bn call raised AttributeError
        raise InvalidInputError("the BatchNorm has no running statistics (track_running_stats=False): its "
                                "batch statistics cannot be folded into a convolution")
    # gamma / sqrt(running_var + eps): what folding multiplies each output channel by
    scale = var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    bias = (bias - mean.double()) * scale
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    return conv.weight.double() * scale.view(shape), bias


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode ``bn`` into ``conv``'s weight and bias, in place (float64 arithmetic, cast back
    to the convolution's dtype). The caller replaces ``bn`` afterwards. A BatchNorm without running
    statistics (``track_running_stats=False``) raises ``InvalidInputError``."""
    dtype = conv.weight.dtype
    weight, bias = _folded(conv, bn)
    conv.weight.copy_(weight.to(dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.to(dtype), requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(bias.to(dtype))


_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _hooked(module: nn.Module) -> bool:
    # the old weight_norm / spectral_norm recompute the weight in a forward pre-hook (a fold would be
    # overwritten); a user's hook would see other values or be dropped with the BatchNorm
    return any(getattr(module, hooks, None) for hooks in _HOOKS)


def _use_counts(model: nn.Module) -> dict[int, int]:
    """How many places of ``model`` hold each module and parameter (by id): folding writes a
    convolution's weight in place, so one used elsewhere too must be left alone."""
    counts: dict[int, int] = {}
    for _, item in [*model.named_modules(remove_duplicate=False), *model.named_parameters(remove_duplicate=False)]:
        counts[id(item)] = counts.get(id(item), 0) + 1
    return counts


@torch.no_grad()
def _why_not(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: Optional[torch.dtype], uses: dict[int, int]) -> Optional[str]:
    if conv.training or bn.training:
        return "in training mode (batch statistics cannot be folded)"
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics (track_running_stats=False)"
    if bn.num_features != conv.out_channels:
        return f"{bn.num_features} features after a convolution of {conv.out_channels} channels"
    if uses.get(id(conv), 0) > 1 or any(uses.get(id(p), 0) > 1 for p in (conv.weight, conv.bias) if p is not None):
        return "the convolution or its weight is shared with another part of the model (folding would change it too)"
    if _hooked(conv) or _hooked(bn):
        return "the convolution or the BatchNorm has hooks (weight_norm, spectral_norm or your own) folding would bypass"
    # The folded weight and bias must stay finite in the convolution's own dtype (the fold is cast back
    # into it) and where the network will run: float16 tops out at 65504.
    weight, bias = _folded(conv, bn)
    for run in {conv.weight.dtype, dtype or conv.weight.dtype}:
        top = torch.finfo(run).max
        for folded in (weight, bias):
            peak = folded.abs().max()
            if not bool(torch.isfinite(peak)):
                return "the folded weights are not finite (NaN or infinite BatchNorm statistics or weights)"
            if float(peak) > top:
                return f"the folded weights would overflow {run} (largest {float(peak):.3g})"
    return None


def _replacement(bn: nn.Module) -> nn.Module:
    # BatchNormAct2d keeps its activation (ReLU, SiLU, or Identity when it has none)
    return bn.act if isinstance(bn, BatchNormAct2d) else nn.Identity()


def fuse_batchnorm(model: nn.Module, *, inplace: bool = False, dtype: Optional[torch.dtype] = None) -> FuseResult:
    """Fold every foldable eval-mode BatchNorm of ``model`` into the convolution before it (see the
    module docstring for which pairs); the BatchNorms become identities (or their activation).

    - ``inplace=False`` (default) folds a deep copy and leaves ``model`` unchanged; ``True`` changes
      ``model`` itself (for a network built for inference only);
    - ``dtype``: the type the network will run in (``torch.float16``): a pair whose folded weights
      would not be finite in it is left unfolded.

    ``model`` must be in eval mode (``InvalidInputError`` otherwise): a training-mode BatchNorm
    normalises with each batch's statistics, which no weight can hold. A pair whose own modules are
    in training mode inside an eval model is left alone and reported in ``kept``."""
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"fuse_batchnorm needs a torch.nn.Module, got {type(model).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point
                                  and not dtype.is_complex):
        raise InvalidInputError(f"fuse_batchnorm's dtype must be None or a floating torch dtype (torch.float16), "
                                f"got {dtype!r}")
    if model.training:
        raise InvalidInputError("fuse_batchnorm folds eval-mode BatchNorm (running statistics); the model is in "
                                "training mode: call model.eval() first")
    if not inplace:
        import copy

        try:
            model = copy.deepcopy(model)
        except (RuntimeError, TypeError) as exc:  # e.g. the old weight_norm's computed weight
            raise InvalidInputError(f"fuse_batchnorm could not copy the model to fold it ({exc}); "
                                    "fold it in place with inplace=True") from exc
    modules = dict(model.named_modules())
    uses = _use_counts(model)
    result = FuseResult(model)
    for conv_name, bn_name in conv_bn_pairs(model):
        conv, bn = modules[conv_name], modules[bn_name]
        reason = _why_not(conv, bn, dtype, uses)
        if reason is not None:
            result.kept[bn_name] = reason
            continue
        fold_conv_bn(conv, bn)
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, _replacement(bn))
        result.folded.append((conv_name, bn_name))
    folded = {bn_name for _, bn_name in result.folded}
    for name, module in modules.items():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and name not in folded and name not in result.kept:
            result.kept[name] = "not directly after a convolution that feeds it alone"
    return result
