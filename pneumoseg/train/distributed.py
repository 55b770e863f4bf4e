"""Multi-process training: ``torchrun --nproc_per_node=K -m pneumoseg train CONFIG.yaml`` (one
process per GPU, NCCL; or K CPU processes with gloo), and multi-node with torchrun's ``--nnodes``.

What the engine does under DistributedDataParallel:
- each process draws its share of one global sample order (:class:`DistributedRatioSampler`): the
  order a 1-process run with ``batch_size x K`` would see, dealt round-robin, so global batches are
  the same images whatever K is;
- gradients are averaged across processes (DDP), so with a loss that is a mean over images (per-image
  Dice, BCE, focal) the step equals the 1-process step on the global batch up to float rounding;
  batch-wide Dice is per process and therefore differs slightly;
- BatchNorm (``model.batchnorm``): ``batch`` normalises with each process's own batch statistics (DDP's
  default; running statistics are rank 0's, broadcast every step); ``sync`` converts it to
  SyncBatchNorm (CUDA only) for statistics over the global batch; ``frozen`` uses the running
  statistics (eval-mode BN, affine parameters still trained), which makes K processes equal 1;
- augmentation random numbers are seeded per rank (different images get different draws);
- validation is split across processes and its counts / scores gathered, so metrics are over the
  whole validation fold; rank 0 alone writes checkpoints, logs and the model directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist

from ..errors import InvalidInputError

__all__ = ["DistInfo", "init_distributed", "DistributedRatioSampler", "positives_epoch_samples", "all_gather_objects",
           "all_reduce_sum", "barrier"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    owns_group: bool = False  # this module initialised the process group (and destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidInputError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL for CUDA, gloo for CPU. Without those
    variables (or with ``WORLD_SIZE=1``) training runs in this one process."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK") or 0,
                        dist.get_backend(), owns_group=False)
    world = _env_int("WORLD_SIZE") or 1
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise InvalidInputError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank = _env_int("RANK")
    local = _env_int("LOCAL_RANK")
    if rank is None:
        raise InvalidInputError("WORLD_SIZE > 1 but RANK is not set: start multi-process training with torchrun")
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local or 0, backend, owns_group=True)


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: Sequence[float], info: DistInfo) -> list[float]:
    """Element-wise sum of a few numbers over processes (float64 on the CPU: gloo and NCCL alike
    through a CPU/GPU tensor as the backend needs)."""
    if not info.enabled:
        return [float(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if info.backend == "nccl" else torch.device("cpu")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every process's ``obj`` (picklable, from this training job's own processes), in rank order."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def positives_epoch_samples(n_positives: int, ratio: float, step: int) -> int:
    """An epoch of every positive image once plus negatives for ``ratio`` (SIIM 1st's sampler:
    ``n_positives / ratio`` images), rounded down to whole optimizer steps of ``step`` images."""
    if not 0.0 < ratio <= 1.0:
        raise InvalidInputError(f"an epoch of every positive once needs a positive ratio in (0, 1], got {ratio}")
    return round(n_positives / ratio) // step * step


class DistributedRatioSampler(torch.utils.data.Sampler):
    """The training sample order of one epoch, for one of ``world_size`` processes.

    The global order is ``num_samples`` indices drawn with a positive share (``positive_ratio``: a
    number, a ``(start, end)`` pair interpolated over ``epochs``, a function of the epoch, or None
    for a plain shuffle without replacement of the labels' own share), the same on every process
    (seeded by ``(seed, epoch)``), rounded down to whole global batches; process ``rank`` takes
    every ``world_size``-th index starting at ``rank``. ``set_epoch(e, start_batch=b)`` skips the
    first ``b`` batches of the epoch (resuming inside an epoch).

    ``positives_once`` (``num_samples`` None) sizes each epoch as SIIM 1st's sampler: every positive
    image once plus negatives for the epoch's ratio, ``len(positives) / ratio`` images rounded down
    to whole optimizer steps of ``step`` images (default one global batch; the rounding leaves out
    fewer than ``step`` images, positives drawn at random). The negatives are dealt from endless
    shuffled passes over them, so every negative is seen before any is seen again, across epochs."""

    def __init__(
        self,
        labels: Sequence[int],
        positive_ratio: Union[None, float, list[float], tuple[float, float], Callable[[int], float]],
        *,
        num_samples: Optional[int],
        batch_size: int,
        epochs: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        positives_once: bool = False,
        step: Optional[int] = None,
    ) -> None:
        lab = np.asarray([int(v) for v in labels], dtype=np.int64)
        self.positives = np.nonzero(lab == 1)[0]
        self.negatives = np.nonzero(lab == 0)[0]
        self.n_items = len(lab)
        self.schedule = positive_ratio
        if positive_ratio is not None and (len(self.positives) == 0 or len(self.negatives) == 0):
            raise InvalidInputError("a positive ratio needs both positive and negative training images")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        global_batch = batch_size * world_size
        self.global_batch = global_batch
        self.step = step or global_batch
        if self.step % global_batch:
            raise InvalidInputError(f"step ({self.step} images) must be whole global batches of {global_batch}")
        self.epochs, self.seed = max(1, epochs), seed
        self.positives_once = bool(positives_once)
        if self.positives_once:
            if positive_ratio is None or num_samples is not None:
                raise InvalidInputError("positives_once sizes the epoch from a positive ratio: give positive_ratio "
                                        "and no num_samples")
            for e in range(self.epochs):
                if self.epoch_samples(e) < self.step:
                    raise InvalidInputError(
                        f"epoch {e + 1}: {len(self.positives)} positives at a positive ratio of {self.ratio(e):.3g} "
                        f"make an epoch of fewer than one optimizer step of {self.step} images")
        else:
            if num_samples is None:
                raise InvalidInputError("num_samples is needed unless positives_once")
            self.batches = num_samples // global_batch
            if self.batches == 0:
                raise InvalidInputError(f"an epoch of {num_samples} samples holds no global batch of {global_batch} "
                                        f"({batch_size} per process x {world_size} processes)")
            self.num_samples = self.batches * global_batch
        self.epoch, self.start_batch = 0, 0
        self.set_epoch(0)

    def ratio(self, epoch: int) -> Optional[float]:
        s = self.schedule
        if s is None:
            return None
        if callable(s):
            return float(s(epoch))
        if isinstance(s, (list, tuple)):
            a, b = float(s[0]), float(s[1])
            return a + (b - a) * min(1.0, epoch / max(1, self.epochs - 1))
        return float(s)

    def epoch_samples(self, epoch: int) -> int:
        """Images in epoch ``epoch`` over all processes."""
        if not self.positives_once:
            return self.num_samples
        return positives_epoch_samples(len(self.positives), self._once_ratio(epoch), self.step)

    def _once_ratio(self, epoch: int) -> float:
        r = self.ratio(epoch)
        assert r is not None  # __init__ refuses positives_once without a positive ratio
        return r

    def _split(self, epoch: int) -> tuple[int, int]:
        """(positives, negatives) of a positives_once epoch."""
        n = self.epoch_samples(epoch)
        n_pos = round(n * self._once_ratio(epoch))
        return n_pos, n - n_pos

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)
        if self.positives_once:
            self.num_samples = self.epoch_samples(self.epoch)
            self.batches = self.num_samples // self.global_batch

    def _negative_passes(self, start: int, count: int) -> np.ndarray:
        """``count`` negatives from position ``start`` of endless shuffled passes over them."""
        n = len(self.negatives)
        if count == 0:
            return self.negatives[:0]
        first, last = start // n, (start + count - 1) // n
        stream = np.concatenate([np.random.default_rng([self.seed, k, 0x4E6]).permutation(self.negatives)
                                 for k in range(first, last + 1)])
        return stream[start - first * n: start - first * n + count]

    def global_order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch, 0x5A3])
        r = self.ratio(self.epoch)
        if r is None:
            reps = -(-self.num_samples // self.n_items)
            picks = np.concatenate([rng.permutation(self.n_items) for _ in range(reps)])[: self.num_samples]
            return picks
        if self.positives_once:
            n_pos, n_neg = self._split(self.epoch)  # n_pos <= len(positives)
            negatives_done = sum(self._split(e)[1] for e in range(self.epoch))  # this epoch goes on from there
            picks = np.concatenate([rng.permutation(self.positives)[:n_pos],
                                    self._negative_passes(negatives_done, n_neg)])
            return rng.permutation(picks)
        n_pos = int(round(self.num_samples * r))
        picks = np.concatenate([
            rng.choice(self.positives, n_pos, replace=True),
            rng.choice(self.negatives, self.num_samples - n_pos, replace=True),
        ])
        return rng.permutation(picks)

    def __len__(self) -> int:
        return (self.batches - self.start_batch) * self.batch_size

    def __iter__(self):
        order = self.global_order()[self.rank::self.world_size]
        return iter(order[self.start_batch * self.batch_size:].tolist())
