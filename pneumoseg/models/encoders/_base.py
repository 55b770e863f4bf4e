"""What every encoder is: a timm-named network that is either a classifier (pooling + linear head,
``state_dict()`` identical to timm's) or, with ``features_only=True``, a feature pyramid without the
head (as ``timm.create_model(..., features_only=True)``), so one checkpoint serves both."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["Encoder", "make_divisible", "init_weights"]


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """timm's channel rounding (the nearest multiple of ``divisor``, never more than 10% down)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convolutions, unit BatchNorm, small uniform linear layers (timm's ResNet init)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.in_features)
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Encoder(nn.Module):
    """Base class of the encoders.

    Subclasses build their modules with timm's names and implement ``forward_pyramid`` (the five
    feature maps at strides 2, 4, 8, 16, 32), ``forward_features`` (timm's: the map that is pooled) and
    ``forward_head``. With ``features_only=True`` the head modules (``head_modules``) are not built and
    ``forward`` returns the pyramid; otherwise ``forward`` returns ``(N, num_classes)`` logits.

    Class attributes a subclass sets:
      - ``stem_weights``: names of the parameters that see the input channels (the first convolution),
        adapted by ``load_pretrained`` when a 3-channel checkpoint meets ``in_channels != 3``;
      - ``head_modules``: names of the modules of the classification head (skipped when features_only);
      - ``classifier_module``: the name of the final linear layer among them (its shape depends on
        ``num_classes``; ``load_pretrained``'s ``head`` option decides about it). Defaults to the last
        of ``head_modules``.
    Instance attributes: ``out_channels`` (5 ints), ``num_features`` (channels into the head),
    ``in_channels``, ``num_classes``, ``features_only``, ``name``.
    """

    stem_weights: tuple[str, ...] = ()
    head_modules: tuple[str, ...] = ()
    classifier_module: str | None = None
    #: a classifier's construction arguments (set by create_classifier), for build_model
    config: dict[str, Any]

    def __init__(self, *, in_channels: int, num_classes: int, features_only: bool) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.num_classes = 0 if features_only else int(num_classes)
        self.features_only = bool(features_only)
        self.name = type(self).__name__
        self.out_channels: tuple[int, ...] = ()
        self.num_features = 0

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self.forward_pyramid(x)
        return self.forward_head(self.forward_features(x))
