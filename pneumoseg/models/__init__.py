"""Networks (need torch): timm-named encoders, the stage-1 classifier, the stage-2 segmenters."""

from .classifier import create_classifier
from .encoders import ENCODERS, Encoder, create_encoder, list_encoders
from .segmenter import ARCHITECTURES, Segmenter, create_segmenter
from .config import build_model
from .pretrained import LoadResult, adapt_input_conv, load_pretrained, read_state_dict

__all__ = ["Encoder", "ENCODERS", "create_encoder", "create_classifier", "list_encoders",
           "ARCHITECTURES", "Segmenter", "create_segmenter", "build_model",
           "load_pretrained", "read_state_dict", "adapt_input_conv", "LoadResult"]
