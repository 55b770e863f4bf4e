"""Backend machinery: batch buckets (what CUDA graphs and compiled code run through), the TensorRT
engine cache, key and profile logic (without TensorRT), and the GPU paths where a GPU and TensorRT are
present (marked, skipped elsewhere)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pneumoseg.errors import InvalidInputError, NativeError  # noqa: E402
from pneumoseg.export.tensorrt import (  # noqa: E402
    DEFAULT_PROFILE, BatchProfile, EngineCache, ProfileRunner, engine_key, engine_key_fields, parse_batch_profile,
    timing_cache_path,
)
from pneumoseg.infer import Predictor  # noqa: E402
from pneumoseg.infer.buckets import BucketedRunner, CudaGraphRunner, bucket_for, chunk_bounds, make_buckets  # noqa: E402

from infer_helpers import exported_model_dir, model_dir, phantom_images  # noqa: E402


def tensorrt_missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


# --------------------------------------------------------------------------------------------------
# buckets


def test_bucket_sizes_and_choice():
    assert make_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert make_buckets(12) == (1, 2, 4, 8, 12)
    assert make_buckets(1) == (1,)
    assert make_buckets(sizes=[8, 3, 8]) == (3, 8)
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(InvalidInputError, match="larger than the largest"):
        bucket_for(9, (1, 2, 4, 8))
    assert chunk_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    for bad in (0, True, 2.0):
        with pytest.raises(InvalidInputError):
            make_buckets(bad)
    with pytest.raises(InvalidInputError):
        make_buckets(sizes=[])


@pytest.mark.parametrize("pad", [True, False])
def test_bucketed_runner_equals_one_eager_call(pad):
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    seen = []

    def run(x):
        seen.append(x.shape[0])
        with torch.no_grad():
            y = net(x)
        return y, y.mean((1, 2, 3))

    runner = BucketedRunner(run, make_buckets(8), pad=pad)
    for n in (1, 3, 8, 13, 21):
        seen.clear()
        x = torch.randn(n, 1, 9, 7)
        got = runner(x)
        want = run(x)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
        chunks = seen[:-1]
        assert sum(min(c, n - 8 * i) for i, c in enumerate(chunks)) == n and max(chunks) <= 8
        if pad:
            assert all(c in make_buckets(8) for c in chunks)
    with pytest.raises(InvalidInputError, match="empty batch"):
        runner(torch.zeros(0, 1, 9, 7))


def test_cuda_graph_runner_is_only_built_for_cuda():
    with pytest.raises(InvalidInputError, match="CUDA graphs need a CUDA device"):
        CudaGraphRunner(lambda x: (x,), lambda b: [torch.zeros(b, 1)], (1, 2), "cpu")


# --------------------------------------------------------------------------------------------------
# TensorRT logic that needs no TensorRT

ENV = {"tensorrt": "10.9.0", "cuda": "12.8", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]}
SHAPES = {"image": [1, 512, 512]}


def test_batch_profiles():
    assert parse_batch_profile(None) == DEFAULT_PROFILE == BatchProfile(1, 8, 32)
    assert parse_batch_profile("1,8,32") == parse_batch_profile([1, 8, 32]) == BatchProfile(1, 8, 32)
    assert parse_batch_profile("16") == BatchProfile(1, 16, 16)
    for bad in ("1,8", "a,b,c", "8,4,32", "0,1,2", [1, 2, 3, 4]):
        with pytest.raises(InvalidInputError):
            parse_batch_profile(bad)
    profile = BatchProfile(2, 4, 8)
    profile.check(2, "e")
    profile.check(8, "e")
    with pytest.raises(InvalidInputError, match="a batch of 9 is outside the engine's profile .*--batch 2,4,9"):
        profile.check(9, "the segmenter engine")
    with pytest.raises(InvalidInputError, match="a batch of 1 is outside"):
        profile.check(1, "e")


def test_batch_profiles_take_plain_decimal_numbers_only():
    # int() read '1_0' as 10 and Arabic-Indic digits as numbers; bytes were read as their character
    # codes (b"8" made the profile 1,56,56) and a bare int raised TypeError.
    for bad in ("1_0", "\u0663", "1,,2", " ", b"8", b"1,8,32", 8.0, True, {1, 8, 32}):
        with pytest.raises(InvalidInputError, match="batch profile"):
            parse_batch_profile(bad)
    assert parse_batch_profile(16) == parse_batch_profile(" 16 ") == BatchProfile(1, 16, 16)
    assert parse_batch_profile((1, 8, 32)) == parse_batch_profile(" 1, 8 ,32") == BatchProfile(1, 8, 32)


def test_engine_key_covers_everything_an_engine_depends_on():
    base = engine_key_fields("ab" * 32, "fp16", BatchProfile(1, 8, 32), SHAPES, ENV)
    assert engine_key(base) == engine_key(json.loads(json.dumps(base)))  # stable, JSON round trip
    variants = [
        engine_key_fields("cd" * 32, "fp16", BatchProfile(1, 8, 32), SHAPES, ENV),
        engine_key_fields("ab" * 32, "fp32", BatchProfile(1, 8, 32), SHAPES, ENV),
        engine_key_fields("ab" * 32, "fp16", BatchProfile(1, 8, 16), SHAPES, ENV),
        engine_key_fields("ab" * 32, "fp16", BatchProfile(1, 8, 32), {"image": [1, 1024, 1024]}, ENV),
        engine_key_fields("ab" * 32, "fp16", BatchProfile(1, 8, 32), SHAPES, {**ENV, "tensorrt": "11.0.0"}),
        engine_key_fields("ab" * 32, "fp16", BatchProfile(1, 8, 32), SHAPES, {**ENV, "cuda": "13.0"}),
        engine_key_fields("ab" * 32, "fp16", BatchProfile(1, 8, 32), SHAPES, {**ENV, "gpu": "NVIDIA L4"}),
        engine_key_fields("ab" * 32, "fp16", BatchProfile(1, 8, 32), SHAPES, {**ENV, "compute_capability": [8, 9]}),
    ]
    keys = {engine_key(v) for v in variants}
    assert len(keys) == len(variants) and engine_key(base) not in keys
    with pytest.raises(InvalidInputError, match="lacks gpu"):
        engine_key_fields("ab", "fp16", DEFAULT_PROFILE, SHAPES, {k: v for k, v in ENV.items() if k != "gpu"})
    assert timing_cache_path(tmp := __import__("pathlib").Path("/x"), ENV) != timing_cache_path(tmp, {**ENV, "gpu": "L4"})


class FakeTensorRT:
    """build() makes 'engine' bytes; deserialize() accepts only bytes it built (a foreign or damaged
    engine is refused, as TensorRT refuses one)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.builds = 0
        self.delay = delay
        self.made: set[bytes] = set()
        self.lock = threading.Lock()

    def build(self) -> bytes:
        time.sleep(self.delay)
        with self.lock:
            self.builds += 1
            data = f"engine #{self.builds}".encode()
            self.made.add(data)
        return data

    def deserialize(self, data: bytes):
        return ("engine", data) if data in self.made else None


