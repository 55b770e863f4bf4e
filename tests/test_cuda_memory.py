"""pneumoseg's own CUDA scratch pools (csrc/common/cuda_memory.*): what they hold is visible
(cuda_memory_reserved), stays cached across calls up to the release threshold, and can be given back
(release_cuda_memory); both are harmless without CUDA and import nothing."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import pneumoseg
from pneumoseg import postprocess as pp


def test_memory_functions_need_no_torch_and_give_nothing_back_without_a_pool():
    code = ("import sys, pneumoseg\n"
            "held = pneumoseg.cuda_memory_reserved()\n"
            "released = pneumoseg.release_cuda_memory()\n"
            "assert isinstance(held, int) and isinstance(released, int), (held, released)\n"
            "assert (held, released) == (0, 0), (held, released)  # no CUDA op ran: no pool exists\n"
            "assert 'torch' not in sys.modules and 'cupy' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_memory_functions_are_public():
    assert pneumoseg.release_cuda_memory is pneumoseg._native.release_cuda_memory
    assert {"release_cuda_memory", "cuda_memory_reserved"} <= set(pneumoseg.__all__)


@pytest.mark.cuda
def test_scratch_stays_cached_across_calls_and_is_given_back():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(rng.random((8, 512, 512)) < 0.5).cuda()
    scratch = 8 * masks.numel()  # parent + area, int32 each
    labels, areas = pp.label_components(masks)  # synchronises: the pool releases above its threshold here
    torch.cuda.synchronize()
    assert pneumoseg.cuda_memory_reserved() >= scratch  # 16 MiB is under every device's threshold
    released = pneumoseg.release_cuda_memory()
    assert released >= scratch
    assert pneumoseg.cuda_memory_reserved() < scratch  # trimming to 0 keeps nothing freed and synchronised
    again, areas_again = pp.label_components(masks)  # the pool simply allocates again
    assert torch.equal(again, labels)
    assert all(torch.equal(a, b) for a, b in zip(areas, areas_again))
    mask_out = pp.postprocess(masks.float(), top=None, bottom=0.5, min_component_area=4)
    assert mask_out.shape == masks.shape
    assert pneumoseg.release_cuda_memory() >= scratch
