"""The lean host path of postprocess and the RLE codec (benchmarks/cpu_profile_postprocess.py) keeps
every protection of the full one: a plain torch.Tensor skips FakeTensor's walk only when it cannot be
fake, cached settings never cache an error, outputs of an (H, W) input described as a batch of one
answer as before, and outputs are made on the input's device whatever torch's default device is."""

from __future__ import annotations

import numpy as np
import pytest
from isolated import run_isolated

import pneumoseg
from pneumoseg import _checks, _native, rle
from pneumoseg import postprocess as pp
from pneumoseg.errors import RLEError, RLELimitError

torch = pytest.importorskip("torch")


def _gated_threshold(probs: np.ndarray, bottom: float, keep: np.ndarray) -> np.ndarray:
    """The reference of postprocess(..., top=None): probs > bottom in the images kept, else empty."""
    return ((probs > bottom) & keep.reshape(-1, 1, 1)).astype(np.uint8)


def _probs(n: int = 2, h: int = 9, w: int = 11) -> np.ndarray:
    probs = np.zeros((n, h, w), np.float32)
    probs[:, 1:4, 2:6] = 0.9
    probs[-1, 6:8, 7:10] = 0.6
    return probs


def test_only_an_unwrapped_exact_tensor_counts_as_plain():
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    x = torch.zeros(2, 3)
    with FakeTensorMode():
        fake = torch.zeros(2, 3)

    class Sub(torch.Tensor):
        pass

    seen = {}

    def look(name):
        def probe(t):
            seen[name] = (_checks.is_plain_tensor(t), bool(is_fake(t)))
            return t.sum()
        return probe

    torch.func.grad(look("grad"))(x)
    torch.func.vmap(look("vmap"))(x)
    torch.func.functionalize(look("functionalize"))(x)
    seen["plain"] = (_checks.is_plain_tensor(x), False)
    seen["fake"] = (_checks.is_plain_tensor(fake), True)
    seen["functional fake"] = (_checks.is_plain_tensor(torch._to_functional_tensor(fake)), True)
    seen["parameter"] = (_checks.is_plain_tensor(torch.nn.Parameter(x)), False)
    seen["subclass"] = (_checks.is_plain_tensor(x.as_subclass(Sub)), False)
    seen["numpy"] = (_checks.is_plain_tensor(x.numpy()), False)
    assert {name: plain for name, (plain, _) in seen.items()} == {
        "grad": False, "vmap": False, "functionalize": False, "plain": True, "fake": False,
        "functional fake": False, "parameter": False, "subclass": False, "numpy": False}
    assert seen["functional fake"][1], "is_fake sees through the functional wrapper"


def test_wrapped_and_functional_tensors_are_refused_not_read():
    x = torch.from_numpy(_probs())
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.zeros(2, 9, 11)
    with pytest.raises(pneumoseg.InvalidInputError, match="FakeTensor"):
        pp.postprocess(torch._to_functional_tensor(fake), top=None)
    # the error names the transform (it said "reaches 792 bytes of a storage of 792 bytes")
    with pytest.raises(pneumoseg.InvalidInputError, match="inside a torch.func transform"):
        rle.encode_batch(torch._to_functional_tensor(x))

    def inside(t):
        pp.postprocess(t, top=None)
        return t.sum()

    for transform in (torch.func.grad, torch.func.vmap, torch.func.functionalize):
        with pytest.raises(pneumoseg.InvalidInputError, match="probs is a tensor inside a torch.func transform"):
            transform(inside)(x)


def test_a_real_input_inside_fake_tensor_mode_is_refused_not_written_through():
    # Inside FakeTensorMode the outputs pneumoseg allocates are FakeTensors with a null data pointer:
    # the native core would write through it (a segfault), so its own output is checked too.
    result = run_isolated("""
import torch, pneumoseg
from pneumoseg import postprocess as pp
from pneumoseg.errors import RLEError, RLELimitError
from torch._subclasses.fake_tensor import FakeTensorMode
x = torch.rand(1, 16, 16)
for kwargs in ({}, {"return_components": True}, {"to_rle": True}):
    with FakeTensorMode(allow_non_fake_inputs=True):
        try:
            pp.postprocess(x, top=None, **kwargs)
            print("not refused")
        except pneumoseg.InvalidInputError as exc:
            assert "FakeTensor" in str(exc), exc
            print("refused")
""")
    assert result.returncode == 0 and result.stdout.split() == ["refused"] * 3, result.describe()


