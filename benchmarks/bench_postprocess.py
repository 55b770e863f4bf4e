"""Threshold + connected components + area filter on 1024x1024 probability maps, against OpenCV
(connectedComponentsWithStats + NumPy area filter) and scipy (ndimage.label + bincount), in one session.

    pytest benchmarks/bench_postprocess.py --benchmark-json=pp.json && python benchmarks/report.py pp.json
"""

from __future__ import annotations

import numpy as np
import pytest

from factories import pneumothorax_blob
from pneumoseg import postprocess as pp

THRESHOLD, MIN_AREA = 0.5, 64


def probability_maps():
    rng = np.random.default_rng(0)
    blob = pneumothorax_blob(1024).astype(np.float32)
    # A network-like map: the crescent at high probability, soft edges, scattered false positives.
    soft = 0.85 * blob + 0.1 * rng.random((1024, 1024), dtype=np.float32)
    speckle = rng.random((1024, 1024), dtype=np.float32) < 0.002
    soft[speckle] = 0.9
    noise = rng.random((1024, 1024), dtype=np.float32)
    return {"blob": soft, "noise": noise}


MAPS = probability_maps()


def opencv_pipeline(probs):
    import cv2

    mask = (probs > THRESHOLD).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= MIN_AREA
    keep[0] = False
    return keep[labels].astype(np.uint8)


def scipy_pipeline(probs):
    from scipy import ndimage

    labels, k = ndimage.label(probs > THRESHOLD, structure=np.ones((3, 3)))
    keep = np.bincount(labels.ravel(), minlength=k + 1) >= MIN_AREA
    keep[0] = False
    return keep[labels].astype(np.uint8)


def ours(probs):
    return pp.postprocess(probs, top=None, bottom=THRESHOLD, min_component_area=MIN_AREA)


IMPLS = {"pneumoseg": (ours, False), "opencv + numpy filter": (opencv_pipeline, True), "scipy label + bincount": (scipy_pipeline, True)}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", list(MAPS))
def test_threshold_label_filter(benchmark, name, impl):
    fn, is_baseline = IMPLS[impl]
    if impl.startswith("opencv"):
        pytest.importorskip("cv2")
    if impl.startswith("scipy"):
        pytest.importorskip("scipy")
    benchmark.group = f"threshold+label+filter {name} 1024x1024"
    benchmark.extra_info.update(impl=impl, baseline=is_baseline)
    out = benchmark(fn, MAPS[name])
    np.testing.assert_array_equal(out, ours(MAPS[name]))


@pytest.mark.cuda
def test_gpu_batch_64_against_cupyx_label():
    """Images/s for threshold + label + area filter on a batch of 64 1024x1024 maps, against
    cupyx.scipy.ndimage.label image by image (+ bincount filter); figures to benchmarks/results/."""
    import json
    from pathlib import Path

    torch = pytest.importorskip("torch")
    cupy = pytest.importorskip("cupy")
    from cupyx.scipy import ndimage as cundimage

    rng = np.random.default_rng(1)
    maps = np.stack([MAPS["blob"] if i % 2 == 0 else rng.random((1024, 1024), dtype=np.float32) for i in range(64)])
    probs = torch.from_numpy(maps).cuda()
    probs_cupy = cupy.asarray(maps)

    def ours_gpu():
        return pp.postprocess(probs, top=None, bottom=THRESHOLD, min_component_area=MIN_AREA)

    structure = cupy.ones((3, 3), dtype=bool)

    def cupyx_loop():
        outs = []
        for i in range(probs_cupy.shape[0]):
            labels, k = cundimage.label(probs_cupy[i] > THRESHOLD, structure=structure)
            keep = cupy.bincount(labels.ravel(), minlength=k + 1) >= MIN_AREA
            keep[0] = False
            outs.append(keep[labels].astype(cupy.uint8))
        return outs

    def timed(fn, reps=5):
        fn()
        torch.cuda.synchronize()
        cupy.cuda.Device().synchronize()
        import time

        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        cupy.cuda.Device().synchronize()
        return (time.perf_counter() - t0) / reps

    ours_s, cupyx_s = timed(ours_gpu), timed(cupyx_loop)
    np.testing.assert_array_equal(ours_gpu()[1].cpu().numpy(), cupy.asnumpy(cupyx_loop()[1]))
    result = {
        "device": torch.cuda.get_device_name(), "batch": 64, "shape": [1024, 1024],
        "pneumoseg_seconds": ours_s, "pneumoseg_images_per_second": 64 / ours_s,
        "cupyx_loop_seconds": cupyx_s, "cupyx_images_per_second": 64 / cupyx_s, "speedup": cupyx_s / ours_s,
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "postprocess_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
