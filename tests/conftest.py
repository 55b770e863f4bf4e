from __future__ import annotations

import os
import shutil
from pathlib import Path

import tempfile

import pytest

import pneumoseg

# torch.compile caches compiled graphs across processes (in /tmp by default); a cache written by an
# older build of our ops would be reused silently. Each test session compiles into its own folder,
# removed at its end (pytest_sessionfinish: never removed, one per pytest run piled up in /tmp). A
# folder the caller set (a developer's, a parent process's) is used as it is and left alone.
_OWN_INDUCTOR_CACHE: str | None = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _OWN_INDUCTOR_CACHE = tempfile.mkdtemp(prefix="pneumoseg-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _OWN_INDUCTOR_CACHE
# Test files import onnxruntime at collection, before pneumoseg's own import helper could switch its
# telemetry off (pneumoseg/_onnxruntime.py); a developer's pytest run should send nothing either.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def pytest_collection_modifyitems(config, items):
    # CUDA tests need a CUDA build and a device; without them they are skipped, never failed.
    if pneumoseg.cuda_available():
        return
    reason = "needs a CUDA device and a CUDA build of pneumoseg"
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_collection_finish(session):
    # the CUDA-emulation executables build on the core the tests leave idle (tests/emulation.py)
    if session.config.option.collectonly:
        return
    from emulation import EMULATOR_BUILDS

    EMULATOR_BUILDS.start(session.items)


def pytest_sessionfinish(session):
    from emulation import EMULATOR_BUILDS

    EMULATOR_BUILDS.stop()
    if _OWN_INDUCTOR_CACHE is not None:
        shutil.rmtree(_OWN_INDUCTOR_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def sync_debug_mode_restored(request):
    """A CUDA test that left torch's sync debug mode on would fail every CUDA test after it."""
    yield
    if "cuda" in request.keywords:
        from cuda_sync import reset_sync_debug_mode

        reset_sync_debug_mode()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """torch on one intra-op thread for the whole run: the tests' forwards are small (64-200 px, tiny
    networks), splitting them across OpenMP threads saves little, and on two cores shared with other
    processes the threads' barriers wait for each other (a float64 EfficientNet-B4 forward took 0.9 s
    on one thread and 14-69 s on two on a busy machine; test_encoders_timm 91 -> 48 s, test_export,
    test_infer, test_infer_backends and test_pretrained 115 -> 62 s). pneumoseg's native ops run on
    their own std::thread pool and are not affected; child processes start with torch's default."""
    try:
        import torch
    except ImportError:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_sample_dir() -> Path | None:
    """The four real SIIM-ACR files, where the checkout has ../shared beside it (never required)."""
    env = os.environ.get("PNEUMOSEG_SIIM_SAMPLE")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "siim-sample")
    for c in candidates:
        if (c / "train-rle.csv").is_file():
            return c
    return None


@pytest.fixture
def siim_sample_dir() -> Path:
    d = shared_sample_dir()
    if d is None:
        pytest.skip("the real SIIM sample folder (../shared/data/siim-sample) is not present")
    return d
