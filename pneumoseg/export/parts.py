"""The network parts a model directory runs as, the same for every backend: what torch calls, what is
exported to ONNX and what TensorRT builds.

=============  ====================  =========================================  ==========================
part           network               inputs -> outputs                          used when
=============  ====================  =========================================  ==========================
``classifier`` the classifier        ``image`` -> ``class_logits`` (N, 1)       a classifier gates
``segmenter``  the segmenter         ``image`` -> ``mask_logits`` (N, 1, H, W)  otherwise (no split)
``encoder``    the segmenter         ``image`` -> ``class_logits``, ``f1``..``f5``  the segmenter gates itself
``decoder``    the segmenter         ``f1``..``f5`` -> ``mask_logits``          with its classification head
=============  ====================  =========================================  ==========================

A segmenter with a classification head and no separate classifier is split at its encoder, so stage 1
(the gate) is its encoder plus head and stage 2 runs only the decoder, on the images the gate lets
through. Preprocessing (min-max scaling, the antialiased resize, normalisation) stays outside every
part: an antialiased resize is not an operator TensorRT's ONNX parser takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..errors import InvalidInputError

__all__ = ["PartSpec", "PART_NAMES", "FEATURE_NAMES", "parts_for", "part_module", "part_spec"]

FEATURE_NAMES = ("f1", "f2", "f3", "f4", "f5")
PART_NAMES = ("classifier", "segmenter", "encoder", "decoder")


@dataclass(frozen=True)
class PartSpec:
    name: str
    network: str  # the model directory's network it is cut from
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


_SPECS = {
    "classifier": PartSpec("classifier", "classifier", ("image",), ("class_logits",)),
    "segmenter": PartSpec("segmenter", "segmenter", ("image",), ("mask_logits",)),
    "encoder": PartSpec("encoder", "segmenter", ("image",), ("class_logits", *FEATURE_NAMES)),
    "decoder": PartSpec("decoder", "segmenter", FEATURE_NAMES, ("mask_logits",)),
}


def part_spec(name: str) -> PartSpec:
    if name not in _SPECS:
        raise InvalidInputError(f"unknown network part {name!r}; the parts are {', '.join(PART_NAMES)}")
    return _SPECS[name]


def parts_for(model_dir: Any) -> dict[str, Optional[str]]:
    """stage -> part for a model directory: ``{"gate": part or None, "segment": part}``.

    The gate is the classifier when there is one, else the segmenter's own classification head (then
    the segmenter is split into encoder and decoder), else there is none."""
    if "segmenter" not in model_dir.networks:
        raise InvalidInputError(f"{model_dir.path}: the model directory has no segmenter; two-stage inference "
                                "needs one (a classifier alone cannot make masks)")
    source = model_dir.gate_source
    if source == "classifier":
        return {"gate": "classifier", "segment": "segmenter"}
    if source == "segmenter":
        return {"gate": "encoder", "segment": "decoder"}
    return {"gate": None, "segment": "segmenter"}


def part_module(name: str, network: Any, *, dtype: Any = None) -> Any:
    """A ``torch.nn.Module`` computing part ``name`` of ``network`` (in eval mode).

    With ``dtype`` (``torch.float16``) the network runs in that type while the image input and the
    logit outputs stay float32 (the cast happens inside the module, so an exported graph has float32
    I/O and half-precision everything else; the features between encoder and decoder keep ``dtype``)."""
    import torch
    from torch import nn

    spec = part_spec(name)
    compute = dtype or torch.float32

    def to_compute(x: torch.Tensor) -> torch.Tensor:
        return x if x.dtype == compute else x.to(compute)

    def to_float(x: torch.Tensor) -> torch.Tensor:
        return x if x.dtype == torch.float32 else x.float()

    # The network is an argument, not a closure variable: these classes are made per call, and a class
    # is always in a reference cycle, so a method closing over it held the weights until a full
    # collection after the part was dropped (every Predictor made, every export).
    class _Part(nn.Module):
        def __init__(self, network: Any) -> None:
            super().__init__()
            self.network = network

    module: _Part
    if spec.name == "classifier":
        class ClassifierPart(_Part):
            def forward(self, image: torch.Tensor) -> torch.Tensor:
                return to_float(self.network(to_compute(image)))
        module = ClassifierPart(network)
    elif spec.name == "segmenter":
        class SegmenterPart(_Part):
            def forward(self, image: torch.Tensor) -> torch.Tensor:
                out = self.network(to_compute(image))
                return to_float(out[0] if isinstance(out, tuple) else out)
        module = SegmenterPart(network)
    elif spec.name == "encoder":
        if getattr(network, "classification_head", None) is None:
            raise InvalidInputError("the encoder part needs a segmenter with a classification head (aux_classifier=True)")

        class EncoderPart(_Part):
            def forward(self, image: torch.Tensor):
                features = self.network.encode(to_compute(image))
                return (to_float(self.network.classify(features)), *features)
        module = EncoderPart(network)
    else:
        class DecoderPart(_Part):
            def forward(self, f1, f2, f3, f4, f5) -> torch.Tensor:
                features = [to_compute(f) for f in (f1, f2, f3, f4, f5)]
                return to_float(self.network.decode(features))
        module = DecoderPart(network)
    if dtype is not None:
        network.to(dtype)
    return module.eval()
