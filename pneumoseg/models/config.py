"""Model configs: every network pneumoseg builds records its construction arguments as a plain
JSON-able dict in ``model.config``; ``build_model(config)`` builds the same network (random weights)
from it, so a model directory is a config file plus a weights file.

    {"kind": "classifier", "encoder": "densenet121", "num_classes": 1, "in_channels": 1}
    {"kind": "segmenter", "arch": "unet", "encoder": "resnet34", "in_channels": 1, "classes": 1,
     "decoder_channels": [256, 128, 64, 32, 16], "attention": null, "aux_classifier": false,
     "aux_dropout": 0.2, "aux_pooling": "avg"}
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from torch import nn

from ..errors import InvalidInputError
from .classifier import create_classifier
from .segmenter import create_segmenter

__all__ = ["build_model", "MODEL_KINDS"]


def _build_classifier(encoder: str, num_classes: int = 1, in_channels: int = 3) -> nn.Module:
    return create_classifier(encoder, num_classes=num_classes, in_channels=in_channels)


MODEL_KINDS: dict[str, Callable[..., nn.Module]] = {"classifier": _build_classifier, "segmenter": create_segmenter}


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """Build the network a ``model.config`` describes. Unknown kinds or keys are an
    ``InvalidInputError`` naming them (a config from a newer pneumoseg fails loudly, never half-built)."""
    if not isinstance(config, Mapping):
        raise InvalidInputError(f"a model config must be a mapping, got {type(config).__name__}")
    kind = config.get("kind")
    builder = MODEL_KINDS.get(kind) if isinstance(kind, str) else None
    if builder is None:
        raise InvalidInputError(f"model config 'kind' must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    kwargs = {k: v for k, v in config.items() if k != "kind"}
    parameters = inspect.signature(builder).parameters
    accepted = set(parameters)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise InvalidInputError(
            f"{kind} config has unknown key(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(sorted(accepted))}"
        )
    # a key the builder cannot default (a classifier's encoder) was the builder's TypeError
    missing = [name for name, p in parameters.items() if p.default is p.empty and name not in kwargs]
    if missing:
        raise InvalidInputError(f"{kind} config lacks required key(s) {', '.join(map(repr, missing))}")
    return builder(**kwargs)
