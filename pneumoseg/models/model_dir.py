"""The model directory: one self-describing folder that training writes, ``pneumoseg export`` adds to
and ``pneumoseg.Predictor`` reads. Nothing in it is ever unpickled.

    RUN/
      pneumoseg.json            format version, pneumoseg version, networks, preprocessing,
                                thresholds, metrics, training config, artefacts (see below)
      segmenter.safetensors     the weights of each network, one file per network
      classifier.safetensors    (optional: a segmenter with a classification head gates by itself)
      onnx/segmenter.onnx ...   exported artefacts, each listed with its SHA-256 fingerprint

``pneumoseg.json``::

    {"format": "pneumoseg-model", "format_version": 1, "pneumoseg_version": "0.1.0",
     "networks": {"segmenter": {"config": {...build_model config...}, "weights": "segmenter.safetensors",
                                "sha256": "...", "input_size": [512, 512]},
                  "classifier": {...}},
     "preprocessing": {"scaling": "min-max", "mean": 0.5, "std": 0.25, "resize": "bilinear-antialias"},
     "thresholds": {"gate": 0.5, "top": 0.75, "min_area": 2000, "bottom": 0.3, "min_component_area": 0},
     "metrics": {...}, "training": {...},
     "artefacts": {"segmenter-onnx-fp32": {"path": "onnx/segmenter.onnx", "format": "onnx",
                   "network": "segmenter", "precision": "fp32", "sha256": "...", "meta": {...}}}}

Thresholds are probabilities; ``min_area`` and ``min_component_area`` count pixels at the segmenter's
``input_size`` (where post-processing runs). The gate comes from the classifier when there is one,
else from the segmenter's classification head, else there is none (every image is segmented).

A gate set on a site's own labelled images (``pneumoseg tune --write``, :meth:`ModelDir.set_gate`)
is written into ``thresholds.gate``, where every reader looks, and the optional top-level
``"gate_tuned"`` object records how it was chosen (value, previous gate, target, images, date,
pneumoseg version, the truth CSV's SHA-256). A new optional key that changes no reading, so the
format version stays 1: earlier pneumoseg versions keep unknown top-level keys (and rewrite them as
they were) and read the tuned gate from ``thresholds``. Networks and artefacts, and so their
fingerprints, are untouched.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import stat
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Union

from .. import __version__, limits
from .._checks import check_image_size, check_int, check_path, check_probability, check_real, nesting_excess, show
from .._fs import (OutputFolder, OutputKind, atomic_write, folder_lock, prepare_output_folder, read_json,
                   record_in_manifest, safe_file_name)
from ..errors import DataFormatError, InvalidInputError, OutputError

__all__ = [
    "FORMAT_VERSION", "CONFIG_NAME", "Thresholds", "Preprocessing", "NetworkEntry", "Artefact", "ModelDir",
    "save_model_dir", "load_model_dir", "NETWORK_NAMES",
]

FORMAT = "pneumoseg-model"
FORMAT_VERSION = 1
CONFIG_NAME = "pneumoseg.json"
#: the networks a model directory may hold
NETWORK_NAMES = ("segmenter", "classifier")
_MAX_CONFIG_BYTES = 16 * 1024 * 1024
# An ONNX file is one protobuf message, which cannot pass 2 GiB; a TensorRT engine of any network
# pneumoseg builds within limits.max_network_pixels is far below 8 GiB.
_MAX_ARTEFACT_BYTES = {"onnx": 2**31, "other": 8 * 2**30}
# how long an export waits for another process's write into the model directory
_LOCK_WAIT_S = 60.0


@contextlib.contextmanager
def _directory_lock(folder: Path) -> Iterator[None]:
    """The output-folder lock of ``folder`` (``_fs.folder_lock``: flock on the folder itself, no lock
    file), shared with this process's own hold of it, so an export into the run it trains cannot
    deadlock; another export's write is waited for, a process writing there longer is an OutputError."""
    with folder_lock(folder, what=OutputKind.MODEL_DIR, wait=_LOCK_WAIT_S):
        yield


