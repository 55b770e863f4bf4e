"""The CUDA labelling and post-processing kernels, their very source, run on the CPU.

tests/cuda_emu/cuda_emu.h emulates the CUDA execution model these kernels use (threads of a block as
OS threads, shared memory, __syncthreads, warp ballots and shuffles, atomics) and
tests/cuda_emu/components_emu.cpp runs csrc/postprocess/components_kernels.cuh with label_cuda's and
postprocess_cuda's launch sequences, built with AddressSanitizer and UBSan. Checked here against scipy and
the CPU post-processing: labels, areas, masks and component counts, on tile borders, odd sizes and
noise. The emulator also fails a warp collective that a lane skips or reaches elsewhere, and a
__syncthreads that some thread misses. It runs where no GPU is; the CUDA tests and compute-sanitizer
run the same kernels on one.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

ndi = pytest.importorskip("scipy.ndimage")

from emulation import EMU, EMULATOR_BUILDS, emulation_compiler  # noqa: E402
from pneumoseg import postprocess as pp  # noqa: E402

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    """Built in the background from the start of the session, or now (tests/emulation.py)."""
    cxx = emulation_compiler(tmp_path_factory.mktemp("cuda-emu"), "postprocess/components_kernels.cuh")
    return EMULATOR_BUILDS.get(cxx, ["components_emu"])["components_emu"]


def _run(exe: Path, tmp_path: Path, values: np.ndarray, mode: int, connectivity: int, *, threshold=0.5, top=0.75,
         triplet_min=None, min_area=0, want_components=False, keep=None) -> bytes:
    n, h, w = values.shape
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(src, "wb") as f:
        f.write(struct.pack("10q", mode, n, h, w, connectivity, triplet_min is not None, triplet_min or 0, min_area,
                            want_components, keep is not None))
        f.write(struct.pack("2d", threshold, top))
        f.write((np.ones(n, np.uint8) if keep is None else np.asarray(keep, np.uint8)).tobytes())
        f.write(np.ascontiguousarray(values, np.float32).tobytes())
    done = subprocess.run([str(exe), str(src), str(dst)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stderr[-4000:]}"
    return dst.read_bytes()


def emulated_labels(exe, tmp_path, values, connectivity, threshold=0.5):
    n, h, w = values.shape
    raw = _run(exe, tmp_path, values, 0, connectivity, threshold=threshold)
    labels = np.frombuffer(raw[: 4 * n * h * w], np.int32).reshape(n, h, w)
    counts = np.frombuffer(raw[4 * n * h * w: 4 * n * h * w + 8 * n], np.int64)
    areas = np.frombuffer(raw[4 * n * h * w + 8 * n:], np.int64)
    return labels, counts, np.split(areas, np.cumsum(counts)[:-1]) if n else []


def structure(connectivity):
    return ndi.generate_binary_structure(2, 1 if connectivity == 4 else 2)


def _stairs(h, w):
    yy, xx = np.mgrid[:h, :w]
    return ((xx % 3 == 0) | (yy % 7 == 0)) ^ ((xx + yy) % 5 == 0)


def _points(shape, *points):
    m = np.zeros(shape, bool)
    for y, x in points:
        m[y, x] = True
    return m


K = 32
LABEL_CASES = {
    "noise 50%, 3 images of 70x97": lambda rng: rng.random((3, 70, 97)) < 0.5,
    "noise 30% and 65%, 66x66": lambda rng: np.stack([rng.random((66, 66)) < d for d in (0.3, 0.65)]),
    "blobs across tiles": lambda rng: ndi.binary_dilation(rng.random((1, 100, 130)) < 0.01, iterations=4),
    "stairs and combs": lambda rng: _stairs(96, 97)[None],
    "tile-corner contacts": lambda rng: np.stack([
        _points((2 * K + 3, 2 * K + 3), (K - 1, K - 1), (K, K)), _points((2 * K + 3, 2 * K + 3), (K - 1, K), (K, K - 1)),
        _points((2 * K + 3, 2 * K + 3), (K, K - 1), (K + 1, K)), _points((2 * K + 3, 2 * K + 3), (K, K), (K + 1, K - 1)),
        _points((2 * K + 3, 2 * K + 3), (2 * K + 1, 2 * K + 1), (2 * K + 2, 2 * K + 2))]),
    "full, empty and last pixel": lambda rng: np.stack([np.ones((33, 65), bool), np.zeros((33, 65), bool),
                                                        _points((33, 65), (32, 64))]),
    "one row, one column, one pixel": lambda rng: [np.ones((1, 1, 77), bool), np.ones((1, 45, 1), bool),
                                                   np.ones((1, 1, 1), bool)],
    # label_cuda sizes the areas by the counts it reads back: no components at all (nothing to compact),
    # components only in the last image or only in the first (ranks starting past 0, counts read at an
    # image's last pixel), and a batch of one-pixel images (every image's first pixel is its last).
    "no components in the batch": lambda rng: np.zeros((3, 40, 33), bool),
    "components only in the last image": lambda rng: np.concatenate([np.zeros((2, 37, 70), bool),
                                                                     rng.random((1, 37, 70)) < 0.4]),
    "components only in the first image": lambda rng: np.concatenate([rng.random((1, 37, 70)) < 0.4,
                                                                      np.zeros((2, 37, 70), bool)]),
    "batch of one-pixel images": lambda rng: np.array([0, 1, 1, 0, 1], bool).reshape(5, 1, 1),
}


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("case", sorted(LABEL_CASES))
def test_emulated_labelling_kernels_equal_scipy(emulator, tmp_path, case, connectivity):
    made = LABEL_CASES[case](np.random.default_rng(7))
    for masks in made if isinstance(made, list) else [made]:
        labels, counts, areas = emulated_labels(emulator, tmp_path, masks.astype(np.float32), connectivity)
        for i, m in enumerate(masks):
            ref, k = ndi.label(m, structure(connectivity))
            np.testing.assert_array_equal(labels[i], ref, err_msg=f"{case}, image {i}")
            assert counts[i] == k
            np.testing.assert_array_equal(areas[i], np.bincount(ref.ravel(), minlength=k + 1)[1:])


@pytest.mark.parametrize("connectivity", [4, 8])
def test_emulated_postprocess_kernels_equal_the_cpu_with_component_counts(emulator, tmp_path, connectivity):
    # 2 x 3 tiles of 32 a image, the last row and column of tiles partial: every kind of tile border
    # (67 x 99, 3 x 4 tiles, took twice as long in the emulator for the same borders)
    rng = np.random.default_rng(3)
    probs = (rng.random((6, 45, 70)) ** 2).astype(np.float32)
    probs[1] *= 0.5  # nothing above top: the triplet rule empties it
    probs[2, 10:40, 5:66] = 0.95  # across the row border at 32 and the column borders at 32 and 64
    probs[3] = 0.9  # one component
    keep = np.array([1, 1, 1, 1, 0, 1], np.uint8)  # image 4 gated out
    for triplet_min, min_area in ((None, 0), (None, 12), (40, 1)):
        kw = dict(top=0.75 if triplet_min is not None else None, bottom=0.4, min_component_area=min_area,
                  connectivity=connectivity)
        if triplet_min is not None:
            kw["min_area"] = triplet_min
        want, want_counts = pp.postprocess(probs, keep.astype(np.float64), gate_threshold=0.5,
                                           return_components=True, **kw)
        raw = _run(emulator, tmp_path, probs, 1, connectivity, threshold=0.4, top=0.75, triplet_min=triplet_min,
                   min_area=min_area, want_components=True, keep=keep)
        masks = np.frombuffer(raw[: probs.size], np.uint8).reshape(probs.shape)
        counts = np.frombuffer(raw[probs.size:], np.int32)
        np.testing.assert_array_equal(masks, want, err_msg=f"triplet {triplet_min}, min area {min_area}")
        assert counts.tolist() == want_counts.tolist()
        assert counts.tolist() == [ndi.label(m, structure(connectivity))[1] for m in masks]


def test_the_emulator_catches_a_lane_that_skips_a_ballot(tmp_path):
    """The emulation's own check, on a made-up kernel: a ballot that one lane never reaches fails
    (on a GPU it is undefined behaviour that often goes unnoticed)."""
    cxx = emulation_compiler(tmp_path, "postprocess/components_kernels.cuh")
    src = tmp_path / "bad.cpp"
    src.write_text('#include "cuda_emu.h"\n'
                   "int main() {\n"
                   "  emu::launch(dim3(1), dim3(32), [] {\n"
                   "    if (threadIdx.x == 5) return;\n"
                   "    (void)__ballot_sync(0xffffffffu, true);\n"
                   "  });\n"
                   "}\n")
    built = subprocess.run([cxx, "-std=c++20", "-pthread", f"-I{EMU}", str(src), "-o", str(tmp_path / "bad")],
                           capture_output=True, text=True)
    if built.returncode:
        pytest.skip(f"cannot build the emulator here: {built.stderr[-300:]}")
    ran = subprocess.run([str(tmp_path / "bad")], capture_output=True, text=True, timeout=60)
    assert ran.returncode != 0 and "lane that has exited" in ran.stderr
