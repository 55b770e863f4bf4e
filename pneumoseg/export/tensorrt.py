"""TensorRT engines from the exported ONNX parts, and the cache that keeps them.

Engines are built on the strongly-typed path only, the one TensorRT 10.x (Jetson) and 11.x share:
the ONNX graph's own types decide every layer's precision (``BuilderFlag.FP16`` / ``INT8`` do not
exist in 11.x). fp16 therefore comes from an fp16 ONNX graph with fp32 inputs and outputs, and int8
from a graph with symmetric Q/DQ nodes (``pneumoseg export --format tensorrt --precision int8``).
Each engine has one optimisation profile: dynamic batch (min/opt/max), static height and width.

An engine only runs on the GPU, TensorRT and CUDA it was built with. The cache key therefore holds
the ONNX file's SHA-256 (which covers the graph's record of the network it was exported from, checked
before any build or lookup), the precision, the profile, the TensorRT and CUDA versions, the GPU's name
and compute capability. Engines are written atomically under a file lock, with a sidecar JSON of the
key's fields and the engine's SHA-256; on load an engine whose sidecar does not match, whose bytes
do not match the sidecar, or that TensorRT cannot deserialise is rebuilt, never run. A timing cache
per GPU and TensorRT version makes rebuilds fast.

Everything except ``build_engine`` / ``deserialize_engine`` works without TensorRT (and is tested so).
"""

from __future__ import annotations

import hashlib
import json
import numbers
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from .._checks import check_int, check_path
from .._fs import atomic_write
from .._optional import import_optional
from ..errors import DataFormatError, InvalidInputError, NativeError
from .parts import PartSpec

__all__ = [
    "import_tensorrt", "BatchProfile", "DEFAULT_PROFILE", "engine_key_fields", "engine_key", "environment",
    "EngineCache", "CacheResult", "build_engine", "deserialize_engine", "parse_batch_profile", "torch_dtype",
    "timing_cache_path", "EngineRunner", "ProfileRunner", "tensorrt_onnx_key", "tensorrt_artefact_key", "export_tensorrt",
]

ENGINE_SUFFIX = ".engine"
SIDECAR_SUFFIX = ".json"
CACHE_FORMAT = 1