def sha256_of(data: Union[bytes, Path]) -> str:
    if isinstance(data, Path):
        h = hashlib.sha256()
        with open(data, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    return hashlib.sha256(data).hexdigest()


@dataclass
class Thresholds:
    """The decision rule after the networks: gate (classifier probability), the SIIM winners' triplet
    (``top=None`` skips it) and the final small-component filter."""

    gate: float = 0.5
    top: Optional[float] = 0.75
    min_area: int = 2000
    bottom: float = 0.3
    min_component_area: int = 0

    def __post_init__(self) -> None:
        self.gate = check_probability(self.gate, "thresholds.gate")
        if self.top is not None:
            self.top = check_probability(self.top, "thresholds.top")
        self.min_area = check_int(self.min_area, "thresholds.min_area", low=0)
        self.bottom = check_probability(self.bottom, "thresholds.bottom")
        self.min_component_area = check_int(self.min_component_area, "thresholds.min_component_area", low=0)


@dataclass
class Preprocessing:
    """How an image becomes a network input (``pneumoseg.data.preprocess``): scaled to [0, 1] by its
    own min and max, resized (bilinear, antialiased) and normalised ``(x - mean) / std``."""

    scaling: str = "min-max"
    mean: float = 0.5
    std: float = 0.25
    resize: str = "bilinear-antialias"

    def __post_init__(self) -> None:
        self.mean = check_real(self.mean, "preprocessing.mean")
        self.std = check_real(self.std, "preprocessing.std", low=0.0, low_open=True)
        # The networks take float32: a hand-edited std of 1e-300 is 0 there, a mean of 1e300 infinite,
        # and every image became inf / NaN, reported as a network answering NaN.
        for name, value in (("mean", self.mean), ("std", self.std)):
            if not _FLOAT32_TINY <= abs(value) <= _FLOAT32_MAX and not (name == "mean" and value == 0):
                raise InvalidInputError(f"preprocessing.{name} is {value!r}, outside float32's range (the networks "
                                        "run in float32)")
        if max(abs(self.mean), abs(1 - self.mean)) / self.std > _FLOAT32_MAX:
            raise InvalidInputError(f"preprocessing.std {self.std!r} with mean {self.mean!r} normalises pixels in [0, 1] "
                                    "past float32's range (the networks run in float32)")
        if self.scaling != "min-max" or self.resize != "bilinear-antialias":
            raise InvalidInputError(
                f"preprocessing scaling={self.scaling!r}, resize={self.resize!r} is not one this pneumoseg knows "
                "('min-max', 'bilinear-antialias')")


_FLOAT32_MAX = 3.4028234663852886e38
_FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32


#: how a network's input is cropped before it is resized to ``input_size``: None (the whole image) or
#: "chest" (the chest's box, ``pneumoseg.data.chest_crop``; classifiers trained with data.chest_crop)
CROPS = (None, "chest")


@dataclass
class NetworkEntry:
    config: dict[str, Any]
    weights: str
    sha256: str
    input_size: tuple[int, int]
    crop: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        out = {**asdict(self), "input_size": list(self.input_size)}
        if self.crop is None:  # written only when set
            del out["crop"]
        return out


def _check_io(name: str, config: Mapping[str, Any], what: str, error: type[Exception]) -> None:
    """The pipeline feeds every network one grey channel and reads one pneumothorax logit (image or
    pixel): refuse other networks here rather than with a shape error or a wrong row at the first batch."""
    channels = config.get("in_channels", 1)
    if channels != 1:
        raise error(f"{what}: the {name} takes in_channels={show(channels)}, but radiographs are one grey channel: "
                    "build it with in_channels=1 and load the 3-channel weights with load_pretrained (it sums the "
                    "stem's RGB weights, as timm does)")
    outputs_key = "num_classes" if name == "classifier" else "classes"
    outputs = config.get(outputs_key, 1)
    if outputs != 1:
        raise error(f"{what}: the {name} has {outputs_key}={show(outputs)}, but the pipeline reads one pneumothorax "
                    f"logit per {'image' if name == 'classifier' else 'pixel'} ({outputs_key}=1)")


def _check_crop(name: str, crop: Any, what: str, error: type[Exception]) -> Optional[str]:
    if crop not in CROPS:
        raise error(f"{what} must be null or 'chest', got {show(crop)}")
    if crop is not None and name != "classifier":
        raise error(f"{what}: only a classifier may be cropped (the segmenter's masks stay in image coordinates)")
    return crop


@dataclass
class Artefact:
    path: str  # relative to the model directory, '/'-separated
    format: str  # "onnx", "tensorrt", ...
    network: str
    precision: str
    sha256: str
    meta: dict[str, Any] = field(default_factory=dict)


def _relative_parts(rel: str, what: str) -> list[str]:
    parts = rel.split("/")
    for part in parts:
        safe_file_name(part, what=what)
    return parts


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _mapping(raw: Mapping[str, Any], key: str, *, required: bool = True, where: str = "") -> dict[str, Any]:
    """``raw[key]`` as a dict of str keys; absent is an error when ``required``, else empty."""
    if key not in raw:
        if required:
            raise KeyError(f"{where}{key}")
        return {}
    value = raw[key]
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{where}{key} must be a JSON object, got {type(value).__name__} {show(value)}")
    return dict(value)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {type(value).__name__} {show(value)}")
    return value


def _fingerprint(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ValueError(f"{what} must be a SHA-256 fingerprint (64 lowercase hex digits), got {show(value)}")
    return value


def _relative_file(value: Any, what: str) -> str:
    """A '/'-separated path inside the model directory: each part a safe file name (no '..', no
    absolute path, no separators of another system)."""
    text = _text(value, what)
    try:
        _relative_parts(text, what)
    except OutputError as exc:
        raise ValueError(f"{what} {show(text)} is not a path inside the model directory: {exc}") from None
    return text


def _keys_known(entry: Mapping[str, Any], known: set[str], what: str) -> None:
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ValueError(f"{what} has unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")


def _network_entry(name: str, entry: Any) -> NetworkEntry:
    what = f"networks.{name}"
    entry = _mapping({what: entry}, what)
    _keys_known(entry, {"config", "weights", "sha256", "input_size", "crop"}, what)
    config = _mapping(entry, "config", where=f"{what}.")
    _check_io(name, config, f"{what}.config", ValueError)
    size = check_image_size(entry["input_size"], f"{what}.input_size", low=32)
    _check_network_pixels(size, f"{what}.input_size")
    if name == "segmenter" and (size[0] % 32 or size[1] % 32):
        raise ValueError(f"{what}.input_size must be a multiple of 32 (the U-Net halves it five times), got {list(size)}")
    return NetworkEntry(config, _relative_file(entry["weights"], f"{what}.weights"),
                        _fingerprint(entry["sha256"], f"{what}.sha256"), size,
                        _check_crop(name, entry.get("crop"), f"{what}.crop", ValueError))


def _check_network_pixels(size: tuple[int, int], what: str) -> None:
    # Every image is resized to the input size: an input_size of [16384, 16384] (within the image
    # limits) made one prediction allocate tens of GB in the stem's activations, where the SIIM
    # networks take 1024 x 1024.
    limits.check("max_network_pixels", size[0] * size[1], f"{what}={list(size)}")


_SAFETENSORS_MAX_HEADER = 100 * 2**20  # safetensors' own limit


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a safetensors file's header lists, read without its data; a header that does
    not describe exactly the file's bytes is a DataFormatError (safetensors refuses such a file too,
    but only once the whole file is in memory)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= length <= min(_SAFETENSORS_MAX_HEADER, size - 8):
            raise DataFormatError(f"{path}: not a readable safetensors file (header length {length} in a file of {size} bytes)")
        text = f.read(length)
    try:
        header = json.loads(text)
        end, shapes = 0, {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            shape, (begin, stop) = info["shape"], info["data_offsets"]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (*shape, begin, stop)):
                raise ValueError(f"tensor {key!r} has a shape or offsets that are not counts")
            shapes[key] = tuple(shape)
            end = max(end, stop)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise DataFormatError(f"{path}: not a readable safetensors file (its header: {type(exc).__name__}: {exc})") from None
    if 8 + length + end != size:
        raise DataFormatError(f"{path}: not a readable safetensors file (its header describes {8 + length + end:,} "
                              f"bytes, the file has {size:,})")
    return shapes


def _artefact(key: Any, entry: Any, networks: Mapping[str, NetworkEntry]) -> Artefact:
    what = f"artefacts.{key}"
    entry = _mapping({what: entry}, what)
    _keys_known(entry, {f.name for f in fields(Artefact)}, what)
    network = _text(entry["network"], f"{what}.network")
    if network not in networks:
        raise ValueError(f"{what}.network is {network!r}, which is not one of the directory's networks "
                         f"({', '.join(sorted(networks))})")
    return Artefact(path=_relative_file(entry["path"], f"{what}.path"), format=_text(entry["format"], f"{what}.format"),
                    network=network, precision=_text(entry["precision"], f"{what}.precision"),
                    sha256=_fingerprint(entry["sha256"], f"{what}.sha256"),
                    meta=_mapping(entry, "meta", required=False, where=f"{what}."))


def _gate_tuned(raw: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The optional ``gate_tuned`` record: a JSON object whose ``value``, when there, is the gate it
    set (a hand-edited gate since then is the one that counts; the record only says how it was made)."""
    if raw.get("gate_tuned") is None:
        return None
    record = _mapping(raw, "gate_tuned")
    if "value" in record:
        check_probability(record["value"], "gate_tuned.value")
    return record


def _complete(raw: Mapping[str, Any], key: str, cls: type) -> dict[str, Any]:
    """``raw[key]`` with every field of ``cls``: a missing one would silently fall back to a default
    that is not the one the model was tuned or trained with."""
    values = _mapping(raw, key)
    missing = [f.name for f in fields(cls) if f.name not in values]
    if missing:
        raise ValueError(f"{key} lacks {', '.join(map(repr, missing))}")
    return values


class ModelDir:
    """A loaded model directory (see the module docstring). ``build(name)`` returns the network with
    its weights, checked against the recorded fingerprint and the config's parameter names and shapes."""

    def __init__(self, path: Path, raw: dict[str, Any]) -> None:
        self.path = path
        self._raw = raw
        #: artefacts the folder's earlier description listed that :func:`save_model_dir` dropped, as
        #: they were exported from networks it no longer holds (key -> Artefact); empty otherwise
        self.removed_artefacts: dict[str, Artefact] = {}
        # of those, the ones whose file was left in place (changed since export, or not removable)
        self.left_artefacts: dict[str, Artefact] = {}
        where = path / CONFIG_NAME
        try:
            self.format_version = int(raw["format_version"])
            self.pneumoseg_version = str(raw.get("pneumoseg_version", "unknown"))
            networks = _mapping(raw, "networks")
            self.networks = {name: _network_entry(name, e) for name, e in networks.items()}
            self.thresholds = Thresholds(**_complete(raw, "thresholds", Thresholds))
            self.preprocessing = Preprocessing(**_complete(raw, "preprocessing", Preprocessing))
            artefacts = _mapping(raw, "artefacts", required=False)
            self.artefacts = {str(key): _artefact(key, a, self.networks) for key, a in artefacts.items()}
            self.metrics: dict[str, Any] = _mapping(raw, "metrics", required=False)
            self.training: dict[str, Any] = _mapping(raw, "training", required=False)
            #: how ``thresholds.gate`` was last set on labelled images (``set_gate``), or None
            self.gate_tuned: Optional[dict[str, Any]] = _gate_tuned(raw)
            classifier = self.networks.get("classifier")
            if classifier is not None and classifier.crop is None and set(self.networks) == {"classifier"}:
                # Classifier runs of pneumoseg 0.1.0 recorded the crop only in their training section.
                legacy = self.training.get("chest_crop", False)
                if not isinstance(legacy, bool):
                    raise ValueError(f"training.chest_crop must be true or false, got {show(legacy)}")
                classifier.crop = "chest" if legacy else None
        except (KeyError, TypeError, ValueError) as exc:
            detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise DataFormatError(f"{where}: malformed model description ({detail})") from None
        unknown = sorted(set(self.networks) - set(NETWORK_NAMES))
        if unknown or "segmenter" not in self.networks and "classifier" not in self.networks:
            raise DataFormatError(f"{where}: networks must be among {', '.join(NETWORK_NAMES)}, got {sorted(self.networks)}")

    # ---------------------------------------------------------------------------------------------
    @property
    def gate_source(self) -> Optional[str]:
        """"classifier", "segmenter" (its classification head) or None (no gate)."""
        if "classifier" in self.networks:
            return "classifier"
        seg = self.networks.get("segmenter")
        if seg is not None and seg.config.get("aux_classifier"):
            return "segmenter"
        return None

    def weights_path(self, name: str) -> Path:
        entry = self._entry(name)
        return self.path.joinpath(*_relative_parts(entry.weights, "weights file name"))

    def _entry(self, name: str) -> NetworkEntry:
        if name not in self.networks:
            raise InvalidInputError(f"{self.path}: the model directory has no {name!r} network "
                                    f"(it has {', '.join(sorted(self.networks))})")
        return self.networks[name]

    def state_dict(self, name: str, *, expected: Optional[Mapping[str, tuple[int, ...]]] = None) -> dict[str, Any]:
        """The network's weights as CPU tensors, after checking the file's SHA-256 fingerprint. With
        ``expected`` (parameter name -> shape), a file whose header lists other names or shapes is
        refused before its tensors are read."""
        from safetensors.torch import load as load_safetensors

        path = self.weights_path(name)
        try:
            if not stat.S_ISREG(path.stat().st_mode):  # a pipe would block the read forever, /dev/zero never end
                raise DataFormatError(f"{path}: the {name} weights named in {CONFIG_NAME} are not a regular file "
                                      "(a device, pipe or socket)")
            # The header first: the whole file is read into memory next, and a 6 GB (sparse) file
            # behind a small header took 6 GB (a MemoryError traceback under a 4 GB ulimit).
            shapes = _safetensors_shapes(path)
            if expected is not None:
                self._check_shapes(name, shapes, expected)
            data = path.read_bytes()
        except FileNotFoundError:
            raise DataFormatError(f"{path}: the {name} weights named in {CONFIG_NAME} are missing") from None
        except OSError as exc:
            raise DataFormatError(f"{path}: cannot read the {name} weights ({exc.strerror or exc})") from None
        if sha256_of(data) != self._entry(name).sha256:
            raise DataFormatError(f"{path}: the file does not match the fingerprint in {CONFIG_NAME} "
                                  "(changed or damaged after it was written)")
        try:
            return load_safetensors(data)
        except Exception as exc:  # safetensors raises its own error types for damaged headers
            raise DataFormatError(f"{path}: not a readable safetensors file ({exc})") from None

    def _check_shapes(self, name: str, got: Mapping[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...]]) -> None:
        parts = weight_mismatches(got, want, "the file", "the config")
        if parts:
            raise DataFormatError(f"{self.weights_path(name)}: the weights do not match the {name} config in "
                                  f"{CONFIG_NAME}: " + "; ".join(parts))

    def build(self, name: str, *, device: Any = "cpu") -> Any:
        """The network ``name`` built from its config with its weights, in eval mode, on ``device``."""
        import torch

        entry = self._entry(name)
        # The config's shapes are checked against the weights on a network without memory (the meta
        # device): building it for real first, a config of decoder_channels [20000, ...] with small
        # weights allocated and initialised 14.4 GB before the weights were found not to match.
        skeleton = self._build_config(name, entry.config, torch.device("meta"))
        expected = skeleton.state_dict()
        # names and shapes are checked in the file's header, before its tensors are read
        state = self.state_dict(name, expected={k: tuple(v.shape) for k, v in expected.items()})
        # load_state_dict casts: bool or integer weights would load as 0/1 or truncated values, complex
        # ones would lose their imaginary part, and a float step counter would be truncated.
        kinds = [(k, state[k].dtype, v.dtype) for k, v in expected.items()
                 if state[k].is_complex() or state[k].is_floating_point() != v.is_floating_point()]
        if kinds:
            k, got, want = kinds[0]
            raise DataFormatError(f"{self.weights_path(name)}: the weights do not match the {name} config in "
                                  f"{CONFIG_NAME}: {len(kinds)} of another kind of number (e.g. {k}: {got} in the "
                                  f"file, {want} in the config)")
        from .pretrained import all_finite

        broken = [k for k, v in state.items() if v.is_floating_point() and not all_finite(v)]
        if broken:
            raise DataFormatError(f"{self.weights_path(name)}: {len(broken)} weight tensor(s) hold NaN or infinity "
                                  f"(e.g. {broken[0]}); the {name} would answer NaN or saturate")
        if _holds_only_its_state_dict(skeleton):
            # the checked skeleton takes the weights: a second build's random initialisation (on
            # DenseNet121 most of its load time) would only be overwritten
            model = skeleton.to_empty(device="cpu")
        else:
            model = self._build_config(name, entry.config, None)
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()

    def _build_config(self, name: str, config: dict[str, Any], device: Any) -> Any:
        from .config import build_model

        try:
            # only the meta device needs the device mode, which intercepts every torch call
            with device if device is not None else contextlib.nullcontext():
                return build_model(config)
        except InvalidInputError as exc:
            raise DataFormatError(f"{self.path / CONFIG_NAME}: the {name} config cannot be built: {exc}") from None
        except (RuntimeError, MemoryError, OverflowError) as exc:  # sizes past memory: torch's allocator error
            first_line = (str(exc).splitlines() or [""])[0]
            raise DataFormatError(f"{self.path / CONFIG_NAME}: the {name} config cannot be built ({type(exc).__name__}: "
                                  f"{first_line}); its sizes do not fit in memory") from None

    # ---------------------------------------------------------------------------------------------
    def artefact_path(self, key: str, *, verify: bool = True) -> Path:
        """The file of artefact ``key``; with ``verify`` its fingerprint is checked first."""
        if key not in self.artefacts:
            raise InvalidInputError(f"{self.path}: no artefact {key!r} (have: {', '.join(sorted(self.artefacts)) or 'none'})")
        art = self.artefacts[key]
        path = self.path.joinpath(*_relative_parts(art.path, "artefact path"))
        if not path.exists():
            raise DataFormatError(f"{path}: artefact {key!r} listed in {CONFIG_NAME} is missing")
        if not path.is_file():
            raise DataFormatError(f"{path}: artefact {key!r} listed in {CONFIG_NAME} is not a regular file")
        # Before the fingerprint, which reads the whole file: a 100 GB (sparse) file in an artefact's
        # place kept `pneumoseg predict` hashing zeros for over a minute before anything was said.
        size, most = path.stat().st_size, _MAX_ARTEFACT_BYTES.get(art.format, _MAX_ARTEFACT_BYTES["other"])
        if size > most:
            raise DataFormatError(f"{path}: artefact {key!r} is a file of {size:,} bytes, larger than any {art.format} "
                                  f"artefact pneumoseg writes ({most:,} bytes at most); export it again")
        if verify and sha256_of(path) != art.sha256:
            raise DataFormatError(f"{path}: artefact {key!r} does not match its fingerprint in {CONFIG_NAME}")
        return path

    def add_artefact(self, key: str, rel_path: str, data: bytes, *, format: str, network: str,
                     precision: str, meta: Optional[Mapping[str, Any]] = None) -> Path:
        """Write ``data`` to ``rel_path`` inside the directory (atomically) and list it, with its
        fingerprint, in ``pneumoseg.json`` (rewritten atomically). In a folder of pneumoseg's output (a
        training run), both are listed in its manifest as pneumoseg's own, so a new run into it needs
        no ``--force``."""
        self._entry(network)
        parts = _relative_parts(rel_path, "artefact path")
        target = self.path.joinpath(*parts)
        try:
            self._inside(target.parent).mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):  # said only "onnx: File exists"
            raise OutputError(f"{target.parent}: a file is where the model directory's {parts[0]} folder "
                              "goes; move it away") from None
        # Two exports of one directory at once (fp32 and fp16, say) each rewrote pneumoseg.json from what
        # it had read at the start: the last one dropped the other's artefact, and one that wrote the same
        # file could leave the other's fingerprint beside its bytes. Under the lock the file and the
        # description are written together, and artefacts another process added since are kept.
        with _directory_lock(self.path):
            atomic_write(self._inside(target), data)
            self.artefacts = {**self.artefacts, **self._artefacts_on_disk()}
            self.artefacts[key] = Artefact("/".join(parts), format, network, precision, sha256_of(data), dict(meta or {}))
            self.save()
            record_in_manifest(self.path, target, self.path / CONFIG_NAME)
        return target

    def _artefacts_on_disk(self) -> dict[str, Artefact]:
        """The artefacts pneumoseg.json lists now (another process may have added some since this
        object was loaded); none when it cannot be read, this object's own list then stands."""
        try:
            raw = json.loads((self.path / CONFIG_NAME).read_text(encoding="utf-8"))
            listed = raw.get("artefacts") or {}
            return {str(k): _artefact(k, a, self.networks) for k, a in listed.items()}
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
            return {}

    def set_gate(self, gate: float, provenance: Mapping[str, Any]) -> Path:
        """Set ``thresholds.gate`` to ``gate`` (a probability) and record ``provenance`` (a JSON object:
        how it was chosen) as ``"gate_tuned"``, rewriting ``pneumoseg.json`` atomically under the
        directory's lock; nothing else changes (networks, artefacts and their fingerprints stay valid:
        the gate is applied after the networks). The description is read again under the lock, so an
        artefact another process exported meanwhile stays listed; networks, preprocessing or gate
        changed since this object was loaded (a run written over it, another ``set_gate``) are
        refused, as the gate was chosen on the old ones' scores and compared with the old gate.
        A write that fails leaves the file as it was (an OSError, or OutputError for a link leading out)."""
        gate = check_probability(gate, "the gate")
        if not isinstance(provenance, Mapping):
            raise InvalidInputError(f"provenance must be a mapping, got {type(provenance).__name__}")
        record = _json_safe(dict(provenance), "the gate's provenance")
        self._inside(self.path / CONFIG_NAME)
        with _directory_lock(self.path):
            current = load_model_dir(self.path)
            # What the scores depend on (each network's whole entry: weights, input size, crop; the
            # preprocessing), and the gate the caller compared with (another tune --write meanwhile).
            changed = [what for what, mine, theirs in (
                ("networks", {n: e.to_json() for n, e in self.networks.items()},
                 {n: e.to_json() for n, e in current.networks.items()}),
                ("preprocessing", asdict(self.preprocessing), asdict(current.preprocessing)),
                ("gate", self.thresholds.gate, current.thresholds.gate)) if mine != theirs]
            if changed:
                raise OutputError(f"{self.path / CONFIG_NAME}: its {' and '.join(changed)} changed since the scores were "
                                  "computed (another run wrote the directory); tune the gate again")
            current.thresholds = Thresholds(**{**asdict(current.thresholds), "gate": gate})
            current._raw["gate_tuned"] = record
            current.gate_tuned = record
            written = current.save()
            record_in_manifest(self.path, written)
        self._raw, self.thresholds, self.gate_tuned = current._raw, current.thresholds, record
        self.artefacts = current.artefacts
        return written

    def to_json(self) -> dict[str, Any]:
        raw = copy.deepcopy(self._raw)
        raw.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            networks={k: v.to_json() for k, v in self.networks.items()},
            thresholds=asdict(self.thresholds),
            preprocessing=asdict(self.preprocessing),
            metrics=self.metrics,
            training=self.training,
            artefacts={k: asdict(v) for k, v in self.artefacts.items()},
        )
        return raw

    def save(self, write: Optional[Callable[[str, str], Any]] = None) -> Path:
        """Rewrite ``pneumoseg.json`` (atomically) from this object's fields; ``write(name, text)``, when
        given, writes it instead (an output folder's own write, which lists it before it is in place)."""
        text = json.dumps(self.to_json(), indent=2, sort_keys=False, allow_nan=False) + "\n"
        if write is not None:
            write(CONFIG_NAME, text)
            return self.path / CONFIG_NAME
        return atomic_write(self._inside(self.path / CONFIG_NAME), text)

    def check_writable(self, *rel_paths: str) -> None:
        """Refuse (OutputError), before any long work, to add files at ``rel_paths`` when they or the
        description would be written through a symbolic link that leads out of the directory."""
        self._inside(self.path / CONFIG_NAME)
        for rel in rel_paths:
            target = self.path.joinpath(*_relative_parts(rel, "artefact path"))
            self._inside(target.parent)
            self._inside(target)

    def _inside(self, target: Path) -> Path:
        """``target`` when it stays inside the directory once symbolic links are followed: a write
        goes through a link, and one leading out (a shared cache's file, another run's) would change
        what is not this directory's."""
        folder = self.path.resolve()
        real = target.resolve()
        if real != folder and folder not in real.parents:
            raise OutputError(f"{target} leads out of the model directory {self.path} (a symbolic link to {real}); "
                              "pneumoseg writes only inside it: copy the directory without links (cp -rL) first")
        return target

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r}, networks={sorted(self.networks)}, gate={self.gate_source})"


