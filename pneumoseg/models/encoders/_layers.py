"""Small layers the timm-named encoders share, in plain torch ops (no custom autograd), so
``torch.compile(fullgraph=True)``, channels_last and autocast see ordinary aten calls."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BatchNormAct2d", "Conv2dSame", "DropPath", "create_conv2d", "symmetric_padding"]


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm followed by an activation, as timm's ``BatchNormAct2d``: a ``BatchNorm2d`` subclass, so
    its state dict is exactly a BatchNorm's (the activation has no parameters)."""

    def __init__(self, num_features: int, *, act: type[nn.Module] | None = nn.ReLU, eps: float = 1e-5,
                 momentum: float = 0.1) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.act = act(inplace=True) if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


def symmetric_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    """timm's ``get_padding``: PyTorch-style padding that keeps ``ceil(size / stride)`` for odd kernels."""
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


class Conv2dSame(nn.Conv2d):
    """TensorFlow's ``SAME`` padding for a strided convolution: pad ``total = max((ceil(n / s) - 1) * s +
    (k - 1) * d + 1 - n, 0)`` with ``total // 2`` before and the rest after, per spatial axis (timm's
    ``Conv2dSame``). The pad depends on the input size, so it is computed in ``forward``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, dilation=dilation,
                         groups=groups, bias=bias)
        # With a receptive field at least the stride the total pad is never negative, so the clamp
        # (a data-dependent max under dynamic shapes) is only needed otherwise.
        self._needs_clamp = (kernel_size - 1) * dilation + 1 < stride

    def _pad(self, n, axis: int):
        k, s, d = self.kernel_size[axis], self.stride[axis], self.dilation[axis]
        total = ((n + s - 1) // s - 1) * s + (k - 1) * d + 1 - n
        if self._needs_clamp:
            total = max(total, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._pad(x.shape[-2], 0)
        left, right = self._pad(x.shape[-1], 1)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def create_conv2d(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, dilation: int = 1,
                  groups: int = 1, bias: bool = False, padding: str = "") -> nn.Conv2d:
    """timm's ``create_conv2d`` for the two padding modes we need: ``""`` (symmetric PyTorch padding)
    and ``"same"`` (TensorFlow's: static and symmetric where it can be, else ``Conv2dSame``)."""
    if padding not in ("", "same"):
        raise ValueError(f"padding must be '' or 'same', got {padding!r}")
    static = stride == 1 and (dilation * (kernel_size - 1)) % 2 == 0
    if padding == "same" and not static:
        return Conv2dSame(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation,
                          groups=groups, bias=bias)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                     padding=symmetric_padding(kernel_size, stride, dilation), dilation=dilation, groups=groups,
                     bias=bias)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath``): in training, zero a residual branch for a
    fraction ``p`` of the samples and scale the others by ``1 / (1 - p)``; identity in eval mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p!r}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * (mask / keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"
