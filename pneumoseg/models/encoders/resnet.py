"""ResNet, ResNeXt and SE-ResNeXt with timm's module names (``timm/models/resnet.py``), plus
``resnet_tiny``, pneumoseg's own small encoder for the demo and the tests."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._base import Encoder, init_weights, make_divisible

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "SEModule"]


class SEModule(nn.Module):
    """Squeeze-and-excitation as timm's ``SEModule``: 1x1 convolutions with bias, ReLU, sigmoid gate."""

    def __init__(self, channels: int, rd_ratio: float = 1.0 / 16) -> None:
        super().__init__()
        rd_channels = make_divisible(channels * rd_ratio, 8, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


def _downsample(in_channels: int, out_channels: int, stride: int) -> Optional[nn.Module]:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, *, cardinality: int = 1,
                 base_width: int = 64, se: bool = False) -> None:
        super().__init__()
        if cardinality != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only cardinality=1 and base_width=64")
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.se = SEModule(out_channels) if se else None
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, out_channels, stride)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        if self.se is not None:
            x = self.se(x)
        return self.act2(x + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, *, cardinality: int = 1,
                 base_width: int = 64, se: bool = False) -> None:
        super().__init__()
        width = int(planes * (base_width / 64)) * cardinality
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.se = SEModule(out_channels) if se else None
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, out_channels, stride)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = self.se(x)
        return self.act3(x + shortcut)


class ResNet(Encoder):
    """timm's ResNet family: 7x7 stem + max-pool, four stages, global average pool, ``fc``.
    Pyramid: the stem's activation (stride 2), then ``layer1`` .. ``layer4`` (strides 4 .. 32)."""

    stem_weights = ("conv1.weight",)
    head_modules = ("fc",)

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        *,
        widths: tuple[int, int, int, int] = (64, 128, 256, 512),
        stem_width: int = 64,
        cardinality: int = 1,
        base_width: int = 64,
        se: bool = False,
        in_channels: int = 3,
        num_classes: int = 1000,
        features_only: bool = False,
    ) -> None:
        super().__init__(in_channels=in_channels, num_classes=num_classes, features_only=features_only)
        self.conv1 = nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = stem_width
        stages = []
        for i, (planes, depth) in enumerate(zip(widths, layers)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(channels, planes, stride, cardinality=cardinality, base_width=base_width, se=se))
                channels = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = channels
        self.out_channels = (stem_width, *(w * block.expansion for w in widths))
        if not features_only:
            self.fc = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self)
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):  # the blocks that have zero_init_last
                m.zero_init_last()

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        s2 = self.act1(self.bn1(self.conv1(x)))
        s4 = self.layer1(self.maxpool(s2))
        s8 = self.layer2(s4)
        s16 = self.layer3(s8)
        return [s2, s4, s8, s16, self.layer4(s16)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


def resnet34(**kwargs) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), **kwargs)


def resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)


def seresnext50_32x4d(**kwargs) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), cardinality=32, base_width=4, se=True, **kwargs)


def resnet_tiny(**kwargs) -> ResNet:
    """pneumoseg's small encoder (not in timm): ResNet with one BasicBlock per stage and widths
    16-128 (about 0.7 M parameters), so the demo and the tests train in minutes on two CPU cores."""
    return ResNet(BasicBlock, (1, 1, 1, 1), widths=(16, 32, 64, 128), stem_width=16, **kwargs)