def import_tensorrt() -> Any:
    """tensorrt, or an InvalidInputError saying whether it is missing or installed but failing to load
    (a CUDA or libnvinfer it was not built for, the usual way a TensorRT install breaks)."""
    return import_optional("tensorrt", needed_for="TensorRT export or inference",
                           install="pip install 'pneumoseg[tensorrt]' on a machine with an NVIDIA GPU "
                                   "(or use backend='torch' / 'onnxruntime')")


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes an engine serves: ``min <= opt <= max`` (it is tuned for ``opt``)."""

    min: int = 1
    opt: int = 8
    max: int = 32

    def __post_init__(self) -> None:
        for name in ("min", "opt", "max"):
            check_int(getattr(self, name), f"batch profile {name}", low=1, high=1 << 16)
        if not self.min <= self.opt <= self.max:
            raise InvalidInputError(f"a batch profile needs min <= opt <= max, got {self.min}, {self.opt}, {self.max}")

    def check(self, batch: int, what: str) -> None:
        """Raise ``InvalidInputError`` when ``batch`` is outside the profile (TensorRT would refuse it)."""
        if not self.min <= batch <= self.max:
            raise InvalidInputError(f"{what}: a batch of {batch} is outside the engine's profile "
                                    f"(batch {self.min} to {self.max}); split it, or rebuild the engine with "
                                    f"`pneumoseg export ... --format tensorrt --batch {self.min},{self.opt},{max(batch, self.max)}`")


DEFAULT_PROFILE = BatchProfile(1, 8, 32)


def parse_batch_profile(value: Union[str, int, Sequence[int], BatchProfile, None]) -> BatchProfile:
    """``"1,8,32"`` / ``(1, 8, 32)`` -> min, opt, max; one number ``"16"`` -> (1, 16, 16); None -> default."""
    if value is None:
        return DEFAULT_PROFILE
    if isinstance(value, BatchProfile):
        return value
    usage = f"batch profile must be MIN,OPT,MAX (e.g. 1,8,32) or one size, got {value!r}"
    sizes: list[Any]  # BatchProfile checks each
    if isinstance(value, str):
        # plain decimal digits: int() would also read '1_0' as 10 and other scripts' digits
        fields = [v.strip() for v in value.split(",")]
        if not all(re.fullmatch(r"[0-9]+", v, re.ASCII) for v in fields):
            raise InvalidInputError(usage)
        sizes = [int(v) for v in fields]
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        sizes = [value]
    elif isinstance(value, (list, tuple)):  # not bytes: those would be read as character codes
        sizes = list(value)
    else:
        raise InvalidInputError(usage)
    if len(sizes) == 1:
        return BatchProfile(1, sizes[0], sizes[0])
    if len(sizes) != 3:
        raise InvalidInputError(usage)
    return BatchProfile(*sizes)


def engine_key_fields(onnx_sha256: str, precision: str, profile: BatchProfile, input_shapes: dict[str, Sequence[int]],
                      env: dict[str, Any]) -> dict[str, Any]:
    """Everything an engine depends on, as a JSON-able dict (the sidecar holds exactly this).
    ``input_shapes`` gives each input's static dimensions after the batch; ``env`` is :func:`environment`."""
    missing = {"tensorrt", "cuda", "gpu", "compute_capability"} - set(env)
    if missing:
        raise InvalidInputError(f"engine environment lacks {', '.join(sorted(missing))}")
    return {
        "format": CACHE_FORMAT,
        "onnx_sha256": str(onnx_sha256),
        "precision": str(precision),
        "profile": asdict(profile),
        "input_shapes": {k: [int(d) for d in v] for k, v in sorted(input_shapes.items())},
        "tensorrt": str(env["tensorrt"]),
        "cuda": str(env["cuda"]),
        "gpu": str(env["gpu"]),
        "compute_capability": [int(c) for c in env["compute_capability"]],
    }