def test_engine_cache_builds_once_then_reuses(tmp_path):
    trt = FakeTensorRT()
    cache = EngineCache(tmp_path / "engines")
    fields = engine_key_fields("ab" * 32, "fp16", DEFAULT_PROFILE, SHAPES, ENV)
    first = cache.get(fields, trt.build, trt.deserialize)
    assert first.status == "built" and first.reason == "not cached" and trt.builds == 1
    engine_path, sidecar_path, _ = cache.paths(engine_key(fields))
    assert first.path == engine_path and engine_path.read_bytes() == b"engine #1"
    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar["fields"] == fields and sidecar["bytes"] == len(b"engine #1")
    again = cache.get(fields, trt.build, trt.deserialize)
    assert again.status == "cached" and again.engine == ("engine", b"engine #1") and trt.builds == 1
    other = cache.get({**fields, "precision": "fp32"}, trt.build, trt.deserialize)
    assert other.status == "built" and other.path != engine_path and trt.builds == 2


@pytest.mark.parametrize("damage, reason", [
    ("bytes", "damaged"),
    ("sidecar-fields", "stale"),
    ("sidecar-json", "unreadable sidecar"),
    ("foreign", "could not deserialise"),
    ("no-sidecar", "not cached"),
])
def test_a_stale_or_damaged_engine_is_rebuilt_never_run(tmp_path, damage, reason):
    trt = FakeTensorRT()
    cache = EngineCache(tmp_path)
    fields = engine_key_fields("ab" * 32, "int8", DEFAULT_PROFILE, SHAPES, ENV)
    cache.get(fields, trt.build, trt.deserialize)
    engine_path, sidecar_path, _ = cache.paths(engine_key(fields))
    if damage == "bytes":
        engine_path.write_bytes(b"engine #9")
    elif damage == "sidecar-fields":
        sidecar = json.loads(sidecar_path.read_text())
        sidecar["fields"]["tensorrt"] = "10.0.0"  # e.g. an engine left by an older TensorRT
        sidecar_path.write_text(json.dumps(sidecar))
    elif damage == "sidecar-json":
        sidecar_path.write_text("{not json")
    elif damage == "foreign":  # the sidecar vouches for bytes TensorRT refuses (another TensorRT build)
        trt.made.clear()
    else:
        sidecar_path.unlink()
    result = cache.get(fields, trt.build, trt.deserialize)
    assert result.status == "built" and reason in result.reason and trt.builds == 2
    assert result.engine == ("engine", b"engine #2") and engine_path.read_bytes() == b"engine #2"
    assert json.loads(sidecar_path.read_text())["sha256"] == __import__("hashlib").sha256(b"engine #2").hexdigest()


