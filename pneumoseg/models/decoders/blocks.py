"""The decoders' building blocks, with segmentation_models_pytorch's module names
(``segmentation_models_pytorch/base/modules.py``), so an smp decoder's state-dict keys and shapes are ours."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["ATTENTIONS", "Conv2dReLU", "SCSEModule", "Attention", "DecoderBlock", "initialize_decoder",
           "initialize_head"]

ATTENTIONS = (None, "scse")


class Conv2dReLU(nn.Sequential):
    """3x3 convolution (no bias: BatchNorm follows), BatchNorm, ReLU; keys ``0.weight``, ``1.*``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class SCSEModule(nn.Module):
    """Concurrent spatial and channel squeeze-and-excitation (Roy et al., 2018):
    ``x * cSE(x) + x * sSE(x)``, cSE a bottleneck of ``channels // reduction`` on the pooled map."""

    def __init__(self, in_channels: int, reduction: int = 16) -> None:
        super().__init__()
        # smp uses in_channels // reduction; at least one channel, where smp would fail to build.
        hidden = max(1, in_channels // reduction)
        self.cSE = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, in_channels, 1),
            nn.Sigmoid(),
        )
        self.sSE = nn.Sequential(nn.Conv2d(in_channels, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.cSE(x) + x * self.sSE(x)


class Attention(nn.Module):
    """``None`` (identity) or ``"scse"``; the wrapper keeps smp's ``attention.`` level in the keys."""

    def __init__(self, name: Optional[str], in_channels: int) -> None:
        super().__init__()
        self.attention = nn.Identity() if name is None else SCSEModule(in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x)


class DecoderBlock(nn.Module):
    """Nearest x2 upsampling, concatenation with the skip features, [attention], conv-BN-ReLU x2,
    [attention]: smp's ``UnetDecoderBlock`` / UNet++ ``DecoderBlock``.

    A block without skip features (the last one, at full resolution) has no ``attention1``: smp builds
    one there but never calls it. Its keys in an smp checkpoint are dropped on loading (they cannot
    change the function), so smp state dicts still load with ``strict=True``, and every parameter
    here gets a gradient (no ``find_unused_parameters`` under DDP).
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, attention: Optional[str]) -> None:
        super().__init__()
        self.has_skip = skip_channels > 0
        self.conv1 = Conv2dReLU(in_channels + skip_channels, out_channels)
        if self.has_skip:
            self.attention1 = Attention(attention, in_channels + skip_channels)
        else:
            self.register_load_state_dict_pre_hook(_drop_unused_attention1)
        self.conv2 = Conv2dReLU(out_channels, out_channels)
        self.attention2 = Attention(attention, out_channels)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = self.attention1(torch.cat([x, skip], dim=1))
        return self.attention2(self.conv2(self.conv1(x)))


def _drop_unused_attention1(module, state_dict, prefix, *args):
    # load_state_dict pre-hook: (module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
    for key in [k for k in state_dict if k.startswith(prefix + "attention1.")]:
        del state_dict[key]


def initialize_decoder(module: nn.Module) -> None:
    """smp's decoder init: Kaiming-uniform (fan in, ReLU) convolutions, unit BatchNorm."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def initialize_head(module: nn.Module) -> None:
    """smp's head init: Xavier-uniform weights, zero bias."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