def test_outputs_are_made_on_the_inputs_device_whatever_the_default_device():
    # A tensor made without a device lands on torch's default one; the CPU kernels would write the
    # masks or component counts through a pointer of another device.
    x = torch.from_numpy(_probs())
    expected, expected_counts = pp.postprocess(x, torch.tensor([0.9, 0.8]), top=None, return_components=True)
    with torch.device("meta"):
        masks, counts = pp.postprocess(x, torch.tensor([0.9, 0.8], device="cpu"), top=None,
                                       return_components=True)
        single, count = pp.postprocess(x[1], top=None, return_components=True)
        labels, _ = pp.label_components(x[0] > 0.5)
    assert masks.device.type == counts.device.type == single.device.type == labels.device.type == "cpu"
    assert torch.equal(masks, expected) and torch.equal(counts, expected_counts)
    assert torch.equal(single, expected[1]) and count.device.type == "cpu" and int(count) == 2


def test_invalid_settings_raise_on_every_call_and_cached_ones_equal_fresh_ones():
    probs = _probs()
    for _ in range(2):  # errors are never cached
        with pytest.raises(pneumoseg.InvalidInputError, match="top"):
            pp.postprocess(probs, top=1.5)
        with pytest.raises(pneumoseg.InvalidInputError, match="min_area"):
            pp.postprocess(probs, min_area=3.0)
        with pytest.raises(pneumoseg.InvalidInputError, match="connectivity"):
            pp.postprocess(probs, connectivity=True)
        with pytest.raises(pneumoseg.InvalidInputError, match="from_logits"):
            pp.postprocess(probs, from_logits=1)
        with pytest.raises(pneumoseg.InvalidInputError, match="gate_threshold"):
            pp.postprocess(probs, [0.9, 0.9], gate_threshold=float("nan"))
    # Without scores the gate threshold is not read, as before.
    pp.postprocess(probs, gate_threshold=7.0)
    # A bad setting is named before a bad input, as before; a bad flag after it.
    with pytest.raises(pneumoseg.InvalidInputError, match="bottom"):
        pp.postprocess(np.zeros(5), bottom=-1.0)
    with pytest.raises(pneumoseg.InvalidInputError, match="probs"):
        pp.postprocess(np.zeros(5), from_logits="yes")
    plain = pp.postprocess(probs, [0.9, 0.2], top=0.75, min_area=3, bottom=0.3, gate_threshold=0.5,
                           min_component_area=2, return_components=True)
    numpy_numbers = pp.postprocess(probs, [0.9, 0.2], top=np.float32(0.75), min_area=np.int64(3),
                                   bottom=np.float64(0.3), gate_threshold=np.float16(0.5),
                                   min_component_area=np.int8(2), from_logits=np.bool_(False),
                                   return_components=np.bool_(True))
    np.testing.assert_array_equal(plain[0], numpy_numbers[0])
    np.testing.assert_array_equal(plain[1], numpy_numbers[1])
    logits = np.log(probs + 1e-6) - np.log1p(-probs + 1e-6)
    np.testing.assert_array_equal(pp.postprocess(logits, from_logits=True, top=None, bottom=0.5),
                                  pp.postprocess(probs, top=None, bottom=0.5))


@pytest.mark.parametrize("make_scores", [
    lambda s: torch.tensor(s),
    lambda s: torch.tensor(s, dtype=torch.bfloat16),
    lambda s: torch.tensor(s, dtype=torch.float16).reshape(2, 1),
    lambda s: torch._neg_view(-torch.tensor(s)),
    lambda s: torch.tensor([v * 100 for v in s]).to(torch.uint8),
    lambda s: torch.tensor([v * 100 for v in s]).to(torch.int64),
    lambda s: np.array(s, np.float16),
    lambda s: np.array([v * 100 for v in s], np.uint64),
    lambda s: list(s),
    lambda s: tuple(np.float32(v) for v in s),
], ids=["float32", "bfloat16", "float16 (2, 1)", "negated view", "uint8", "int64", "numpy float16",
        "numpy uint64", "list", "tuple of numpy floats"])
def test_gate_scores_of_every_kind_gate_as_their_float64_values(make_scores):
    # Few scores are compared in Python (tolist) rather than by NumPy: the same decisions as the
    # float64 comparison, for every dtype and layout (0.49 in bfloat16 is 0.490234375: gated out).
    probs = _probs()
    scores = make_scores([0.5, 0.49])
    as_float = (scores.double().numpy() if isinstance(scores, torch.Tensor)
                else np.asarray(scores, np.float64)).reshape(-1)
    masks = pp.postprocess(probs, scores, top=None, gate_threshold=0.5)
    np.testing.assert_array_equal(np.asarray(masks), _gated_threshold(probs, 0.3, as_float >= 0.5))


