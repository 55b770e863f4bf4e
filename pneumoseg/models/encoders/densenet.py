"""DenseNet-121 with timm's (and torchvision's) module names (``timm/models/densenet.py``): CheXNet's
network. Every BatchNorm is followed by a ReLU (timm's ``BatchNormAct2d``), ``norm5`` included."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol, cast

import torch
from torch import nn

from ._base import Encoder
from ._layers import BatchNormAct2d

__all__ = ["DenseNet", "DenseLayer", "DenseBlock", "DenseTransition", "densenet121"]

if TYPE_CHECKING:
    class _Features(Protocol):
        """DenseNet.features' children: added with add_module, so torch types them Tensor | Module."""

        conv0: nn.Conv2d
        norm0: BatchNormAct2d
        pool0: nn.MaxPool2d
        denseblock1: DenseBlock
        denseblock2: DenseBlock
        denseblock3: DenseBlock
        denseblock4: DenseBlock
        transition1: DenseTransition
        transition2: DenseTransition
        transition3: DenseTransition
        norm5: BatchNormAct2d


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv to ``bn_size * growth_rate`` channels, BN-ReLU-3x3 conv to ``growth_rate``."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = BatchNormAct2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, 1, bias=False)
        self.norm2 = BatchNormAct2d(bn_size * growth_rate)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(self.norm1(torch.cat(features, 1)))
        return self.conv2(self.norm2(x))


class DenseBlock(nn.ModuleDict):
    """``denselayer1`` .. ``denselayerN``; each sees the concatenation of the input and all earlier
    layers' outputs, and the block returns the concatenation of them all."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseTransition(nn.Sequential):
    """BN-ReLU, 1x1 conv halving the channels, 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.add_module("norm", BatchNormAct2d(in_channels))
        self.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, bias=False))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


class DenseNet(Encoder):
    """DenseNet-BC: ``features`` = 7x7 stem (``conv0``, ``norm0``, ``pool0``), dense blocks and
    transitions, ``norm5``; global average pool; ``classifier``.
    Pyramid (timm's ``feature_info``): ``norm0`` (stride 2), ``denseblock1`` .. ``denseblock3`` (strides
    4, 8, 16: the blocks' outputs before their transitions), ``norm5`` (stride 32)."""

    stem_weights = ("features.conv0.weight",)
    head_modules = ("classifier",)
    classifier_module = "classifier"

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        bn_size: int = 4,
        *,
        in_channels: int = 3,
        num_classes: int = 1000,
        features_only: bool = False,
    ) -> None:
        super().__init__(in_channels=in_channels, num_classes=num_classes, features_only=features_only)
        if len(block_config) != 4:
            raise ValueError("DenseNet needs four dense blocks for a stride 2..32 pyramid")
        stem = 2 * growth_rate
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False))
        self.features.add_module("norm0", BatchNormAct2d(stem))
        self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        channels = stem
        out_channels = [stem]
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(num_layers, channels, growth_rate, bn_size))
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                out_channels.append(channels)
                self.features.add_module(f"transition{i + 1}", DenseTransition(channels, channels // 2))
                channels //= 2
        self.features.add_module("norm5", BatchNormAct2d(channels))
        out_channels.append(channels)
        self.out_channels = tuple(out_channels)
        self.num_features = channels
        if not features_only:
            self.classifier = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's / timm's DenseNet initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = cast("_Features", self.features)
        s2 = f.norm0(f.conv0(x))
        s4 = f.denseblock1(f.pool0(s2))
        s8 = f.denseblock2(f.transition1(s4))
        s16 = f.denseblock3(f.transition2(s8))
        s32 = f.norm5(f.denseblock4(f.transition3(s16)))
        return [s2, s4, s8, s16, s32]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x.mean((2, 3)))


def densenet121(**kwargs) -> DenseNet:
    return DenseNet(32, (6, 12, 24, 16), 4, **kwargs)
