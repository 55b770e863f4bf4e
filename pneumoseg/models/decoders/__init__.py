"""Segmentation decoders of segmentation_models_pytorch's design, with its module names."""

from .blocks import (ATTENTIONS, Attention, Conv2dReLU, DecoderBlock, SCSEModule, freeze_subpixel_weights,
                     set_subpixel_decoding, subpixel_decoding, unfreeze_subpixel_weights, upsample_conv3x3)
from .unet import UnetDecoder
from .unetplusplus import UnetPlusPlusDecoder

DECODERS = {"unet": UnetDecoder, "unet++": UnetPlusPlusDecoder}

__all__ = ["ATTENTIONS", "DECODERS", "Attention", "Conv2dReLU", "DecoderBlock", "SCSEModule", "UnetDecoder",
           "UnetPlusPlusDecoder", "freeze_subpixel_weights", "set_subpixel_decoding", "subpixel_decoding",
           "unfreeze_subpixel_weights", "upsample_conv3x3"]
