"""The encoder registry: names -> builders of timm-named networks (see ``_base.Encoder``)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from ..._checks import INT64_MAX, show
from ...errors import InvalidInputError
from . import densenet, efficientnet, resnet, xception
from ._base import Encoder

__all__ = ["Encoder", "EncoderSpec", "ENCODERS", "register_encoder", "list_encoders", "create_encoder"]


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    builder: Callable[..., Encoder]
    #: the timm model whose state_dict and function this encoder reproduces (None: pneumoseg's own)
    timm_name: str | None
    description: str


ENCODERS: dict[str, EncoderSpec] = {}


def register_encoder(name: str, builder: Callable[..., Encoder], *, timm_name: str | None, description: str) -> None:
    if name in ENCODERS:
        raise ValueError(f"encoder {name!r} is registered twice")
    ENCODERS[name] = EncoderSpec(name, builder, timm_name, description)


def list_encoders() -> list[str]:
    return sorted(ENCODERS)


def _suggest(name) -> str:
    """"did you mean ...; " for smp's and typed spellings ("efficientnet-b0", "densenet_121")."""
    if not isinstance(name, str):
        return ""
    folded = {n.replace("_", ""): n for n in ENCODERS}
    key = name.strip().lower().replace("-", "_").removeprefix("timm_").removeprefix("tu_").replace("_", "")
    close = difflib.get_close_matches(key, list(folded), n=1, cutoff=0.8)
    return f"did you mean {folded[close[0]]!r}? " if close else ""


def check_size(value, name: str, low: int) -> int:
    """A channel or class count for a network builder: a Python int in [low, 2**63 - 1] (torch takes
    sizes as int64, and a larger one was its TypeError, not this error)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= INT64_MAX:
        raise InvalidInputError(f"{name} must be an integer >= {low} (and at most 2**63 - 1), got {show(value)}")
    return value


def create_encoder(name: str, *, in_channels: int = 3, num_classes: int = 0, features_only: bool = True) -> Encoder:
    """Build encoder ``name`` (see ``list_encoders()``) with random weights."""
    spec = ENCODERS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise InvalidInputError(f"unknown encoder {name!r}; {_suggest(name)}choose one of {', '.join(list_encoders())}")
    check_size(in_channels, "in_channels", 1)
    check_size(num_classes, "num_classes", 0)
    model = spec.builder(in_channels=in_channels, num_classes=num_classes, features_only=features_only)
    model.name = name
    return model


register_encoder("resnet34", resnet.resnet34, timm_name="resnet34", description="ResNet-34 (21.8 M parameters)")
register_encoder("resnet50", resnet.resnet50, timm_name="resnet50", description="ResNet-50 (25.6 M)")
register_encoder("seresnext50_32x4d", resnet.seresnext50_32x4d, timm_name="seresnext50_32x4d",
                 description="SE-ResNeXt-50 32x4d (27.6 M)")
register_encoder("densenet121", densenet.densenet121, timm_name="densenet121",
                 description="DenseNet-121, CheXNet's network (8.0 M)")
for _variant, _params in (("b0", "5.3 M"), ("b1", "7.8 M"), ("b2", "9.1 M"), ("b3", "12.2 M"), ("b4", "19.3 M")):
    register_encoder(f"efficientnet_{_variant}", getattr(efficientnet, f"efficientnet_{_variant}"),
                     timm_name=f"efficientnet_{_variant}",
                     description=f"EfficientNet-{_variant.upper()}, PyTorch padding ({_params})")
    register_encoder(f"tf_efficientnet_{_variant}", getattr(efficientnet, f"tf_efficientnet_{_variant}"),
                     timm_name=f"tf_efficientnet_{_variant}",
                     description=f"EfficientNet-{_variant.upper()}, TensorFlow SAME padding and BN eps 1e-3 for "
                                 f"Google's ported weights ({_params})")
register_encoder("legacy_xception", xception.legacy_xception, timm_name="legacy_xception",
                 description="Xception, Keras port (22.9 M)")
register_encoder("resnet_tiny", resnet.resnet_tiny, timm_name=None,
                 description="pneumoseg's small ResNet for the demo and tests (one block per stage, widths 16-128)")
