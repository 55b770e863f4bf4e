"""Training checkpoints: everything a run needs to continue exactly, in a file ``torch.load`` reads
with ``weights_only=True`` (tensors and plain containers of numbers and strings only: nothing is
unpickled), written atomically (temporary file, fsync, rename), so a process killed at any moment
leaves the previous checkpoint intact.

Contents: ``format``/``format_version``, ``pneumoseg_version``, ``config`` (the run's training config),
``model_config`` (the network's construction arguments), ``model`` (state dict), ``ema``,
``optimizer``, ``schedule``, ``scaler``, ``progress`` (stage, epoch, step), ``rng`` (torch, CUDA and
augmentation generator states), ``sampler``, ``metrics`` (of the last validation), ``thresholds``
(the best triplet so far), ``history`` (every epoch's log row) and ``top_k``.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from .. import __version__
from .._checks import check_path, nesting_excess, show
from .._fs import OutputFolder, atomic_write
from ..errors import DataFormatError, InvalidInputError
from ..models.model_dir import weight_mismatches
from ..models.pretrained import check_torch_archive

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "save_checkpoint", "load_checkpoint", "check_same_model",
           "check_same_config", "check_resume_state", "check_checkpoint_weights", "checkpoint_state_dict", "checkpoint_to_safetensors"]

CHECKPOINT_FORMAT = "pneumoseg-checkpoint"
CHECKPOINT_VERSION = 1
_PLAIN = (str, int, float, bool, type(None))


def _check_plain(obj: Any, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` would not read back (so the problem shows
    when the checkpoint is written, not when a resume needs it)."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise InvalidInputError(f"checkpoint key {k!r} at {where} is not a str or int")
            _check_plain(v, f"{where}.{k}")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise InvalidInputError(f"checkpoint value at {where} is a {type(obj).__name__}, which weights_only loading refuses")


def save_checkpoint(folder: OutputFolder, name: str, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` (plus format and version) as ``folder/checkpoints/name`` atomically."""
    data = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "pneumoseg_version": __version__,
            **payload}
    _check_plain(data, "checkpoint")
    buf = io.BytesIO()
    torch.save(data, buf)
    with folder.open("checkpoints", name) as f:
        f.write(buf.getbuffer())
    return folder.path / "checkpoints" / name


#: values (containers and leaves, shared ones counted each time they are reached) and nesting a
#: checkpoint may hold: a real one has a few thousand, a few levels deep
_MAX_VALUES = 100_000
_MAX_DEPTH = 100


def _check_bounded(data: Any, path: Path) -> None:
    """Refuse a checkpoint whose containers are nested too deeply or, shared through the pickle's
    memo, expand past :data:`_MAX_VALUES`: comparing such a config with the run's (--resume) raised
    RecursionError at 3000 levels, and a 4 MB checkpoint whose config shares one mapping twice per
    level, 22 levels deep (4 million leaves), ran past a minute."""
    excess = nesting_excess(data, _MAX_DEPTH, _MAX_VALUES)
    if excess is not None:
        what = f"holds more than {_MAX_VALUES:,} values" if excess == "values" else f"nests deeper than {_MAX_DEPTH} levels"
        raise DataFormatError(f"{path}: not a checkpoint pneumoseg wrote (it {what})")


def load_checkpoint(path: Union[str, Path], *, map_location: Any = "cpu") -> dict[str, Any]:
    """A pneumoseg training checkpoint, read with ``weights_only=True``; anything else (a file of
    another program, a newer format, a damaged file) is a :class:`pneumoseg.DataFormatError`."""
    path = check_path(path, "checkpoint", error=DataFormatError)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such checkpoint")
    check_torch_archive(path)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError ... for damaged files
        first = (str(exc).splitlines() or [""])[0]
        raise DataFormatError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {first})") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise DataFormatError(f"{path}: not a pneumoseg training checkpoint")
    _check_bounded(data, path)
    version = data.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise DataFormatError(f"{path}: checkpoint format {version!r} written by pneumoseg "
                              f"{data.get('pneumoseg_version', '?')}; this pneumoseg reads {CHECKPOINT_VERSION}")
    for key in ("model", "model_config", "config"):
        if key not in data:
            raise DataFormatError(f"{path}: the checkpoint has no {key!r}")
    return data