def _json_safe(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{what} must be JSON-serialisable without NaN/inf: {exc}") from None


def save_model_dir(
    path: Union[str, Path, OutputFolder],
    networks: Mapping[str, Any],
    *,
    input_sizes: Mapping[str, Union[int, tuple[int, int]]],
    thresholds: Optional[Union[Thresholds, Mapping[str, Any]]] = None,
    preprocessing: Optional[Preprocessing] = None,
    metrics: Optional[Mapping[str, Any]] = None,
    training: Optional[Mapping[str, Any]] = None,
    crops: Optional[Mapping[str, Optional[str]]] = None,
    overwrite: bool = False,
    prepare: bool = True,
) -> ModelDir:
    """Write a model directory: each network's weights as ``<name>.safetensors`` and ``pneumoseg.json``.

    ``networks`` maps "segmenter" and/or "classifier" to models built by pneumoseg (they carry
    ``model.config``); ``input_sizes`` gives each one's input (H, W) (an int for square). The folder
    follows pneumoseg's output rules (``overwrite``); ``prepare=False`` writes into a folder the caller
    has already prepared (a training run's folder that also holds its checkpoints and logs): given as
    its :class:`~pneumoseg._fs.OutputFolder`, each file is written and listed through it.
    ``crops`` gives a network's input crop (``{"classifier": "chest"}`` for a classifier trained with
    ``data.chest_crop``), which every backend of the Predictor then applies.

    Written over an earlier model directory (``prepare=False``, or ``overwrite=True`` beside others'
    files; a finished run's ``--resume``), the artefacts ``pneumoseg export`` added stay listed when
    their network is written unchanged (same weights, construction arguments, input size and crop;
    same preprocessing); those of a changed or absent network are dropped from ``pneumoseg.json`` and
    their files removed (a file changed since export is left, unlisted), as they would answer with
    the earlier weights. The returned ``ModelDir.removed_artefacts`` names them, and
    ``ModelDir.left_artefacts`` those whose file stayed.
    """
    def write_through(folder: OutputFolder) -> ModelDir:
        # Each file is written through the folder, listed in its manifest just before it is in place:
        # listed after the rename, a file a run killed in between was refused as someone's where the
        # earlier one (held) goes back. Someone's file of the same name, under overwrite=True, is set
        # aside just before it is replaced, and goes back if the save fails (a stale artefact removed
        # too: replacing=).
        return _write_model_dir(folder.path, networks, input_sizes=input_sizes, thresholds=thresholds,
                                preprocessing=preprocessing, metrics=metrics, training=training, crops=crops,
                                write=lambda name, data: folder.write_bytes(name, data=data),
                                replacing=folder.replacing)

    if isinstance(path, OutputFolder):
        if prepare:
            # its caller holds it (and its lock): preparing it again would be refused as another writer's
            raise InvalidInputError(f"{path.path}: an OutputFolder is already prepared; pass prepare=False to "
                                    "save_model_dir into it")
        return write_through(path)
    if not prepare:
        return _write_model_dir(check_path(path, "model directory"), networks, input_sizes=input_sizes,
                                thresholds=thresholds, preprocessing=preprocessing, metrics=metrics,
                                training=training, crops=crops)
    # Saving again replaces the files without overwrite=True, and a save that fails part way (the metrics
    # are checked after the weights are written) or is killed removes what it wrote as the folder's
    # earlier model directory goes back. Someone's file kept under overwrite=True and not replaced stays.
    with prepare_output_folder(path, overwrite=overwrite, what=OutputKind.MODEL_DIR) as prepared:
        return write_through(prepared)


def _write_model_dir(folder: Path, networks: Mapping[str, Any], *, input_sizes: Mapping[str, Union[int, tuple[int, int]]],
                     thresholds: Optional[Union[Thresholds, Mapping[str, Any]]], preprocessing: Optional[Preprocessing],
                     metrics: Optional[Mapping[str, Any]], training: Optional[Mapping[str, Any]],
                     crops: Optional[Mapping[str, Optional[str]]],
                     write: Optional[Callable[[str, Union[bytes, str]], Any]] = None,
                     replacing: Callable[..., Any] = lambda *parts: None) -> ModelDir:
    """:func:`save_model_dir`'s work, in ``folder`` (prepared, or held by the caller): each file is written
    by ``write(name, data)`` (default: atomically, listed nowhere); ``replacing(*parts)`` is told of a
    file about to be removed."""
    from safetensors.torch import save as save_safetensors

    if not isinstance(networks, Mapping) or not networks:
        raise InvalidInputError("networks must be a non-empty mapping of 'segmenter'/'classifier' to models")
    if crops is not None and not isinstance(crops, Mapping):
        raise InvalidInputError(f"crops must be a mapping of network name to crop, got {type(crops).__name__}")
    crops = dict(crops or {})
    unknown_crops = sorted(set(crops) - set(networks))
    if unknown_crops:
        raise InvalidInputError(f"crops names network(s) the directory does not have: {', '.join(map(str, unknown_crops))}")
    for name, crop in crops.items():
        _check_crop(name, crop, f"crops[{name!r}]", InvalidInputError)
    sizes: dict[str, tuple[int, int]] = {}
    for name, model in networks.items():  # every check before anything is written
        if name not in NETWORK_NAMES:
            raise InvalidInputError(f"network names must be among {', '.join(NETWORK_NAMES)}, got {name!r}")
        config = getattr(model, "config", None)
        if not isinstance(config, dict):
            raise InvalidInputError(f"the {name} has no config dict (build it with pneumoseg.models)")
        _check_io(name, config, f"networks[{name!r}]", InvalidInputError)
        if name not in input_sizes:
            raise InvalidInputError(f"input_sizes has no entry for the {name}")
        sizes[name] = check_image_size(input_sizes[name], f"input_sizes[{name!r}]", low=32)
        _check_network_pixels(sizes[name], f"input_sizes[{name!r}]")
        if name == "segmenter" and (sizes[name][0] % 32 or sizes[name][1] % 32):
            raise InvalidInputError(f"the segmenter's input size must be a multiple of 32, got {sizes[name]}")
    entries: dict[str, dict[str, Any]] = {}
    for name, model in networks.items():
        config, size = model.config, sizes[name]
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        data = _canonical_safetensors(save_safetensors(tensors, metadata={"pneumoseg_version": __version__,
                                                                          "network": name}))
        weights = f"{name}.safetensors"
        if write is None:
            atomic_write(folder / weights, data)
        else:
            write(weights, data)
        entries[name] = {"config": _json_safe(config, f"the {name} config"), "weights": weights,
                         "sha256": sha256_of(data), "input_size": list(size)}
        if crops.get(name) is not None:
            entries[name]["crop"] = crops[name]
    if isinstance(thresholds, Mapping):
        thresholds = Thresholds(**thresholds)
    raw = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pneumoseg_version": __version__,
        "networks": entries,
        "preprocessing": asdict(preprocessing or Preprocessing()),
        "thresholds": asdict(thresholds or Thresholds()),
        "metrics": _json_safe(dict(metrics or {}), "metrics"),
        "training": _json_safe(dict(training or {}), "training"),
        "artefacts": {},
    }
    earlier = _earlier_description(folder)
    kept, stale = _still_valid_artefacts(earlier, raw) if earlier is not None else ({}, {})
    raw["artefacts"] = {k: asdict(a) for k, a in kept.items()}
    model_dir = ModelDir(folder, raw)
    model_dir.save(write)  # before the stale files go: a crash in between leaves them unlisted, not listed and gone
    model_dir.removed_artefacts = stale
    model_dir.left_artefacts = {key: art for key, art in stale.items()
                                if not _remove_artefact_file(model_dir, art, replacing)}
    return model_dir


