"""A strict stand-in for the ``tensorrt`` Python module, for the machines TensorRT cannot be installed on.

It has only the names, argument names and return conventions pneumoseg uses, as TensorRT 10.x / 11.x
bind them (NVIDIA/TensorRT ``python/src/infer/pyCore.cpp``, ``pyFoundationalTypes.cpp``,
``python/src/parsers/pyOnnx.cpp``; C++ contracts in ``include/NvInfer.h`` / ``NvInferRuntime.h``):

- failures are return values, as TensorRT's are: ``build_serialized_network`` and
  ``deserialize_cuda_engine`` return None, ``set_input_shape`` / ``set_tensor_address`` /
  ``execute_async_v3`` / ``set_timing_cache`` / ``combine`` return False; arguments of the wrong
  type raise TypeError, as pybind11 does (None where a reference is bound, a Stream object where a
  ``size_t`` stream handle is bound);
- ``set_input_shape`` refuses shapes outside the optimisation profile or against a static dimension;
  an output's ``get_tensor_shape`` has -1 until every input shape is set; ``execute_async_v3`` fails
  without an address for every tensor;
- a timing cache carries the device it was timed on: ``set_timing_cache(cache, ignore_mismatch=False)``
  refuses a foreign one, ``True`` uses it (what NVIDIA warns "may lead to functional/performance bugs");
- engines run for real on CPU memory (read and written through the addresses given), so results can
  be checked: each output is ``2 * image`` (same shape) or the per-row mean of ``image`` (``(B, 1)``).

The "ONNX" file it parses is JSON: ``{"inputs": {name: [dtype, shape]}, "outputs": {name: [dtype, kind]}}``
with ``kind`` "double" or "mean". Everything a test needs to look at is recorded on the module
(``built_with``, ``addresses``, ``executions``).
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
from typing import Any

import numpy as np


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9


_NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
          DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}
_NAMES = {"float32": DataType.FLOAT, "float16": DataType.HALF, "int8": DataType.INT8, "int32": DataType.INT32,
          "bool": DataType.BOOL, "uint8": DataType.UINT8, "int64": DataType.INT64, "bfloat16": DataType.BF16,
          "fp8": DataType.FP8}


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 0


class Dims:
    """Like ``trt.Dims``: indexable and sized, not a tuple."""

    def __init__(self, dims: Any) -> None:
        self._d = [int(d) for d in dims]

    def __len__(self) -> int:
        return len(self._d)

    def __getitem__(self, i: int) -> int:
        return self._d[i]

    def __repr__(self) -> str:
        return f"Dims({self._d})"


def _dims(value: Any, what: str) -> list[int]:
    if not isinstance(value, (tuple, list, Dims)):
        raise TypeError(f"{what}: incompatible function arguments (got {type(value).__name__})")
    out = list(value)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in out):
        raise TypeError(f"{what}: dimensions must be int")
    return out


def _size_t(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"{what}: incompatible function arguments (a size_t, got {type(value).__name__})")
    return value


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    INTERNAL_ERROR = Severity.INTERNAL_ERROR
    ERROR = Severity.ERROR
    WARNING = Severity.WARNING
    INFO = Severity.INFO
    VERBOSE = Severity.VERBOSE


class Logger(ILogger):
    def __init__(self, min_severity: Severity = Severity.WARNING) -> None:
        self.min_severity = min_severity
        self.messages: list[tuple[Severity, str]] = []

    def log(self, severity: Severity, msg: str) -> None:
        self.messages.append((severity, msg))


class ITimingCache:
    def __init__(self, device: str, entries: list[str]) -> None:
        self.device = device
        self.entries = list(entries)

    def serialize(self) -> memoryview:
        return memoryview(b"TC1|" + json.dumps({"device": self.device, "entries": self.entries}).encode())

    def combine(self, input_cache: "ITimingCache", ignore_mismatch: bool) -> bool:
        if not isinstance(input_cache, ITimingCache):
            raise TypeError("combine(): incompatible function arguments")
        if input_cache.device != self.device and not ignore_mismatch:
            return False
        self.entries += [e for e in input_cache.entries if e not in self.entries]
        return True


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[list[int], list[int], list[int]]] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 (TensorRT's names)
        lo, mid, hi = (_dims(d, "set_shape") for d in (min, opt, max))
        if not (len(lo) == len(mid) == len(hi)) or any(not a <= b <= c for a, b, c in zip(lo, mid, hi)):
            raise RuntimeError("Shape provided for opt is inconsistent with other shapes.")
        self.shapes[input] = (lo, mid, hi)


class ITensor:
    def __init__(self, name: str, dtype: DataType, shape: list[int]) -> None:
        self.name = name
        self.dtype = dtype
        self.shape = Dims(shape)


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: list[ITensor] = []
        self.outputs: dict[str, tuple[DataType, str]] = {}

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int) -> ITensor:
        return self.inputs[index]


class IBuilderConfig:
    def __init__(self, module: Any) -> None:
        self._m = module
        self.pools: dict[Any, int] = {}
        self.profiles: list[IOptimizationProfile] = []
        self.timing_cache: ITimingCache | None = None

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        if not isinstance(pool, MemoryPoolType):
            raise TypeError("set_memory_pool_limit(): incompatible function arguments")
        self.pools[pool] = _size_t(pool_size, "set_memory_pool_limit")

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        if not isinstance(profile, IOptimizationProfile):
            raise TypeError("add_optimization_profile(): incompatible function arguments")
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: Any) -> ITimingCache | None:
        blob = bytes(memoryview(serialized_timing_cache))  # a buffer; None is a TypeError
        if not blob:
            return ITimingCache(self._m.device_name, [])
        if self._m.corrupt_timing_cache == "raise" and not blob.startswith(b"TC1|"):
            raise RuntimeError("Failed to create timing cache")
        try:
            record = json.loads(blob[4:]) if blob.startswith(b"TC1|") else None
            return ITimingCache(record["device"], record["entries"])
        except (ValueError, TypeError, KeyError):
            return None  # createTimingCache returns a null pointer

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if not isinstance(cache, ITimingCache):  # pybind binds ITimingCache const&: None is refused
            raise TypeError("set_timing_cache(): incompatible function arguments")
        if cache.device != self._m.device_name and not ignore_mismatch:
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self.timing_cache


class Builder:
    def __init__(self, logger: ILogger) -> None:
        if not isinstance(logger, ILogger):
            raise TypeError("Builder(): incompatible constructor arguments")
        self._m = _MODULE_OF[id(type(self))]
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(_size_t(flags, "create_network"))

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig(self._m)

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> memoryview | None:
        m = self._m
        if not isinstance(network, INetworkDefinition) or not isinstance(config, IBuilderConfig):
            raise TypeError("build_serialized_network(): incompatible function arguments")
        strongly_typed = m.major >= 11 or bool(network.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
        dynamic = [t for t in network.inputs if any(d < 0 for d in t.shape)]
        if len(config.profiles) != 1 or any(t.name not in config.profiles[0].shapes for t in dynamic):
            return None  # "Network has dynamic or shape inputs, but no optimization profile has been defined."
        cache = config.timing_cache
        m.built_with.append({"strongly_typed": strongly_typed, "timing_cache_device": cache.device if cache else None,
                             "timing_entries": list(cache.entries) if cache else None})
        if m.during_build is not None:
            m.during_build()
        if cache is not None:
            cache.entries.append(f"tactics of build {len(m.built_with)}")
        plan = {"version": m.__version__, "device": m.device_name, "strongly_typed": strongly_typed,
                "inputs": {t.name: [t.dtype.value, list(t.shape)] for t in network.inputs},
                "profile": {k: v for k, v in config.profiles[0].shapes.items()},
                "outputs": {k: [d.value, kind] for k, (d, kind) in network.outputs.items()}}
        return memoryview(b"FAKEPLAN" + json.dumps(plan).encode())


class IParserError:
    def __init__(self, desc: str) -> None:
        self._desc = desc

    def desc(self) -> str:
        return self._desc

    def __str__(self) -> str:
        return f"In node -1 (parse): INVALID_GRAPH: {self._desc}"


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
        if not isinstance(network, INetworkDefinition) or not isinstance(logger, ILogger):
            raise TypeError("OnnxParser(): incompatible constructor arguments")
        self.network = network
        self.errors: list[IParserError] = []

    def parse_from_file(self, model: str) -> bool:
        if not isinstance(model, str):
            raise TypeError("parse_from_file(): incompatible function arguments")
        try:
            with open(model, encoding="utf-8") as f:
                graph = json.load(f)
            for name, (dtype, shape) in graph["inputs"].items():
                self.network.inputs.append(ITensor(name, _NAMES[dtype], shape))
            for name, (dtype, kind) in graph["outputs"].items():
                self.network.outputs[name] = (_NAMES[dtype], kind)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.errors.append(IParserError(f"could not read the model ({exc})"))
            return False
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> IParserError:
        return self.errors[index]


class ICudaEngine:
    def __init__(self, module: Any, plan: dict) -> None:
        self._m = module
        self.plan = plan
        self.names = [*plan["inputs"], *plan["outputs"]]

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        if name in self.plan["inputs"]:
            return TensorIOMode.INPUT
        return TensorIOMode.OUTPUT if name in self.plan["outputs"] else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        spec = self.plan["inputs"].get(name) or self.plan["outputs"][name]
        return DataType(spec[0])

    def create_execution_context(self) -> "IExecutionContext":
        self._m.contexts += 1
        return IExecutionContext(self)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, list[int]] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: Any) -> bool:
        dims = _dims(shape, "set_input_shape")
        plan = self.engine.plan
        if name not in plan["inputs"]:
            return False
        network = plan["inputs"][name][1]
        lo, _, hi = plan["profile"][name] if name in plan["profile"] else (network, network, network)
        if len(dims) != len(network) or any(n >= 0 and n != d for n, d in zip(network, dims)) or \
                any(not a <= d <= b for a, d, b in zip(lo, dims, hi)):
            return False
        self.shapes[name] = dims
        return True

    def get_tensor_shape(self, name: str) -> Dims:
        plan = self.engine.plan
        if name in plan["inputs"]:
            return Dims(self.shapes.get(name, plan["inputs"][name][1]))
        image = self.shapes.get("image")
        if name not in plan["outputs"] or image is None:
            return Dims([-1])
        return Dims(image if plan["outputs"][name][1] == "double" else [image[0], 1])

    def set_tensor_address(self, name: str, memory: int) -> bool:
        memory = _size_t(memory, "set_tensor_address")
        if name not in self.engine.names:
            return False
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        m = self.engine._m
        _size_t(stream_handle, "execute_async_v3")
        plan = self.engine.plan
        if set(self.shapes) != set(plan["inputs"]) or set(self.addresses) != set(self.engine.names):
            return False
        m.addresses.append(dict(self.addresses))
        image_dtype = _NUMPY[DataType(plan["inputs"]["image"][0])]
        image = _view(self.addresses["image"], self.shapes["image"], image_dtype).astype(np.float32)
        for name, (dtype, kind) in plan["outputs"].items():
            value = image * 2 if kind == "double" else image.reshape(image.shape[0], -1).mean(1, keepdims=True)
            out = _view(self.addresses[name], list(self.get_tensor_shape(name)), _NUMPY[DataType(dtype)])
            out[...] = value
        m.executions.append({"stream": stream_handle, "shapes": dict(self.shapes)})
        return True


def _view(address: int, shape: list[int], dtype: Any) -> np.ndarray:
    count = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = (ctypes.c_char * count).from_address(address)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


class Runtime:
    def __init__(self, logger: ILogger) -> None:
        if not isinstance(logger, ILogger):
            raise TypeError("Runtime(): incompatible constructor arguments")
        self._m = _MODULE_OF[id(type(self))]

    def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
        blob = bytes(memoryview(serialized_engine))
        try:
            plan = json.loads(blob[8:]) if blob.startswith(b"FAKEPLAN") else None
        except ValueError:
            plan = None
        if plan is None or plan["version"] != self._m.__version__ or plan["device"] != self._m.device_name:
            return None
        return ICudaEngine(self._m, plan)


_MODULE_OF: dict[int, Any] = {}


def make_module(version: str = "10.9.0.34", device_name: str = "NVIDIA H100 80GB HBM3", *,
                corrupt_timing_cache: str = "none") -> types.ModuleType:
    """A fresh ``tensorrt`` module (its own classes, so several can coexist in one test)."""
    m = types.ModuleType("tensorrt")
    m.__version__ = version
    m.major = int(version.split(".")[0])
    m.device_name = device_name
    m.corrupt_timing_cache = corrupt_timing_cache
    m.built_with = []
    m.addresses = []
    m.executions = []
    m.contexts = 0
    m.during_build = None
    m.Builder = type("Builder", (Builder,), {})
    m.Runtime = type("Runtime", (Runtime,), {})
    _MODULE_OF[id(m.Builder)] = _MODULE_OF[id(m.Runtime)] = m
    m.OnnxParser = OnnxParser
    m.Logger = Logger
    m.ILogger = ILogger
    m.ITimingCache = ITimingCache
    m.IHostMemory = memoryview
    m.DataType = DataType
    m.TensorIOMode = TensorIOMode
    m.MemoryPoolType = MemoryPoolType
    m.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    for name, dtype in _NAMES.items():
        if name != "fp8":
            setattr(m, name, dtype)
    m.fp8 = DataType.FP8
    return m


def write_graph(path: Any, inputs: dict[str, tuple[str, list[int]]], outputs: dict[str, tuple[str, str]]) -> None:
    """The JSON "ONNX" file :class:`OnnxParser` reads."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"inputs": {k: list(v) for k, v in inputs.items()},
                   "outputs": {k: list(v) for k, v in outputs.items()}}, f)
