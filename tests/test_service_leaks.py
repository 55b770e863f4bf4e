"""A Predictor beside a PACS predicts for days: what a request leaves behind must be freed when the
request ends, by reference counting, not by a later full collection of the cycle collector. A cycle
that holds a damaged file's bytes lives until a generation-2 collection, which a process with many
long-lived objects (a loaded model, pydicom's dictionaries) runs rarely: RSS climbed by ~5 MiB per
request with a truncated 2048^2 DICOM before the fix."""

from __future__ import annotations

import gc
import weakref

import pytest

pytest.importorskip("torch")

from pneumoseg import PneumosegError  # noqa: E402
from pneumoseg.data import make_synthetic_siim  # noqa: E402
from pneumoseg.data.siim import find_dicoms  # noqa: E402
from pneumoseg.infer import Predictor  # noqa: E402

from infer_helpers import exported_model_dir, model_dir  # noqa: E402


@pytest.fixture(scope="module")
def predictor():
    return Predictor.from_dir(model_dir("classifier"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("siim")
    make_synthetic_siim(root, n_images=3, size=72, positive_fraction=0.5, seed=5)
    good = [str(p) for p in find_dicoms(root).values()]
    broken = root / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 300)
    return good, str(broken)


def exceptions_left_in_cycles(call) -> list[str]:
    """The exceptions that ``call()`` leaves for the cycle collector (with it off during the call)."""
    call()  # first-call caches are not the request's garbage
    gc.collect()
    gc.disable()
    try:
        call()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        return [type(o).__name__ for o in gc.garbage if isinstance(o, BaseException)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_a_skipped_file_read_on_a_reader_thread_leaves_no_cycle(predictor, files):
    good, broken = files

    def call():  # the damaged file last: the request's final read is its failure
        out = predictor.predict([good[0], good[1], broken], batch_size=2, on_error="skip")
        assert len(out) == 2 and [p for p, _ in out.skipped] == [broken]

    assert exceptions_left_in_cycles(call) == []


def test_a_failed_request_leaves_no_cycle(predictor, files):
    good, broken = files

    def call():
        with pytest.raises(PneumosegError, match="broken.dcm"):
            predictor.predict([good[0], broken], batch_size=2)

    assert exceptions_left_in_cycles(call) == []


@pytest.mark.parametrize("kind", ["classifier", "aux"])
def test_a_dropped_torch_predictor_frees_its_networks_at_once(kind):
    """A service that reloads its model (or makes a Predictor per request) must get the old weights
    back when it drops the Predictor: the per-call part classes closed over the network, so each
    Predictor's networks waited for a full collection (3 MB per tiny model here, ~100 MB for U-Net
    ResNet34)."""
    Predictor.from_dir(model_dir(kind))  # first-call imports keep frames of their own
    gc.collect()
    gc.disable()
    try:
        predictor = Predictor.from_dir(model_dir(kind))
        networks = [weakref.ref(part.network) for part in predictor.backend._modules.values()]
        assert networks
        del predictor
        assert [ref() for ref in networks] == [None] * len(networks)
    finally:
        gc.enable()


def test_a_dropped_onnxruntime_predictor_frees_its_sessions_at_once():
    pytest.importorskip("onnxruntime")
    Predictor.from_dir(exported_model_dir("aux"), backend="onnxruntime")
    gc.collect()
    gc.disable()
    try:
        predictor = Predictor.from_dir(exported_model_dir("aux"), backend="onnxruntime", threads=1)
        sessions = [weakref.ref(s) for s in predictor.backend._sessions.values()]
        assert sessions
        del predictor
        assert [ref() for ref in sessions] == [None] * len(sessions)
    finally:
        gc.enable()


def test_every_memo_cache_in_pneumoseg_is_bounded():
    """A cache keyed by call arguments grows with every new argument a long-running process passes
    (per-request thresholds, loss weights): each one in pneumoseg has a maxsize. A module-level
    ``functools.cache`` / ``lru_cache(maxsize=None)`` added later fails here."""
    import functools
    import importlib
    import pkgutil

    import pneumoseg

    caches = {}
    for info in pkgutil.walk_packages(pneumoseg.__path__, "pneumoseg."):
        if info.name.endswith("__main__"):  # running it is the command line
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional dependency (tensorrt, cupy, matplotlib) missing here
            continue
        for name, value in vars(module).items():
            if isinstance(value, functools._lru_cache_wrapper) and getattr(value, "__module__", None) == info.name:
                caches[f"{info.name}.{name}"] = value.cache_info().maxsize
    assert len(caches) >= 4, caches  # postprocess's three and the loss's parameters, at least
    assert [name for name, size in caches.items() if size is None] == []