def test_engine_cache_failures_are_clear(tmp_path):
    trt = FakeTensorRT()
    cache = EngineCache(tmp_path)
    fields = engine_key_fields("ab" * 32, "fp16", DEFAULT_PROFILE, SHAPES, ENV)
    with pytest.raises(NativeError, match="returned no data"):
        cache.get(fields, lambda: b"", trt.deserialize)
    with pytest.raises(NativeError, match="cannot deserialise the engine it has just built"):
        cache.get(fields, lambda: b"garbage", trt.deserialize)
    with pytest.raises(InvalidInputError, match="alphanumeric"):
        cache.paths("../x")


def test_concurrent_requests_build_one_engine(tmp_path):
    trt = FakeTensorRT(delay=0.3)
    fields = engine_key_fields("ab" * 32, "fp16", DEFAULT_PROFILE, SHAPES, ENV)
    results = []

    def get():
        results.append(EngineCache(tmp_path).get(fields, trt.build, trt.deserialize))

    threads = [threading.Thread(target=get) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert trt.builds == 1
    assert sorted(r.status for r in results) == ["built", "cached", "cached"]


def test_profile_runner_keeps_every_call_inside_the_profile():
    profile = BatchProfile(2, 4, 5)
    calls = []

    def engine(x):
        profile.check(x.shape[0], "fake engine")  # what the real runner checks before TensorRT sees it
        calls.append(x.shape[0])
        return (x * 2, x.sum((1, 2, 3)))

    runner = ProfileRunner(engine, profile)
    for n in range(1, 13):
        calls.clear()
        x = torch.randn(n, 1, 3, 3)
        y, s = runner(x)
        torch.testing.assert_close(y, x * 2)
        torch.testing.assert_close(s, x.sum((1, 2, 3)))
        assert all(2 <= c <= 5 for c in calls)
    with pytest.raises(InvalidInputError, match="empty batch"):
        runner(torch.zeros(0, 1, 3, 3))


def test_default_engine_cache_falls_back_to_a_user_folder(tmp_path, monkeypatch):
    from pneumoseg.infer import tensorrt as trt_backend
    from pneumoseg.models.model_dir import load_model_dir

    md = load_model_dir(model_dir("aux"))
    assert trt_backend.default_engine_cache(md) == md.path / "tensorrt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(trt_backend.os, "access", lambda p, mode: False)  # a read-only model directory
    fallback = trt_backend.default_engine_cache(md)
    assert fallback.parent == tmp_path / "pneumoseg" / "tensorrt"


@pytest.mark.skipif(tensorrt_missing() != "TensorRT is not installed", reason="TensorRT is installed")
def test_tensorrt_backend_without_tensorrt_is_a_clear_error():
    with pytest.raises(InvalidInputError, match=r"pip install 'pneumoseg\[tensorrt\]'"):
        Predictor.from_dir(model_dir("aux"), backend="tensorrt", device="cpu")


# --------------------------------------------------------------------------------------------------
# GPU paths (skipped here; run where a session has a GPU)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["classifier", "aux"])
def test_torch_cuda_fp16_graphs_agree_with_cpu_fp32(kind):
    images = phantom_images(7, seed=3)
    cpu = Predictor.from_dir(model_dir(kind)).predict(images, return_masks=True)
    for options in ({}, {"cuda_graphs": False}, {"segment": "all"}):
        gpu = Predictor.from_dir(model_dir(kind), device="cuda", max_batch=4, **options).predict(
            images, batch_size=3, return_masks=True)
        assert [p.score for p in gpu] == pytest.approx([p.score for p in cpu], abs=2e-2)
        overlap = sum(int((a.mask & b.mask).sum()) for a, b in zip(cpu, gpu))
        total = sum(int(a.mask.sum() + b.mask.sum()) for a, b in zip(cpu, gpu))
        assert 2 * overlap / max(total, 1) > 0.95


@pytest.mark.cuda
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_torch_cuda_side_by_side_networks_equal_one_after_the_other(cuda_graphs):
    # segment="all" with a classifier: the two networks run on two streams; the answers must be those
    # of running them one after the other, and the stage times say where the networks went.
    images = phantom_images(7, seed=4)
    predictor = Predictor.from_dir(model_dir("classifier"), device="cuda", max_batch=4, segment="all",
                                   cuda_graphs=cuda_graphs)
    side = predictor.predict(images, batch_size=3, return_masks=True)
    predictor.overlap_networks = False
    serial = predictor.predict(images, batch_size=3, return_masks=True)
    assert [p.rle for p in side] == [p.rle for p in serial]
    assert [p.score for p in side] == [p.score for p in serial]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(side, serial))
    assert all(p.timings["segment"] < 0.5 * p.timings["classify"] for p in side)
    assert all(p.timings["segment"] > 0 for p in serial)