def _canonical_safetensors(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its header's metadata in sorted key order. safetensors
    writes the metadata in a hash map's order, which changes from call to call: the same weights made
    files with other bytes, hence another fingerprint, and whatever had been exported from them
    (whose source record names that fingerprint) looked stale after a finished run's --resume."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    if isinstance(header.get("__metadata__"), dict):
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the tensor data starts 8-byte aligned, as safetensors pads it
    return len(text).to_bytes(8, "little") + text + data[8 + length:]


def _earlier_description(folder: Path) -> Optional[ModelDir]:
    """The model directory ``folder`` described before it is written again; None where there is none
    or it cannot be read (then no artefact of it is kept, and none of its files is touched)."""
    if not (folder / CONFIG_NAME).is_file():
        return None
    try:
        return load_model_dir(folder)
    except (DataFormatError, InvalidInputError, OSError):
        return None


def _still_valid_artefacts(earlier: ModelDir, raw: Mapping[str, Any]) -> tuple[dict[str, Artefact], dict[str, Artefact]]:
    """(the earlier description's artefacts still made from the networks ``raw`` describes, the
    others). An artefact is cut from one network, given the preprocessing: it holds exactly while
    that network's entry (weights fingerprint, config, input size, crop) and the preprocessing do."""
    old_entries = {name: entry.to_json() for name, entry in earlier.networks.items()}
    same_preprocessing = asdict(earlier.preprocessing) == raw["preprocessing"]
    kept: dict[str, Artefact] = {}
    stale: dict[str, Artefact] = {}
    for key, art in earlier.artefacts.items():
        new_entry = raw["networks"].get(art.network)
        if same_preprocessing and new_entry is not None and old_entries.get(art.network) == new_entry:
            kept[key] = art
        else:
            stale[key] = art
    return kept, stale


def _remove_artefact_file(model_dir: ModelDir, art: Artefact,
                          replacing: Callable[..., Any] = lambda *parts: None) -> bool:
    """Remove a dropped artefact's file when it is still the one export wrote (its fingerprint
    matches); a file changed since is someone's, and is left (unlisted, nothing loads it). Saved with
    overwrite=True beside someone's files, ``replacing`` first sets it aside with the description that
    lists it: unlinked, a save killed before it ended put that description back without the file.
    Whether the file is gone (False: left in place, so the training note does not call it removed)."""
    try:
        parts = _relative_parts(art.path, "artefact path")
        path = model_dir._inside(model_dir.path.joinpath(*parts))
        if not os.path.lexists(path):
            return True
        if path.is_file() and not path.is_symlink() and sha256_of(path) == art.sha256:
            replacing(*parts)
            if path.is_file():  # not set aside: a folder of pneumoseg's own output
                path.unlink()
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # an onnx/ folder left empty
            return True
    except (OSError, OutputError):
        pass
    return False


_MAX_DEPTH = 64


def _check_depth(raw: Any, where: Path) -> None:
    """Refuse nesting deeper than :data:`_MAX_DEPTH`: json.loads reads up to about 1000 levels, but
    rewriting the description (an export copies and writes it) recursed past Python's limit at 900
    levels in a free-form section such as ``training`` (a RecursionError traceback)."""
    if nesting_excess(raw, _MAX_DEPTH) is not None:
        raise DataFormatError(f"{where}: not a pneumoseg model description (nested deeper than {_MAX_DEPTH} levels)")


def _holds_only_its_state_dict(network: Any) -> bool:
    """Whether every tensor of ``network`` is in its state dict (no non-persistent buffers, no plain
    tensor attributes), so that loading a state dict into it leaves nothing uninitialised."""
    import torch

    persistent = set(network.state_dict())
    return (all(n in persistent for n, _ in network.named_buffers())
            and not any(isinstance(v, torch.Tensor) for m in network.modules() for v in vars(m).values()))


def weight_mismatches(got: Mapping[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...]],
                      got_in: str, want_in: str) -> list[str]:
    """What differs between two state dicts' names and shapes, one phrase per kind (missing,
    unexpected, of another shape) with an example; empty when they match."""
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    wrong = [(k, got[k], v) for k, v in want.items() if k in got and got[k] != v]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        k, g, w = wrong[0]
        parts.append(f"{len(wrong)} of another shape (e.g. {k}: {g} in {got_in}, {w} in {want_in})")
    return parts


