"""Run GPU-only Python on the CPU, to find the plumbing mistakes (a renamed function, a wrong keyword,
a result key the summary no longer reads) before a scarce GPU session does.

Inside ``fake_cuda(monkeypatch)`` tensors asked for on ``"cuda"`` are made on the CPU, and torch.cuda's
queries, streams, events and graphs are stand-ins that run nothing: pneumoseg's ops then take their
CPU path, while code that branches on a ``torch.device("cuda")`` it was given (the Predictor, the
training engine) takes its CUDA branch. Nothing here says anything about the kernels, the timings or
stream ordering; ``fake_cupy_modules()`` likewise maps cupy onto NumPy and cupyx.scipy.ndimage onto
scipy.ndimage. Used by ``test_gpu_code_on_cpu.py`` only.
"""

from __future__ import annotations

import contextlib
import time
import types
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

DEVICE_NAME = "fake CUDA (CPU)"


def _cpu_if_cuda(value: Any) -> Any:
    if isinstance(value, torch.device) and value.type == "cuda":
        return "cpu"
    if isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    return value


class _CpuForCuda(TorchFunctionMode):
    """Every torch function and tensor method called with a CUDA device gets the CPU instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        name = getattr(func, "__name__", "")
        if name in ("cuda", "pin_memory"):
            return args[0]
        if name == "to":
            args = tuple(_cpu_if_cuda(a) for a in args)
        return func(*args, **kwargs)


class _Event:
    def __init__(self, enable_timing: bool = False, **_: Any) -> None:
        self.at = time.perf_counter()

    def record(self, stream: Any = None) -> None:
        self.at = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def wait(self, stream: Any = None) -> None:
        pass

    def elapsed_time(self, end: "_Event") -> float:
        return (end.at - self.at) * 1e3


class _Stream:
    cuda_stream = 0

    def __init__(self, device: Any = None, priority: int = 0, **_: Any) -> None:
        self.device = device

    def wait_stream(self, other: "_Stream") -> None:
        assert isinstance(other, _Stream), f"wait_stream({other!r}): not a stream"

    def wait_event(self, event: _Event) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> _Event:
        event = event or _Event()
        event.record(self)
        return event


_STREAMS = [_Stream()]


@contextlib.contextmanager
def _stream(stream: Any) -> Iterator[None]:
    assert stream is None or isinstance(stream, _Stream), f"torch.cuda.stream({stream!r}): not a stream"
    _STREAMS.append(stream or _STREAMS[-1])
    try:
        yield
    finally:
        _STREAMS.pop()


class _Graph:
    """A capture runs its body once, eagerly; ``replay`` runs ``replay_fn`` if one was set (the
    Predictor's graph runner gets one in ``fake_cuda``), else nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.replay_fn = None

    def replay(self) -> None:
        if self.replay_fn is not None:
            self.replay_fn()


@contextlib.contextmanager
def _graph(graph: Any, pool: Any = None, stream: Any = None, capture_error_mode: str = "global") -> Iterator[None]:
    assert isinstance(graph, _Graph), f"torch.cuda.graph({graph!r}): not a CUDAGraph"
    assert stream is None or isinstance(stream, _Stream), f"torch.cuda.graph(stream={stream!r}): not a stream"
    yield


_TorchGenerator = torch.Generator


class _Generator(_TorchGenerator):
    def __new__(cls, device: Any = "cpu") -> Any:
        return _TorchGenerator.__new__(cls, device=_cpu_if_cuda(device))

    def __init__(self, device: Any = "cpu") -> None:
        pass


@contextlib.contextmanager
def fake_cuda(monkeypatch: Any) -> Iterator[None]:
    """torch.cuda faked for the duration (with pytest's ``monkeypatch``, undone by it afterwards)."""
    cuda = torch.cuda
    for name, value in {
        "is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
        "set_device": lambda device: None, "get_device_name": lambda device=None: DEVICE_NAME,
        "get_device_capability": lambda device=None: (9, 0), "is_bf16_supported": lambda *a, **k: True,
        "synchronize": lambda device=None: None, "empty_cache": lambda: None,
        "Event": _Event, "Stream": _Stream, "stream": _stream, "current_stream": lambda device=None: _STREAMS[-1],
        "default_stream": lambda device=None: _STREAMS[0], "CUDAGraph": _Graph, "graph": _graph,
        "graph_pool_handle": lambda: object(), "device": lambda device: contextlib.nullcontext(),
        "get_rng_state": lambda device=None: torch.get_rng_state(), "set_rng_state": lambda state, device=None: None,
        "manual_seed_all": lambda seed: None, "max_memory_allocated": lambda device=None: 0,
        "reset_peak_memory_stats": lambda device=None: None,
    }.items():
        monkeypatch.setattr(cuda, name, value)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    monkeypatch.setattr(torch, "Generator", _Generator)

    from pneumoseg.infer import buckets

    capture = buckets.CudaGraphRunner._capture

    def capture_and_replay_eagerly(self: Any, bucket: int, static_inputs: list, warmup: int) -> None:
        capture(self, bucket, static_inputs, warmup)
        graph, inputs, outputs = self._graphs[bucket]

        def replay() -> None:
            for static, fresh in zip(outputs, self.fn(*inputs)):
                static.copy_(fresh)

        graph.replay_fn = replay

    monkeypatch.setattr(buckets.CudaGraphRunner, "_capture", capture_and_replay_eagerly)
    with _CpuForCuda():
        yield


def fake_cupy_modules() -> dict[str, types.ModuleType]:
    """sys.modules entries for ``cupy`` (NumPy) and ``cupyx.scipy.ndimage`` (scipy.ndimage)."""
    import numpy as np
    from scipy import ndimage

    cupy = types.ModuleType("cupy")
    cupy.__dict__.update({k: v for k, v in vars(np).items() if not k.startswith("__")})
    cupy.__version__ = "fake (NumPy)"
    cupy.ndarray = type("ndarray", (), {})  # so that pneumoseg never takes a NumPy array for a cupy one
    cupy.asnumpy = np.asarray
    cupy.asarray = lambda x, dtype=None: np.asarray(x, dtype=dtype)
    cupyx = types.ModuleType("cupyx")
    scipy_ = types.ModuleType("cupyx.scipy")
    cupyx.scipy = scipy_
    scipy_.ndimage = ndimage
    return {"cupy": cupy, "cupyx": cupyx, "cupyx.scipy": scipy_, "cupyx.scipy.ndimage": ndimage}


__all__ = ["DEVICE_NAME", "fake_cuda", "fake_cupy_modules"]
