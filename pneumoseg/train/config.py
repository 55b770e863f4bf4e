"""The training configuration: one dataclass tree per run, read from YAML, every field documented
(``describe_config()`` prints them) and validated with an error that names the field.

    cfg = load_config("run.yaml", overrides=["optimizer.lr=3e-4", "stages.0.epochs=2"])
    cfg = load_recipe("demo", data={"root": "siim-synthetic"})
    list_recipes()          # {"siim-1st": "...", "classifier": "...", "demo": "..."}

A YAML file holds a mapping of the fields below (unknown keys are an error naming them); a recipe
is such a file shipped in the package (``pneumoseg/train/recipes/NAME.yaml``). ``overrides`` are
``key=value`` strings (``pneumoseg train --set``): the key is a dotted path (list items by number),
the value is read as the field's type (``epochs=3`` an integer, ``optimizer.lr=1e-4`` a float,
``model.decoder_channels=[64,32,16,16,8]`` a list, ``ema=null`` none).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import stat
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from ..errors import InvalidInputError

__all__ = [
    "ConfigError", "TrainConfig", "DataConfig", "ModelConfig", "LossConfig", "OptimizerConfig", "SchedulerConfig",
    "AugmentConfig", "StageConfig", "ValidationConfig", "CheckpointConfig", "LogConfig", "load_config",
    "load_recipe", "list_recipes", "recipe_path", "config_from_dict", "apply_overrides", "describe_config",
]


class ConfigError(InvalidInputError):
    """A training configuration is invalid; the message names the field (``optimizer.lr``) and the file."""


def _doc(text: str, **extra: Any) -> dict[str, Any]:
    return {"doc": text, **extra}


def _f(default: Any, doc: str, **extra: Any) -> Any:
    if isinstance(default, (list, dict)):
        value = copy.deepcopy(default)
        return field(default_factory=lambda: copy.deepcopy(value), metadata=_doc(doc, **extra))
    return field(default=default, metadata=_doc(doc, **extra))


def _sub(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata=_doc(doc))


# A positive share: None (natural sampling), a number, or a [start, end] pair interpolated per epoch.
Ratio = Optional[Union[float, list]]


@dataclass
class DataConfig:
    """Where the images and labels come from and how they are split."""

    root: Optional[str] = _f(None, "folder with the DICOMs (any nesting of *.dcm, the Kaggle layout)")
    csv: Optional[str] = _f(None, "the RLE CSV (train-rle.csv / stage_2_train.csv); default: ROOT/train-rle.csv, else ROOT/stage_2_train.csv")
    cache: Optional[str] = _f(None, "a folder written by `pneumoseg data cache` (used instead of root/csv)")
    image_size: int = _f(512, "network input side in pixels (a multiple of 32 for segmenters)")
    folds: int = _f(5, "number of stratified folds")
    fold: int = _f(0, "the validation fold (0 .. folds-1); the others train")
    split_seed: int = _f(0, "seed of the fold split (keep it fixed across runs that are compared or ensembled)")
    preload: bool = _f(False, "decode every image once into memory (uint8) before training")
    workers: int = _f(0, "DataLoader worker processes (0: load in the training process)")
    chest_crop: bool = _f(False, "classification only: crop each image to its chest (pneumoseg.data.chest_crop) "
                                 "and resize back to image_size")


@dataclass
class ModelConfig:
    """The network (``pneumoseg.models``)."""

    arch: str = _f("unet", "segmenter architecture: unet or unet++ (segmentation only)")
    encoder: str = _f("resnet34", "encoder name (pneumoseg.models.list_encoders())")
    decoder_channels: list = _f([256, 128, 64, 32, 16], "the five decoder blocks' widths (segmentation)")
    attention: Optional[str] = _f(None, "decoder attention: null or scse (segmentation)")
    aux_classifier: bool = _f(False, "segmenter with a classification head (one network that gates itself); "
                                     "trained with BCE on the image label, weighted by loss.aux_weight")
    aux_dropout: float = _f(0.2, "dropout before the classification head's linear layer")
    pretrained: Optional[str] = _f(None, "weights to start from (.safetensors / .pth / .pt, loaded with "
                                         "pneumoseg.models.load_pretrained, never unpickled)")
    batchnorm: str = _f("batch", "BatchNorm in training: batch (per process statistics), sync (SyncBatchNorm "
                                 "across processes, CUDA only) or frozen (running statistics, affine trained)",
                        choices=("batch", "sync", "frozen"))


@dataclass
class LossConfig:
    """Segmentation: the fused ``combo_loss`` (BCE + Dice + focal); classification: BCE."""

    bce: float = _f(3.0, "BCE weight (segmentation)")
    dice: float = _f(1.0, "soft Dice weight (segmentation)")
    focal: float = _f(4.0, "focal loss weight (segmentation)")
    focal_gamma: float = _f(2.0, "focal loss gamma")
    dice_smooth: float = _f(1e-6, "added to the Dice numerator and denominator")
    per_image_dice: bool = _f(False, "Dice per image and averaged (false: over the whole batch, as SIIM 1st)")
    pos_weight: Optional[float] = _f(None, "BCE weight of positives (classifier and classification head)")
    aux_weight: float = _f(0.2, "weight of the classification head's BCE in a segmenter with aux_classifier")


@dataclass
class OptimizerConfig:
    name: str = _f("adam", "adam, adamw or sgd", choices=("adam", "adamw", "sgd"))
    lr: float = _f(1e-4, "learning rate (the peak rate of a one-cycle schedule)")
    weight_decay: float = _f(0.0, "weight decay (L2 for adam/sgd, decoupled for adamw)")
    momentum: float = _f(0.9, "sgd momentum")
    nesterov: bool = _f(False, "sgd Nesterov momentum")
    betas: list = _f([0.9, 0.999], "adam / adamw betas")


@dataclass
class SchedulerConfig:
    name: str = _f("none", "none, plateau (ReduceLROnPlateau on the validation score), cosine or onecycle",
                   choices=("none", "plateau", "cosine", "onecycle"))
    factor: float = _f(0.1, "plateau: multiply the rate by this")
    patience: int = _f(2, "plateau: validations without improvement before reducing (epochs, with validation.every 1)")
    threshold: float = _f(1e-7, "plateau: smallest change that counts as improvement")
    min_lr: float = _f(1e-7, "plateau: lowest rate")
    t_max: Optional[int] = _f(None, "cosine: epochs of a half period (default: the stage's epochs)")
    eta_min: float = _f(1e-7, "cosine: lowest rate")
    warmup: float = _f(0.1, "onecycle: share of the stage's steps spent warming up")
    div_factor: float = _f(25.0, "onecycle: initial rate = lr / div_factor")
    final_div_factor: float = _f(1e4, "onecycle: final rate = initial rate / final_div_factor")


@dataclass
class AugmentConfig:
    """Batched augmentation on the training device (``pneumoseg.data.Augment``)."""

    enabled: bool = _f(True, "augment the training batches")
    hflip: float = _f(0.5, "probability of a horizontal flip")
    shift: float = _f(0.0625, "shift-scale-rotate: largest shift (fraction of the side)")
    scale: float = _f(0.1, "shift-scale-rotate: largest relative zoom")
    rotate: float = _f(45.0, "shift-scale-rotate: largest rotation in degrees")
    affine_p: float = _f(0.5, "probability of the shift-scale-rotate warp")
    brightness: float = _f(0.1, "largest brightness change")
    contrast: float = _f(0.1, "largest relative contrast change")
    gamma: list = _f([0.8, 1.25], "gamma range")
    intensity_p: float = _f(0.5, "probability of the brightness / contrast / gamma change")


@dataclass
class StageConfig:
    """One stage of a curriculum (SIIM 1st: a warm stage then fine-tuning stages); unset fields take
    the run's top-level values. Each stage starts a fresh optimizer and schedule."""

    name: Optional[str] = _f(None, "a label for logs (default stageN)")
    epochs: Optional[int] = _f(None, "epochs of this stage (default: the run's epochs)")
    lr: Optional[float] = _f(None, "learning rate of this stage (default: optimizer.lr)")
    scheduler: Optional[SchedulerConfig] = _f(None, "schedule of this stage (default: the run's scheduler)")
    positive_ratio: Ratio = _f(None, "positive share of this stage (default: the run's positive_ratio)")
    early_stopping: Optional[int] = _f(None, "stop the stage after this many epochs without improvement")
    init: str = _f("last", "weights the stage starts from: last (where the previous stage ended) or best "
                           "(the best checkpoint of all earlier stages, as SIIM 1st)", choices=("last", "best"))


