"""Stage 2: U-Net and U-Net++ segmenters of segmentation_models_pytorch's design on a timm-named
encoder, with an optional classification head on the deepest features (one network that segments
and gates, as the SIIM-ACR 4th place did).

Names: ``encoder.*`` is ``create_encoder(name, features_only=True)``, i.e. the classifier's keys minus
its head, so an ImageNet/CheXNet encoder checkpoint loads into ``model.encoder``. ``decoder.*``,
``segmentation_head.*`` and ``classification_head.*`` have the keys of ``smp.Unet`` /
``smp.UnetPlusPlus`` (``decoder_attention_type`` None or "scse", ``aux_params=dict(classes=1)``), and
the same shapes wherever our encoder's five feature widths equal smp's for that encoder: resnet34,
resnet50, seresnext50_32x4d, densenet121 and legacy_xception (smp's "xception") do; the EfficientNets
do not (timm's stride-2 features, which we follow, come after the first block; smp taps the stem),
so there the blocks that take the stride-2 features differ in width (U-Net: ``blocks.3``; U-Net++:
``x_*_3``). smp's resnet encoders use torchvision's names, which are ours, so an
``smp.Unet("resnet34")`` state dict loads here with ``strict=True`` and computes the same function
(checked against smp's own decoder code: identical in float64). smp's other encoders name their
weights their own way (pretrainedmodels, lukemelas); only their decoder and head keys carry over.

Bad input sizes raise ``InvalidInputError`` (eager, or ``torch.compile`` without ``fullgraph``); under
``torch.compile(fullgraph=True)`` dynamo cannot trace a ``raise`` and reports it as an unsupported
graph break that quotes our message.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from .._checks import show
from ..errors import InvalidInputError
from .decoders import ATTENTIONS, DECODERS
from .decoders.blocks import initialize_decoder, initialize_head
from .encoders import Encoder, check_size, create_encoder

__all__ = ["Segmenter", "SegmentationHead", "ClassificationHead", "create_segmenter", "ARCHITECTURES", "OUTPUT_STRIDE"]

ARCHITECTURES = tuple(DECODERS)
#: input height and width must be multiples of this (five stride-2 stages)
OUTPUT_STRIDE = 32
_POOLINGS = ("avg", "max")


class SegmentationHead(nn.Sequential):
    """3x3 convolution to ``classes`` logits (smp's head without upsampling or activation: keys ``0.*``)."""

    def __init__(self, in_channels: int, classes: int) -> None:
        super().__init__(nn.Conv2d(in_channels, classes, kernel_size=3, padding=1))


class ClassificationHead(nn.Sequential):
    """Global pooling, flatten, dropout, linear (smp's: keys ``3.*``)."""

    def __init__(self, in_channels: int, classes: int, pooling: str = "avg", dropout: float = 0.2) -> None:
        pool = nn.AdaptiveAvgPool2d(1) if pooling == "avg" else nn.AdaptiveMaxPool2d(1)
        drop = nn.Dropout(dropout) if dropout else nn.Identity()
        super().__init__(pool, nn.Flatten(), drop, nn.Linear(in_channels, classes))


class Segmenter(nn.Module):
    """Encoder -> decoder -> segmentation head, plus an optional classification head on the deepest
    features. ``forward(x)`` returns mask logits ``(N, classes, H, W)``, or with the classification head
    ``(mask_logits, class_logits (N, 1))``. ``forward`` is ``encode`` then ``decode`` (and ``classify``);
    a two-stage pipeline calls them itself, to decode only the images its gate lets through:

        features = model.encode(x)
        keep = model.classify(features).sigmoid().squeeze(1) > threshold
        masks = model.decode([f[keep] for f in features])

    ``config`` holds the construction arguments as a JSON-able dict (``pneumoseg.models.build_model``
    rebuilds the network from it).
    """

    def __init__(self, encoder: Encoder, decoder: nn.Module, segmentation_head: nn.Module,
                 classification_head: Optional[nn.Module], config: dict) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.segmentation_head = segmentation_head
        self.classification_head = classification_head
        self.config = config
        initialize_decoder(self.decoder)
        initialize_head(self.segmentation_head)
        if self.classification_head is not None:
            initialize_head(self.classification_head)

    @property
    def in_channels(self) -> int:
        return self.encoder.in_channels

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``InvalidInputError`` unless ``x`` is ``(N, in_channels, H, W)`` with H and W multiples
        of 32. Plain Python on static shapes, so ``torch.compile(fullgraph=True)`` traces through it."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InvalidInputError(f"segmenter input must be a 4-D tensor (N, C, H, W), got {shape}")
        n, c, h, w = x.shape
        if c != self.in_channels:
            raise InvalidInputError(
                f"segmenter expects {self.in_channels} input channel(s), got {c} (input shape {tuple(x.shape)})"
            )
        if h % OUTPUT_STRIDE or w % OUTPUT_STRIDE or not h or not w:
            ph, pw = (max(OUTPUT_STRIDE, -(-s // OUTPUT_STRIDE) * OUTPUT_STRIDE) for s in (h, w))
            raise InvalidInputError(
                f"input height and width must be positive multiples of {OUTPUT_STRIDE}, got {h}x{w}; pad or resize "
                f"to {ph}x{pw}"
            )
        weight = self._stem_weight()
        if not x.is_floating_point():
            want = weight.dtype if weight is not None else "floating point"
            raise InvalidInputError(f"segmenter input must be {want} as its weights, got {x.dtype} (convert an "
                                    "image with .float() and scale it as in training)")
        if weight is not None and x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            # torch's own message ("expected scalar type Double but found Float") names neither side
            raise InvalidInputError(f"segmenter input is {x.dtype} but its weights are {weight.dtype}; convert the "
                                    "input (or the model) or run under torch.autocast")

    def _stem_weight(self) -> Optional[torch.Tensor]:
        # attribute lookup, not get_parameter: torch.func.functional_call substitutes plain tensors
        if not self.encoder.stem_weights:
            return None
        module_name, _, attr = self.encoder.stem_weights[0].rpartition(".")
        return getattr(self.encoder.get_submodule(module_name), attr)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's features at strides 2, 4, 8, 16, 32."""
        self.check_input(x)
        return self.encoder(x)

    def decode(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mask logits ``(N, classes, H, W)`` from the encoder's features."""
        return self.segmentation_head(self.decoder(features))

    def classify(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Class logits ``(N, 1)`` from the deepest features (needs ``aux_classifier=True``)."""
        if self.classification_head is None:
            raise InvalidInputError("this segmenter has no classification head; build it with aux_classifier=True")
        return self.classification_head(features[-1])

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        features = self.encode(x)
        masks = self.decode(features)
        if self.classification_head is None:
            return masks
        return masks, self.classify(features)


def create_segmenter(
    arch: str = "unet",
    encoder: str = "resnet34",
    in_channels: int = 1,
    classes: int = 1,
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    aux_classifier: bool = False,
    attention: Optional[str] = None,
    aux_dropout: float = 0.2,
    aux_pooling: str = "avg",
) -> Segmenter:
    """Build a segmenter with random weights (load an encoder checkpoint into ``model.encoder``).

    - ``arch``: ``"unet"`` or ``"unet++"``; ``encoder``: a name from ``list_encoders()``;
    - ``in_channels``: 1 for radiographs; ``classes``: mask channels of the output;
    - ``decoder_channels``: the five decoder blocks' widths, from stride 16 up to full resolution;
    - ``attention``: ``None`` or ``"scse"`` in every decoder block (smp's ``decoder_attention_type``);
    - ``aux_classifier``: add a classification head (1 logit) on the stride-32 features, pooled with
      ``aux_pooling`` (``"avg"``/``"max"``), with dropout ``aux_dropout`` (smp's default 0.2).
    """
    if not isinstance(arch, str) or arch not in DECODERS:
        raise InvalidInputError(f"unknown segmenter architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if not (attention is None or isinstance(attention, str)) or attention not in ATTENTIONS:
        raise InvalidInputError(f"unknown attention {attention!r}; choose None or 'scse'")
    check_size(classes, "classes", 1)
    if isinstance(decoder_channels, (str, bytes)) or not isinstance(decoder_channels, Sequence) \
            or len(decoder_channels) != 5:
        raise InvalidInputError(
            f"decoder_channels must be 5 integers (one per decoder block), got {show(decoder_channels)}"
        )
    decoder_channels = [check_size(c, "decoder_channels entries", 1) for c in decoder_channels]
    if not isinstance(aux_classifier, bool):
        raise InvalidInputError(f"aux_classifier must be True or False, got {aux_classifier!r}")
    if not isinstance(aux_pooling, str) or aux_pooling not in _POOLINGS:
        raise InvalidInputError(f"aux_pooling must be 'avg' or 'max', got {aux_pooling!r}")
    if isinstance(aux_dropout, bool) or not isinstance(aux_dropout, (int, float)) or not 0.0 <= aux_dropout < 1.0:
        raise InvalidInputError(f"aux_dropout must be a number in [0, 1), got {aux_dropout!r}")

    enc = create_encoder(encoder, in_channels=in_channels, features_only=True)
    if len(enc.out_channels) != 5:
        raise InvalidInputError(
            f"encoder {encoder!r} gives {len(enc.out_channels)} feature maps; a segmenter needs 5 (strides 2-32)"
        )
    decoder = DECODERS[arch](enc.out_channels, decoder_channels, attention)
    head = SegmentationHead(decoder_channels[-1], classes)
    cls_head = ClassificationHead(enc.out_channels[-1], 1, aux_pooling, float(aux_dropout)) if aux_classifier else None
    config = {
        "kind": "segmenter",
        "arch": arch,
        "encoder": encoder,
        "in_channels": in_channels,
        "classes": classes,
        "decoder_channels": decoder_channels,
        "attention": attention,
        "aux_classifier": aux_classifier,
        "aux_dropout": float(aux_dropout),
        "aux_pooling": aux_pooling,
    }
    return Segmenter(enc, decoder, head, cls_head, config)
