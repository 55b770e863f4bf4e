"""The Predictor as a long-running triage service uses it: after a failed or interrupted call it gives
the answers a fresh Predictor gives, and abandoned streams, failed calls and dropped Predictors leave
no reader threads, open files or backends behind. Counts are compared, never timings."""

from __future__ import annotations

import gc
import os
import threading
import weakref

import numpy as np
import pytest

pytest.importorskip("torch")

from pneumoseg import PneumosegError  # noqa: E402
from pneumoseg.data import make_synthetic_siim  # noqa: E402
from pneumoseg.data.siim import find_dicoms  # noqa: E402
from pneumoseg.infer import Predictor  # noqa: E402

from infer_helpers import model_dir, phantom_images  # noqa: E402


@pytest.fixture(scope="module")
def dicoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("siim")
    make_synthetic_siim(root, n_images=7, size=72, positive_fraction=0.5, seed=5)
    return [str(p) for p in find_dicoms(root).values()]


@pytest.fixture(scope="module")
def predictor():
    return Predictor.from_dir(model_dir("classifier"))


@pytest.fixture(scope="module")
def answers(dicoms):
    """What a fresh Predictor says for the arrays and for the files."""
    fresh = Predictor.from_dir(model_dir("classifier"))
    return answer(fresh, phantom_images(5), dicoms)


def answer(predictor, images, files):
    def key(preds):
        return [(p.image_id, p.score, p.rle, p.n_components) for p in preds]

    return key(predictor.predict(images, batch_size=3)), key(predictor.predict(files, batch_size=2))


def reader_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("pneumoseg-read")]


def open_files() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


@pytest.mark.parametrize("how", ["break", "close", "drop"])
def test_an_abandoned_stream_stops_its_reader_threads(predictor, dicoms, how):
    before = open_files()
    stream = predictor.predict_iter(dicoms, batch_size=2)
    next(stream)
    assert reader_threads()  # the next batch is being read
    if how == "break":
        for _ in stream:
            break
        stream.close()
    elif how == "close":
        stream.close()
    del stream
    gc.collect()
    assert reader_threads() == []
    assert open_files() <= before


def test_many_abandoned_streams_leave_nothing_behind(predictor, dicoms):
    def abandon(i):
        for k, _ in enumerate(predictor.predict_iter(dicoms, batch_size=2)):
            if k == i % 4:
                break

    abandon(0)
    gc.collect()
    threads, files = threading.active_count(), open_files()
    for i in range(30):
        abandon(i)
    gc.collect()
    assert threading.active_count() == threads and reader_threads() == []
    assert open_files() <= files


def test_failed_calls_leave_the_predictor_as_a_fresh_one(predictor, dicoms, answers, tmp_path):
    images = phantom_images(5)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"DICM" * 16)
    with pytest.raises(PneumosegError, match="broken.dcm"):
        predictor.predict(dicoms[:3] + [str(broken)] + dicoms[3:], batch_size=2)
    nan = images[1].astype(np.float32)
    nan[4, 4] = np.nan
    with pytest.raises(PneumosegError, match="NaN"):
        predictor.predict([images[0], nan], batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        predictor.predict(dicoms, batch_size=0)
    assert reader_threads() == []
    assert answer(predictor, images, dicoms) == answers


def test_an_interrupt_from_the_progress_bar_leaves_the_predictor_usable(predictor, dicoms, answers, monkeypatch):
    import tqdm

    update = tqdm.tqdm.update
    calls = []

    def interrupted(self, n=1):
        calls.append(n)
        if len(calls) == 2:  # mid-way: one batch done, the next one being read
            raise KeyboardInterrupt
        return update(self, n)

    monkeypatch.setattr(tqdm.tqdm, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predictor.predict(dicoms, batch_size=2, progress=True)
    monkeypatch.setattr(tqdm.tqdm, "update", update)
    assert reader_threads() == []
    assert answer(predictor, phantom_images(5), dicoms) == answers


def test_dropped_predictors_free_their_backends(dicoms):
    image = phantom_images(1)[0]
    refs = []
    for i in range(5):
        p = Predictor.from_dir(model_dir("classifier"), thresholds={"gate": 0.3 + 0.1 * i})
        p.predict(image)
        p.predict(dicoms[:3], batch_size=2)
        refs.append(weakref.ref(p.backend))
        del p
    gc.collect()
    assert [r() for r in refs] == [None] * 5
    assert reader_threads() == []


def test_dropped_onnxruntime_predictors_free_their_sessions(tmp_path):
    pytest.importorskip("onnxruntime")
    from infer_helpers import exported_model_dir

    image = phantom_images(1)[0]
    Predictor.from_dir(exported_model_dir("aux"), backend="onnxruntime").predict(image)
    gc.collect()
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 0
    refs = []
    for _ in range(5):
        p = Predictor.from_dir(exported_model_dir("aux"), backend="onnxruntime", threads=2)
        p.predict(image)
        refs.append(weakref.ref(p.backend))
        del p
    gc.collect()
    assert [r() for r in refs] == [None] * 5
    if threads:  # each session's intra-op pool is joined with it
        assert len(os.listdir("/proc/self/task")) <= threads


def test_a_one_file_request_is_read_on_the_calling_thread(predictor, dicoms, monkeypatch):
    """Batch-1 triage: one DICOM per request has nothing to overlap its read with, so no reader pool
    is started for it (its start and hand-off cost about 0.8 ms against 2 ms for the read itself);
    two files still get one."""
    from pneumoseg.infer import predictor as predictor_module

    pools = []
    real = predictor_module.ThreadPoolExecutor

    def counting(*args, **kwargs):
        pools.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(predictor_module, "ThreadPoolExecutor", counting)
    one = predictor.predict(dicoms[0])
    assert pools == [] and len(one) == 1
    two = predictor.predict(dicoms[:2], batch_size=1)
    assert pools == [1] and [p.rle for p in two][:1] == [one[0].rle] and two[0].score == one[0].score


def test_a_stream_is_a_context_manager(predictor, dicoms):
    """`with predictor.predict_iter(...) as stream:` stops the reader threads when the block ends,
    even after leaving the loop early with the stream still referenced."""
    with predictor.predict_iter(dicoms, batch_size=1) as stream:
        first = next(stream)
        assert reader_threads()
    assert first.image_id and stream.total == len(dicoms)
    assert reader_threads() == []