def engine_key(fields: dict[str, Any]) -> str:
    """A short stable name for ``fields``: SHA-256 of their canonical JSON."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def environment(device_index: int = 0) -> dict[str, Any]:
    """The TensorRT and CUDA versions, GPU name and compute capability engines are built for."""
    import torch

    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise InvalidInputError("TensorRT engines need a CUDA device; none is available")
    return {
        "tensorrt": trt.__version__,
        "cuda": torch.version.cuda or "unknown",
        "gpu": torch.cuda.get_device_name(device_index),
        "compute_capability": list(torch.cuda.get_device_capability(device_index)),
    }


@dataclass
class CacheResult:
    engine: Any  # the deserialised engine (whatever ``deserialize`` returned)
    path: Path
    status: str  # "cached" or "built"
    reason: str  # why it was (re)built, or "" when cached
    seconds: float


# A sidecar is the engine's key fields, its SHA-256 and size: a few kilobytes.
_MAX_SIDECAR_BYTES = 2**20


class EngineCache:
    """A folder of engines keyed by :func:`engine_key`: ``<key>.engine`` + ``<key>.json`` + ``<key>.lock``.

    ``get(fields, build, deserialize)`` returns a usable engine: the cached one when its sidecar
    matches ``fields`` exactly, its bytes match the sidecar's SHA-256 and ``deserialize`` accepts
    them; otherwise ``build()`` makes new bytes, which are written atomically (engine first, then
    the sidecar that vouches for it) and deserialised. Two processes asking for the same engine build
    it once: the second waits on the lock and then finds it cached."""

    def __init__(self, folder: Union[str, Path], *, lock_timeout: float = 3600.0) -> None:
        self.folder = check_path(folder, "engine cache folder")
        self.lock_timeout = float(lock_timeout)

    def paths(self, key: str) -> tuple[Path, Path, Path]:
        if not key.isalnum():
            raise InvalidInputError(f"engine key must be alphanumeric, got {key!r}")
        return (self.folder / f"{key}{ENGINE_SUFFIX}", self.folder / f"{key}{SIDECAR_SUFFIX}",
                self.folder / f"{key}.lock")

    def _lock(self, path: Path) -> Any:
        from filelock import FileLock

        return FileLock(str(path), timeout=self.lock_timeout)

    def _check_cached(self, fields: dict[str, Any], engine_path: Path, sidecar_path: Path) -> tuple[Optional[bytes], str]:
        """(engine bytes, "") when the cached engine is the one ``fields`` describe, else (None, why not)."""
        if not engine_path.is_file() or not sidecar_path.is_file():
            return None, "not cached"
        try:
            # sizes before reading: a huge (sparse) sidecar or engine was read whole, a MemoryError
            if sidecar_path.stat().st_size > _MAX_SIDECAR_BYTES:
                return None, "unreadable sidecar (larger than any pneumoseg writes)"
            sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # ValueError: bad UTF-8 or JSON, or an integer of over 4300 digits
            return None, f"unreadable sidecar ({exc})"
        except RecursionError:
            return None, "unreadable sidecar (nested too deeply)"
        if not isinstance(sidecar, dict) or sidecar.get("fields") != fields:
            return None, "stale (built for another ONNX, precision, profile, TensorRT, CUDA or GPU)"
        try:
            if engine_path.stat().st_size != sidecar.get("bytes"):
                return None, "damaged (its size is not the sidecar's)"
            data = engine_path.read_bytes()
        except OSError as exc:
            return None, f"unreadable engine ({exc.strerror or exc})"
        if hashlib.sha256(data).hexdigest() != sidecar.get("sha256"):
            return None, "damaged (its bytes do not match the sidecar's SHA-256)"
        return data, ""

    def get(self, fields: dict[str, Any], build: Callable[[], bytes], deserialize: Callable[[bytes], Any]) -> CacheResult:
        key = engine_key(fields)
        engine_path, sidecar_path, lock_path = self.paths(key)
        self.folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with self._lock(lock_path):
            data, reason = self._check_cached(fields, engine_path, sidecar_path)
            if data is not None:
                engine = _try_deserialize(deserialize, data)
                if engine is not None:
                    return CacheResult(engine, engine_path, "cached", "", time.perf_counter() - start)
                reason = "TensorRT could not deserialise it"
            data = build()
            if not isinstance(data, (bytes, bytearray)) or not data:
                raise NativeError("the TensorRT engine build returned no data")
            data = bytes(data)
            # The old sidecar goes first, so a crash between the two writes leaves no false voucher.
            sidecar_path.unlink(missing_ok=True)
            atomic_write(engine_path, data)
            sidecar = {"fields": fields, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                       "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            atomic_write(sidecar_path, json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
            engine = _try_deserialize(deserialize, data)
            if engine is None:
                raise NativeError(f"{engine_path}: TensorRT cannot deserialise the engine it has just built")
            return CacheResult(engine, engine_path, "built", reason, time.perf_counter() - start)


def _try_deserialize(deserialize: Callable[[bytes], Any], data: bytes) -> Any:
    try:
        return deserialize(data)
    except Exception:  # a damaged or foreign engine: rebuilt by the caller, never run
        return None


_RUNTIMES: dict[int, Any] = {}


def deserialize_engine(data: bytes) -> Any:
    """The ``ICudaEngine`` in ``data``, or None when TensorRT refuses it (another version, damaged)."""
    trt = import_tensorrt()
    runtime = _RUNTIMES.get(0)
    if runtime is None:
        runtime = _RUNTIMES[0] = trt.Runtime(_logger(trt))
    return runtime.deserialize_cuda_engine(data)


_LOGGERS: dict[int, Any] = {}


def _logger(trt: Any) -> Any:
    logger = _LOGGERS.get(0)
    if logger is None:
        logger = _LOGGERS[0] = trt.Logger(trt.Logger.WARNING)
    return logger


def _strongly_typed_flags(trt: Any) -> int:
    major = int(str(trt.__version__).split(".")[0])
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    # TensorRT 11 is always strongly typed (the flag is deprecated there); 10.x needs it asked for.
    return 1 << int(flag) if flag is not None and major < 11 else 0


def build_engine(onnx_path: Union[str, Path], profile: BatchProfile, *, timing_cache: Optional[Path] = None,
                 workspace_bytes: int = 4 << 30) -> bytes:
    """Build a serialised engine from an ONNX part on the current GPU (strongly typed, one profile:
    dynamic batch per ``profile``, the other dimensions as the graph has them)."""
    trt = import_tensorrt()
    onnx_path = Path(onnx_path)
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_strongly_typed_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DataFormatError(f"{onnx_path}: TensorRT's ONNX parser refused it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(int(d) for d in tuple(tensor.shape)[1:])
        if any(d < 0 for d in rest):
            raise DataFormatError(f"{onnx_path}: input {tensor.name} has dynamic dimensions {tuple(tensor.shape)}; "
                                  "only the batch may be dynamic")
        opt_profile.set_shape(tensor.name, (profile.min, *rest), (profile.opt, *rest), (profile.max, *rest))
    config.add_optimization_profile(opt_profile)
    cache_lock = None
    if timing_cache is not None:
        from filelock import FileLock

        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        cache_lock = FileLock(str(timing_cache) + ".lock", timeout=3600)
        with cache_lock:
            saved = _load_timing_cache(config, timing_cache)
        # ignore_mismatch=False: a cache timed on another device is refused (TensorRT warns that using
        # one "may lead to functional/performance bugs"); a refused or unreadable one is timed afresh
        if saved is None or not config.set_timing_cache(saved, ignore_mismatch=False):
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise NativeError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    if timing_cache is not None and cache_lock is not None:
        with cache_lock:
            ours = config.get_timing_cache()
            if ours is not None:
                on_disk = _load_timing_cache(config, timing_cache)
                if on_disk is not None:  # keep what other builds saved while this one ran
                    ours.combine(on_disk, ignore_mismatch=False)
                atomic_write(timing_cache, bytes(ours.serialize()))
    return bytes(serialized)


def _load_timing_cache(config: Any, path: Path) -> Any:
    """The timing cache saved at ``path``; None when there is none or TensorRT cannot read it (a
    damaged file must not fail every build on this GPU: it is replaced by the next one's)."""
    try:
        blob = path.read_bytes() if path.is_file() else b""
    except OSError:
        return None
    if not blob:
        return None
    try:
        return config.create_timing_cache(blob)
    except Exception:  # TensorRT reports an unreadable blob by a null cache or an exception
        return None


def timing_cache_path(folder: Path, env: dict[str, Any]) -> Path:
    """One timing cache per TensorRT version and GPU (a cache from another is useless)."""
    tag = hashlib.sha256(f"{env['tensorrt']}|{env['gpu']}|{env['compute_capability']}".encode()).hexdigest()[:16]
    return folder / f"timing-{tag}.cache"


def torch_dtype(trt_dtype: Any) -> Any:
    """The torch dtype of a TensorRT ``DataType``."""
    import torch

    trt = import_tensorrt()
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int8: torch.int8, trt.int32: torch.int32,
             trt.bool: torch.bool}
    for name, dtype in (("bfloat16", torch.bfloat16), ("int64", torch.int64), ("uint8", torch.uint8)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = dtype
    if trt_dtype not in table:
        raise NativeError(f"TensorRT tensor type {trt_dtype} has no torch equivalent")
    return table[trt_dtype]


def tensorrt_onnx_key(part: str, precision: str) -> str:
    """The ONNX artefact an engine of ``precision`` is built from: the fp32 or fp16 graph, or for int8
    the graph with symmetric Q/DQ nodes (zero points 0, as TensorRT requires)."""
    return f"{part}-onnx-{'int8-symmetric' if precision == 'int8' else precision}"


def tensorrt_artefact_key(part: str, precision: str) -> str:
    return f"{part}-tensorrt-{precision}"


class EngineRunner:
    """One engine of one part: ``runner(*inputs) -> outputs`` for a batch within its profile."""

    def __init__(self, engine: Any, spec: PartSpec, device: Any, profile: BatchProfile) -> None:
        import torch

        trt = import_tensorrt()
        self.engine = engine
        self.spec = spec
        self.device = torch.device(device)
        self.profile = profile
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(inputs) != sorted(spec.inputs) or sorted(outputs) != sorted(spec.outputs):
            raise DataFormatError(f"the {spec.name} engine has inputs {inputs} and outputs {outputs}, not those of "
                                  f"the part ({list(spec.inputs)} / {list(spec.outputs)})")
        self.dtypes = {n: torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        self._local = threading.local()

    def _context(self) -> Any:
        context = getattr(self._local, "context", None)
        if context is None:
            context = self.engine.create_execution_context()
            if context is None:
                raise NativeError(f"TensorRT could not create an execution context for the {self.spec.name} engine "
                                  "(out of GPU memory?)")
            self._local.context = context
        return context

    def __call__(self, *inputs: Any) -> tuple:
        import torch

        rows = int(inputs[0].shape[0])
        self.profile.check(rows, f"the {self.spec.name} engine")
        stream = torch.cuda.current_stream(self.device)
        context = self._context()
        held = []  # the inputs as bound, alive until the call returns (later work is stream-ordered)
        for name, x in zip(self.spec.inputs, inputs):
            x = x.to(device=self.device, dtype=self.dtypes[name]).contiguous()
            if x.data_ptr() % 256:  # TensorRT needs 256-byte aligned addresses; a view into a batch may lack it
                x = x.clone()
            if not context.set_input_shape(name, tuple(x.shape)):
                raise InvalidInputError(f"the {self.spec.name} engine refused input {name} of shape {tuple(x.shape)}")
            context.set_tensor_address(name, x.data_ptr())
            held.append(x)
        outputs = []
        for name in self.spec.outputs:
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise NativeError(f"the {self.spec.name} engine left output {name} with an unknown shape {shape}")
            out = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        if not context.execute_async_v3(stream.cuda_stream):
            raise NativeError(f"TensorRT failed to run the {self.spec.name} engine")
        return tuple(outputs)


class ProfileRunner:
    """Any batch size through an engine's profile: chunks of at most ``max`` rows, a chunk below
    ``min`` padded with zero rows up to it (cut off the outputs again). ``runner`` is an
    :class:`EngineRunner` or anything called the same way."""

    def __init__(self, runner: Callable[..., tuple], profile: BatchProfile) -> None:
        self.runner = runner
        self.profile = profile

    def __call__(self, *inputs: Any) -> tuple:
        import torch

        n = int(inputs[0].shape[0])
        if n == 0:
            raise InvalidInputError("an engine was called with an empty batch")
        pieces = []
        for start in range(0, n, self.profile.max):
            chunk = [x[start:start + self.profile.max] for x in inputs]
            rows = int(chunk[0].shape[0])
            if rows < self.profile.min:
                chunk = [torch.cat([x, x.new_zeros((self.profile.min - rows, *x.shape[1:]))], 0) for x in chunk]
                pieces.append(tuple(o[:rows] for o in self.runner(*chunk)))
            else:
                pieces.append(tuple(self.runner(*chunk)))
        if len(pieces) == 1:
            return pieces[0]
        return tuple(torch.cat([p[i] for p in pieces], 0) for i in range(len(pieces[0])))


def _needs_onnx(md: Any, part: str, precision: str) -> bool:
    """Whether the ONNX graph an engine of ``precision`` is built from must be exported (again): it is
    missing, or was exported from another network than the directory's (a damaged file is an error)."""
    from .provenance import StaleArtefactError, verified_onnx_artefact

    key = tensorrt_onnx_key(part, precision)
    if key not in md.artefacts:
        return True
    try:
        verified_onnx_artefact(md, key, part, command_format="tensorrt")
    except StaleArtefactError:
        return True
    return False


def export_tensorrt(model_dir: Any, precision: str = "fp16", *, batch: Union[str, Sequence[int], BatchProfile, None] = None,
                    calibrate: Any = None, device: Any = "cuda", engine_cache: Union[str, Path, None] = None,
                    validation: Optional[Sequence[Any]] = None, min_dice: Optional[float] = None) -> dict[str, Path]:
    """Build (or find cached) TensorRT engines for every part of a model directory on this GPU, check
    each against torch fp32 on ``validation`` images (the calibration images, or synthetic phantoms),
    and record them in the directory; returns part -> engine file.

    The ONNX graph each engine is built from (fp32, fp16 with fp32 I/O, or int8 with symmetric Q/DQ
    calibrated on ``calibrate``) is exported first where the directory lacks it or where the one it has
    was exported from another network (:mod:`pneumoseg.export.provenance`). ``batch`` is the
    profile MIN,OPT,MAX (default 1,8,32); ``engine_cache`` defaults to ``<model dir>/tensorrt``."""
    import torch

    from .onnx import _torch_outputs, compare_outputs, export_onnx, load_calibration_images, load_for_export, \
        part_inputs, validation_images
    from .parts import part_module, part_spec, parts_for
    from .provenance import verified_onnx_artefact

    import_tensorrt()
    md = load_for_export(model_dir)
    if precision not in ("fp32", "fp16", "int8"):
        raise InvalidInputError(f"precision must be 'fp32', 'fp16' or 'int8', got {precision!r}")
    profile = parse_batch_profile(batch)
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise InvalidInputError("TensorRT engines are built on a CUDA device; none is available")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    dev = torch.device("cuda", index)
    parts = [p for p in parts_for(md).values() if p is not None]
    onnx_precision = "int8-symmetric" if precision == "int8" else precision
    if any(_needs_onnx(md, p, precision) for p in parts):
        export_onnx(md, onnx_precision, calibrate=calibrate, validation=validation, min_dice=min_dice)
    if validation is None and calibrate is not None:
        validation = load_calibration_images(calibrate, 16)[0]
    images = validation_images(md, validation)
    env = environment(index)
    cache = EngineCache(engine_cache if engine_cache is not None else Path(md.path) / "tensorrt")
    timing = timing_cache_path(cache.folder, env)
    networks = {name: md.build(name) for name in dict.fromkeys(part_spec(p).network for p in parts)}
    written: dict[str, Path] = {}
    for part in parts:
        spec = part_spec(part)
        key = tensorrt_onnx_key(part, precision)
        onnx_path = verified_onnx_artefact(md, key, part, command_format="tensorrt")
        art = md.artefacts[key]
        fields = engine_key_fields(art.sha256, precision, profile, art.meta["input_shapes"], env)
        with torch.cuda.device(dev):
            result = cache.get(fields, lambda: build_engine(onnx_path, profile, timing_cache=timing), deserialize_engine)
            runner = ProfileRunner(EngineRunner(result.engine, spec, dev, profile), profile)
            inputs = part_inputs(md, networks, part, images)
            stream = torch.cuda.Stream(dev)  # TensorRT runs on a non-default stream
            with torch.cuda.stream(stream):
                outputs = runner(*[x.to(dev) for x in inputs])
                candidate = [o.float().cpu().numpy() for o in outputs]
        reference = _torch_outputs(part_module(part, networks[spec.network]), inputs)
        t = md.thresholds
        # TensorRT's fp32 may use TF32 tensor cores: judged with the fp16 tolerance
        tolerance = {"fp32": "fp16", "fp16": "fp16", "int8": "int8"}[precision]
        check = compare_outputs(part, reference, candidate, tolerance, (t.bottom, 0.5, *(() if t.top is None else (t.top,))),
                                f"{part} TensorRT {precision} engine", min_dice=min_dice)
        meta = {"profile": asdict(profile), "key": engine_key(fields), "fields": fields, "build": result.status,
                "build_seconds": round(result.seconds, 2), "validation": {"images": len(images), **check}}
        try:
            rel = result.path.resolve().relative_to(Path(md.path).resolve()).as_posix()
        except ValueError:  # a cache outside the model directory: listed there, not recorded here
            written[part] = result.path
            continue
        written[part] = md.add_artefact(tensorrt_artefact_key(part, precision), rel, result.path.read_bytes(),
                                        format="tensorrt", network=spec.network, precision=precision, meta=meta)
    return written
