"""U-Net++ decoder (Zhou et al., 2018) of segmentation_models_pytorch's design
(``decoders/unetplusplus/decoder.py``): nested dense skip pathways. Node ``x_{d}_{l}`` upsamples node
``x_{d}_{l-1}`` (or, for ``d == l``, the encoder's features one stride deeper) and concatenates the
nodes ``x_{d+1..l}_{l}`` and the encoder's features at that stride; a last node ``x_0_4`` brings the
result to full resolution without skip features."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .blocks import DecoderBlock

__all__ = ["UnetPlusPlusDecoder"]


class UnetPlusPlusDecoder(nn.Module):
    """Arguments as ``UnetDecoder``. Keys: ``blocks.x_{depth}_{layer}.*`` as smp's."""

    def __init__(self, encoder_channels: Sequence[int], decoder_channels: Sequence[int],
                 attention: Optional[str] = None) -> None:
        super().__init__()
        deepest_first = list(encoder_channels)[::-1]
        in_channels = [deepest_first[0], *decoder_channels[:-1]]
        skip_channels = [*deepest_first[1:], 0]
        self.depth = len(in_channels) - 1
        self.center = nn.Identity()
        blocks = {}
        for layer in range(self.depth):
            for depth in range(layer + 1):
                if depth == 0:
                    in_ch, out_ch = in_channels[layer], decoder_channels[layer]
                    skip_ch = skip_channels[layer] * (layer + 1)
                else:
                    # inner nodes keep the width of the encoder features they sit beside
                    in_ch, out_ch = skip_channels[layer - 1], skip_channels[layer]
                    skip_ch = skip_channels[layer] * (layer + 1 - depth)
                blocks[f"x_{depth}_{layer}"] = DecoderBlock(in_ch, skip_ch, out_ch, attention)
        blocks[f"x_0_{self.depth}"] = DecoderBlock(in_channels[-1], 0, decoder_channels[-1], attention)
        self.blocks = nn.ModuleDict(blocks)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        feats = list(features)[::-1]
        feats[0] = self.center(feats[0])
        nodes: dict[str, torch.Tensor] = {}
        for layer in range(self.depth):
            for depth in range(self.depth - layer):
                if layer == 0:
                    nodes[f"x_{depth}_{depth}"] = self.blocks[f"x_{depth}_{depth}"](feats[depth], feats[depth + 1])
                else:
                    col = depth + layer
                    newer = [nodes[f"x_{i}_{col}"] for i in range(depth + 1, col + 1)]
                    skip = torch.cat(newer + [feats[col + 1]], dim=1)
                    nodes[f"x_{depth}_{col}"] = self.blocks[f"x_{depth}_{col}"](nodes[f"x_{depth}_{col - 1}"], skip)
        return self.blocks[f"x_0_{self.depth}"](nodes[f"x_0_{self.depth - 1}"])