@pytest.mark.cuda
def test_torch_cuda_threads_equal_serial():
    predictor = Predictor.from_dir(model_dir("aux"), device="cuda", max_batch=4)
    sets = [phantom_images(5, seed=s) for s in range(3)]
    serial = [[p.rle for p in predictor.predict(s)] for s in sets]
    out: dict[int, list] = {}
    threads = [threading.Thread(target=lambda k=k: out.__setitem__(k, [p.rle for p in predictor.predict(sets[k])]))
               for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [out[k] for k in range(3)] == serial


@pytest.mark.cuda
@pytest.mark.tensorrt
@pytest.mark.skipif(tensorrt_missing() is not None, reason=str(tensorrt_missing()))
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engines_agree_with_torch_and_are_cached(tmp_path, precision):
    import shutil

    from pneumoseg.export.tensorrt import export_tensorrt

    path = tmp_path / "m"
    shutil.copytree(exported_model_dir("aux"), path)
    export_tensorrt(path, precision, batch="1,2,4")
    images = phantom_images(9, seed=2)
    want = Predictor.from_dir(path).predict(images, return_masks=True)
    predictor = Predictor.from_dir(path, backend="tensorrt", device="cuda", precision=precision)
    assert {e["status"] for e in predictor.backend.engines.values()} == {"cached"}
    got = predictor.predict(images, batch_size=7, return_masks=True)  # 7 > the profile's 4: split
    overlap = sum(int((a.mask & b.mask).sum()) for a, b in zip(want, got))
    total = sum(int(a.mask.sum() + b.mask.sum()) for a, b in zip(want, got))
    assert 2 * overlap / max(total, 1) > 0.97
    engine = next(iter(predictor.backend.engines.values()))["path"]
    with open(engine, "r+b") as f:  # damage one engine: it is rebuilt, not run
        f.seek(100)
        f.write(b"\0" * 16)
    rebuilt = Predictor.from_dir(path, backend="tensorrt", device="cuda", precision=precision)
    assert "built" in {e["status"] for e in rebuilt.backend.engines.values()}
    assert [p.rle for p in rebuilt.predict(images)] == [p.rle for p in predictor.predict(images)]
    assert np.isfinite([p.score for p in got]).all()


@pytest.mark.parametrize("kind", ["segmenter", "classifier"])
def test_torch_backend_freezes_the_subpixel_weights_and_masks_are_identical(kind):
    """The backend's own copy of the decoder computes its sub-pixel phase weights once; masks and
    scores are the same, bit for bit, as with them computed on every forward."""
    from pneumoseg.infer.backends import TorchBackend
    from pneumoseg.models.decoders import DecoderBlock
    from pneumoseg.models.decoders.blocks import unfreeze_subpixel_weights

    images = phantom_images(4, seed=5)
    frozen = Predictor.from_dir(model_dir(kind))
    plain = Predictor.from_dir(model_dir(kind))
    segment = plain.parts["segment"]
    assert unfreeze_subpixel_weights(plain.backend._modules[segment]) == 5  # CPU: eager runners use the modules
    blocks = [m for m in frozen.backend._modules[segment].modules() if isinstance(m, DecoderBlock)]
    with torch.inference_mode():  # as the backend runs them
        assert len(blocks) == 5 and all(b._frozen_weights_apply(b.has_skip) for b in blocks)
    a = frozen.predict(images, return_masks=True, batch_size=2)
    b = plain.predict(images, return_masks=True, batch_size=2)
    for p, q in zip(a, b, strict=True):
        assert p.score == q.score and np.array_equal(p.mask, q.mask) and p.rle == q.rle
    assert any(p.rle != "-1" for p in a)
    d = frozen.describe()
    assert d["freeze_subpixel"] is True and d["subpixel_blocks_frozen"]["segmenter"] == 5
    assert "classifier" not in d["subpixel_blocks_frozen"] or d["subpixel_blocks_frozen"]["classifier"] == 0
    off = TorchBackend(frozen.model_dir, [segment], freeze_subpixel=False)
    assert off.describe()["freeze_subpixel"] is False and "subpixel_blocks_frozen" not in off.describe()
    assert not any(m._frozen_phase_weight is not None for m in off._modules[segment].modules()
                   if isinstance(m, DecoderBlock))
    with pytest.raises(InvalidInputError, match="freeze_subpixel"):
        TorchBackend(frozen.model_dir, [segment], freeze_subpixel=1)


@pytest.mark.parametrize("kind", ["classifier", "aux", "plain"])
def test_torch_backend_runs_channels_last_on_the_cpu_with_the_results_of_nchw(kind):
    """On a CPU the torch backend's networks are channels_last by default (oneDNN's layout); NCHW
    (``channels_last=False``) gives the same masks and RLE, gated rows, TTA and batch padding included."""
    from pneumoseg.infer.backends import TorchBackend

    images = phantom_images(5, seed=11)
    nhwc = Predictor.from_dir(model_dir(kind), tta=True)
    nchw = Predictor.from_dir(model_dir(kind), tta=True, channels_last=False)
    assert nhwc.describe()["channels_last"] is True and nchw.describe()["channels_last"] is False
    for predictor, layout in ((nhwc, torch.channels_last), (nchw, torch.contiguous_format)):
        weights = [p for m in predictor.backend._modules.values() for p in m.parameters() if p.dim() == 4]
        assert weights and all(w.is_contiguous(memory_format=layout) for w in weights)
    a = nhwc.predict(images, return_masks=True, batch_size=3)
    b = nchw.predict(images, return_masks=True, batch_size=3)
    for p, q in zip(a, b, strict=True):
        assert p.score == pytest.approx(q.score, abs=1e-5) and p.segmented == q.segmented
        assert np.array_equal(p.mask, q.mask) and p.rle == q.rle
    assert any(p.rle != "-1" for p in a)
    if kind != "plain":  # a gate: both outcomes are compared
        assert any(not p.segmented for p in a) and any(p.rle == "-1" for p in a)
    with pytest.raises(InvalidInputError, match="channels_last"):
        TorchBackend(nhwc.model_dir, [nhwc.parts["segment"]], channels_last="yes")