def load_model_dir(path: Union[str, Path]) -> ModelDir:
    """Read a model directory's ``pneumoseg.json`` (weights are read by ``build``). A folder written by
    a newer format, a missing or malformed description: :class:`pneumoseg.DataFormatError` naming it."""
    folder = check_path(path, "model directory")
    config = folder / CONFIG_NAME
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: no such model directory")
    if not config.is_file():
        if config.exists() or config.is_symlink():  # a pipe, a folder or a broken link was called 'no pneumoseg.json'
            raise DataFormatError(f"{config}: not a regular file (a folder, device, pipe or broken link); a model "
                                  f"directory's {CONFIG_NAME} is the file `pneumoseg train` writes")
        raise DataFormatError(f"{folder}: not a model directory (no {CONFIG_NAME}); train one with "
                              "`pneumoseg train` or point at the folder a training run wrote")
    if config.stat().st_size > _MAX_CONFIG_BYTES:
        raise DataFormatError(f"{config}: larger than {_MAX_CONFIG_BYTES} bytes; not a pneumoseg model description")
    raw = read_json(config)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DataFormatError(f"{config}: not a pneumoseg model description (format {raw.get('format') if isinstance(raw, dict) else None!r})")
    _check_depth(raw, config)
    version = raw.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DataFormatError(f"{config}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise DataFormatError(f"{config}: written in model format {version} by pneumoseg "
                              f"{raw.get('pneumoseg_version', '?')}; this pneumoseg {__version__} reads format "
                              f"{FORMAT_VERSION} and older: upgrade pneumoseg")
    return ModelDir(folder, raw)
