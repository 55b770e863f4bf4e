"""EfficientNet B0-B4 with timm's module names (``timm/models/efficientnet.py`` and the EfficientNet
builder), in both of timm's flavours:

- ``efficientnet_bN``: PyTorch padding, BatchNorm eps 1e-5 (timm's own trainings);
- ``tf_efficientnet_bN``: TensorFlow ``SAME`` padding (asymmetric for strided convolutions) and
  BatchNorm eps 1e-3, which the ported Google checkpoints (and many Kaggle solutions) need.

Both have the same state dict. Activation SiLU (swish), squeeze-excitation in every block, drop-path
off by default (timm's ``create_model`` default)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._base import Encoder, make_divisible
from ._layers import BatchNormAct2d, DropPath, create_conv2d

__all__ = ["EfficientNet", "SqueezeExcite", "DepthwiseSeparableConv", "InvertedResidual", "STAGES_B0",
           "SCALING", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
           "efficientnet_b4", "tf_efficientnet_b0", "tf_efficientnet_b1", "tf_efficientnet_b2",
           "tf_efficientnet_b3", "tf_efficientnet_b4"]


@dataclass(frozen=True)
class StageSpec:
    """One stage of the base network (timm's ``ds_r1_k3_s1_e1_c16_se0.25`` strings, spelled out)."""

    block: str  # "ds": depthwise-separable, "ir": inverted residual (MBConv)
    repeats: int
    kernel: int
    stride: int
    expansion: float
    channels: int
    se_ratio: float = 0.25


#: EfficientNet-B0 (Tan & Le 2019, table 1); B1-B4 scale its widths and depths.
STAGES_B0 = (
    StageSpec("ds", 1, 3, 1, 1.0, 16),
    StageSpec("ir", 2, 3, 2, 6.0, 24),
    StageSpec("ir", 2, 5, 2, 6.0, 40),
    StageSpec("ir", 3, 3, 2, 6.0, 80),
    StageSpec("ir", 3, 5, 1, 6.0, 112),
    StageSpec("ir", 4, 5, 2, 6.0, 192),
    StageSpec("ir", 1, 3, 1, 6.0, 320),
)

#: name suffix -> (channel multiplier, depth multiplier), timm's ``_gen_efficientnet`` arguments
SCALING = {"b0": (1.0, 1.0), "b1": (1.0, 1.1), "b2": (1.1, 1.2), "b3": (1.2, 1.4), "b4": (1.4, 1.8)}

_TF_BN_EPS = 1e-3


def round_channels(channels: float, multiplier: float) -> int:
    return make_divisible(channels * multiplier, 8)


class SqueezeExcite(nn.Module):
    """timm's EfficientNet ``SqueezeExcite``: global mean, 1x1 conv down, block activation, 1x1 conv
    up, sigmoid gate."""

    def __init__(self, channels: int, reduced: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act1 = act(inplace=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


def _se_reduced(se_channels: int, se_ratio: float, expansion: float) -> int:
    # timm divides the block's SE ratio by its expansion (the ratio is relative to the block input) and
    # rounds with Python's round(); the same float operations give the same channel counts.
    return round(se_channels * (se_ratio / expansion))


class DepthwiseSeparableConv(nn.Module):
    """Depthwise conv-BN-act, squeeze-excite, pointwise conv-BN (no activation); residual when the
    shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, *, se_ratio: float,
                 act: type[nn.Module], bn_eps: float, padding: str, drop_path: float) -> None:
        super().__init__()
        self.has_skip = stride == 1 and in_channels == out_channels
        self.conv_dw = create_conv2d(in_channels, in_channels, kernel, stride=stride, groups=in_channels,
                                     padding=padding)
        self.bn1 = BatchNormAct2d(in_channels, act=act, eps=bn_eps)
        self.se = SqueezeExcite(in_channels, _se_reduced(in_channels, se_ratio, 1.0), act)
        self.conv_pw = create_conv2d(in_channels, out_channels, 1, padding=padding)
        self.bn2 = BatchNormAct2d(out_channels, act=None, eps=bn_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(self.se(self.bn1(self.conv_dw(x)))))
        return self.drop_path(y) + x if self.has_skip else y


class InvertedResidual(nn.Module):
    """MBConv: pointwise expansion conv-BN-act, depthwise conv-BN-act, squeeze-excite, pointwise
    projection conv-BN (no activation); residual when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, *, expansion: float,
                 se_ratio: float, act: type[nn.Module], bn_eps: float, padding: str, drop_path: float) -> None:
        super().__init__()
        mid = make_divisible(in_channels * expansion)
        self.has_skip = stride == 1 and in_channels == out_channels
        self.conv_pw = create_conv2d(in_channels, mid, 1, padding=padding)
        self.bn1 = BatchNormAct2d(mid, act=act, eps=bn_eps)
        self.conv_dw = create_conv2d(mid, mid, kernel, stride=stride, groups=mid, padding=padding)
        self.bn2 = BatchNormAct2d(mid, act=act, eps=bn_eps)
        self.se = SqueezeExcite(mid, _se_reduced(mid, se_ratio, expansion), act)
        self.conv_pwl = create_conv2d(mid, out_channels, 1, padding=padding)
        self.bn3 = BatchNormAct2d(out_channels, act=None, eps=bn_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        y = self.bn3(self.conv_pwl(self.se(y)))
        return self.drop_path(y) + x if self.has_skip else y


class EfficientNet(Encoder):
    """``conv_stem`` + ``bn1`` (stride 2), ``blocks.0`` .. ``blocks.6`` (one ``nn.Sequential`` per stage),
    ``conv_head`` + ``bn2`` (1x1 to ``round(1280 * width)`` channels), global average pool,
    ``classifier``.

    Pyramid (timm's ``features_only``): the output of each stage after which the next one strides, and
    of the last: stages 0, 1, 2, 4, 6 (strides 2, 4, 8, 16, 32). ``features_only`` drops ``conv_head``,
    ``bn2`` and ``classifier``, as timm's ``EfficientNetFeatures`` does.

    ``depth_multiplier`` repeats each stage ``ceil(repeats * depth)`` times, ``width_multiplier`` scales
    and rounds every channel count to a multiple of 8 (stem and head included), as timm's builder does.
    ``drop_path_rate`` grows linearly over the blocks (timm: ``rate * block_index / block_count``)."""

    stem_weights = ("conv_stem.weight",)
    head_modules = ("conv_head", "bn2", "classifier")
    classifier_module = "classifier"

    def __init__(
        self,
        width_multiplier: float = 1.0,
        depth_multiplier: float = 1.0,
        *,
        tf_same_padding: bool = False,
        bn_eps: float | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        stages: tuple[StageSpec, ...] = STAGES_B0,
        in_channels: int = 3,
        num_classes: int = 1000,
        features_only: bool = False,
    ) -> None:
        super().__init__(in_channels=in_channels, num_classes=num_classes, features_only=features_only)
        act = nn.SiLU
        padding = "same" if tf_same_padding else ""
        bn_eps = (_TF_BN_EPS if tf_same_padding else 1e-5) if bn_eps is None else float(bn_eps)
        self.tf_same_padding = tf_same_padding
        self.drop_rate = float(drop_rate)

        stem = round_channels(32, width_multiplier)
        self.conv_stem = create_conv2d(in_channels, stem, 3, stride=2, padding=padding)
        self.bn1 = BatchNormAct2d(stem, act=act, eps=bn_eps)

        depths = [math.ceil(s.repeats * depth_multiplier) for s in stages]
        total, index = sum(depths), 0
        channels = stem
        blocks = []
        for spec, depth in zip(stages, depths):
            out = round_channels(spec.channels, width_multiplier)
            stage: list[nn.Module] = []
            for j in range(depth):
                stride = spec.stride if j == 0 else 1
                common: dict[str, Any] = dict(se_ratio=spec.se_ratio, act=act, bn_eps=bn_eps, padding=padding,
                              drop_path=drop_path_rate * index / total)
                if spec.block == "ds":
                    stage.append(DepthwiseSeparableConv(channels, out, spec.kernel, stride, **common))
                else:
                    stage.append(InvertedResidual(channels, out, spec.kernel, stride, expansion=spec.expansion,
                                                  **common))
                channels = out
                index += 1
            blocks.append(nn.Sequential(*stage))
        self.blocks = nn.Sequential(*blocks)

        # A stage is a pyramid level when the next one strides (or it is the last).
        self.pyramid_stages = tuple(i for i in range(len(stages))
                                    if i == len(stages) - 1 or stages[i + 1].stride > 1)
        if len(self.pyramid_stages) != 5 or stages[0].stride != 1:
            raise ValueError("the stage layout does not give a stride 2..32 pyramid")
        self.out_channels = tuple(round_channels(stages[i].channels, width_multiplier) for i in self.pyramid_stages)

        head = round_channels(1280, width_multiplier)
        if not features_only:
            self.conv_head = create_conv2d(channels, head, 1, padding=padding)
            self.bn2 = BatchNormAct2d(head, act=act, eps=bn_eps)
            self.classifier = nn.Linear(head, num_classes) if num_classes > 0 else nn.Identity()
        self.num_features = head
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's TensorFlow-style initialisation (_init_weight_goog)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.weight.shape[0])
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.bn1(self.conv_stem(x))
        features = []
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in self.pyramid_stages:
                features.append(x)
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.bn1(self.conv_stem(x)))
        return self.bn2(self.conv_head(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean((2, 3))
        if self.drop_rate > 0.0:
            x = nn.functional.dropout(x, self.drop_rate, self.training)
        return self.classifier(x)


def _builder(variant: str, tf: bool):
    width, depth = SCALING[variant]

    def build(**kwargs) -> EfficientNet:
        return EfficientNet(width, depth, tf_same_padding=tf, **kwargs)

    build.__name__ = f"{'tf_' if tf else ''}efficientnet_{variant}"
    build.__doc__ = (f"EfficientNet-{variant.upper()} (width x{width}, depth x{depth})"
                     + (", TensorFlow SAME padding and BatchNorm eps 1e-3" if tf else ""))
    return build


efficientnet_b0 = _builder("b0", False)
efficientnet_b1 = _builder("b1", False)
efficientnet_b2 = _builder("b2", False)
efficientnet_b3 = _builder("b3", False)
efficientnet_b4 = _builder("b4", False)
tf_efficientnet_b0 = _builder("b0", True)
tf_efficientnet_b1 = _builder("b1", True)
tf_efficientnet_b2 = _builder("b2", True)
tf_efficientnet_b3 = _builder("b3", True)
tf_efficientnet_b4 = _builder("b4", True)
