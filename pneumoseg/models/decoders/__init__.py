"""Segmentation decoders of segmentation_models_pytorch's design, with its module names."""

from .blocks import ATTENTIONS, Attention, Conv2dReLU, DecoderBlock, SCSEModule
from .unet import UnetDecoder
from .unetplusplus import UnetPlusPlusDecoder

DECODERS = {"unet": UnetDecoder, "unet++": UnetPlusPlusDecoder}

__all__ = ["ATTENTIONS", "DECODERS", "Attention", "Conv2dReLU", "DecoderBlock", "SCSEModule", "UnetDecoder",
           "UnetPlusPlusDecoder"]
