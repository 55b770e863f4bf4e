"""Load pretrained weights (timm, torchvision, CheXNet, our own) into a classifier, a bare encoder or
a segmenter's encoder, without ever unpickling arbitrary objects.

Files: ``.pth`` / ``.pt`` / ``.bin`` / ``.tar`` / ``.ckpt`` go through ``torch.load(path,
map_location="cpu", weights_only=True)``; ``.safetensors`` (recognised by content, whatever the suffix)
through safetensors. Containers: the state dict itself, or under ``state_dict`` / ``model`` /
``model_state_dict`` (``state_dict_ema`` / ``model_ema`` with ``use_ema=True``); prefixes added by
``DataParallel`` / DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) are removed.

Names, converted only where the conversion makes keys match the model:
  - timm and torchvision: the encoders have timm's names, which are torchvision's for the ResNets and
    DenseNet-121;
  - old torchvision DenseNet checkpoints: ``denselayer1.norm.1.weight`` -> ``denselayer1.norm1.weight``;
  - CheXNet (``module.densenet121.features...``, old-style keys, head ``classifier.0`` = 14 classes);
  - wrapper prefixes ``model.`` / ``encoder.`` / ``backbone.`` / ``net.`` / ``densenet121.`` (Lightning
    modules, segmenter checkpoints), or any prefix given as ``prefix=``;
  - a head saved inside an ``nn.Sequential`` (``classifier.0.weight``) or as Cadene's ``last_linear``.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..errors import DataFormatError, InvalidInputError
from .encoders import Encoder

__all__ = ["load_pretrained", "read_state_dict", "adapt_input_conv", "LoadResult", "HEAD_POLICIES", "check_torch_archive"]

logger = logging.getLogger(__name__)

#: ``head`` choices of ``load_pretrained``
HEAD_POLICIES = ("auto", "load", "drop")

_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
_EMA_KEYS = ("state_dict_ema", "model_ema")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MODEL_PREFIXES = ("model.", "encoder.", "backbone.", "net.", "densenet121.")
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


@dataclass(frozen=True)
class LoadResult:
    """What ``load_pretrained`` did. Keys are relative to ``target`` (``"model"`` or ``"model.encoder"``).

    - ``loaded_keys``: model entries set from the checkpoint;
    - ``missing_keys``: model entries the checkpoint did not provide (``num_batches_tracked`` of old
      checkpoints and a head deliberately not loaded are not counted);
    - ``unexpected_keys``: checkpoint entries the model has no place for;
    - ``adapted_keys``: stem weights converted from the checkpoint's 3 input channels;
    - ``skipped_keys``: checkpoint entries deliberately not loaded: the head under ``head="drop"`` or a
      head of another shape under ``head="auto"``, and modules a ``features_only`` encoder does not build;
    - ``head_loaded``: whether the model's classifier layer was loaded (None: the model has none);
    - ``conversions``: the name conversions applied, in words.
    """

    path: str
    target: str
    loaded_keys: tuple[str, ...]
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]
    adapted_keys: tuple[str, ...]
    skipped_keys: tuple[str, ...]
    head_loaded: Optional[bool]
    conversions: tuple[str, ...]

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded_keys)} tensors from {self.path} into {self.target}"]
        if self.conversions:
            parts.append("names converted: " + ", ".join(self.conversions))
        if self.adapted_keys:
            parts.append("stem adapted to the model's input channels: " + ", ".join(self.adapted_keys))
        if self.head_loaded is False:
            parts.append("classifier head not loaded (kept its initialisation)")
        if self.skipped_keys:
            parts.append(f"{len(self.skipped_keys)} head tensors skipped")
        if self.missing_keys:
            parts.append(f"{len(self.missing_keys)} missing: {_preview(self.missing_keys)}")
        if self.unexpected_keys:
            parts.append(f"{len(self.unexpected_keys)} unexpected: {_preview(self.unexpected_keys)}")
        return "; ".join(parts)


def _preview(keys, n: int = 8) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n})" if len(keys) > n else "")


# ----------------------------------------------------------------------------------------- reading

def _is_safetensors(path: Path) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as e:  # pragma: no cover - safetensors is a dependency
        raise InvalidInputError(f"{path} is a safetensors file; install safetensors (pip install safetensors)") from e
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise DataFormatError(f"{path} cannot be read as safetensors: {e}") from e


def _unpickler_reason(error: Exception) -> str:
    # torch's message is a page of advice; the line naming the refused global or opcode is the news
    text = str(error)
    m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\.\s|\n\n|$)", text, re.S)
    reason = m.group(1) if m else text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return " ".join(reason.split())


#: how much larger than the file a torch.save archive's records may declare themselves, in all
_MAX_INFLATION = 2
_INFLATION_SLACK = 1 << 20


def check_torch_archive(path: Path) -> None:
    """Refuse, before ``torch.load`` reads it, a zip archive whose records inflate to far more than the
    file: ``torch.save`` stores records uncompressed, and torch's reader inflates deflated ones, so a
    1 MB file declaring one 2**28-float tensor of zeros (deflated) took 1.3 GB (a zip bomb; the sum
    over many tensors is unbounded). Other files (a legacy pickle, a damaged zip) are left to torch."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return
    if inflated > _MAX_INFLATION * size + _INFLATION_SLACK:
        raise DataFormatError(f"{path}: its records inflate to {inflated:,} bytes from a {size:,}-byte file; torch.save "
                              "stores them uncompressed, so this is not a checkpoint torch wrote (a zip bomb?)")


