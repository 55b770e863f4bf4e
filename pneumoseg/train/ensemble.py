"""Ensembling as the SIIM winners and the seed solutions did it.

- :func:`average_checkpoints`: the weights of several checkpoints of one network averaged (SWA-style:
  the best epochs of a run, or its last few), then the BatchNorm running statistics recomputed on
  training images, since the average of statistics is not the statistics of the averaged network.
- :class:`StackedClassifier`: several frozen classifiers' pooled features concatenated into one small
  trained head (:func:`fit_stacked_classifier`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError
from .checkpoint import check_checkpoint_weights, check_same_model, checkpoint_state_dict, load_checkpoint

if TYPE_CHECKING:
    from ..models.encoders import Encoder

__all__ = ["average_checkpoints", "recompute_batchnorm", "StackedClassifier", "fit_stacked_classifier"]


def _images_of(batch: Any) -> torch.Tensor:
    if isinstance(batch, Mapping):
        return batch["image"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Iterable[Any], *, device: Any = None,
                        max_batches: Optional[int] = None) -> int:
    """Reset every BatchNorm's running mean and variance and recompute them as the exact average over
    ``batches`` (tensors, or dicts with ``"image"`` as the datasets give): momentum ``None``, i.e. a
    cumulative average, as ``torch.optim.swa_utils.update_bn``. uint8 images (a cache's raw rows) are
    normalised first. Returns the number of batches used; the model is left in eval mode."""
    from ..data.cache import CachedDataset

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    device = device if device is not None else next(model.parameters()).device
    used = 0
    try:
        for batch in batches:
            images = _images_of(batch).to(device)
            if images.dtype == torch.uint8:
                images = CachedDataset.normalise(images)
            model(images)
            used += 1
            if max_batches is not None and used >= max_batches:
                break
    finally:
        for m in norms:
            m.momentum = momenta[m]
        model.train(was_training)
    if used == 0:
        raise InvalidInputError("recompute_batchnorm got no batches")
    model.eval()
    return used


def average_checkpoints(
    checkpoints: Sequence[Union[str, Path]],
    *,
    batches: Optional[Iterable[Any]] = None,
    ema: Optional[bool] = None,
    device: Any = "cpu",
    max_batches: Optional[int] = None,
) -> nn.Module:
    """The network of ``checkpoints`` (pneumoseg training checkpoints of one architecture) with
    their floating-point weights averaged; integer buffers are taken from the first. With
    ``batches`` (a DataLoader over training images) the BatchNorm statistics are recomputed; without
    them a network that has BatchNorm keeps averaged statistics and a warning says so. ``ema`` picks
    the EMA weights (see ``checkpoint_state_dict``). Returns the model in eval mode; it carries
    ``model.config`` and can be saved as a model directory."""
    import warnings

    from ..models import build_model

    if isinstance(checkpoints, (str, Path)) or not checkpoints:
        raise InvalidInputError("checkpoints must be a non-empty list of checkpoint paths")
    first = load_checkpoint(checkpoints[0])
    config = dict(first["model_config"])
    model = build_model(config)
    total: dict[str, torch.Tensor] = {}
    n = 0
    for path in checkpoints:
        data = first if n == 0 else load_checkpoint(path)
        check_same_model(data["model_config"], config, path)
        # names and shapes against the network: a smaller tensor would broadcast into the sum
        check_checkpoint_weights(data, model, path)
        state = checkpoint_state_dict(data, ema=ema)
        if n == 0:
            total = {k: (v.double().clone() if v.dtype.is_floating_point else v.clone()) for k, v in state.items()}
        else:
            if set(state) != set(total):
                raise InvalidInputError(f"{path}: its weights have other names than {checkpoints[0]}'s")
            for k, v in state.items():
                if v.dtype.is_floating_point:
                    total[k] += v.double()
        n += 1
    reference = model.state_dict()
    averaged = {k: (v / n).to(reference[k].dtype) if v.dtype.is_floating_point else v for k, v in total.items()}
    model.load_state_dict(averaged)
    model.to(device)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if batches is not None:
        recompute_batchnorm(model, batches, device=device, max_batches=max_batches)
    elif has_bn and n > 1:
        warnings.warn("average_checkpoints without batches: the BatchNorm statistics are the average of the "
                      "checkpoints' statistics; pass batches= (training images) to recompute them", UserWarning,
                      stacklevel=2)
    return model.eval()


class StackedClassifier(nn.Module):
    """Frozen classifiers (pneumoseg classifiers: encoders with a head) whose globally average-pooled
    features are concatenated and fed to a small trained head (``hidden`` units, ReLU, dropout,
    1 logit). Each member sees the input resized to its own ``input_sizes`` entry when given."""

    def __init__(self, members: Sequence[Encoder], *, hidden: int = 256, dropout: float = 0.2,
                 input_sizes: Optional[Sequence[Optional[int]]] = None) -> None:
        super().__init__()
        if not members:
            raise InvalidInputError("StackedClassifier needs at least one member classifier")
        for i, m in enumerate(members):
            if not hasattr(m, "forward_features") or not getattr(m, "num_features", 0):
                raise InvalidInputError(f"member {i} is not a pneumoseg classifier (no forward_features / num_features)")
        if input_sizes is not None and len(input_sizes) != len(members):
            raise InvalidInputError(f"input_sizes has {len(input_sizes)} entries for {len(members)} members")
        self.members = nn.ModuleList(members)
        for p in self.members.parameters():
            p.requires_grad_(False)
        self.input_sizes = list(input_sizes) if input_sizes is not None else [None] * len(members)
        width = sum(int(m.num_features) for m in members)
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                  nn.Linear(hidden, 1))
        self.config = {"kind": "stacked_classifier", "members": [dict(getattr(m, "config", {})) for m in members],
                       "hidden": hidden, "dropout": dropout, "input_sizes": self.input_sizes}

    def train(self, mode: bool = True) -> "StackedClassifier":
        super().train(mode)
        self.members.eval()  # frozen: BatchNorm statistics and dropout of the members stay as trained
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The members' pooled features, concatenated (members always in eval mode: frozen)."""
        self.members.eval()
        parts = []
        for size, m in zip(self.input_sizes, self.members):
            xi = x if size is None or x.shape[-1] == size else F.interpolate(
                x, size=size, mode="bilinear", align_corners=False, antialias=True)
            # __init__ checked each member has forward_features; the ModuleList yields them as plain Modules
            parts.append(F.adaptive_avg_pool2d(cast("Encoder", m).forward_features(xi), 1).flatten(1))
        return torch.cat(parts, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def fit_stacked_classifier(
    model: StackedClassifier,
    loader: Iterable[Any],
    *,
    epochs: int = 5,
    lr: float = 1e-3,
    pos_weight: Optional[float] = None,
    device: Any = "cpu",
) -> list[float]:
    """Train the head of ``model`` with Adam and BCE on ``loader`` (dicts with ``image`` and
    ``label``, as the datasets give). The members' features are computed once per batch without
    gradients. Returns the mean loss of each epoch."""
    from ..data.cache import CachedDataset

    if not isinstance(model, StackedClassifier):
        raise InvalidInputError(f"model must be a StackedClassifier, got {type(model).__name__}")
    model.to(device).train()
    opt = torch.optim.Adam(model.head.parameters(), lr=lr)
    pw = None if pos_weight is None else torch.tensor(float(pos_weight), device=device)
    losses = []
    for _ in range(int(epochs)):
        total, count = 0.0, 0
        for batch in loader:
            images = batch["image"].to(device)
            if images.dtype == torch.uint8:
                images = CachedDataset.normalise(images)
            labels = batch["label"].to(device).float()
            logits = model.head(model.features(images))[:, 0]
            loss = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=pw)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(labels)
            count += len(labels)
        losses.append(total / max(1, count))
    model.eval()
    return losses
