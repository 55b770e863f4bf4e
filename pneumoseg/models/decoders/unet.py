"""U-Net decoder of segmentation_models_pytorch's design (``decoders/unet/decoder.py``): from the
deepest features up, five blocks of nearest x2 upsampling, concatenation with the encoder's features
of that stride (none for the last block, at full resolution) and conv-BN-ReLU x2."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .blocks import DecoderBlock

__all__ = ["UnetDecoder"]


class UnetDecoder(nn.Module):
    """``encoder_channels``: the channels of the features at strides 2, 4, 8, 16, 32;
    ``decoder_channels``: the output channels of the five blocks (strides 16, 8, 4, 2, 1).
    Keys: ``blocks.{0..4}.{conv1,attention1,conv2,attention2}...`` as smp's (its ``center`` is an
    identity for every non-VGG encoder and has no parameters)."""

    def __init__(self, encoder_channels: Sequence[int], decoder_channels: Sequence[int],
                 attention: Optional[str] = None) -> None:
        super().__init__()
        deepest_first = list(encoder_channels)[::-1]
        in_channels = [deepest_first[0], *decoder_channels[:-1]]
        skip_channels = [*deepest_first[1:], 0]
        self.center = nn.Identity()
        self.blocks = nn.ModuleList(
            DecoderBlock(i, s, o, attention) for i, s, o in zip(in_channels, skip_channels, decoder_channels)
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        deepest_first = list(features)[::-1]
        x = self.center(deepest_first[0])
        skips = deepest_first[1:]
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < len(skips) else None)
        return x
