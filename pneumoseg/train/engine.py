"""The training engine: one loop for both stages (segmenter, classifier), from one CPU process to
many GPUs under torchrun.

    from pneumoseg.train import load_recipe, train
    result = train(load_recipe("demo", data={"root": "siim-synthetic"}), "runs/demo")
    result.model_dir          # the model directory (pneumoseg.json + safetensors) in runs/demo
    result.metrics            # validation Kaggle Dice, the all-empty baseline, AUC ...

A run folder holds ``config.yaml`` (the resolved config), ``metrics.csv``, ``checkpoints/``
(``last.pt`` for resuming, the best ``keep_top_k`` epochs, ``stage-best.pt``), ``tensorboard/``,
``plots/`` and, at the end, the model directory files (``pneumoseg.json``, ``*.safetensors``) with the
thresholds searched on the validation fold. Everything that can be wrong with the config, the data
or a checkpoint to resume is reported before the folder is touched or a step is taken.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._fs import OutputFolder, OutputKind, prepare_output_folder
from ..errors import DataFormatError, InvalidInputError, OutputError, PneumosegError, TrainingError
from . import distributed as D
from .checkpoint import check_checkpoint_weights, check_resume_state, check_same_config, check_same_model, load_checkpoint, save_checkpoint
from .config import ConfigError, StageConfig, TrainConfig
from .data import RunData, build_data
from .ema import ModelEMA
from .schedules import StageSchedule, build_optimizer

if TYPE_CHECKING:
    from ..models.encoders import Encoder
    from ..models.segmenter import Segmenter

__all__ = ["Trainer", "TrainResult", "train", "build_network", "Gate"]

LAST = "last.pt"
STAGE_BEST = "stage-best.pt"


@dataclass
class TrainResult:
    """What a finished run gives back (the same is on disk in ``out``)."""

    out: Path
    model_dir: Any  # pneumoseg.models.model_dir.ModelDir (rank 0; None on other ranks)
    metrics: dict[str, Any]
    thresholds: Any
    history: list[dict[str, Any]]
    steps: int
    best_checkpoint: Optional[Path]
    classifier: Optional["TrainResult"] = None
    notes: list[str] = field(default_factory=list)
    model: Optional[nn.Module] = None  # the saved network (best epoch, EMA weights if any), eval mode


# ---------------------------------------------------------------------------------------------------
# Networks


def check_model_config(cfg: TrainConfig, section: str = "") -> None:
    """Refuse an unknown encoder (before any data is read). ``section`` is where ``cfg`` sits in the
    config the user wrote (``"classifier."`` for the stage-1 classifier), so the error names that field."""
    from ..models import list_encoders

    m = cfg.model
    if m.encoder not in list_encoders():
        import difflib

        close = difflib.get_close_matches(m.encoder, list(list_encoders()), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"config field {section}model.encoder: unknown encoder {m.encoder!r}{hint}; known: "
                          f"{', '.join(list_encoders())}")
    if cfg.task == "segmentation":
        # Counted on the meta device, which allocates nothing: decoder_channels [20000, ...] made the
        # real build allocate and initialise 14.4 GB (stopped only by the allocator under a ulimit).
        from ..models import create_segmenter

        try:
            with torch.device("meta"):
                skeleton = create_segmenter(m.arch, m.encoder, in_channels=1, classes=1,
                                            decoder_channels=list(m.decoder_channels), aux_classifier=m.aux_classifier,
                                            attention=m.attention, aux_dropout=m.aux_dropout)
        except InvalidInputError as exc:
            raise ConfigError(f"config field {section}model: {exc}") from None
        count = sum(p.numel() for p in skeleton.parameters())
        if count > _MAX_PARAMETERS:
            raise ConfigError(f"config field {section}model.decoder_channels: {list(m.decoder_channels)} makes a network "
                              f"of {count:,} parameters, more than {_MAX_PARAMETERS:,} (the built-in networks have "
                              "up to about 50 million)")
    # A batch of one image whose deepest feature map is 1x1 gives BatchNorm one value per channel in
    # training mode, which torch refuses in the first step, after the run folder was written. Every
    # encoder's stride-32 map is larger than 1x1 from 64 px up, so only small images are looked at.
    if cfg.batch_size == 1 and m.batchnorm == "batch" and cfg.data.image_size < 64:
        shape = _single_value_batchnorm(cfg)
        if shape is not None:
            raise ConfigError(
                f"config field {section}batch_size: a batch of 1 image at data.image_size {cfg.data.image_size} leaves "
                f"BatchNorm 1 value per channel in training (a {shape} feature map), which torch cannot normalise; "
                f"use batch_size 2 or more, a data.image_size of 64 or more, or model.batchnorm: frozen")


def _single_value_batchnorm(cfg: TrainConfig) -> Optional[str]:
    """The shape of the first BatchNorm input with one value per channel when the network trains on
    a batch of ``cfg.batch_size`` images, or None; found by a forward pass on the meta device (no
    memory, no arithmetic)."""
    from ..models import create_classifier, create_segmenter

    m = cfg.model
    found: list[str] = []

    def look(module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if not found and isinstance(x, torch.Tensor) and x.dim() >= 2 and x.numel() // max(1, x.shape[1]) <= 1:
            found.append("x".join(str(v) for v in x.shape))

    with torch.device("meta"):
        net: nn.Module
        if cfg.task == "segmentation":
            net = create_segmenter(m.arch, m.encoder, in_channels=1, classes=1, decoder_channels=list(m.decoder_channels),
                                   aux_classifier=m.aux_classifier, attention=m.attention, aux_dropout=m.aux_dropout)
        else:
            net = create_classifier(m.encoder, num_classes=1, in_channels=1)
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.register_forward_pre_hook(look)
        size = cfg.data.image_size
        try:
            net.train()(torch.empty(cfg.batch_size, 1, size, size))
        except ValueError:  # torch's own refusal, after the hook has seen the input
            pass
    return found[0] if found else None


#: the most parameters a network built from a training config may have: 5 times the largest built-in
#: network (U-Net++ on seresnext50_32x4d, about 50 million); 1 GiB of float32 weights, 4 with Adam
_MAX_PARAMETERS = 2**28


def build_network(cfg: TrainConfig, section: str = "") -> Union[Segmenter, Encoder]:
    """The network a config describes (random weights, or ``model.pretrained`` loaded); ``section``
    as in :func:`check_model_config`."""
    from ..models import create_classifier, create_segmenter, load_pretrained

    check_model_config(cfg, section)
    m = cfg.model
    model: Union[Segmenter, Encoder]
    try:
        if cfg.task == "segmentation":
            model = create_segmenter(m.arch, m.encoder, in_channels=1, classes=1, decoder_channels=list(m.decoder_channels),
                                     aux_classifier=m.aux_classifier, attention=m.attention, aux_dropout=m.aux_dropout)
        else:
            model = create_classifier(m.encoder, num_classes=1, in_channels=1)
    except InvalidInputError as exc:
        raise ConfigError(f"config field {section}model: {exc}") from None
    if m.pretrained is not None:
        path = Path(m.pretrained)
        if not path.is_file():
            raise ConfigError(f"config field {section}model.pretrained: {path} is not a file")
        load_pretrained(model, path)
    return model


def _set_frozen_bn(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C and SIGTERM: a terminal sends them to the whole process group,
    and a worker that died of one made the main process fail with 'DataLoader worker exited
    unexpectedly' (a traceback, exit 1) instead of unwinding; the main process stops them itself."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # a container's or taskset's share, as torch counts it
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def loader_workers(requested: int) -> tuple[int, Optional[str]]:
    """``data.workers`` capped at the CPUs this process may use, and a note when capped. More workers
    than CPUs only compete with the training step for them, and torch warns about it mid-run (the
    classifier and siim-1st recipes ask for 4 for a GPU server); the count does not change the data."""
    usable = _usable_cpus()
    if requested <= usable:
        return requested, None
    return usable, f"data.workers {requested} capped at the {usable} CPUs this process may use"


class Gate:
    """A stage-1 classifier used as the gate: per-image probabilities for segmenter input images
    (resized to the classifier's input size, chest-cropped when it was trained so), made from them as
    the Predictor makes them (``pneumoseg.data.transforms.classifier_input``), so the gate threshold chosen here
    holds at prediction."""

    def __init__(self, model: nn.Module, input_size: int, chest_crop: bool = False,
                 threshold: Optional[float] = None) -> None:
        self.model = model.eval()
        self.input_size = int(input_size)
        self.chest_crop = bool(chest_crop)
        self.threshold = threshold  # the classifier's own choice, added to the gate grid

    @torch.no_grad()
    def scores(self, images: torch.Tensor) -> torch.Tensor:
        from ..data.transforms import classifier_input

        x = classifier_input(images.float(), self.input_size, "chest" if self.chest_crop else None)
        device = next(self.model.parameters()).device
        return torch.sigmoid(self.model(x.to(device)).float())[:, 0].to(images.device)

    @classmethod
    def from_model_dir(cls, path: Union[str, Path], device: Any = "cpu") -> "Gate":
        from ..models.model_dir import load_model_dir

        md = load_model_dir(path)
        if "classifier" not in md.networks:
            raise ConfigError(f"config field classifier_dir: {path} holds no classifier (it has "
                              f"{', '.join(sorted(md.networks))})")
        model = md.build("classifier", device=device)
        return cls(model, md.networks["classifier"].input_size[0], md.networks["classifier"].crop == "chest",
                   md.thresholds.gate)


# ---------------------------------------------------------------------------------------------------
# Loss


# Batches between reads of the summed training loss (each read waits for the GPU).
LOSS_READ_EVERY = 10


class TaskLoss:
    """Segmentation: ``combo_loss`` on the masks (+ ``aux_weight`` x BCE of a classification head);
    classification: BCE on the labels. Every term is a mean over images (batch Dice apart)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.seg = cfg.task == "segmentation"
        lc = cfg.loss
        self.combo: dict[str, Any] = dict(bce_weight=lc.bce, dice_weight=lc.dice, focal_weight=lc.focal, focal_gamma=lc.focal_gamma,
                          per_image=lc.per_image_dice, smooth=lc.dice_smooth)
        self.aux_weight = lc.aux_weight
        self.pos_weight = lc.pos_weight
        self._pos_weight_on: dict[torch.device, torch.Tensor] = {}

    def _bce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pw = None
        if self.pos_weight is not None:
            # made once per device: a new CUDA scalar each step is a copy that waits for the GPU
            pw = self._pos_weight_on.get(logits.device)
            if pw is None:
                pw = self._pos_weight_on[logits.device] = torch.tensor(self.pos_weight, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits.float().reshape(-1), labels.float().reshape(-1), pos_weight=pw)

    def __call__(self, out: Any, masks: Optional[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        from ..losses import combo_loss

        if not self.seg:
            return self._bce(out, labels)
        assert masks is not None  # a segmentation training set gives every image its mask
        if isinstance(out, tuple):
            mask_logits, class_logits = out
            return combo_loss(mask_logits, masks, **self.combo) + self.aux_weight * self._bce(class_logits, labels)
        return combo_loss(out, masks, **self.combo)


# ---------------------------------------------------------------------------------------------------


def _resolve_device(cfg: TrainConfig, info: D.DistInfo) -> torch.device:
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"config field device: {cfg.device!r} asks for CUDA, but torch sees no CUDA device")
        index = int(want[5:]) if ":" in want else (info.local_rank if info.enabled else torch.cuda.current_device())
        if index >= torch.cuda.device_count():
            raise ConfigError(f"config field device: there is no CUDA device {index} ({torch.cuda.device_count()} found)")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _device_type(cfg: TrainConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if cfg.device.startswith("cuda") else "cpu"


def _scaled(values_at_1024: tuple[int, ...], size: int) -> list[int]:
    return list(dict.fromkeys(int(round(v * size * size / (1024 * 1024))) for v in values_at_1024))


def _better(a: list, b: Optional[list]) -> bool:
    """Rank keys (larger is better) compared in order: the monitored score, then the loss."""
    return b is None or tuple(a) > tuple(b)


def _to_float(x: Any) -> Optional[float]:
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else None


class Trainer:
    """One training run of one network. Construction checks everything (config, data, network,
    the checkpoint to resume) and touches no file; ``fit(folder)`` trains into the prepared run
    folder (``folder`` is None on ranks other than 0). ``section`` is the config's place in the run's
    config (``"classifier."`` for a stage-1 classifier), named in its errors."""

    def __init__(self, cfg: TrainConfig, out: Union[str, Path], *, resume: bool = False, progress: bool = True,
                 gate: Optional[Gate] = None, info: Optional[D.DistInfo] = None,
                 preloaded: Optional[dict] = None, section: str = "") -> None:
        if not isinstance(cfg, TrainConfig):
            raise InvalidInputError(f"config must be a pneumoseg.train.TrainConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.out = Path(out)
        self.info = info or D.DistInfo()
        self.progress = bool(progress and cfg.log.progress and self.info.is_main)
        self.seg = cfg.task == "segmentation"
        self.maximize = cfg.monitor != "loss"
        self.gate = gate
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = _resolve_device(cfg, self.info)
        if cfg.amp == "fp16" and self.device.type == "cpu":
            raise ConfigError(f"config field {section}amp: fp16 mixed precision needs CUDA; use bf16 on a CPU")
        if cfg.model.batchnorm == "sync" and self.device.type != "cuda":
            raise ConfigError(f"config field {section}model.batchnorm: sync BatchNorm needs CUDA devices")
        # Data first: a missing folder, a bad CSV or an unusable fold is reported before anything else.
        check_model_config(cfg, section)
        self.data: RunData = build_data(cfg, world_size=self.info.world_size, progress=self.progress,
                                        preloaded=preloaded)
        torch.manual_seed(cfg.seed)
        network = build_network(cfg, section)
        self.model: nn.Module = network.to(self.device)
        if cfg.channels_last:
            # torch's stub lists no memory_format overload of Module.to; its docs and code take one
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model_config = dict(network.config)
        self.resume_state: Optional[dict[str, Any]] = None
        if resume:
            path = self.out / "checkpoints" / LAST
            if not path.is_file():
                raise OutputError(f"{self.out}: nothing to resume (no checkpoints/{LAST}); start the run without --resume")
            state = load_checkpoint(path)
            check_same_model(state["model_config"], self.model_config, path)
            check_same_config(state["config"], cfg.to_dict(), path, section)
            check_resume_state(state, self.model, path)
            saved_split = state.get("split")  # absent in checkpoints of older pneumoseg versions
            if saved_split is not None and saved_split != self.data.split_fingerprint():
                raise ConfigError(
                    f"config field {section}data: {path} was trained on other images or labels ({self.data.source} "
                    "splits into other training and validation folds): resuming would train on images the run "
                    "validated on; point data.root / data.csv / data.cache at the run's data, or train into a new "
                    "run folder")
            self.resume_state = state
        self.stages = cfg.stage_list()
        self.global_batch = cfg.batch_size * self.info.world_size
        per_epoch = cfg.samples_per_epoch or len(self.data.train_indices)
        self.steps_per_epoch = per_epoch // (self.global_batch * cfg.accumulate)
        if cfg.epoch_size == "positives":
            # each epoch's length follows its positive ratio; the samplers check every epoch holds a step
            self.steps_per_epoch = 1
            for s_idx, stage in enumerate(self.stages):
                try:
                    self._sampler(s_idx, stage)
                except InvalidInputError as exc:
                    raise ConfigError(f"config field {section}epoch_size: stage {stage.name}: {exc}") from None
        if self.steps_per_epoch < 1:
            step = f"{self.global_batch * cfg.accumulate} images (batch_size x processes x accumulate)"
            if cfg.samples_per_epoch:
                raise ConfigError(f"config field {section}samples_per_epoch: {per_epoch} samples per epoch hold no "
                                  f"optimizer step of {step}")
            # the user set no samples_per_epoch: the training fold itself is smaller than one step
            raise ConfigError(f"config field {section}batch_size: the training fold holds {per_epoch} images, fewer than "
                              f"one optimizer step of {step}; lower batch_size (or accumulate), or train on more images")
        self.samples_per_epoch = self.steps_per_epoch * self.global_batch * cfg.accumulate
        self.loss_fn = TaskLoss(cfg)
        self.notes: list[str] = []
        self.workers, note = loader_workers(cfg.data.workers)
        if note:
            self.notes.append(note)

    # -------------------------------------------------------------------------------------------
    # loaders

    def _sampler(self, s_idx: int, stage: StageConfig) -> D.DistributedRatioSampler:
        """The training sample order of stage ``s_idx`` (``set_epoch`` picks the epoch)."""
        cfg = self.cfg
        once = cfg.epoch_size == "positives"
        assert stage.epochs is not None  # stage_list fills every stage's epochs from the run's
        return D.DistributedRatioSampler(
            self.data.train_labels, stage.positive_ratio, num_samples=None if once else self.samples_per_epoch,
            batch_size=cfg.batch_size, epochs=stage.epochs, seed=cfg.seed + 1009 * s_idx, rank=self.info.rank,
            world_size=self.info.world_size, positives_once=once, step=self.global_batch * cfg.accumulate)

    def _stage_steps(self, sampler: D.DistributedRatioSampler, stage: StageConfig) -> int:
        """Optimizer steps of a whole stage (its epochs may differ in length)."""
        step = self.global_batch * self.cfg.accumulate
        assert stage.epochs is not None  # as in _sampler
        return sum(sampler.epoch_samples(e) // step for e in range(stage.epochs))

    def _train_loader(self, sampler: D.DistributedRatioSampler) -> torch.utils.data.DataLoader:
        subset = torch.utils.data.Subset(self.data.dataset, self.data.train_indices)
        return torch.utils.data.DataLoader(
            subset, batch_size=self.cfg.batch_size, sampler=sampler, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", drop_last=True,
            generator=torch.Generator(),  # keeps DataLoader seeding off the global RNG (exact resume)
            persistent_workers=False, worker_init_fn=_leave_signals_to_the_main_process)

    def _val_loader(self) -> torch.utils.data.DataLoader:
        shard = self.data.val_indices[self.info.rank::self.info.world_size]
        subset = torch.utils.data.Subset(self.data.dataset, shard)
        bs = self.cfg.validation.batch_size or 2 * self.cfg.batch_size
        return torch.utils.data.DataLoader(subset, batch_size=bs, shuffle=False, num_workers=self.workers,
                                           pin_memory=self.device.type == "cuda", generator=torch.Generator(),
                                           worker_init_fn=_leave_signals_to_the_main_process)

    def _inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        from ..data.cache import CachedDataset

        images = batch["image"].to(self.device, non_blocking=True)
        masks = batch.get("mask")
        if masks is not None:
            masks = masks.to(self.device, non_blocking=True).float()
        if self.data.raw:
            images = CachedDataset.normalise(images)
        labels = batch["label"].to(self.device, non_blocking=True).float()
        return images, masks, labels

    def _autocast(self):
        if self.cfg.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # -------------------------------------------------------------------------------------------
    # validation

    @torch.no_grad()
    def _validate(self, model: nn.Module, *, final: bool = False) -> dict[str, Any]:
        """Metrics over the whole validation fold (split across processes, then gathered)."""
        from ..metrics import TripletSearch, dice_per_image

        cfg, v = self.cfg, self.cfg.validation
        model.eval()
        # Sums and per-image scores stay on the device until the fold is done: one synchronisation
        # per validation, not several per batch.
        loss_acc = torch.zeros((), dtype=torch.float64, device=self.device)
        dice_acc = torch.zeros((), dtype=torch.float64, device=self.device)
        count: float = 0  # an image count, summed over processes as a float below
        score_parts: list[torch.Tensor] = []
        label_parts: list[torch.Tensor] = []
        search = None
        gated = False
        for batch in self._val_loader():
            images, masks, lab = self._inputs(batch)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                out = model(images)
            loss_acc += self.loss_fn(out, masks, lab).detach().double() * images.shape[0]
            count += images.shape[0]
            label_parts.append(lab.detach())
            if not self.seg:
                score_parts.append(torch.sigmoid(out.float())[:, 0])
                continue
            mask_logits, class_logits = out if isinstance(out, tuple) else (out, None)
            probs = torch.sigmoid(mask_logits.float())[:, 0]
            assert masks is not None  # as in TaskLoss: segmentation data has masks
            truth = masks[:, 0]
            gate_scores = None
            if self.gate is not None:
                gate_scores = self.gate.scores(images)
            elif class_logits is not None:
                gate_scores = torch.sigmoid(class_logits.float())[:, 0]
            if search is None:
                gated = gate_scores is not None
                gates = list(v.gate_thresholds)
                if self.gate is not None and self.gate.threshold is not None and self.gate.threshold not in gates:
                    gates.append(float(self.gate.threshold))
                search = TripletSearch(v.tops, v.min_areas, v.bottoms, sorted(gates) if gated else None)
            search.update(probs, truth, gate_scores)
            dice_acc += dice_per_image(probs, truth, threshold=v.threshold).double().sum()
            image_scores = gate_scores if gate_scores is not None else probs.flatten(1).amax(1)
            score_parts.append(image_scores.float())
        scores = [torch.cat(score_parts).cpu().numpy()] if score_parts else []
        labels = [torch.cat(label_parts).cpu().numpy()] if label_parts else []
        loss_sum, dice_sum = float(loss_acc), float(dice_acc)
        loss_sum, dice_sum, count = D.all_reduce_sum([loss_sum, dice_sum, count], self.info)
        all_scores = np.concatenate([s for part in D.all_gather_objects(scores, self.info) for s in part])
        all_labels = np.concatenate([s for part in D.all_gather_objects(labels, self.info) for s in part]).astype(np.int64)
        m: dict[str, Any] = {"val_loss": loss_sum / count, "val_images": int(count),
                             "val_empty_baseline": float(np.mean(all_labels == 0))}
        if self.seg:
            m["val_kaggle_dice"] = dice_sum / count
            assert search is not None  # made at the first batch: build_data gives each process validation images
            choice = search.result()
            grids = D.all_gather_objects((choice.scores * choice.images, choice.images), self.info)
            grid = sum(g for g, _ in grids) / sum(n for _, n in grids)
            best = np.unravel_index(int(np.argmax(grid)), grid.shape)
            if gated:
                assert choice.gate_thresholds is not None  # a gated search has them
                m["gate_threshold"] = float(choice.gate_thresholds[best[0]])
                best = best[1:]
            m.update(val_triplet_dice=float(grid.max()), top=float(choice.tops[best[0]]),
                     min_area=int(choice.min_areas[best[1]]), bottom=float(choice.bottoms[best[2]]))
            if final:
                m["_min_areas_grid"] = list(choice.min_areas)
        if self.seg and self.gate is None and not self.model_config.get("aux_classifier"):
            m["_score_name"] = "max pixel probability"
        else:
            self._classifier_metrics(m, all_labels, all_scores)
        m["_labels"], m["_scores"] = all_labels, all_scores
        return m

    def _classifier_metrics(self, m: dict[str, Any], labels: np.ndarray, scores: np.ndarray) -> None:
        from ..metrics import average_precision, roc_auc, sensitivity_specificity

        m["_score_name"] = "classifier probability"
        if 0 < labels.sum() < len(labels):
            m["val_auc"] = roc_auc(labels, scores)
            m["val_ap"] = average_precision(labels, scores)
        thr = m.get("gate_threshold", self.cfg.validation.threshold)
        sens, spec = sensitivity_specificity(labels, scores, threshold=thr)
        m["val_sensitivity"], m["val_specificity"] = _to_float(sens), _to_float(spec)

    @torch.no_grad()
    def _component_search(self, model: nn.Module, choice: dict[str, Any]) -> tuple[int, dict[int, float], np.ndarray]:
        """Kaggle Dice of the chosen triplet (and gate) for each final component-area filter, and the
        per-image prediction (mask not empty) at the best one."""
        from .. import postprocess as pp
        from ..metrics import dice_per_image

        v = self.cfg.validation
        areas = v.min_component_areas or _scaled((0, 64, 256, 1024), self.data.image_size)
        sums = np.zeros(len(areas))
        flags: list[list[np.ndarray]] = [[] for _ in areas]
        model.eval()
        for batch in self._val_loader():
            images, masks, _ = self._inputs(batch)
            if self.cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                out = model(images)
            mask_logits, class_logits = out if isinstance(out, tuple) else (out, None)
            probs = torch.sigmoid(mask_logits.float())[:, 0].contiguous()
            gate_scores = None
            if "gate_threshold" in choice:
                gate_scores = self.gate.scores(images) if self.gate is not None else torch.sigmoid(class_logits.float())[:, 0]
            assert masks is not None  # segmenters only: their data has masks
            truth = masks[:, 0]
            for k, area in enumerate(areas):
                kwargs = dict(top=choice["top"], min_area=choice["min_area"], bottom=choice["bottom"], min_component_area=area)
                if gate_scores is not None:
                    kwargs["gate_threshold"] = choice["gate_threshold"]
                pred = pp.postprocess(probs, gate_scores, **kwargs)
                sums[k] += float(dice_per_image(pred, truth).sum())
                flags[k].append(pred.flatten(1).amax(1).cpu().numpy() > 0)
        sums = np.asarray(D.all_reduce_sum(list(sums), self.info))
        n = len(self.data.val_indices)
        dice = {int(a): float(s / n) for a, s in zip(areas, sums)}
        best = int(np.argmax(sums))
        gathered = D.all_gather_objects(flags[best], self.info)
        return int(areas[best]), dice, np.concatenate([f for part in gathered for f in part]).astype(np.int64)

    # -------------------------------------------------------------------------------------------
    # state

    def _weights_payload(self, ema: Optional[ModelEMA]) -> dict[str, Any]:
        return {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "ema": None if ema is None else {"decay": ema.decay, "updates": ema.updates,
                                                 "weights": {k: v.detach().cpu() for k, v in ema.module.state_dict().items()}}}

    def _rng_state(self, augment: Any) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "augment": None if augment is None else augment.generator.get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng_state(self, state: dict[str, Any], augment: Any) -> None:
        torch.set_rng_state(state["torch"])
        if augment is not None and state.get("augment") is not None:
            augment.generator.set_state(state["augment"])
        if self.device.type == "cuda" and state.get("cuda") is not None:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def _eval_model(self, ema: Optional[ModelEMA]) -> nn.Module:
        return ema.module if ema is not None else self.model

    def _augment(self) -> Any:
        from ..data.transforms import Augment

        a = self.cfg.augment
        if not a.enabled:
            return None
        return Augment(hflip=a.hflip, shift=a.shift, scale=a.scale, rotate_degrees=a.rotate, affine_p=a.affine_p,
                       brightness=a.brightness, contrast=a.contrast, gamma=tuple(a.gamma), intensity_p=a.intensity_p,
                       seed=(self.cfg.seed * 7919 + self.info.rank) % (2**63))

    def _say(self, text: str) -> None:
        if self.progress:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stderr)

    # -------------------------------------------------------------------------------------------

    def fit(self, folder: Optional[OutputFolder]) -> TrainResult:
        """Train every stage, then search the thresholds and write the model directory."""
        cfg, info = self.cfg, self.info
        main = info.is_main
        if main and folder is None:
            raise InvalidInputError("rank 0 needs the run's output folder")
        if main:
            import yaml

            assert folder is not None  # refused just above
            folder.write_bytes("config.yaml", data=yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        from .logs import RunLog

        log = RunLog(folder, tensorboard=cfg.log.tensorboard) if main and folder is not None else None
        if log is not None and log.note:
            self.notes.append(log.note)
        model = self.model
        train_module: nn.Module = model
        if cfg.model.batchnorm == "sync":
            train_module = model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.model = model
        if info.enabled:
            train_module = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            # torch.compile's stub returns a Callable; given a Module it returns an OptimizedModule (a Module)
            train_module = cast(nn.Module, torch.compile(train_module))
        ema = ModelEMA(model, cfg.ema) if cfg.ema is not None else None
        augment = self._augment()
        scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)

        progress: dict[str, Any] = {"stage": 0, "epoch": 0, "batch": 0, "global_step": 0, "global_epoch": 0, "stage_started": False,
                    "stage_best": None, "bad_epochs": 0, "finished": False, "loss_sum": 0.0, "loss_count": 0}
        history: list[dict[str, Any]] = []
        top_k: list[dict[str, Any]] = []
        thresholds: Optional[dict[str, Any]] = None
        st = self.resume_state
        optimizer = schedule = None
        if st is not None:
            model.load_state_dict(st["model"])
            if ema is not None and st.get("ema") is not None:
                ema.load_state_dict(st["ema"])
            progress.update(st["progress"])
            history = list(st.get("history", []))
            top_k = list(st.get("top_k", []))
            thresholds = st.get("thresholds")
            if log is not None:
                for row in history:
                    log.rows.append(dict(row))
            if progress["finished"]:
                self._say(f"{self.out}: the run is already finished; writing its model directory again")
        for s_idx in range(progress["stage"], len(self.stages)):
            stage = self.stages[s_idx]
            # stage_list fills every unset field of a stage from the run's
            assert stage.epochs is not None and stage.lr is not None and stage.scheduler is not None
            if progress["stage"] != s_idx or not progress["stage_started"]:
                progress.update(stage=s_idx, epoch=0, batch=0, stage_started=False, stage_best=None, bad_epochs=0,
                                loss_sum=0.0, loss_count=0)
            lr = stage.lr
            sampler = self._sampler(s_idx, stage)
            optimizer = build_optimizer(model.parameters(), cfg.optimizer, lr)
            schedule = StageSchedule(optimizer, stage.scheduler, lr=lr, epochs=stage.epochs,
                                     steps_per_epoch=self.steps_per_epoch, maximize=self.maximize,
                                     total_steps=self._stage_steps(sampler, stage))
            if progress["stage_started"]:
                # only a resumed stage is started here: every other one was reset just above
                assert st is not None
                try:
                    optimizer.load_state_dict(st["optimizer"])
                    schedule.load_state_dict(st["schedule"])
                    if scaler is not None and st.get("scaler") is not None:
                        scaler.load_state_dict(st["scaler"])
                    self._set_rng_state(st["rng"], augment)
                except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
                    if isinstance(exc, PneumosegError):
                        raise
                    # torch's own loaders raise these for a damaged or foreign optimizer or RNG state
                    first = (str(exc).splitlines() or [""])[0]
                    raise DataFormatError(f"{self.out / 'checkpoints' / LAST}: the checkpoint's optimizer, schedule "
                                          f"or random state cannot be restored ({type(exc).__name__}: {first})") from None
            else:
                if stage.init == "best" and s_idx > 0:
                    # The best epoch of all earlier stages, as SIIM 1st (its best-checkpoint file is only
                    # replaced by a better score): a stage that never beat the one before hands on the
                    # earlier, better weights, not its own best.
                    best_path = self.out / "checkpoints" / (top_k[0]["file"] if top_k else STAGE_BEST)
                    if best_path.is_file():
                        best = load_checkpoint(best_path)
                        check_checkpoint_weights(best, model, best_path)
                        model.load_state_dict(best["model"])
                        if ema is not None and best.get("ema") is not None:
                            ema.load_state_dict(best["ema"])
                        self._say(f"stage {stage.name}: starting from the best weights so far ({best_path.name})")
                if st is not None and st.get("rng") is not None and progress["global_epoch"] > 0:
                    self._set_rng_state(st["rng"], augment)
                progress["stage_started"] = True
            st = None  # resume state used once
            stop = False
            for epoch in range(progress["epoch"], stage.epochs):
                progress["epoch"] = epoch
                row = self._train_epoch(train_module, optimizer, schedule, scaler, ema, augment, sampler, stage,
                                        progress, folder, history, top_k, thresholds)
                last_epoch = epoch == stage.epochs - 1
                score = key = None
                if (epoch + 1) % cfg.validation.every == 0 or last_epoch:
                    metrics = self._validate(self._eval_model(ema))
                    row.update({k: _to_float(v) if isinstance(v, float) else v
                                for k, v in metrics.items() if not k.startswith("_")})
                    score = self._monitor_value(metrics)
                    key = self._rank_key(metrics)
                    if self.seg:
                        thresholds = {"top": metrics["top"], "min_area": metrics["min_area"], "bottom": metrics["bottom"],
                                      **({"gate": metrics["gate_threshold"]} if "gate_threshold" in metrics else {})}
                schedule.after_epoch(score)
                progress["global_epoch"] += 1
                row["epoch"] = progress["global_epoch"]
                history.append(row)
                improved = key is not None and _better(key, progress["stage_best"])
                # epochs, validated or not (validation.every > 1), count towards early stopping, which
                # is decided after a validation
                if improved:
                    progress["stage_best"], progress["bad_epochs"] = key, 0
                else:
                    progress["bad_epochs"] += 1
                if (key is not None and stage.early_stopping is not None
                        and progress["bad_epochs"] >= stage.early_stopping):
                    stop = True
                finished_stage = last_epoch or stop
                progress.update(epoch=epoch + 1, batch=0, loss_sum=0.0, loss_count=0)
                if finished_stage:
                    progress.update(stage=s_idx + 1, epoch=0, stage_started=False)
                if main:
                    assert folder is not None and log is not None  # rank 0's, from the top of fit
                    weights = self._weights_payload(ema)
                    common = {"config": cfg.to_dict(), "model_config": self.model_config, "metrics": _plain_row(row),
                              "thresholds": thresholds, "progress": dict(progress),
                              "split": self.data.split_fingerprint()}
                    if improved:
                        save_checkpoint(folder, STAGE_BEST, {**common, **weights})
                    if key is not None:
                        assert score is not None  # a rank key is made from a score
                        top_k = self._update_top_k(folder, top_k, score, key, progress["global_epoch"],
                                                   {**common, **weights})
                    save_checkpoint(folder, LAST, {
                        **common, **weights, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                        "scaler": None if scaler is None else scaler.state_dict(), "rng": self._rng_state(augment),
                        "history": [_plain_row(r) for r in history], "top_k": top_k})
                    log.add(row)
                    self._say(_epoch_line(row, self.seg))
                top_k = D.broadcast_object(top_k, info)
                D.barrier(info)
                if stop:
                    self._say(f"stage {stage.name}: early stop after {progress['bad_epochs']} epochs without improvement")
                    break
        if log is not None:
            log.close()
        return self._finish(folder, ema, history, top_k, progress)

    def _monitor_value(self, metrics: dict[str, Any]) -> Optional[float]:
        key = {"triplet_dice": "val_triplet_dice", "kaggle_dice": "val_kaggle_dice", "auc": "val_auc",
               "loss": "val_loss"}[self.cfg.monitor]
        return _to_float(metrics.get(key))

    def _rank_key(self, metrics: dict[str, Any]) -> Optional[list]:
        """Larger is better: the monitored score (negated for the loss), ties broken by the lower loss."""
        score = self._monitor_value(metrics)
        if score is None:
            return None
        loss = _to_float(metrics.get("val_loss"))
        return [score, -loss if loss is not None else 0.0] if self.maximize else [-score, 0.0]

    def _update_top_k(self, folder: OutputFolder, top_k: list[dict[str, Any]], score: float, key: list, epoch: int,
                      payload: dict[str, Any]) -> list[dict[str, Any]]:
        k = self.cfg.checkpoint.keep_top_k
        ranked = sorted(top_k, key=lambda e: tuple(e["key"]), reverse=True)
        if len(ranked) >= k and not _better(key, ranked[-1]["key"]):
            return top_k
        name = f"epoch-{epoch:03d}.pt"
        save_checkpoint(folder, name, payload)
        ranked.append({"score": float(score), "key": [float(v) for v in key], "epoch": int(epoch), "file": name})
        ranked = sorted(ranked, key=lambda e: tuple(e["key"]), reverse=True)
        for dropped in ranked[k:]:
            with contextlib.suppress(FileNotFoundError):
                (folder.path / "checkpoints" / dropped["file"]).unlink()
        return ranked[:k]

    def _train_epoch(self, train_module, optimizer, schedule, scaler, ema, augment, sampler, stage: StageConfig,
                     progress: dict[str, Any], folder, history, top_k, thresholds) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        epoch = progress["epoch"]
        start_batch = progress["batch"]
        sampler.set_epoch(epoch, start_batch)
        loader = self._train_loader(sampler)
        train_module.train()
        if cfg.model.batchnorm == "frozen":
            _set_frozen_bn(train_module)
        total = sampler.batches
        bar = None
        if self.progress:
            from tqdm import tqdm

            what = "segmenter" if self.seg else "classifier"
            bar = tqdm(total=total, initial=start_batch, desc=f"{what} {stage.name} epoch {epoch + 1}/{stage.epochs}",
                       unit="batch", leave=False, dynamic_ncols=True)
        t0 = time.perf_counter()
        images_done = 0
        accumulate = cfg.accumulate
        step_lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        # The loss is summed on the device and read (one synchronisation) every LOSS_READ_EVERY batches
        # and before each checkpoint, at fixed batch indices, so an interrupted and resumed run adds
        # the same partial sums in the same order as an uninterrupted one.
        loss_acc = torch.zeros((), dtype=torch.float64, device=self.device)
        window = [start_batch]  # first batch index of the sum not yet read

        def read_loss(end: int) -> None:
            value = float(loss_acc)
            # A NaN / infinite loss means the run diverged (or the data holds non-finite values): every
            # later step would only spread NaN through the weights, so stop and say where. All
            # processes decide together, or one would stop while the others wait in a collective.
            if D.all_reduce_sum([0.0 if math.isfinite(value) else 1.0], info)[0] > 0:
                what = f"became {value}" if not math.isfinite(value) else "became NaN or infinite on another process"
                raise TrainingError(
                    f"the training loss {what} in epoch {epoch + 1}, batches {window[0] + 1}-{end} (learning rate "
                    f"{optimizer.param_groups[0]['lr']:.3g}): the run diverged or the data holds non-finite values; "
                    "lower the learning rate, set clip_grad_norm, or check the data (the run folder keeps its last "
                    "checkpoint)")
            progress["loss_sum"] += value
            loss_acc.zero_()
            window[0] = end

        for b, batch in enumerate(loader, start=start_batch):
            images, masks, labels = self._inputs(batch)
            if augment is not None:
                if masks is not None:
                    images, masks = augment(images, masks)
                else:
                    images = augment(images)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            boundary = (b + 1) % accumulate == 0
            sync = contextlib.nullcontext()
            if info.enabled and not boundary and hasattr(train_module, "no_sync"):
                sync = train_module.no_sync()
            with sync:
                with self._autocast():
                    out = train_module(images)
                loss = self.loss_fn(out, masks, labels)
                scaled = loss / accumulate
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_acc += loss.detach().double() * images.shape[0]
            progress["loss_count"] += images.shape[0]
            images_done += images.shape[0] * info.world_size
            if boundary:
                # the rate this step uses: a one-cycle schedule moves it after every step, so the
                # rate read after the epoch would be the next epoch's first
                step_lr = optimizer.param_groups[0]["lr"]
                optimizer_step(optimizer, self.model, scaler=scaler, clip_grad_norm=cfg.clip_grad_norm,
                               schedule=schedule, ema=ema)
                progress["global_step"] += 1
                every = cfg.checkpoint.every_steps
                if every and progress["global_step"] % every == 0 and b + 1 < total:
                    read_loss(b + 1)
                    progress["batch"] = b + 1
                    if info.is_main:
                        save_checkpoint(folder, LAST, {
                            "config": cfg.to_dict(), "model_config": self.model_config, "metrics": {},
                            "thresholds": thresholds, "progress": dict(progress),
                            "split": self.data.split_fingerprint(), **self._weights_payload(ema),
                            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                            "scaler": None if scaler is None else scaler.state_dict(), "rng": self._rng_state(augment),
                            "history": [_plain_row(r) for r in history], "top_k": top_k})
            if (b + 1) % LOSS_READ_EVERY == 0:
                read_loss(b + 1)
                if bar is not None:
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{progress['loss_sum'] / max(1, progress['loss_count']):.4f}",
                                    lr=f"{step_lr:.2e}", img_s=f"{images_done / elapsed:.1f}")
            if bar is not None:
                bar.update(1)
        read_loss(total)
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        loss_sum, loss_count = D.all_reduce_sum([progress["loss_sum"], progress["loss_count"]], info)
        return {"epoch": None, "stage": stage.name, "lr": step_lr,
                "positive_ratio": sampler.ratio(epoch), "train_loss": loss_sum / max(1.0, loss_count),
                "images_per_s": images_done / max(seconds, 1e-9), "seconds": seconds}

    # -------------------------------------------------------------------------------------------

    def _finish(self, folder: Optional[OutputFolder], ema: Optional[ModelEMA], history: list[dict[str, Any]],
                top_k: list[dict[str, Any]], progress: dict[str, Any]) -> TrainResult:
        """Best weights -> threshold search on the validation fold -> model directory, plots."""
        from ..models.model_dir import Thresholds, save_model_dir

        cfg, info = self.cfg, self.info
        best_path = None
        if top_k:
            best_path = self.out / "checkpoints" / top_k[0]["file"]
            if top_k[0]["epoch"] != progress["global_epoch"] or self.resume_state is not None:
                best = load_checkpoint(best_path)  # otherwise the weights in memory are the best epoch's
                check_checkpoint_weights(best, self.model, best_path)
                self.model.load_state_dict(best["model"])
                if ema is not None and best.get("ema") is not None:
                    ema.load_state_dict(best["ema"])
        model = self._eval_model(ema)
        final = self._validate(model, final=True)
        labels, scores = final.pop("_labels"), final.pop("_scores")
        score_name = final.pop("_score_name", "score")
        final.pop("_min_areas_grid", None)
        metrics: dict[str, Any] = {"task": cfg.task, "fold": cfg.data.fold, "folds": cfg.data.folds,
                                   "validation_images": len(labels), "steps": progress["global_step"],
                                   "epochs": progress["global_epoch"],
                                   "best_epoch": top_k[0]["epoch"] if top_k else progress["global_epoch"],
                                   "monitor": cfg.monitor, "data": self.data.source}
        predictions = None
        if self.seg:
            area, dice_by_area, predictions = self._component_search(model, final)
            thresholds = Thresholds(gate=final.get("gate_threshold", 0.5), top=final["top"], min_area=final["min_area"],
                                    bottom=final["bottom"], min_component_area=area)
            metrics.update(kaggle_dice=dice_by_area[area], triplet_dice=final["val_triplet_dice"],
                           kaggle_dice_at_threshold=final["val_kaggle_dice"], threshold=cfg.validation.threshold,
                           empty_baseline=final["val_empty_baseline"],
                           kaggle_dice_by_min_component_area={str(k): v for k, v in dice_by_area.items()},
                           gate=("classifier" if self.gate is not None else
                                 "segmenter" if self.model_config.get("aux_classifier") else None))
        else:
            gate = _youden_threshold(labels, scores)
            thresholds = Thresholds(gate=gate)
            final["gate_threshold"] = gate
            self._classifier_metrics(final, labels, scores)
            predictions = (scores >= gate).astype(np.int64)
        for key in ("val_auc", "val_ap", "val_sensitivity", "val_specificity"):
            if final.get(key) is not None:
                metrics[key[4:]] = final[key]
        if "gate_threshold" in final:
            metrics["gate_threshold"] = final["gate_threshold"]
        metrics["val_loss"] = final["val_loss"]
        model_dir = None
        if info.is_main:
            assert folder is not None  # fit refuses rank 0 without its folder
            name = "segmenter" if self.seg else "classifier"
            networks = {name: self.model if ema is None else ema.module}
            sizes = {name: cfg.data.image_size}
            crops = {"classifier": "chest"} if not self.seg and cfg.data.chest_crop else {}
            if self.gate is not None:
                networks["classifier"] = self.gate.model
                sizes["classifier"] = self.gate.input_size
                if self.gate.chest_crop:
                    crops["classifier"] = "chest"
            training = {"config": cfg.to_dict(), "history": [_plain_row(r) for r in history],
                        "best_checkpoint": None if best_path is None else f"checkpoints/{best_path.name}",
                        "chest_crop": bool(cfg.data.chest_crop)}
            # written through the folder: each file listed before it is in place, and in a forced run what
            # it replaces set aside just then (not before: the earlier pneumoseg.json names stale artefacts)
            model_dir = save_model_dir(folder, networks, input_sizes=sizes, thresholds=thresholds,
                                       metrics=metrics, training=training, crops=crops, prepare=False)
            note = _artefacts_note(self.out, bool(progress.get("finished")), sorted(model_dir.artefacts),
                                   sorted(set(model_dir.removed_artefacts) - set(model_dir.left_artefacts)),
                                   sorted(model_dir.left_artefacts))
            if note:
                self.notes.append(note)
            written, note = ([], None)
            if cfg.log.plots:
                written, note = self._plots(folder, history, labels, scores, score_name, predictions,
                                            metrics.get("empty_baseline"))
            if note:
                self.notes.append(note)
            last = self.out / "checkpoints" / LAST
            if last.is_file():
                state = load_checkpoint(last)
                state["progress"] = {**state["progress"], "finished": True}
                state = {k: v for k, v in state.items() if k not in ("format", "format_version", "pneumoseg_version")}
                save_checkpoint(folder, LAST, state)
        D.barrier(info)
        return TrainResult(self.out, model_dir, metrics, thresholds, history, progress["global_step"], best_path,
                           notes=list(self.notes), model=model.eval())

    def _plots(self, folder, history, labels, scores, score_name, predictions, baseline):
        from .logs import write_plots

        curve = "val_triplet_dice" if self.seg else "val_auc"
        return write_plots(folder, history, labels=labels, scores=scores, score_name=score_name,
                           predictions=predictions, curve_key=curve,
                           curve_label="validation Kaggle Dice (best triplet)" if self.seg else "validation AUC",
                           baseline=baseline if self.seg else None)


def optimizer_step(optimizer: torch.optim.Optimizer, model: nn.Module, *, scaler: Optional[Any],
                   clip_grad_norm: Optional[float], schedule: StageSchedule, ema: Optional[ModelEMA]) -> bool:
    """One optimizer step on the accumulated gradients: unscaled (fp16) before the norm clip, then
    the schedule and the EMA follow it. Returns False when the gradient scaler skipped the step
    (inf/NaN gradients): the weights did not change, so neither do the schedule and the EMA (which
    counted a skipped step as an update, pulling the average towards the unchanged weights and
    advancing its warm-up)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad_norm is not None:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    stepped = True
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        stepped = scaler.get_scale() >= scale  # a lowered scale means inf/NaN gradients: step skipped
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if stepped:
        schedule.after_step()
        if ema is not None:
            ema.update(model)
    return stepped


def _artefacts_note(out: Path, finished_before: bool, kept: list[str], removed: list[str],
                    left: Sequence[str] = ()) -> Optional[str]:
    """What writing the model directory again did to what `pneumoseg export` had added to it."""
    parts = []
    if kept:
        what = ("the run was already finished: its model directory was written again from the same weights, and "
                "the exported artefacts made from them were kept" if finished_before else
                "its model directory was written again; the exported artefacts of its unchanged networks were kept")
        parts.append(f"{out}: {what} ({', '.join(kept)})")
    if removed:
        parts.append(f"{out}: removed the exported artefacts made from networks that have changed since "
                     f"({', '.join(removed)}), as they would answer with the earlier weights; export again: "
                     f"`pneumoseg export {out}`")
    if left:
        parts.append(f"{out}: dropped from pneumoseg.json the exported artefacts made from networks that have "
                     f"changed since ({', '.join(left)}); their files were left in place, unlisted, as they were "
                     f"changed since export or could not be removed; export again: `pneumoseg export {out}`")
    return "; ".join(parts) or None


def _youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold maximising sensitivity + specificity (a classifier's own gate)."""
    from ..metrics import roc_curve

    if not 0 < labels.sum() < len(labels):
        return 0.5
    fpr, tpr, thr = roc_curve(labels, scores)
    j = tpr - fpr
    finite = np.isfinite(thr)
    best = int(np.argmax(np.where(finite, j, -np.inf)))
    return float(min(1.0, max(0.0, thr[best])))


def _plain_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if isinstance(v, (np.floating, np.integer)):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        if isinstance(v, (str, int, float, bool, type(None))):
            out[k] = v
    return out


def _epoch_line(row: dict[str, Any], seg: bool) -> str:
    parts = [f"{'segmenter' if seg else 'classifier'} epoch {row['epoch']} ({row['stage']})", f"loss {row['train_loss']:.4f}", f"lr {row['lr']:.2e}",
             f"{row['images_per_s']:.1f} img/s"]
    if row.get("val_loss") is not None:
        parts.append(f"val loss {row['val_loss']:.4f}")
    if seg and row.get("val_triplet_dice") is not None:
        parts.append(f"Kaggle Dice {row['val_triplet_dice']:.4f} (empty {row['val_empty_baseline']:.4f})")
    if row.get("val_auc") is not None:
        parts.append(f"AUC {row['val_auc']:.4f}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------


def _classifier_done(folder_path: Path) -> bool:
    last = folder_path / "checkpoints" / LAST
    if not last.is_file() or not (folder_path / "pneumoseg.json").is_file():
        return False
    try:
        return bool(load_checkpoint(last)["progress"].get("finished"))
    except DataFormatError:
        return False


def run_inputs(config: TrainConfig) -> tuple:
    """The paths a run reads: a run folder that would remove them is refused."""
    return (config.data.root, config.data.csv, config.data.cache, config.classifier_dir, config.model.pretrained)


def train(config: TrainConfig, out: Union[str, Path], *, resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> TrainResult:
    """Train ``config`` into the run folder ``out`` (see the module documentation). ``resume``
    continues the run in ``out`` from its last checkpoint; ``overwrite`` writes into a folder holding
    files pneumoseg did not write. Under torchrun every process calls this; rank 0 writes."""
    if not isinstance(config, TrainConfig):
        raise InvalidInputError(f"config must be a pneumoseg.train.TrainConfig, got {type(config).__name__}")
    out = Path(out)
    info = D.init_distributed(_device_type(config))
    threads = torch.get_num_threads()
    folder: Optional[OutputFolder] = None
    cls_folder: Optional[OutputFolder] = None
    failed = True  # until the run returns its result
    cls_out = out / "classifier"
    try:
        cls_cfg = config.classifier_config()
        check_model_config(config)
        if cls_cfg is not None:
            check_model_config(cls_cfg, "classifier.")
        preloaded: dict = {}
        cls_trainer = None
        if cls_cfg is not None:
            cls_done = resume and _classifier_done(cls_out)
            cls_resume = resume and (cls_out / "checkpoints" / LAST).is_file() and not cls_done
            if not cls_done:
                cls_trainer = Trainer(cls_cfg, cls_out, resume=cls_resume, progress=progress, info=info,
                                      preloaded=preloaded, section="classifier.")
        gate = None
        if config.classifier_dir is not None:
            gate = Gate.from_model_dir(config.classifier_dir, _resolve_device(config, info))
        # The segmenter's checks run before anything is trained or written, too.
        # With a stage-1 classifier, a run killed before its segmenter started has nothing of it to resume.
        seg_resume = resume and (cls_cfg is None or (out / "checkpoints" / LAST).is_file())
        seg_trainer = Trainer(config, out, resume=seg_resume, progress=progress, gate=gate, info=info,
                              preloaded=preloaded)
        if info.is_main:  # held (no other process may write here) until the run ends
            folder = prepare_output_folder(out, overwrite=overwrite, what=OutputKind.TRAINING_RUN, resume=resume,
                                           inputs=run_inputs(config))
        D.barrier(info)
        cls_result = None
        if cls_cfg is not None:
            if info.is_main:
                cls_folder = OutputFolder(cls_out, what=OutputKind.CLASSIFIER_RUN,
                                          resume=resume and (cls_out / ".pneumoseg-manifest").is_file())
            if cls_trainer is not None:
                cls_result = cls_trainer.fit(cls_folder)
            from ..models.model_dir import load_model_dir

            D.barrier(info)
            md = load_model_dir(cls_out)
            seg_trainer.gate = Gate(md.build("classifier", device=seg_trainer.device),
                                    md.networks["classifier"].input_size[0], bool(cls_cfg.data.chest_crop),
                                    md.thresholds.gate)
        result = seg_trainer.fit(folder)
        result.classifier = cls_result
        failed = False
        return result
    finally:
        # A failed run that left a checkpoint stays, to --resume; the folder's earlier run then stays set
        # aside until this one ends (see pneumoseg._fs). One that left none puts the earlier run back.
        resumable = failed and any((d / "checkpoints" / LAST).is_file() for d in (out, cls_out))
        for held in (cls_folder, folder):
            if held is not None:
                held.close(failed=failed, keep=resumable)  # at once, not whenever a traceback holding it is dropped
        torch.set_num_threads(threads)  # config.threads is for the run, not for the caller's process
        D.shutdown(info)
