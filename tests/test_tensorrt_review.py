"""Review of the TensorRT backend against NVIDIA's documented Python API, run through a strict fake
``tensorrt`` module (tests/fake_tensorrt.py) because TensorRT cannot be installed here.

The fake binds the names, argument names and return conventions of TensorRT 10.x / 11.x
(NVIDIA/TensorRT python/src/infer/pyCore.cpp): what passes here calls TensorRT the documented way;
what TensorRT's kernels then do is only checked where a GPU session has TensorRT."""

from __future__ import annotations

import threading
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fake_tensorrt  # noqa: E402
from pneumoseg.errors import InvalidInputError  # noqa: E402
from pneumoseg.export import tensorrt as trt_export  # noqa: E402
from pneumoseg.export.parts import part_spec  # noqa: E402
from pneumoseg.export.tensorrt import (  # noqa: E402
    BatchProfile, EngineCache, EngineRunner, ProfileRunner, build_engine, deserialize_engine, engine_key,
    engine_key_fields, torch_dtype,
)

STREAM = 0x7F00  # a non-default stream handle, as torch.cuda.Stream.cuda_stream gives one
ENV = {"tensorrt": "10.9.0.34", "cuda": "12.8", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]}


@pytest.fixture
def fake_trt(monkeypatch):
    """Install a fresh fake ``tensorrt``; returns a function that swaps in another (version, GPU)."""

    def install(version: str = "10.9.0.34", device: str = "NVIDIA H100 80GB HBM3", **kw):
        module = fake_tensorrt.make_module(version, device, **kw)
        monkeypatch.setitem(__import__("sys").modules, "tensorrt", module)
        monkeypatch.setattr(trt_export, "_RUNTIMES", {})
        monkeypatch.setattr(trt_export, "_LOGGERS", {})
        return module

    # EngineRunner asks torch for the current CUDA stream; on this CPU-only torch it is a stand-in
    # whose handle is an int, as torch.cuda.Stream.cuda_stream is.
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=STREAM))
    return install


def graph(tmp_path, name="segmenter", *, dtype="float32", chw=(1, 8, 8)):
    path = tmp_path / f"{name}.onnx"
    output = {"segmenter": ("mask_logits", "double"), "classifier": ("class_logits", "mean")}[name]
    fake_tensorrt.write_graph(path, {"image": (dtype, [-1, *chw])}, {output[0]: ("float32", output[1])})
    return path


def runner_for(tmp_path, part="segmenter", profile=BatchProfile(1, 2, 4), **graph_kw):
    data = build_engine(graph(tmp_path, part, **graph_kw), profile)
    engine = deserialize_engine(data)
    return EngineRunner(engine, part_spec(part), "cpu", profile)


# --------------------------------------------------------------------------------------------------
# the documented calls, on TensorRT 10.x (flag asked for) and 11.x (always strongly typed)


@pytest.mark.parametrize("version", ["10.3.0", "10.13.2.6", "11.1.0.5"])
def test_engines_are_built_strongly_typed_with_one_dynamic_batch_profile_and_run(tmp_path, fake_trt, version):
    trt = fake_trt(version)
    profile = BatchProfile(1, 2, 4)
    runner = ProfileRunner(runner_for(tmp_path, profile=profile), profile)
    assert trt.built_with[0]["strongly_typed"]
    for n in (1, 3, 4, 7, 9):
        x = torch.randn(n, 1, 8, 8)
        (y,) = runner(x)
        torch.testing.assert_close(y, 2 * x)
    assert all(e["stream"] == STREAM for e in trt.executions)
    assert all(1 <= e["shapes"]["image"][0] <= 4 for e in trt.executions)


def test_fp16_inputs_and_outputs_get_their_torch_types(tmp_path, fake_trt):
    trt = fake_trt()
    runner = runner_for(tmp_path, "classifier", dtype="float16")
    assert runner.dtypes == {"image": torch.float16, "class_logits": torch.float32}
    x = torch.randn(3, 1, 8, 8)
    (score,) = runner(x)
    assert score.shape == (3, 1) and score.dtype == torch.float32
    torch.testing.assert_close(score, x.half().float().flatten(1).mean(1, keepdim=True), rtol=1e-3, atol=1e-3)
    assert {torch_dtype(getattr(trt, n)) for n in ("float32", "float16", "int8", "int32", "bool", "bfloat16",
                                                    "int64", "uint8")} == {
        torch.float32, torch.float16, torch.int8, torch.int32, torch.bool, torch.bfloat16, torch.int64, torch.uint8}
    with pytest.raises(Exception, match="no torch equivalent"):
        torch_dtype(trt.fp8)


def test_a_batch_outside_the_profile_never_reaches_tensorrt(tmp_path, fake_trt):
    trt = fake_trt()
    runner = runner_for(tmp_path, profile=BatchProfile(2, 2, 4))
    for n in (1, 5):
        with pytest.raises(InvalidInputError, match=f"a batch of {n} is outside the engine's profile"):
            runner(torch.zeros(n, 1, 8, 8))
    with pytest.raises(InvalidInputError, match="refused input image of shape"):  # a wrong height/width
        runner(torch.zeros(2, 1, 8, 9))
    assert trt.executions == []
    (y,) = ProfileRunner(runner, BatchProfile(2, 2, 4))(torch.ones(5, 1, 8, 8))  # split, the last padded
    assert y.shape == (5, 1, 8, 8) and bool((y == 2).all())


