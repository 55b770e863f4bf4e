"""Segmentation decoders of segmentation_models_pytorch's design, with its module names."""

from .blocks import (ATTENTIONS, Attention, Conv2dReLU, DecoderBlock, SCSEModule, set_subpixel_decoding,
                     subpixel_decoding, upsample_conv3x3)
from .unet import UnetDecoder
from .unetplusplus import UnetPlusPlusDecoder

DECODERS = {"unet": UnetDecoder, "unet++": UnetPlusPlusDecoder}

__all__ = ["ATTENTIONS", "DECODERS", "Attention", "Conv2dReLU", "DecoderBlock", "SCSEModule", "UnetDecoder",
           "UnetPlusPlusDecoder", "set_subpixel_decoding", "subpixel_decoding", "upsample_conv3x3"]
