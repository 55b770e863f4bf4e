"""RLE encode/decode against what a user would otherwise run, in one pytest-benchmark session.

    pytest benchmarks/bench_rle.py --benchmark-json=rle.json && python benchmarks/report.py rle.json

Each group holds pneumoseg and its baselines on the same input; report.py prints baseline/pneumoseg.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cuda_timing import median_ms
from factories import pneumothorax_blob, random_mask
from pneumoseg import rle
from reference import competition_mask2rle

RESULTS = Path(__file__).parent / "results"
MASKS = {
    "blob": pneumothorax_blob(1024),
    "noise": random_mask(np.random.default_rng(0), (1024, 1024), 0.5),
}


def numpy_encode(mask: np.ndarray) -> str:
    """The padded-diff idiom from Kaggle kernels, with SIIM's relative starts."""
    pixels = np.concatenate([[0], mask.T.flatten(), [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0]
    starts, ends = runs[0::2], runs[1::2]
    numbers = np.empty(runs.size, dtype=np.int64)
    numbers[0::2] = starts - np.concatenate([[0], ends[:-1]])
    numbers[1::2] = ends - starts
    return " ".join(str(x) for x in numbers) if numbers.size else "-1"


def numpy_decode(text: str, shape=(1024, 1024)) -> np.ndarray:
    """The usual Kaggle decoder: cumulative SIIM starts, slice assignment per run, transpose."""
    h, w = shape
    values = np.asarray(text.split(), dtype=np.int64)
    img = np.zeros(h * w, dtype=np.uint8)
    position = 0
    for gap, length in zip(values[0::2], values[1::2]):
        position += gap
        img[position : position + length] = 1
        position += length
    return img.reshape(w, h).T


def info(benchmark, group: str, impl: str, baseline: bool) -> None:
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, baseline=baseline)


@pytest.mark.parametrize("name", list(MASKS))
def test_encode_pneumoseg(benchmark, name):
    info(benchmark, f"encode {name} 1024x1024", "pneumoseg", False)
    text = benchmark(rle.encode, MASKS[name])
    assert text == numpy_encode(MASKS[name])


@pytest.mark.parametrize("name", list(MASKS))
def test_encode_numpy_idiom(benchmark, name):
    info(benchmark, f"encode {name} 1024x1024", "numpy padded-diff", True)
    benchmark(numpy_encode, MASKS[name])


@pytest.mark.parametrize("name", list(MASKS))
def test_encode_pycocotools(benchmark, name):
    mask_util = pytest.importorskip("pycocotools.mask")
    info(benchmark, f"encode {name} 1024x1024", "pycocotools (counts, Fortran mask)", True)
    fortran = np.asfortranarray(MASKS[name])
    benchmark(mask_util.encode, fortran)


def test_encode_competition_loop(benchmark):
    info(benchmark, "encode blob 1024x1024", "competition mask2rle (pure Python)", True)
    img = MASKS["blob"].T * 255
    benchmark.pedantic(competition_mask2rle, args=(img, 1024, 1024), rounds=2, iterations=1)


@pytest.mark.parametrize("name", list(MASKS))
def test_decode_pneumoseg(benchmark, name):
    info(benchmark, f"decode {name} 1024x1024", "pneumoseg", False)
    text = rle.encode(MASKS[name])
    out = benchmark(rle.decode, text)
    np.testing.assert_array_equal(out, MASKS[name])


@pytest.mark.parametrize("name", list(MASKS))
def test_decode_numpy_idiom(benchmark, name):
    info(benchmark, f"decode {name} 1024x1024", "numpy slices", True)
    text = rle.encode(MASKS[name])
    out = benchmark(numpy_decode, text)
    np.testing.assert_array_equal(out, MASKS[name])


def test_encode_batch_pneumoseg_cpu(benchmark):
    info(benchmark, "encode_batch 16 blobs", "pneumoseg", False)
    masks = np.stack([pneumothorax_blob(1024, seed=s) for s in range(16)])
    benchmark(rle.encode_batch, masks)


def test_encode_batch_numpy_loop(benchmark):
    info(benchmark, "encode_batch 16 blobs", "numpy padded-diff loop", True)
    masks = np.stack([pneumothorax_blob(1024, seed=s) for s in range(16)])
    benchmark(lambda: [numpy_encode(m) for m in masks])


@pytest.mark.cuda
def test_gpu_encode_batch_64_vs_one_copy():
    """masks/s of encode_batch on 64 CUDA masks, against one device-to-host copy of those masks."""
    import torch

    masks = torch.from_numpy(np.stack([pneumothorax_blob(1024, seed=s) for s in range(64)])).cuda()
    host = torch.empty(masks.shape, dtype=masks.dtype, pin_memory=True)

    def timed(fn, reps=20):
        return median_ms(torch, fn, reps, warmup=1) / 1e3

    encode_s = timed(lambda: rle.encode_batch(masks))
    copy_s = timed(lambda: host.copy_(masks, non_blocking=True))
    cpu = masks.cpu().numpy()
    import time

    t0 = time.perf_counter()
    rle.encode_batch(cpu)
    cpu_s = time.perf_counter() - t0
    assert rle.encode_batch(masks) == rle.encode_batch(cpu)
    result = {
        "device": torch.cuda.get_device_name(),
        "batch": 64,
        "shape": [1024, 1024],
        "encode_batch_seconds": encode_s,
        "masks_per_second": 64 / encode_s,
        "d2h_copy_of_masks_seconds": copy_s,
        "encode_over_copy": encode_s / copy_s,
        "cpu_encode_batch_seconds_same_host": cpu_s,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rle_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
