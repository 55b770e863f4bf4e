"""Xception (Chollet 2017) with the module names of timm's ``legacy_xception`` (``timm/models/xception.py``,
the Keras port via Cadene's pretrainedmodels): the seed solution's second classifier."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._base import Encoder

__all__ = ["Xception", "SeparableConv2d", "XceptionBlock", "legacy_xception"]


class SeparableConv2d(nn.Module):
    """Depthwise ``conv1`` then ``pointwise`` 1x1, both without bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size, padding=padding, groups=in_channels,
                               bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.conv1(x))


class XceptionBlock(nn.Module):
    """timm's xception ``Block``: ``rep`` = ``reps`` x (ReLU, separable conv, BN), without the first
    ReLU when ``start_with_relu`` is false, then a 3x3 stride-2 max-pool when strided; ``skip`` +
    ``skipbn`` (1x1 conv) when the shape changes. The ReLU modules sit in ``rep`` so the parameter
    indices (``rep.1``, ``rep.4`` ...) are timm's."""

    def __init__(self, in_channels: int, out_channels: int, reps: int, stride: int = 1, *,
                 start_with_relu: bool = True, grow_first: bool = True) -> None:
        super().__init__()
        if out_channels != in_channels or stride != 1:
            self.skip: Optional[nn.Conv2d] = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            self.skipbn = nn.BatchNorm2d(out_channels)
        else:
            self.skip = None
        rep: list[nn.Module] = []
        for i in range(reps):
            if grow_first:
                cin, cout = (in_channels if i == 0 else out_channels), out_channels
            else:
                cin, cout = in_channels, (in_channels if i < reps - 1 else out_channels)
            # the first ReLU must not be in place: its input is also the skip branch's input
            rep += [nn.ReLU(inplace=i > 0), SeparableConv2d(cin, cout), nn.BatchNorm2d(cout)]
        if not start_with_relu:
            rep = rep[1:]
        if stride != 1:
            rep.append(nn.MaxPool2d(3, stride, 1))
        self.rep = nn.Sequential(*rep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.skip is None else self.skipbn(self.skip(x))
        return self.rep(x) + shortcut


class Xception(Encoder):
    """``conv1``/``bn1``/``act1`` (3x3 stride 2), ``conv2``/``bn2``/``act2`` (3x3), ``block1`` ..
    ``block12``, separable ``conv3``/``bn3``/``act3`` and ``conv4``/``bn4``/``act4``, global average pool,
    ``fc``.

    Pyramid (timm's ``feature_info``): ``act2`` (stride 2), then the ReLU'd outputs of ``block1``,
    ``block2`` and ``block11`` (what ``block2.rep.0``, ``block3.rep.0``, ``block12.rep.0`` see: strides
    4, 8, 16) and ``act4`` (stride 32).

    timm's stem convolutions are unpadded, so its stride-2 map of a 192-pixel image is 93 pixels, not
    96, and every level is off by a pixel or two. A decoder needs exact ``size / stride`` maps, so with
    ``pad_stem=True`` (the default when ``features_only``, as segmentation_models_pytorch does) both stem
    convolutions get padding 1. The weights are the same; only the border pixels of the stem differ.
    The classifier (``features_only=False``) keeps timm's function exactly unless asked otherwise."""

    stem_weights = ("conv1.weight",)
    head_modules = ("fc",)
    classifier_module = "fc"

    def __init__(self, *, in_channels: int = 3, num_classes: int = 1000, features_only: bool = False,
                 pad_stem: bool | None = None, drop_rate: float = 0.0) -> None:
        super().__init__(in_channels=in_channels, num_classes=num_classes, features_only=features_only)
        self.pad_stem = features_only if pad_stem is None else bool(pad_stem)
        stem_pad = 1 if self.pad_stem else 0
        self.drop_rate = float(drop_rate)
        self.conv1 = nn.Conv2d(in_channels, 32, 3, stride=2, padding=stem_pad, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=stem_pad, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.act2 = nn.ReLU(inplace=True)
        self.block1 = XceptionBlock(64, 128, 2, 2, start_with_relu=False)
        self.block2 = XceptionBlock(128, 256, 2, 2)
        self.block3 = XceptionBlock(256, 728, 2, 2)
        for i in range(4, 12):
            self.add_module(f"block{i}", XceptionBlock(728, 728, 3, 1))
        self.block12 = XceptionBlock(728, 1024, 2, 2, grow_first=False)
        self.conv3 = SeparableConv2d(1024, 1536)
        self.bn3 = nn.BatchNorm2d(1536)
        self.act3 = nn.ReLU(inplace=True)
        self.conv4 = SeparableConv2d(1536, 2048)
        self.bn4 = nn.BatchNorm2d(2048)
        self.act4 = nn.ReLU(inplace=True)
        self.num_features = 2048
        self.out_channels = (64, 128, 256, 728, 2048)
        if not features_only:
            self.fc = nn.Linear(2048, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.uniform_(m.bias, -bound, bound)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(x)))

    def _middle(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(4, 12):
            x = getattr(self, f"block{i}")(x)
        return x

    def _exit(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act3(self.bn3(self.conv3(self.block12(x))))
        return self.act4(self.bn4(self.conv4(x)))

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        s2 = self._stem(x)
        b1 = self.block1(s2)
        b2 = self.block2(b1)
        b11 = self._middle(self.block3(b2))
        return [s2, F.relu(b1), F.relu(b2), F.relu(b11), self._exit(b11)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self._stem(x))))
        return self._exit(self._middle(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean((2, 3))
        if self.drop_rate > 0.0:
            x = F.dropout(x, self.drop_rate, self.training)
        return self.fc(x)


def legacy_xception(**kwargs) -> Xception:
    return Xception(**kwargs)
