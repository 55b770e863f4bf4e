"""Running a network part on batches of any size through a fixed set of batch sizes ("buckets").

A CUDA graph (or a ``torch.compile`` specialisation, or a TensorRT profile) serves fixed shapes, so a
batch of n images runs as chunks of at most the largest bucket, each padded up to the smallest
bucket that holds it; padding rows are zeros and are cut off the outputs (every part is per-image:
batch norm in eval mode, no cross-image operation, so padding never changes a real row).

:class:`CudaGraphRunner` captures one graph per bucket at load time and replays it; it is only ever
built for a CUDA device (the check is explicit, so the CPU tests exercise everything up to it).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Sequence

from .._checks import check_int
from ..errors import InvalidInputError

__all__ = ["make_buckets", "bucket_for", "chunk_bounds", "BucketedRunner", "CudaGraphRunner"]

DEFAULT_MAX_BATCH = 32


def make_buckets(max_batch: int = DEFAULT_MAX_BATCH, sizes: Optional[Sequence[int]] = None) -> tuple[int, ...]:
    """Sorted distinct bucket sizes: ``sizes`` if given, else the powers of two up to ``max_batch``
    and ``max_batch`` itself (1, 2, 4, 8, 16, 32 by default)."""
    if sizes is not None:
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes:
            raise InvalidInputError(f"batch buckets must be a non-empty list of sizes, got {sizes!r}")
        out = sorted({check_int(s, "batch bucket", low=1, high=1 << 16) for s in sizes})
        return tuple(out)
    max_batch = check_int(max_batch, "max_batch", low=1, high=1 << 16)
    bucket_sizes = {max_batch}
    b = 1
    while b < max_batch:
        bucket_sizes.add(b)
        b *= 2
    return tuple(sorted(bucket_sizes))


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` rows (``n`` must not exceed the largest)."""
    for b in buckets:
        if b >= n:
            return b
    raise InvalidInputError(f"a chunk of {n} rows is larger than the largest batch bucket ({buckets[-1]})")


def chunk_bounds(n: int, max_rows: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most ``max_rows`` covering ``range(n)``."""
    return [(s, min(n, s + max_rows)) for s in range(0, n, max_rows)]


def _pad_rows(x: Any, rows: int) -> Any:
    import torch

    n = x.shape[0]
    if n == rows:
        return x
    pad = torch.zeros((rows - n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    return torch.cat([x, pad.contiguous(memory_format=_memory_format(x))], 0)


def _memory_format(x: Any) -> Any:
    import torch

    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class BucketedRunner:
    """``runner(*inputs) -> tuple of outputs`` over any batch size: chunks of at most the largest
    bucket; with ``pad=True`` each chunk is padded to its bucket (fixed shapes for graphs and compiled
    code), with ``pad=False`` (eager CPU) chunks run at their own size."""

    def __init__(self, run_bucket: Callable[..., tuple], buckets: Sequence[int], *, pad: bool) -> None:
        self.run_bucket = run_bucket
        self.buckets = tuple(buckets)
        self.pad = pad

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def __call__(self, *inputs: Any) -> tuple:
        import torch

        n = inputs[0].shape[0]
        if n == 0:
            raise InvalidInputError("a network part was called with an empty batch")
        if n <= self.max_batch and not self.pad:  # one chunk, run as it is (no slicing: a batch-1 request)
            return tuple(self.run_bucket(*inputs))
        pieces = []
        for start, stop in chunk_bounds(n, self.max_batch):
            chunk = list(inputs) if stop - start == n else [x[start:stop] for x in inputs]
            rows = stop - start
            if self.pad:
                size = bucket_for(rows, self.buckets)
                chunk = [_pad_rows(x, size) for x in chunk]
            out = self.run_bucket(*chunk)
            pieces.append(tuple(o[:rows] for o in out) if self.pad else tuple(out))
        if len(pieces) == 1:
            return pieces[0]
        return tuple(torch.cat([p[i] for p in pieces], 0) for i in range(len(pieces[0])))


class CudaGraphRunner:
    """One CUDA graph per bucket of a part, captured once (``capture``) and replayed per call.

    A call takes at most the largest bucket's rows (wrap it in a ``BucketedRunner(pad=False)``): they
    are copied into the bucket's static inputs (the rest zeroed), the graph replays, and the real rows
    of the outputs are cloned, so the result stays valid after the next replay. The graphs share
    their static buffers, so calls are serialised by a lock and run on this runner's own stream,
    ordered after the caller's stream and before the caller's next work. Build it only for a CUDA
    device."""

    def __init__(self, fn: Callable[..., tuple], example_inputs: Callable[[int], list], buckets: Sequence[int],
                 device: Any, *, warmup: int = 2) -> None:
        import torch

        device = torch.device(device)
        if device.type != "cuda":
            raise InvalidInputError(f"CUDA graphs need a CUDA device, got {device}")
        self.fn = fn
        self.device = device
        self.buckets = tuple(buckets)
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(device=device)
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[int, tuple[Any, list, tuple]] = {}
        # Largest first: later (smaller) graphs reuse the pool's blocks.
        for b in sorted(self.buckets, reverse=True):
            self._capture(b, example_inputs(b), warmup)

    def _capture(self, bucket: int, static_inputs: list, warmup: int) -> None:
        import torch

        with torch.cuda.device(self.device):
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(warmup):  # cuDNN / cuBLAS choose their algorithms outside the capture
                    self.fn(*static_inputs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
                static_outputs = tuple(self.fn(*static_inputs))
            self._graphs[bucket] = (graph, static_inputs, static_outputs)

    def __call__(self, *inputs: Any) -> tuple:
        import torch

        rows = inputs[0].shape[0]
        bucket = bucket_for(rows, self.buckets)
        graph, static_inputs, static_outputs = self._graphs[bucket]
        caller = torch.cuda.current_stream(self.device)
        with self._lock:
            self._stream.wait_stream(caller)
            with torch.cuda.stream(self._stream):
                full = rows == bucket  # then no slices (host time only, but a batch-1 request pays it per tensor)
                for dst, src in zip(static_inputs, inputs):
                    (dst if full else dst[:rows]).copy_(src, non_blocking=True)
                    if not full:
                        dst[rows:].zero_()
                graph.replay()
                outputs = tuple((o if full else o[:rows]).clone() for o in static_outputs)
            caller.wait_stream(self._stream)
        for o in outputs:
            o.record_stream(caller)  # allocated on the graph stream, consumed on the caller's
        return outputs