def _read_torch(path: Path):
    check_torch_archive(path)
    try:
        with warnings.catch_warnings():
            # a plain pickle (not torch.save's format) triggers a protocol warning; it is refused anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5
                return torch.load(path, map_location="cpu", weights_only=True)
            # timm's training checkpoints keep their arguments as an argparse.Namespace, a plain
            # attribute bag; nothing else beyond weights_only's tensors and containers is ever built.
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():  # a broken file, not a refused one
            raise DataFormatError(f"{path} cannot be read as a PyTorch checkpoint: {e}") from e
        raise DataFormatError(
            f"{path} was refused: it holds Python objects that safe loading (torch.load weights_only=True) "
            f"does not build, so it was not unpickled ({_unpickler_reason(e)}). Re-save just its state dict "
            "(torch.save(model.state_dict(), ...)) or convert it to .safetensors where you trust the file"
        ) from e
    except Exception as e:  # zip errors, truncation, legacy-format errors: all say "not readable"
        raise DataFormatError(f"{path} cannot be read as a PyTorch checkpoint: {type(e).__name__}: {e}") from e


def _select_state_dict(obj, path: Path, use_ema: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    notes = []
    if use_ema:
        if not isinstance(obj, Mapping) or not any(isinstance(obj.get(k), Mapping) for k in _EMA_KEYS):
            keys = ", ".join(map(str, list(obj)[:10])) if isinstance(obj, Mapping) else type(obj).__name__
            raise InvalidInputError(f"use_ema=True but {path} has no EMA weights ({' / '.join(_EMA_KEYS)}); "
                                    f"it holds: {keys}")
        key = next(k for k in _EMA_KEYS if isinstance(obj.get(k), Mapping))
        obj = obj[key]
        notes.append(f"'{key}' container")
    for _ in range(3):  # containers nest at most a few levels (e.g. {'model': {'state_dict': ...}})
        # a container key holding a mapping wins even beside loose tensors (CheXNet's best_loss)
        if not isinstance(obj, Mapping):
            break
        container = next((k for k in _STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)), None)
        if container is None:
            break
        obj = obj[container]
        notes.append(f"'{container}' container")
    if not isinstance(obj, Mapping):
        raise DataFormatError(f"{path} holds a {type(obj).__name__}, not a state dict")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        raise DataFormatError(
            f"{path} holds no tensors where a state dict should be; its keys: {_preview(map(str, obj))}")
    return state, notes