@dataclass
class ValidationConfig:
    every: int = _f(1, "validate every N epochs (and always after a stage's last epoch)")
    batch_size: Optional[int] = _f(None, "validation batch (default: 2 x batch_size)")
    monitor: str = _f("auto", "score that picks the best checkpoints and drives plateau schedules: "
                              "triplet_dice, kaggle_dice, auc or loss; auto = triplet_dice for segmenters, "
                              "auc for classifiers", choices=("auto", "triplet_dice", "kaggle_dice", "auc", "loss"))
    threshold: float = _f(0.5, "pixel threshold of kaggle_dice, and the classifier threshold of the per-epoch "
                               "sensitivity / specificity")
    tops: list = _f([0.5, 0.6, 0.7, 0.75, 0.8, 0.9], "triplet grid: top thresholds")
    bottoms: list = _f([0.2, 0.3, 0.4, 0.5], "triplet grid: bottom thresholds")
    min_areas: Optional[list] = _f(None, "triplet grid: min_area values in pixels at image_size (default: "
                                         "0-4000 at 1024 scaled to the image area)")
    gate_thresholds: list = _f([0.3, 0.4, 0.5, 0.6, 0.7], "grid of classifier gate thresholds")
    min_component_areas: Optional[list] = _f(None, "grid of final component-area filters (default: 0, 64, 256, "
                                                   "1024 at 1024 scaled to the image area)")