def test_every_call_gets_fresh_outputs_and_every_thread_its_own_context(tmp_path, fake_trt):
    trt = fake_trt()
    runner = runner_for(tmp_path)
    first = runner(torch.ones(2, 1, 8, 8))[0]
    second = runner(torch.full((2, 1, 8, 8), 3.0))[0]
    assert first.data_ptr() != second.data_ptr() and bool((first == 2).all()) and bool((second == 6).all())
    threads = [threading.Thread(target=runner, args=(torch.ones(1, 1, 8, 8),)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert trt.contexts == 4  # this thread's and one per other thread


def test_an_engine_of_another_tensorrt_is_rebuilt_not_run(tmp_path, fake_trt):
    old = fake_trt("10.8.0.43")
    fields = engine_key_fields("ab" * 32, "fp16", BatchProfile(1, 2, 4), {"image": [1, 8, 8]}, ENV)
    onnx = graph(tmp_path)
    cache = EngineCache(tmp_path / "engines")
    cache.get(fields, lambda: build_engine(onnx, BatchProfile(1, 2, 4)), deserialize_engine)
    new = fake_trt("10.9.0.34")  # the sidecar vouches for the bytes, TensorRT refuses them
    result = cache.get(fields, lambda: build_engine(onnx, BatchProfile(1, 2, 4)), deserialize_engine)
    assert result.status == "built" and "could not deserialise" in result.reason
    assert len(old.built_with) == 1 and len(new.built_with) == 1
    assert cache.paths(engine_key(fields))[0].read_bytes().find(b'"10.9.0.34"') > 0


def test_parser_errors_are_named(tmp_path, fake_trt):
    fake_trt()
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a graph")
    with pytest.raises(Exception, match="ONNX parser refused it: In node"):
        build_engine(bad, BatchProfile(1, 2, 4))


# --------------------------------------------------------------------------------------------------
# findings


@pytest.mark.parametrize("mode", ["none", "raise"])
def test_a_damaged_timing_cache_does_not_stop_every_build(tmp_path, fake_trt, mode):
    # createTimingCache on bytes it cannot read gives no cache (a null pointer, or polygraphy guards it
    # with except:); set_timing_cache(None, ...) is then a pybind TypeError, and every later build on
    # this GPU failed the same way until someone deleted the file.
    trt = fake_trt(corrupt_timing_cache=mode)
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"\x00garbage from a killed writer")
    data = build_engine(graph(tmp_path), BatchProfile(1, 2, 4), timing_cache=timing)
    assert deserialize_engine(data) is not None
    assert trt.built_with[0]["timing_cache_device"] == trt.device_name  # a fresh cache was used
    assert timing.read_bytes().startswith(b"TC1|")  # and replaced the damaged one


def test_a_timing_cache_from_another_device_is_not_used(tmp_path, fake_trt):
    # set_timing_cache(cache, ignore_mismatch=True) USES a cache timed on another device, which NVIDIA
    # warns "may lead to functional/performance bugs" (NvInfer.h, IBuilderConfig::setTimingCache);
    # the code's own comment meant the opposite ("a foreign cache is ignored").
    trt = fake_trt()
    timing = tmp_path / "timing.cache"
    timing.write_bytes(bytes(fake_tensorrt.ITimingCache("NVIDIA A100-SXM4-80GB", ["a100 tactics"]).serialize()))
    build_engine(graph(tmp_path), BatchProfile(1, 2, 4), timing_cache=timing)
    assert trt.built_with[0]["timing_cache_device"] == trt.device_name
    assert "a100 tactics" not in trt.built_with[0]["timing_entries"]


def test_a_concurrent_build_does_not_lose_timing_cache_entries(tmp_path, fake_trt):
    # The cache was read before the build and written after it: entries another process saved in
    # between were overwritten (polygraphy combines the file's cache into its own under the lock).
    trt = fake_trt()
    timing = tmp_path / "timing.cache"
    other = fake_tensorrt.ITimingCache(trt.device_name, ["another process's tactics"])
    trt.during_build = lambda: timing.write_bytes(bytes(other.serialize()))
    build_engine(graph(tmp_path), BatchProfile(1, 2, 4), timing_cache=timing)
    saved = fake_tensorrt.IBuilderConfig(trt).create_timing_cache(timing.read_bytes())
    assert "another process's tactics" in saved.entries and "tactics of build 1" in saved.entries


def test_tensor_addresses_are_256_byte_aligned(tmp_path, fake_trt):
    # setTensorAddress: "The pointer must have at least 256-byte alignment" (NvInferRuntime.h). A
    # ProfileRunner chunk is a view into the caller's batch: with 100-byte rows its second chunk of 3
    # started 300 bytes in.
    trt = fake_trt()
    profile = BatchProfile(1, 2, 3)
    runner = ProfileRunner(runner_for(tmp_path, profile=profile, chw=(1, 5, 5)), profile)
    x = torch.randn(8, 1, 5, 5)
    (y,) = runner(x)
    torch.testing.assert_close(y, 2 * x)
    base = x.untyped_storage().data_ptr()
    end = base + x.untyped_storage().nbytes()
    inside = [a["image"] for a in trt.addresses if base <= a["image"] < end]
    assert all((a - base) % 256 == 0 for a in inside), [a - base for a in inside]
    assert np.isfinite(y.numpy()).all()