def test_gate_scores_that_are_not_real_numbers_are_refused():
    probs = torch.from_numpy(_probs())
    for scores, match in ((torch.tensor([True, False]), "real numbers"), (torch.tensor([float("nan"), 0.2]), "NaN"),
                          (np.array([np.nan, 0.2]), "NaN"), ([0.9, 0.1, 0.3], "3 values"), (["a", "b"], "real numbers"),
                          ([[0.1], [0.2, 0.3]], "could not be read"), (torch.tensor([1j, 0j]), "real")):
        with pytest.raises(pneumoseg.InvalidInputError, match=match):
            pp.postprocess(probs, scores, top=None)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_one_2d_image_answers_as_before(kind):
    probs = _probs(1)
    x = probs[0] if kind == "numpy" else torch.from_numpy(probs[0])
    transposed = np.ascontiguousarray(probs[0].T).T if kind == "numpy" else torch.from_numpy(probs[0].T.copy()).T
    masks, counts = pp.postprocess(probs, top=None, return_components=True)
    mask, count = pp.postprocess(x, top=None, return_components=True)
    assert tuple(mask.shape) == probs.shape[1:] and type(mask) is type(x)
    if kind == "numpy":
        assert isinstance(count, np.int32)
    else:
        assert isinstance(count, torch.Tensor) and count.shape == () and count.dtype == torch.int32
    np.testing.assert_array_equal(np.asarray(mask), masks[0])
    assert int(count) == int(counts[0]) == 2
    np.testing.assert_array_equal(np.asarray(pp.postprocess(transposed, top=None)), masks[0])
    text = pp.postprocess(x, top=None, to_rle=True)
    assert text == rle.encode(masks[0]) == rle.encode(transposed > 0.3) == rle.encode_batch(masks)[0]
    labels, areas = pp.label_components(x > 0.3)
    assert tuple(labels.shape) == probs.shape[1:] and np.asarray(areas).tolist() == [12, 6]


def test_the_bridge_describes_a_batch_of_one_as_indexing_would():
    for x in (np.arange(12, dtype=np.float32).reshape(3, 4), torch.arange(12.0).reshape(3, 4).T):
        info = _native.as_view(x, "x", batch_of_one=True)
        assert list(info.view.shape) == [1, *x.shape]
        # the strides are right if the native encoder reads the same pixels as from x[None]
        assert _native._C.rle_encode(info.view, 0, 0) == rle.encode_batch(torch.as_tensor(x)[None].contiguous())
    with pytest.raises(pneumoseg.InvalidInputError, match="at most 4"):
        _native.as_view(np.zeros((1, 1, 1, 1)), "x", batch_of_one=True)


def test_decode_batch_limits_still_apply_on_the_quick_shape_check():
    with pneumoseg.limits.override(max_image_side=8):
        with pytest.raises(RLELimitError, match="max_image_side"):
            rle.decode_batch(["-1"], (9, 4))
        assert rle.decode_batch(["1 2"], (8, 4)).shape == (1, 8, 4)
    with pneumoseg.limits.override(max_rle_chars=3), pytest.raises(RLELimitError, match="max_rle_chars"):
        rle.decode_batch(["1 2", "1 20"], (8, 4))
    with pneumoseg.limits.override(max_batch_bytes=63), pytest.raises(RLELimitError, match="max_batch_bytes"):
        rle.decode_batch(["-1", "-1"], (8, 4))
    for shape in ((8, -1), (8, 4.0), (True, 4), [8, 4, 1]):
        with pytest.raises(RLEError, match="shape"):
            rle.decode_batch(["-1"], shape)


def test_compiling_a_caller_adds_no_cache_warnings_and_keeps_the_answer():
    # Dynamo warned on every lru_cache-wrapped call (the cached settings) and could not trace the plain
    # tensor probes; while it traces, both are bypassed and only the native call breaks the graph
    import warnings

    import torch

    def caller(x):
        return pp.postprocess(torch.sigmoid(x), torch.full((1,), 0.9), gate_threshold=0.5, top=0.75, min_area=3,
                              bottom=0.3, min_component_area=2, return_components=True)

    torch._dynamo.reset()
    x = torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(caller, backend="eager")(x)
    expected = caller(x)
    assert torch.equal(compiled[0], expected[0]) and torch.equal(compiled[1], expected[1])
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "lru_cache" in m], messages
    assert not [m for m in messages if "functorch_wrapped" in m or "_is_functional_tensor" in m], messages