def read_state_dict(path: Union[str, os.PathLike], *,
                    use_ema: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read checkpoint ``path`` safely and return its state dict (wrapper prefixes removed) and the
    containers / prefixes removed, in words."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputError(f"path must be a file path, got {type(path).__name__}")
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise InvalidInputError(f"checkpoint {path} is not a file")
    if path.stat().st_size == 0:
        raise DataFormatError(f"checkpoint {path} is empty")
    obj = _read_safetensors(path) if _is_safetensors(path) else _read_torch(path)
    state, notes = _select_state_dict(obj, path, use_ema)
    for prefix in _WRAPPER_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = _renamed(state, {k: _strip(k, prefix) for k in state}, path, f"removing the '{prefix}' prefix")
            notes.append(f"'{prefix}' prefix")
    return state, notes


def _strip(key: str, prefix: str) -> str:
    while key.startswith(prefix):
        key = key[len(prefix):]
    return key


def _renamed(state: dict[str, torch.Tensor], names: Mapping[str, str], path: Path,
             why: str) -> dict[str, torch.Tensor]:
    """``state`` with keys renamed by ``names`` (old -> new; others kept). Two checkpoint tensors that
    end up under one name (``module.conv1.weight`` beside ``conv1.weight``, ``norm.1`` beside ``norm1``)
    are refused: keeping either one would be a silent guess."""
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for k, v in state.items():
        new = names.get(k, k)
        if new in out:
            raise DataFormatError(f"{path}: '{source[new]}' and '{k}' both become '{new}' after {why}; the "
                                  "checkpoint holds two tensors for one weight, so neither is loaded (keep one "
                                  "of them, or pass prefix= to choose)")
        out[new], source[new] = v, k
    return out


# ------------------------------------------------------------------------------------------ naming

def _rename(state: dict[str, torch.Tensor], target_keys: set[str], encoder: Optional[Encoder],
            path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    notes = []

    def matches(s) -> int:
        return sum(k in target_keys for k in s)

    improved = True
    while improved:  # peel nested prefixes (model.encoder....) while each peel adds matches
        improved = False
        for prefix in _MODEL_PREFIXES:
            if not any(k.startswith(prefix) for k in state):
                continue
            candidate = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
            if len(candidate) == len(state) and matches(candidate) > matches(state):
                state, improved = candidate, True
                notes.append(f"'{prefix}' prefix")

    renamed = {}
    for k in state:
        m = _OLD_DENSENET_KEY.match(k)
        if m and k not in target_keys:
            renamed[k] = m.group(1) + m.group(2)
    if renamed:
        state = _renamed(state, renamed, path, "converting old torchvision DenseNet keys (norm.1 -> norm1)")
        notes.append("old torchvision DenseNet keys (norm.1 -> norm1)")

    if encoder is not None:
        classifier = _classifier_name(encoder)
        head_aliases = {f"{classifier}.0.": f"{classifier}.", "last_linear.": f"{classifier}."}
        for old, new in head_aliases.items():
            if any(k.startswith(old) and k not in target_keys for k in state):
                state = _renamed(state, {k: new + k[len(old):] for k in state if k.startswith(old)}, path,
                                 f"renaming the head '{old[:-1]}' to '{new[:-1]}'")
                notes.append(f"head '{old[:-1]}' -> '{new[:-1]}'")
    return state, notes


def _classifier_name(encoder: Encoder) -> str:
    return encoder.classifier_module or (encoder.head_modules[-1] if encoder.head_modules else "fc")


# ----------------------------------------------------------------------------------------- loading

def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A first-convolution weight ``(out, 3, kh, kw)`` for ``in_channels`` inputs, as timm's
    ``adapt_input_conv``: summed over RGB for one channel (a grey image replicated to RGB gives the
    same output), else RGB repeated cyclically and scaled by ``3 / in_channels`` (so the response to a
    constant image is kept)."""
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise InvalidInputError(f"adapt_input_conv needs a (out, 3, kh, kw) weight, got {tuple(weight.shape)}")
    if in_channels < 1:
        raise InvalidInputError(f"in_channels must be >= 1, got {in_channels}")
    if weight.layout != torch.strided:
        raise InvalidInputError(f"adapt_input_conv needs a dense weight, got a {weight.layout} tensor")
    # timm's arithmetic, so the adapted stem is bit for bit timm's: float32 sums and scaling (a float64
    # weight keeps float64; timm would round it to float32)
    w = weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    if in_channels == 1:
        w = w.sum(dim=1, keepdim=True)
    elif in_channels != 3:
        repeats = -(-in_channels // 3)
        w = w.repeat(1, repeats, 1, 1)[:, :in_channels]
        w *= 3 / float(in_channels)
    return w.to(weight.dtype)


def _resolve_target(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[nn.Module, str, Encoder, str]:
    """(module to load into, its name, the encoder it holds, the encoder's key prefix inside it)."""
    if isinstance(model, Encoder):
        return model, "model", model, ""
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, Encoder):
        raise InvalidInputError(
            f"load_pretrained needs a pneumoseg encoder or classifier, or a model whose .encoder is one "
            f"(a segmenter); got {type(model).__name__}")
    # A checkpoint that has the model's own keys outside the encoder (decoder, heads) is a whole-model
    # checkpoint (a trained segmenter); anything else is an encoder / classifier checkpoint.
    own = {k for k in model.state_dict() if not k.startswith("encoder.")}
    if any(k in own or any(k.startswith(p) and _strip(k, p) in own for p in _MODEL_PREFIXES) for k in state):
        return model, "model", encoder, "encoder."
    return encoder, "model.encoder", encoder, ""


def all_finite(value: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN or infinity (float8 too: isfinite has no kernel
    for it, so it is checked in float32, which holds it exactly)."""
    if value.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        value = value.float()
    return bool(torch.isfinite(value).all())


def _check_values(path: Path, key: str, value: torch.Tensor, want: torch.Tensor) -> None:
    """A weight must come from a finite real floating-point tensor: load_state_dict would cast a complex,
    bool or integer tensor into it, and NaN weights only show up as NaN predictions. (Integer counters
    such as BatchNorm's num_batches_tracked take any real number: they do not change the outputs.)"""
    if value.is_complex():
        raise InvalidInputError(f"cannot load {path}: '{key}' is {value.dtype} in the checkpoint; the model's is "
                                f"{want.dtype}")
    if not want.is_floating_point():
        # a float NaN cast into an integer counter is -2**63
        if value.is_floating_point() and not all_finite(value):
            raise InvalidInputError(f"cannot load {path}: '{key}' holds NaN or infinity (an integer counter)")
        return
    if not value.is_floating_point():
        raise InvalidInputError(f"cannot load {path}: '{key}' is {value.dtype} in the checkpoint; the model's "
                                f"is {want.dtype} (a real floating-point weight)")
    if not all_finite(value):
        raise InvalidInputError(f"cannot load {path}: '{key}' holds NaN or infinity (a diverged or damaged "
                                "checkpoint?)")
    if key.endswith("running_var") and bool((value < 0).any()):
        # BatchNorm divides by sqrt(running_var + eps): every output would be NaN
        raise InvalidInputError(f"cannot load {path}: '{key}' holds negative variances (min "
                                f"{value.min().item():.4g}); a damaged checkpoint?")


def load_pretrained(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    head: str = "auto",
    use_ema: bool = False,
    strict: bool = False,
    prefix: Optional[str] = None,
) -> LoadResult:
    """Load checkpoint ``path`` into ``model`` (a classifier, a ``features_only`` encoder, or a segmenter:
    then into ``model.encoder``, or into the whole model if the file is a whole-segmenter checkpoint).

    ``head`` decides about the classifier layer (``fc`` / ``classifier``), whose shape depends on the
    number of classes:
      - ``"auto"`` (default): load it when its shape equals the model's (same classes), else keep the
        model's own and say so (log + ``LoadResult.head_loaded=False``). Fine-tuning an ImageNet (1000
        classes) or CheXNet (14) network into a 1-class classifier is the common case, and a head of
        another size is never partly or wrongly loaded;
      - ``"load"``: the head must load; a shape mismatch (or a model without a head) is an error;
      - ``"drop"``: never load it (start a new head even when the class counts agree).
    Modules a ``features_only`` encoder does not build (EfficientNet's ``conv_head``/``bn2``, the
    classifier) are skipped. The stem of a 3-channel checkpoint is adapted to ``in_channels != 3``
    (``adapt_input_conv``). Every other shape mismatch raises ``InvalidInputError`` naming the key,
    both shapes and the file. ``strict=True`` also refuses missing or unexpected keys; otherwise they
    are returned and logged (warning). A checkpoint of which no tensor fits is always refused.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if head not in HEAD_POLICIES:
        raise InvalidInputError(f"head must be one of {', '.join(HEAD_POLICIES)}, got {head!r}")
    if prefix is not None and (not isinstance(prefix, str) or not prefix):
        raise InvalidInputError(f"prefix must be a non-empty string, got {prefix!r}")
    state, notes = read_state_dict(path, use_ema=use_ema)
    path = Path(path)
    if prefix:  # before deciding what the checkpoint is: a whole segmenter under a Lightning attribute
        state = _renamed(state, {k: k[len(prefix):] for k in state if k.startswith(prefix)}, path,
                         f"removing the '{prefix}' prefix")
        notes.append(f"'{prefix}' prefix")
    target, target_name, encoder, enc_prefix = _resolve_target(model, state)
    target_sd = target.state_dict()
    state, renames = _rename(state, set(target_sd), encoder if enc_prefix == "" else None, path)
    notes += renames

    classifier = enc_prefix + _classifier_name(encoder) + "."
    head_prefixes = tuple(enc_prefix + m + "." for m in encoder.head_modules)
    stem_keys = {enc_prefix + k for k in encoder.stem_weights}
    model_has_classifier = any(k.startswith(classifier) for k in target_sd)

    # The classifier loads as a whole or not at all.
    ckpt_classifier = {k: v for k, v in state.items() if k.startswith(classifier)}
    model_classifier = [k for k in target_sd if k.startswith(classifier)]
    classifier_fits = bool(ckpt_classifier) and all(
        k in target_sd and v.shape == target_sd[k].shape for k, v in ckpt_classifier.items())
    # a weight without its bias (or the reverse) would leave a half-initialised head
    classifier_whole = all(k in ckpt_classifier for k in model_classifier)
    if head == "load":
        if not model_has_classifier:
            raise InvalidInputError(f"head='load' but the model has no classifier layer to load {path}'s head into "
                                    "(a features_only encoder or num_classes=0)")
        if not ckpt_classifier:
            raise InvalidInputError(f"head='load' but {path} has no '{classifier[:-1]}' weights")
        if not classifier_whole:
            absent = [k for k in model_classifier if k not in ckpt_classifier]
            raise InvalidInputError(f"head='load' but {path} lacks {', '.join(absent)} of the classifier layer")
    load_classifier = classifier_fits and classifier_whole and head != "drop"

    loaded: dict[str, torch.Tensor] = {}
    adapted: list[str] = []
    skipped: list[str] = []
    unexpected: list[str] = []
    for k, v in state.items():
        if k.startswith(classifier) and not (load_classifier or head == "load"):
            skipped.append(k)
            continue
        if k not in target_sd:
            (skipped if k.startswith(head_prefixes) else unexpected).append(k)
            continue
        want = target_sd[k]
        if v.layout != torch.strided:  # before any arithmetic on it (a sparse stem is adapted below)
            raise InvalidInputError(f"cannot load {path}: '{k}' is a {v.layout} tensor in the checkpoint (sparse or "
                                    "another layout); the model's weights are dense: save it with .to_dense()")
        if v.shape != want.shape:
            if (k in stem_keys and v.ndim == 4 and v.shape[1] == 3 and want.ndim == 4
                    and (v.shape[0], *v.shape[2:]) == (want.shape[0], *want.shape[2:])):
                v = adapt_input_conv(v, want.shape[1])
                adapted.append(k)
            else:
                hint = " (pass head='auto' or 'drop' to keep the model's own head)" if k.startswith(classifier) else ""
                raise InvalidInputError(
                    f"cannot load {path}: '{k}' has shape {tuple(v.shape)} in the checkpoint but "
                    f"{tuple(want.shape)} in the model{hint}")
        _check_values(path, k, v, want)
        loaded[k] = v
    if not loaded:
        raise InvalidInputError(
            f"no tensor of {path} fits the model ({type(encoder).__name__}); is it a checkpoint of another "
            f"network? its first keys: {_preview(state, 5)}")

    head_loaded = None
    if model_has_classifier:
        head_loaded = any(k.startswith(classifier) for k in loaded)
    missing = [k for k in target_sd if k not in loaded and not k.endswith("num_batches_tracked")
               and not (head_loaded is False and ckpt_classifier and k.startswith(classifier))]
    if strict and (missing or unexpected):
        raise InvalidInputError(
            f"strict loading of {path} failed: {len(missing)} missing ({_preview(missing)}), "
            f"{len(unexpected)} unexpected ({_preview(unexpected)})")

    result_missing, result_unexpected = target.load_state_dict(loaded, strict=False)
    assert not result_unexpected, result_unexpected  # every loaded key was checked against target_sd

    result = LoadResult(
        path=str(path), target=target_name, loaded_keys=tuple(loaded), missing_keys=tuple(missing),
        unexpected_keys=tuple(unexpected), adapted_keys=tuple(adapted), skipped_keys=tuple(skipped),
        head_loaded=head_loaded, conversions=tuple(notes))
    logger.info(result.summary())
    if missing or unexpected:
        logger.warning("%s: %d model tensors not in the checkpoint (%s), %d checkpoint tensors unused (%s)",
                       path, len(missing), _preview(missing), len(unexpected), _preview(unexpected))
    return result