def _describe(cfg: Mapping[str, Any]) -> str:
    if cfg.get("kind") == "segmenter":
        return f"{cfg.get('arch')} segmenter on {cfg.get('encoder')}" + (" with a classification head" if cfg.get("aux_classifier") else "")
    return f"{cfg.get('kind')} on {cfg.get('encoder')}"


def check_same_model(saved: Mapping[str, Any], current: Mapping[str, Any], where: Any) -> None:
    """Refuse a checkpoint of another network than the config builds, naming both."""
    if dict(saved) != dict(current):
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        details = ", ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} in the config" for k in diff[:3])
        raise InvalidInputError(f"{where}: the checkpoint holds a {_describe(saved)}, but the config builds a "
                                f"{_describe(current)} ({details})")


# What a resumed run may read differently from the run it continues: where the data, the stage-1
# classifier and the starting weights live (the checkpoint holds the weights), how data is loaded,
# the machine, the logs. Everything else shapes the training itself.
RESUME_MAY_CHANGE = ("data.root", "data.csv", "data.cache", "data.preload", "data.workers", "model.pretrained",
                     "classifier_dir", "device", "threads", "compile", "log", "validation.batch_size",
                     "checkpoint.every_steps")


def _nested(config: Mapping[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
    return node


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):  # stages
        out = {f"{prefix}length": len(value)}
        for i, v in enumerate(value):
            out.update(_flat(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: value}


def _may_change(key: str) -> bool:
    key = key[len("classifier."):] if key.startswith("classifier.") else key
    return any(key == f or key.startswith(f + ".") for f in RESUME_MAY_CHANGE)


def check_same_config(saved: Mapping[str, Any], current: Mapping[str, Any], where: Any, section: str = "") -> None:
    """Refuse to resume a run under a config that trains differently from the one in its checkpoint
    (``--resume --set epochs=20`` on a finished 10-epoch run trained nothing, yet rewrote config.yaml
    to say 20; on an unfinished run it changed the schedule halfway). Fields of ``RESUME_MAY_CHANGE``
    and fields the checkpoint does not know (written by an older pneumoseg) are not compared."""
    old, new = _flat(saved), _flat(current)

    def leaf(flat: dict[str, Any], key: str) -> Optional[str]:
        """``key``, or the leaf above it (a ``classifier: null`` that now has fields), if ``flat`` has it."""
        parts = key.split(".")
        return next((k for k in (".".join(parts[:i]) for i in range(len(parts), 0, -1)) if k in flat), None)

    diff: dict[str, tuple[Any, Any]] = {}
    for k in sorted(set(old) | set(new)):
        a, b = leaf(old, k), leaf(new, k)
        if a is None or b is None or _may_change(k):  # a field this checkpoint's pneumoseg did not have
            continue
        if old[a] != new[b]:
            shown = min(a, b, key=len)
            diff.setdefault(shown, (old[a] if a == shown else _nested(saved, shown),
                                    new[b] if b == shown else _nested(current, shown)))
    if diff:
        from .config import ConfigError

        details = "; ".join(f"{section}{k}: {show(a)} in the run, {show(b)} now" for k, (a, b) in list(diff.items())[:3])
        first = next(iter(diff))
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise ConfigError(f"config field {section}{first}: {where} was trained with another config ({details}{more}); "
                          "--resume continues a run as it was configured: train into a new run folder to change it")


_TOP_K_FILE = re.compile(r"epoch-[0-9]{3,}\.pt")
_PROGRESS_COUNTS = ("stage", "epoch", "batch", "global_step", "global_epoch", "bad_epochs", "loss_count")


def _weights_fit(module: torch.nn.Module, weights: Any, what: str) -> str:
    """'' when ``weights`` is a state dict of ``module``'s names and shapes, else what differs."""
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        return f"{what} is not a state dict of tensors"
    parts = weight_mismatches({k: tuple(v.shape) for k, v in weights.items()},
                              {k: tuple(v.shape) for k, v in module.state_dict().items()}, "the checkpoint", "the network")
    return f"{what} do not fit the network: " + "; ".join(parts) if parts else ""


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _weight_problems(state: Mapping[str, Any], model: torch.nn.Module) -> list[str]:
    problems = [_weights_fit(model, state.get("model"), "its model weights")]
    ema = state.get("ema")
    if ema is not None:
        if not isinstance(ema, Mapping) or not _number(ema.get("decay")) or not _whole(ema.get("updates")):
            problems.append("its ema is not a mapping of decay, updates and weights")
        else:
            problems.append(_weights_fit(model, ema.get("weights"), "its EMA weights"))
    return [p for p in problems if p]


def check_checkpoint_weights(state: Mapping[str, Any], model: torch.nn.Module, where: Any) -> None:
    """Refuse a checkpoint whose model (or EMA) weights do not fit ``model``, naming the first
    difference (``load_state_dict`` raised a RuntimeError listing every key)."""
    problems = _weight_problems(state, model)
    if problems:
        raise DataFormatError(f"{where}: the checkpoint does not fit this run: {'; '.join(problems)}")


def check_resume_state(state: Mapping[str, Any], model: torch.nn.Module, where: Any) -> None:
    """Refuse, before a resumed run uses it, a checkpoint whose weights do not fit ``model`` or whose
    progress, history or top-k list are not what pneumoseg writes: these came out as RuntimeError,
    TypeError or KeyError tracebacks, and a top-k entry naming '../../file' deleted that file outside
    the run folder when a better epoch replaced it."""
    problems = _weight_problems(state, model)
    progress = state.get("progress")
    if not isinstance(progress, Mapping) or not all(isinstance(k, str) for k in progress):
        problems.append("its progress is not a mapping")
    else:
        bad = [k for k in _PROGRESS_COUNTS if k in progress and not _whole(progress[k])]
        bad += [k for k in ("stage_started", "finished") if k in progress and not isinstance(progress[k], bool)]
        bad += [k for k in ("loss_sum",) if k in progress and not _number(progress[k])]
        best = progress.get("stage_best")
        if best is not None and (not isinstance(best, list) or not all(_number(v) for v in best)):
            bad.append("stage_best")
        if bad:
            problems.append(f"its progress field(s) {', '.join(bad)} are not counts, flags or numbers")
    history = state.get("history", [])
    if not isinstance(history, list) or not all(isinstance(row, Mapping) for row in history):
        problems.append("its history is not a list of rows")
    top_k = state.get("top_k", [])
    if not isinstance(top_k, list) or not all(
            isinstance(e, Mapping) and isinstance(e.get("file"), str) and _TOP_K_FILE.fullmatch(e["file"])
            and _whole(e.get("epoch")) and _number(e.get("score")) and isinstance(e.get("key"), list)
            and all(_number(v) for v in e["key"]) for e in top_k):
        problems.append("its top_k is not a list of {score, key, epoch, file: 'epoch-NNN.pt'} entries")
    thresholds = state.get("thresholds")
    if thresholds is not None and not isinstance(thresholds, Mapping):
        problems.append("its thresholds are not a mapping")
    problems = [p for p in problems if p]
    if problems:
        raise DataFormatError(f"{where}: the checkpoint cannot resume this run: {'; '.join(problems)}")


def checkpoint_state_dict(checkpoint: Union[str, Path, Mapping[str, Any]], *, ema: Optional[bool] = None) -> dict[str, torch.Tensor]:
    """The network weights of a checkpoint: the EMA weights when it has them (``ema=None``) or
    when ``ema=True`` (then they must exist), else the trained weights."""
    data = load_checkpoint(checkpoint) if not isinstance(checkpoint, Mapping) else checkpoint
    has_ema = data.get("ema") is not None
    if ema is True and not has_ema:
        raise InvalidInputError("the checkpoint has no EMA weights (the run had ema: null)")
    if (ema is None and has_ema) or ema is True:
        return dict(data["ema"]["weights"])
    return dict(data["model"])


def checkpoint_to_safetensors(checkpoint: Union[str, Path], out: Union[str, Path], *, ema: Optional[bool] = None) -> Path:
    """Export a checkpoint's weights as ``.safetensors`` (with its model config in the metadata)."""
    import json

    from safetensors.torch import save as save_safetensors

    data = load_checkpoint(checkpoint)
    tensors = {k: v.detach().cpu().contiguous() for k, v in checkpoint_state_dict(data, ema=ema).items()}
    meta = {"pneumoseg_version": __version__, "model_config": json.dumps(data["model_config"])}
    return atomic_write(check_path(out, "out"), save_safetensors(tensors, metadata=meta))