@dataclass
class CheckpointConfig:
    keep_top_k: int = _f(3, "keep the k best checkpoints by the monitored score")
    every_steps: Optional[int] = _f(None, "also write last.pt every N optimizer steps inside an epoch")


@dataclass
class LogConfig:
    progress: bool = _f(True, "tqdm progress bars (loss, lr, images/s)")
    tensorboard: bool = _f(True, "TensorBoard event files in RUN/tensorboard when tensorboard is installed")
    plots: bool = _f(True, "PNG plots at the end (loss, Dice, ROC, PR, confusion matrix) when matplotlib is installed")


@dataclass
class TrainConfig:
    """One training run."""

    task: str = _f("segmentation", "segmentation or classification", choices=("segmentation", "classification"))
    data: DataConfig = _sub(DataConfig, "data source and split")
    model: ModelConfig = _sub(ModelConfig, "the network")
    loss: LossConfig = _sub(LossConfig, "loss weights")
    optimizer: OptimizerConfig = _sub(OptimizerConfig, "optimizer")
    scheduler: SchedulerConfig = _sub(SchedulerConfig, "learning-rate schedule")
    augment: AugmentConfig = _sub(AugmentConfig, "augmentation")
    stages: list = _f([], "curriculum stages (list of StageConfig); empty: one stage from the top-level fields",
                      item=StageConfig)
    epochs: int = _f(10, "epochs (per stage unless the stage sets its own)")
    batch_size: int = _f(8, "images per optimizer step per process (global batch = batch_size x processes x accumulate)")
    accumulate: int = _f(1, "gradient accumulation steps per optimizer step (each micro-batch's loss scaled by "
                            "1/accumulate; with per-image losses the step equals one on the whole batch, but batch-wide "
                            "Dice (loss.per_image_dice false) is a mean of each micro-batch's Dice, as across processes)")
    samples_per_epoch: Optional[int] = _f(None, "images drawn per epoch over all processes (default: the training fold's "
                                                "size), rounded down to whole optimizer steps")
    epoch_size: str = _f("samples", "what an epoch is: samples (samples_per_epoch images) or positives (every positive "
                                    "training image once plus negatives for the epoch's positive_ratio, as SIIM 1st's "
                                    "sampler: the epoch's length follows the ratio)", choices=("samples", "positives"))
    positive_ratio: Ratio = _f(None, "share of positive images per epoch: null (the data's own), a number, or "
                                     "[start, end] interpolated linearly over a stage's epochs")
    early_stopping: Optional[int] = _f(None, "stop a stage after this many epochs without improvement")
    amp: str = _f("none", "mixed precision: none, bf16 or fp16 (fp16 uses a gradient scaler)",
                  choices=("none", "bf16", "fp16"))
    channels_last: bool = _f(False, "channels_last memory format (faster convolutions on GPUs)")
    compile: bool = _f(False, "torch.compile the model")
    clip_grad_norm: Optional[float] = _f(None, "clip the gradient norm to this (SIIM 1st: 0.1)")
    ema: Optional[float] = _f(None, "decay of an exponential moving average of the weights (e.g. 0.999); "
                                    "validation and the saved model use the average")
    seed: int = _f(0, "seed of weights, sampling, augmentation and dropout")
    device: str = _f("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    threads: Optional[int] = _f(None, "torch CPU threads (default: torch's)")
    deterministic: bool = _f(False, "torch.use_deterministic_algorithms (slower on GPUs)")
    validation: ValidationConfig = _sub(ValidationConfig, "validation and threshold search")
    checkpoint: CheckpointConfig = _sub(CheckpointConfig, "checkpoints")
    log: LogConfig = _sub(LogConfig, "logging")
    classifier: Optional[dict] = _f(None, "a stage-1 classifier trained first, into RUN/classifier: a training "
                                          "config of its own (task classification; its data section defaults to "
                                          "this one's). Its scores gate the segmenter in the threshold search and "
                                          "it joins the model directory", nested=True)
    classifier_dir: Optional[str] = _f(None, "an already trained classifier (a model directory) used as the gate")

    # -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/YAML-able dict (every field, defaults included)."""
        return _plain(self)

    def stage_list(self) -> list[StageConfig]:
        """The stages with every unset field filled from the top-level fields."""
        stages = self.stages or [StageConfig()]
        out = []
        for i, s in enumerate(stages):
            out.append(StageConfig(
                name=s.name or f"stage{i}",
                epochs=self.epochs if s.epochs is None else s.epochs,
                lr=self.optimizer.lr if s.lr is None else s.lr,
                scheduler=copy.deepcopy(self.scheduler if s.scheduler is None else s.scheduler),
                positive_ratio=copy.deepcopy(self.positive_ratio if s.positive_ratio is None else s.positive_ratio),
                early_stopping=self.early_stopping if s.early_stopping is None else s.early_stopping,
                init=s.init,
            ))
        return out

    @property
    def monitor(self) -> str:
        if self.validation.monitor != "auto":
            return self.validation.monitor
        return "triplet_dice" if self.task == "segmentation" else "auc"

    def classifier_config(self) -> Optional["TrainConfig"]:
        """The stage-1 classifier's config (``classifier``), its data defaulting to this run's."""
        if self.classifier is None:
            return None
        raw = copy.deepcopy(self.classifier)
        if raw.setdefault("task", "classification") != "classification":
            raise ConfigError(f"config field classifier.task: the stage-1 classifier's task is classification, "
                              f"got {raw['task']!r}")
        data = {k: getattr(self.data, k) for k in ("root", "csv", "cache", "folds", "fold", "split_seed",
                                                   "preload", "workers")}
        data.update(raw.get("data") or {})
        raw["data"] = data
        for key in ("seed", "device", "threads", "deterministic"):
            raw.setdefault(key, getattr(self, key))
        return _build(TrainConfig, raw, "classifier", None)


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------------
# Reading: raw mapping -> dataclasses, with types and values checked and the field named.


def _is_ratio(hint: Any) -> bool:
    return typing.get_origin(hint) is Union and set(typing.get_args(hint)) == {float, list, type(None)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, globalns={**globals(), "Ratio": Ratio})


def _fail(path: str, message: str, source: Optional[str]) -> ConfigError:
    where = f"{source}: " if source else ""
    return ConfigError(f"{where}config field {path}: {message}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _coerce(value: Any, hint: Any, path: str, meta: Mapping[str, Any], source: Optional[str]) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if _is_ratio(hint):
        return _ratio(value, path, source)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if value is None:
            raise _fail(path, "must not be null", source)
        return _coerce(value, inner[0], path, meta, source)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a hint is a class, never an instance
        return _build(hint, value, path, source)
    if hint is bool:
        if not isinstance(value, bool):
            raise _fail(path, f"must be true or false, got {_type_name(value)} {value!r}", source)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(path, f"must be an integer, got {_type_name(value)} {value!r}", source)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(path, f"must be a number, got {_type_name(value)} {value!r}", source)
        value = float(value)
        if not math.isfinite(value):
            raise _fail(path, f"must be a finite number, got {value!r}", source)
        return value
    if hint is str:
        if not isinstance(value, str):
            raise _fail(path, f"must be a string, got {_type_name(value)} {value!r}", source)
        choices = meta.get("choices")
        if choices and value not in choices:
            close = difflib.get_close_matches(value, choices, n=1)
            hint_text = f" (did you mean {close[0]!r}?)" if close else ""
            raise _fail(path, f"must be one of {', '.join(choices)}; got {value!r}{hint_text}", source)
        return value
    if hint is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise _fail(path, f"must be a list, got {_type_name(value)} {value!r}", source)
        item = meta.get("item")
        if item is not None:
            return [_build(item, v, f"{path}.{i}", source) for i, v in enumerate(value)]
        return list(value)
    if hint is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise _fail(path, f"must be a mapping, got {_type_name(value)} {value!r}", source)
        return dict(value)
    raise _fail(path, f"has an unsupported type {hint!r}", source)  # pragma: no cover - a bug in this module


def _ratio(value: Any, path: str, source: Optional[str]) -> Any:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise _fail(path, f"must be a number in [0, 1] or a [start, end] pair, got {value!r}", source)
        return [_ratio(v, f"{path}.{i}", source) for i, v in enumerate(value)]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise _fail(path, f"must be a number in [0, 1] (or a [start, end] pair of them), got {value!r}", source)
    return float(value)


def _build(cls: type, raw: Any, path: str, source: Optional[str]) -> Any:
    if isinstance(raw, cls):
        raw = _plain(raw)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise _fail(path or "(top level)", f"must be a mapping of fields, got {_type_name(raw)} {raw!r}", source)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint_text = f" (did you mean {close[0]!r}?)" if close else ""
        name = f"{path}.{key}" if path else str(key)
        raise _fail(name, f"unknown field{hint_text}; {cls.__name__} has: {', '.join(fields)}", source)
    kwargs = {}
    for name, f in fields.items():
        sub_path = f"{path}.{name}" if path else name
        if name in raw:
            value = raw[name]
            if f.metadata.get("nested") and value is not None:
                if not isinstance(value, Mapping):
                    raise _fail(sub_path, f"must be a mapping (a training config), got {_type_name(value)}", source)
                kwargs[name] = copy.deepcopy(dict(value))
            else:
                kwargs[name] = _coerce(value, hints[name], sub_path, f.metadata, source)
        elif f.default is MISSING and f.default_factory is MISSING:  # pragma: no cover - every field has a default
            raise _fail(sub_path, "is required", source)
    obj = cls(**kwargs)
    _validate(obj, path, source)
    return obj


def _need(ok: bool, path: str, message: str, source: Optional[str]) -> None:
    if not ok:
        raise _fail(path, message, source)


def _validate(obj: Any, path: str, source: Optional[str]) -> None:
    """Value checks beyond types, per dataclass."""
    p = (lambda name: f"{path}.{name}" if path else name)  # noqa: E731

    def positive(name: str, allow_none: bool = False, strict: bool = True) -> None:
        v = getattr(obj, name)
        if v is None and allow_none:
            return
        _need(v is not None and (v > 0 if strict else v >= 0), p(name),
              f"must be {'> 0' if strict else '>= 0'}, got {v!r}", source)
        # counts and seeds end up in int64 (torch.manual_seed raised a ValueError past 2**64)
        _need(not isinstance(v, int) or v <= 2**63 - 1, p(name), f"must be at most 2**63 - 1, got {v!r}", source)

    def rate(name: str, allow_none: bool = False) -> None:
        positive(name, allow_none=allow_none)
        v = getattr(obj, name)
        # Past this a rate is a typo; near float32's range it overflowed inside Adam (a RuntimeError).
        _need(v is None or v <= 1e3, p(name), f"must be at most 1000, got {v!r}", source)

    def unit(name: str) -> None:
        v = getattr(obj, name)
        _need(0.0 <= v <= 1.0, p(name), f"must be in [0, 1], got {v!r}", source)

    def numbers(name: str, length: Optional[int] = None, low: float = 0.0, high: Optional[float] = None,
                integer: bool = False) -> None:
        v = getattr(obj, name)
        if v is None:
            return
        kind = "integers" if integer else "numbers"
        ok = all((isinstance(x, int) if integer else isinstance(x, (int, float))) and not isinstance(x, bool)
                 and math.isfinite(x) and x >= low and (high is None or x <= high) for x in v)
        ok = ok and (length is None or len(v) == length) and len(v) > 0
        rng = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        count = f"{length} " if length else ""
        _need(ok, p(name), f"must be a list of {count}{kind} {rng}, got {v!r}", source)
        if not integer:
            setattr(obj, name, [float(x) for x in v])

    if isinstance(obj, DataConfig):
        for name in ("root", "csv", "cache"):
            v = getattr(obj, name)
            _need(v is None or (v != "" and "\x00" not in v), p(name), f"must be a non-empty path, got {v!r}", source)
        _need(obj.image_size >= 32, p("image_size"), f"must be at least 32, got {obj.image_size}", source)
        _need(obj.image_size <= 8192, p("image_size"), f"must be at most 8192, got {obj.image_size}", source)
        _need(obj.folds >= 2, p("folds"), f"must be at least 2, got {obj.folds}", source)
        _need(0 <= obj.fold < obj.folds, p("fold"), f"must be in [0, folds-1] = [0, {obj.folds - 1}], got {obj.fold}", source)
        positive("split_seed", strict=False)
        positive("workers", strict=False)
    elif isinstance(obj, ModelConfig):
        numbers("decoder_channels", 5, low=1, integer=True)
        _need(obj.attention in (None, "scse"), p("attention"), f"must be null or scse, got {obj.attention!r}", source)
        _need(0.0 <= obj.aux_dropout < 1.0, p("aux_dropout"), f"must be in [0, 1), got {obj.aux_dropout}", source)
        _need(bool(obj.encoder), p("encoder"), "must name an encoder", source)
    elif isinstance(obj, LossConfig):
        for name in ("bce", "dice", "focal", "focal_gamma", "dice_smooth", "aux_weight"):
            positive(name, strict=False)
        positive("pos_weight", allow_none=True)
    elif isinstance(obj, OptimizerConfig):
        rate("lr")
        positive("weight_decay", strict=False)
        unit("momentum")
        numbers("betas", 2, high=0.999999)
    elif isinstance(obj, SchedulerConfig):
        _need(0.0 < obj.factor < 1.0, p("factor"), f"must be in (0, 1), got {obj.factor}", source)
        positive("patience", strict=False)
        positive("threshold", strict=False)
        positive("min_lr", strict=False)
        positive("t_max", allow_none=True)
        positive("eta_min", strict=False)
        _need(0.0 <= obj.warmup < 1.0, p("warmup"), f"must be in [0, 1), got {obj.warmup}", source)
        positive("div_factor")
        positive("final_div_factor")
    elif isinstance(obj, AugmentConfig):
        for name in ("hflip", "affine_p", "intensity_p", "shift", "brightness", "contrast"):
            unit(name)
        _need(0.0 <= obj.scale < 1.0, p("scale"), f"must be in [0, 1), got {obj.scale}", source)
        _need(0.0 <= obj.rotate <= 180.0, p("rotate"), f"must be in [0, 180] degrees, got {obj.rotate}", source)
        numbers("gamma", 2, low=1e-6)
        _need(obj.gamma[0] <= obj.gamma[1], p("gamma"), f"must be a [low, high] range, got {obj.gamma}", source)
    elif isinstance(obj, StageConfig):
        positive("epochs", allow_none=True)
        rate("lr", allow_none=True)
        positive("early_stopping", allow_none=True)
    elif isinstance(obj, ValidationConfig):
        positive("every")
        positive("batch_size", allow_none=True)
        unit("threshold")
        numbers("tops", high=1.0)
        numbers("bottoms", high=1.0)
        numbers("gate_thresholds", high=1.0)
        numbers("min_areas", integer=True)
        numbers("min_component_areas", integer=True)
    elif isinstance(obj, CheckpointConfig):
        positive("keep_top_k")
        positive("every_steps", allow_none=True)
    elif isinstance(obj, TrainConfig):
        for name in ("epochs", "batch_size", "accumulate"):
            positive(name)
        positive("samples_per_epoch", allow_none=True)
        positive("early_stopping", allow_none=True)
        positive("clip_grad_norm", allow_none=True)
        positive("seed", strict=False)
        positive("threads", allow_none=True)
        if obj.ema is not None:
            _need(0.0 < obj.ema < 1.0, p("ema"), f"must be null or a decay in (0, 1), got {obj.ema}", source)
        dev = obj.device
        ok = dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())
        _need(ok, p("device"), f"must be auto, cpu, cuda or cuda:N, got {dev!r}", source)
        seg = obj.task == "segmentation"
        if seg:
            _need(obj.data.image_size % 32 == 0, p("data.image_size"),
                  f"must be a multiple of 32 for a segmenter, got {obj.data.image_size}", source)
            _need(not obj.data.chest_crop, p("data.chest_crop"),
                  "is for classifiers only (a segmenter's masks must stay in image coordinates)", source)
        else:
            _need(obj.classifier is None and obj.classifier_dir is None, p("classifier"),
                  "a classification run cannot have a stage-1 classifier of its own", source)
            _need(obj.monitor in ("auc", "loss"), p("validation.monitor"),
                  f"a classifier is monitored by auc or loss, got {obj.monitor!r}", source)
        _need(obj.classifier is None or obj.classifier_dir is None, p("classifier_dir"),
              "give either classifier (train one) or classifier_dir (use one), not both", source)
        if seg and obj.monitor == "auc":
            _need(obj.model.aux_classifier, p("validation.monitor"),
                  "auc needs a classification head (model.aux_classifier: true)", source)
        if obj.model.batchnorm == "sync":
            _need(dev != "cpu", p("model.batchnorm"), "sync BatchNorm needs CUDA (device cpu was chosen)", source)
        if obj.epoch_size == "positives":
            _need(obj.samples_per_epoch is None, p("samples_per_epoch"),
                  "must be null with epoch_size positives (the positive ratio sizes each epoch)", source)
            for i, st in enumerate(obj.stage_list()):
                r = st.positive_ratio
                ok = r is not None and all(float(v) > 0 for v in (r if isinstance(r, list) else [r]))
                where = f"stages.{i}.positive_ratio" if obj.stages else "positive_ratio"
                _need(ok, p(where), f"epoch_size positives needs a positive ratio above 0 in every stage, got {r!r}",
                      source)
        for i, s in enumerate(obj.stages):
            if i == 0:
                _need(s.init == "last", p("stages.0.init"), "the first stage has no previous stage to start from", source)
        if obj.classifier is not None:
            obj.classifier_config()  # checked now, with its own field names


def config_from_dict(raw: Mapping[str, Any], *, source: Optional[str] = None) -> TrainConfig:
    """A :class:`TrainConfig` from a plain mapping (as read from YAML), checked; ``source`` names the
    file in errors."""
    return _build(TrainConfig, raw, "", source)


# ---------------------------------------------------------------------------------------------------
# Overrides: key=value with the value read as the field's type.


def _field_at(path: Sequence[str], source: str) -> tuple[Any, Mapping[str, Any]]:
    """The type hint and metadata of the field at a dotted path."""
    cls: Any = TrainConfig
    hint: Any = TrainConfig
    meta: Mapping[str, Any] = {}
    walked: list[str] = []
    for part in path:
        walked.append(part)
        dotted = ".".join(walked)
        if typing.get_origin(hint) is Union and not _is_ratio(hint):  # Optional[X] -> X
            hint = [a for a in typing.get_args(hint) if a is not type(None)][0]
        if meta.get("nested"):
            hint = TrainConfig
        if meta.get("item") is not None or hint is list:
            if not part.isdigit():
                raise _fail(dotted, "expected a list index (a number)", source)
            item = meta.get("item")
            if item is None:
                return float, {}
            cls = hint = item
            meta = {}
            continue
        if not dataclasses.is_dataclass(hint):
            raise _fail(dotted, f"{'.'.join(walked[:-1])} has no sub-fields", source)
        cls = hint
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=1)
            hint_text = f" (did you mean {close[0]!r}?)" if close else ""
            raise _fail(dotted, f"unknown field{hint_text}", source)
        meta = fields[part].metadata
        hint = _hints(cls)[part]
    return hint, meta


_YAML_LOADER: Any = None


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` that reads ``1e-4`` as a number. PyYAML follows YAML 1.1, whose floats need a
    dot (``1.0e-4``), so the way everyone writes a learning rate came back as the string '1e-4' and
    was refused as "must be a number"; YAML 1.2, JSON and Python read it as a float."""
    global _YAML_LOADER
    import re

    import yaml

    if _YAML_LOADER is None:
        class Loader(yaml.SafeLoader):
            pass

        # YAML 1.1's float forms, with the dot before an exponent made optional (YAML 1.2's rule)
        Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"""^(?:
            [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
           |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
           |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
           |[-+]?\.(?:inf|Inf|INF)
           |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))
        _YAML_LOADER = Loader
    try:
        value = yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:  # PyYAML composes nested collections recursively: 100,000 '[' exhaust the stack
        raise yaml.YAMLError("nested too deeply") from None
    except ValueError as exc:  # a value the constructors refuse: an integer of over 4300 digits, 2020-13-45
        raise yaml.YAMLError(" ".join(str(exc).split())) from None
    _check_expanded_size(value, yaml.YAMLError)
    return value


_YAML_MAX_VALUES = 100_000


def _check_expanded_size(value: Any, error: type) -> None:
    """Refuse YAML whose aliases expand past :data:`_YAML_MAX_VALUES` values, or refer to themselves.
    PyYAML shares an aliased node rather than copying it, so nine lines of nested aliases (the
    "billion laughs") load in microseconds and then take tens of GB as soon as anything walks,
    copies or prints the config. Sizes are memoised per shared object, so this check is linear in
    the text."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (list, dict)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            raise error("an alias refers to the value that contains it (a recursive YAML value)")
        in_progress.add(key)
        children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += size(child)
            if total > _YAML_MAX_VALUES:
                raise error(f"its aliases expand to more than {_YAML_MAX_VALUES:,} values; "
                            "a training config has a few hundred")
        in_progress.discard(key)
        sizes[key] = total
        return total

    size(value)


def _parse_value(text: str, hint: Any, meta: Mapping[str, Any], key: str) -> Any:
    import yaml

    stripped = text.strip()
    if stripped.lower() in ("null", "none", "~"):
        return None
    base = hint
    if typing.get_origin(hint) is Union and not _is_ratio(hint):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        base = inner[0]
    if base is bool:
        low = stripped.lower()
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
        raise _fail(key, f"must be true or false, got {text!r}", "--set")
    if base is int:
        try:
            return int(stripped.replace("_", ""), 10)
        except ValueError:
            raise _fail(key, f"must be an integer, got {text!r}", "--set") from None
    if base is float:
        try:
            return float(stripped)
        except ValueError:
            raise _fail(key, f"must be a number, got {text!r}", "--set") from None
    if base is str:
        return text
    if _is_ratio(hint):
        try:
            return float(stripped)
        except ValueError:
            pass
    try:
        return yaml_load(text)
    except yaml.YAMLError as exc:
        raise _fail(key, f"is not valid YAML: {' '.join(str(exc).split())}", "--set") from None


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``raw`` (a config mapping) with each ``key=value`` of ``overrides`` set, the value read as the
    field's type. Returns a new mapping; raises :class:`ConfigError` naming a bad key or value."""
    out = copy.deepcopy(dict(raw))
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise ConfigError(f"--set expects key=value with a dotted key, got {item!r}")
        hint, meta = _field_at(parts, "--set")
        value = _parse_value(text, hint, meta, key)
        node: Any = out
        for depth, part in enumerate(parts[:-1]):
            nxt = parts[depth + 1]
            if isinstance(node, list):
                idx = int(part)
                if idx >= len(node):
                    raise _fail(".".join(parts[:depth + 1]), f"index {idx} is past the list's end ({len(node)} items)", "--set")
                if node[idx] is None:
                    node[idx] = {}
                node = node[idx]
                continue
            if node.get(part) is None:
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            idx = int(last)
            if idx >= len(node):
                raise _fail(key, f"index {idx} is past the list's end ({len(node)} items)", "--set")
            node[idx] = value
        else:
            node[last] = value
    return out


# ---------------------------------------------------------------------------------------------------
# Files and recipes


_MAX_CONFIG_BYTES = 4 * 1024 * 1024


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    import yaml

    try:
        # Read no more than the limit: /dev/zero as the config was read until memory ran out (a
        # MemoryError traceback), and a 300 MB file was read whole before its size was refused.
        # A pipe is refused before open(), which would wait for a writer.
        if path.exists() and not path.is_dir() and not stat.S_ISREG(path.stat().st_mode):
            raise ConfigError(f"{path}: not a regular file (a device, pipe or socket); not a {what}")
        with open(path, "rb") as f:
            data = f.read(_MAX_CONFIG_BYTES + 1)
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a {what}") from None
    except UnicodeDecodeError:
        if len(data) > _MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than 4 MiB; not a {what}") from None
        raise ConfigError(f"{path}: not a text (UTF-8) file") from None
    if len(data) > _MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than 4 MiB; not a {what}")
    try:
        raw = yaml_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a training config must be a mapping of fields, got {_type_name(raw)}")
    return raw


def read_config_mapping(path: Union[str, Path]) -> dict[str, Any]:
    """The raw mapping of a YAML config file (not yet checked)."""
    return _read_yaml(Path(path), "config file")


def load_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML training config, apply ``key=value`` overrides, and check every field."""
    raw = read_config_mapping(path)
    return config_from_dict(apply_overrides(raw, overrides), source=str(path))


_RECIPE_PACKAGE = "pneumoseg.train"


def _recipe_folder():
    from importlib.resources import files

    return files(_RECIPE_PACKAGE).joinpath("recipes")


def list_recipes() -> dict[str, str]:
    """name -> the first line of the recipe's description, for every built-in recipe."""
    out = {}
    for entry in sorted(_recipe_folder().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            lines = [ln[1:].strip() for ln in entry.read_text(encoding="utf-8").splitlines() if ln.startswith("#")]
            out[entry.name[:-5]] = lines[0] if lines else ""
    return out


def recipe_path(name: str):
    """The packaged YAML file of recipe ``name`` (an importlib.resources Traversable)."""
    recipes = list_recipes()
    if not isinstance(name, str) or name not in recipes:
        close = difflib.get_close_matches(str(name), list(recipes), n=1)
        hint_text = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown recipe {name!r}{hint_text}; built-in recipes: {', '.join(recipes)}")
    return _recipe_folder().joinpath(f"{name}.yaml")


def recipe_text(name: str) -> str:
    return recipe_path(name).read_text(encoding="utf-8")


def recipe_mapping(name: str) -> dict[str, Any]:
    raw = yaml_load(recipe_text(name)) or {}
    return dict(raw)


def load_recipe(name: str, overrides: Sequence[str] = (), *, data: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """A built-in recipe as a :class:`TrainConfig`; ``data`` sets fields of its data section (root,
    csv, cache ...), ``overrides`` are ``key=value`` strings applied after."""
    raw = recipe_mapping(name)
    if data:
        raw.setdefault("data", {})
        raw["data"] = {**(raw["data"] or {}), **{k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}}
    return config_from_dict(apply_overrides(raw, overrides), source=f"recipe {name}")


def describe_config(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted field name, default, description) for every field, for documentation and ``--help``."""
    rows = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        hint = _hints(cls)[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            rows.extend(describe_config(hint, name + "."))
            continue
        # a field has a default or a default factory (the other is MISSING, which is not callable)
        default = f.default_factory() if callable(f.default_factory) else f.default
        rows.append((name, repr(_plain(default)), f.metadata.get("doc", "")))
        item = f.metadata.get("item")
        if item is not None:
            rows.extend(describe_config(item, name + ".N."))
    return rows
