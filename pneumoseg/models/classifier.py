"""Stage 1: the classifier is the encoder itself with timm's global pooling and linear head, so its
``state_dict()`` is timm's and a timm checkpoint loads with ``strict=True``."""

from __future__ import annotations

from .encoders import Encoder, create_encoder

__all__ = ["create_classifier"]


def create_classifier(name: str, num_classes: int = 1, in_channels: int = 3) -> Encoder:
    """Encoder ``name`` + global average pooling + linear head, returning ``(N, num_classes)`` logits.
    With ``num_classes=1000, in_channels=3`` it has exactly the parameter names and shapes of
    ``timm.create_model(name)`` and computes the same function. ``num_classes=0`` returns the pooled
    features (timm's ``num_classes=0``)."""
    model = create_encoder(name, in_channels=in_channels, num_classes=num_classes, features_only=False)
    # construction arguments, JSON-able, for pneumoseg.models.build_model
    model.config = {"kind": "classifier", "encoder": name, "num_classes": num_classes, "in_channels": in_channels}
    return model
