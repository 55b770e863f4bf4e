"""Adversarial review of the host-overhead fast paths (post-processing / RLE bridge: exact-type
checks, batch-of-one views, cached settings, gate scores in Python; the Predictor's batch-1 path:
non-blocking read-backs after the end mark, reused timer events, NaN checks from the maps' peaks).
Each attack answered as the revision before the fast paths did (compared over a few hundred cases
while reviewing); these tests keep the ones a later shortcut could most easily break."""

from __future__ import annotations

import itertools
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from infer_helpers import model_dir, phantom_images

import pneumoseg
from pneumoseg import postprocess as pp
from pneumoseg import rle
from pneumoseg.errors import InvalidInputError, RLEError

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # last: never shadows a tests/ module
from fake_cuda import fake_cuda  # the Predictor's CUDA branch, run on the CPU

_RNG = np.random.default_rng(7)
_PROBS = _RNG.random((17, 23)).astype(np.float32)


def _memmap(tmp_path: Path) -> np.memmap:
    path = tmp_path / "probs.bin"
    _PROBS.tofile(path)
    return np.memmap(path, np.float32, mode="r", shape=_PROBS.shape)


def _unaligned() -> np.ndarray:
    return np.frombuffer(b"\0" + _PROBS.tobytes(), np.float32, offset=1).reshape(_PROBS.shape)


def _matrix() -> np.ndarray:
    with warnings.catch_warnings():  # np.matrix warns that it is not recommended: still met in old code
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.matrix(_PROBS)


def _read_only() -> np.ndarray:
    a = _PROBS.copy()
    a.setflags(write=False)
    return a


# (H, W) inputs the bridge now describes as a batch of one without x[None], in layouts its fast
# paths skip checks for: each must answer as its own contiguous copy does.
LAYOUTS = {
    "numpy flipped rows": lambda tmp: _PROBS[::-1],
    "numpy flipped columns": lambda tmp: _PROBS[:, ::-1],
    "numpy transposed": lambda tmp: _PROBS.T,
    "numpy strided": lambda tmp: _RNG.random((40, 50)).astype(np.float32)[::3, ::2],
    "numpy broadcast row": lambda tmp: np.broadcast_to(_PROBS[0], (9, 23)),
    "numpy broadcast scalar": lambda tmp: np.broadcast_to(np.float32(0.8), (9, 11)),
    "numpy unaligned": lambda tmp: _unaligned(),
    "numpy big-endian": lambda tmp: _PROBS.astype(">f4"),
    "numpy read-only": lambda tmp: _read_only(),
    "numpy read-only memmap": _memmap,
    "numpy matrix": lambda tmp: _matrix(),
    "numpy one row": lambda tmp: _PROBS[:1],
    "numpy one column": lambda tmp: _PROBS[:, 4:5],
    "numpy float16": lambda tmp: _PROBS.astype(np.float16),
    "torch transposed": lambda tmp: torch.from_numpy(_PROBS.copy()).t(),
    "torch expanded": lambda tmp: torch.tensor(0.8).expand(9, 11),
    "torch expanded row": lambda tmp: torch.from_numpy(_PROBS[0].copy()).expand(9, 23),
    "torch negative view": lambda tmp: torch._neg_view(torch.from_numpy(-_PROBS)),
    "torch requires grad": lambda tmp: torch.from_numpy(_PROBS.copy()).requires_grad_(),
    "torch one column": lambda tmp: torch.from_numpy(_PROBS.copy())[:, 4:5],
    "torch offset view": lambda tmp: torch.from_numpy(_RNG.random((30, 30)).astype(np.float32))[5:22, 3:26],
}


def _as_plain(x):
    """The same values as a contiguous NumPy float32 array (the oracle's input)."""
    if isinstance(x, torch.Tensor):
        return x.detach().resolve_neg().float().contiguous().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=np.float32)


def _host(x):
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_hostile_layouts_answer_as_their_contiguous_copy(layout, tmp_path):
    x = LAYOUTS[layout](tmp_path)
    plain = _as_plain(x)
    kind = torch.Tensor if isinstance(x, torch.Tensor) else np.ndarray
    settings = {"top": 0.6, "min_area": 5, "bottom": 0.3, "min_component_area": 3}

    masks, counts = pp.postprocess(x, return_components=True, **settings)
    want_masks, want_counts = pp.postprocess(plain, return_components=True, **settings)
    assert isinstance(masks, kind) and tuple(masks.shape) == tuple(x.shape)  # outputs in the input's shape
    np.testing.assert_array_equal(_host(masks), want_masks)
    assert int(counts) == int(want_counts)
    assert pp.postprocess(x, to_rle=True, **settings) == rle.encode(want_masks)

    labels, areas = pp.label_components(x)
    want_labels, want_areas = pp.label_components(plain)
    assert tuple(labels.shape) == tuple(x.shape)
    np.testing.assert_array_equal(_host(labels), want_labels)
    np.testing.assert_array_equal(_host(areas), want_areas)

    np.testing.assert_array_equal(_host(pp.remove_small_components(x > 0.5, 3)),
                                  pp.remove_small_components(plain > 0.5, 3))
    assert rle.encode(x) == rle.encode(plain)
    assert pp.gate(x, [0.7], 0.5).shape == tuple(x.shape)


def _shrunk(kind: str):
    """A view made while its storage was whole, then the storage cut to 50 floats (as FSDP frees)."""
    base = torch.rand(64)
    view = {
        "contiguous at an offset": lambda: base.as_strided((4, 4), (4, 1), 40),
        "transposed": lambda: base.as_strided((4, 4), (1, 4), 40),
        "expanded": lambda: base.as_strided((4, 4), (0, 1), 50),
        "one row of a batch": lambda: base.as_strided((1, 4, 4), (1000, 4, 1), 40)[0],
        "all of it": lambda: base.as_strided((8, 8), (8, 1), 0),
    }[kind]()
    base.untyped_storage().resize_(50 * 4)
    return view


@pytest.mark.parametrize("kind", ["contiguous at an offset", "transposed", "expanded", "one row of a batch", "all of it"])
def test_a_view_past_its_shrunk_storage_is_refused_everywhere(kind):
    # check_tensor_memory's contiguous shortcut (offset + numel) and the batch-of-one description
    # must still see every byte a view reaches
    with pytest.raises(InvalidInputError, match="reaches"):
        pp.postprocess(_shrunk(kind))
    with pytest.raises(InvalidInputError, match="reaches"):
        pp.label_components(_shrunk(kind))
    with pytest.raises(RLEError, match="reaches"):
        rle.encode(_shrunk(kind))
    scores = torch.rand(16)
    scores.untyped_storage().resize_(0)
    with pytest.raises(InvalidInputError, match="scores reaches"):
        pp.postprocess(np.zeros((16, 3, 3), np.float32), scores=scores)


class _EqualsAnything(float):
    """A float that hashes as 0.0 and equals everything: a poisoned cache key if it were one."""

    def __eq__(self, other):
        return True

    def __hash__(self):
        return 0


class _IntEqualsAnything(int):
    def __eq__(self, other):
        return True

    def __hash__(self):
        return 0


def test_cached_settings_are_never_shared_with_keys_that_merely_compare_equal():
    probs = _RNG.random((2, 20, 20)).astype(np.float32)
    fresh = {b: pp.postprocess(probs, bottom=b, top=None) for b in (0.0, 0.4)}
    # 0.0 and 0 are cached first; the odd subclasses hash and compare equal to them
    pp.postprocess(probs, bottom=0.0, top=None)
    pp.postprocess(probs, bottom=0.0, top=None, min_component_area=0)
    np.testing.assert_array_equal(pp.postprocess(probs, bottom=_EqualsAnything(0.4), top=None), fresh[0.4])
    np.testing.assert_array_equal(
        pp.postprocess(probs, bottom=0.4, top=None, min_component_area=_IntEqualsAnything(30)),
        pp.postprocess(probs, bottom=0.4, top=None, min_component_area=30))
    gated = pp.postprocess(probs, scores=[0.5, 0.5], gate_threshold=0.0, top=None)
    assert gated.any()
    assert not pp.postprocess(probs, scores=[0.5, 0.5], gate_threshold=_EqualsAnything(0.75), top=None).any()
    # -0.0 after 0.0 (equal keys) means the same threshold, in probability and in logit space
    for from_logits in (False, True):
        zero = pp.postprocess(probs - 0.5, bottom=0.0, top=None, from_logits=from_logits)
        np.testing.assert_array_equal(pp.postprocess(probs - 0.5, bottom=-0.0, top=None, from_logits=from_logits), zero)


@pytest.mark.parametrize("scores, want", [
    ([0.5, np.nextafter(0.5, 0)], [1, 0]),
    (np.array([0.5, 0.25], np.float16), [1, 0]),
    (torch.tensor([0.5, 0.49]).bfloat16(), [1, 0]),  # 0.49 rounds to 0.490234375 in bfloat16
    (torch._neg_view(torch.tensor([-0.6, -0.4])), [1, 0]),
    (torch.tensor([0.9, 0.9, 0.1])[::2], [1, 0]),
    (torch.tensor(0.7).expand(2), [1, 1]),
    (np.array([1, 0], np.uint64), [1, 0]),
])
def test_gate_scores_compared_in_python_gate_as_their_values(scores, want):
    masks = np.ones((2, 3, 3), np.uint8)
    got = pp.gate(masks, scores, 0.5)
    assert [int(m.any()) for m in got] == want


# ---------------------------------------------------------------------------------------------------
# the Predictor's batch-1 host path, on the CPU and on its CUDA branch (fake_cuda: tensors on the CPU)


@pytest.fixture(params=["cpu", "fake cuda"])
def device(request, monkeypatch):
    if request.param == "cpu":
        yield "cpu"
        return
    with fake_cuda(monkeypatch):
        yield "cuda"


def _answers(predictions):
    return [(p.image_id, p.score, p.rle, p.n_components, p.segmented, p.shape) for p in predictions]


@pytest.mark.parametrize("poison", ["nan beside +inf", "nan beside huge values", "nan in an fp16 map"])
def test_a_nan_in_a_map_whose_peak_is_infinite_is_caught(device, poison):
    # The maps' NaN check is now their amax (which propagates NaN): a map holding +inf or values far
    # above everything must still answer NaN. With a classifier gate the score cannot give it away.
    predictor = pneumoseg.Predictor.from_dir(model_dir("classifier"), device=device, segment="all")
    run = predictor.backend.run

    def poisoned(part, *inputs):
        out = list(run(part, *inputs))
        if part == "segmenter":
            m = out[0].clone()
            if poison == "nan in an fp16 map":
                m = m.half()
                m[-1, 0, 1, 1] = float("inf")
            m[-1, 0, 5, 7] = float("nan")
            m[-1, 0, 9, 9] = float("inf") if poison == "nan beside +inf" else 3e4
            out[0] = m
        return tuple(out)

    predictor.backend.run = poisoned
    with pytest.raises(pneumoseg.PneumosegError, match=r"image '2'.*segmentation.* NaN"):
        predictor.predict(phantom_images(3, seed=5), image_ids=["0", "1", "2"], batch_size=3)


def test_interleaved_streams_in_one_thread_answer_as_alone(device):
    # timer events are reused per thread: two streams advanced in turn must not read each other's marks
    predictor = pneumoseg.Predictor.from_dir(model_dir("classifier"), device=device)
    images = phantom_images(5, seed=3)
    alone_a = _answers(predictor.predict(images, batch_size=1))
    alone_b = _answers(predictor.predict(images[::-1], batch_size=2))
    a, b = predictor.predict_iter(images, batch_size=1), predictor.predict_iter(images[::-1], batch_size=2)
    got_a, got_b = [], []
    for x, y in itertools.zip_longest(a, b):
        got_a += [] if x is None else [x]
        got_b += [] if y is None else [y]
        if x is not None:
            assert x.timings["total"] >= 0
    assert _answers(got_a) == alone_a and _answers(got_b) == alone_b


@pytest.mark.parametrize("segment", ["gated", "all"])
def test_a_bad_tensor_mid_batch_is_skipped_and_the_rest_answer_as_without_it(device, segment):
    # on CUDA the pixels' finite flags are read back (non-blocking) after the end mark, then the batch
    # runs again without the bad image
    if device == "cuda" and segment == "all":
        pytest.skip("fake_cuda's post-processing runs on the CPU, where a NaN gate score (the bad image's) is an "
                    "error; a real CUDA batch gates it out and the pixels are named after the end mark")
    predictor = pneumoseg.Predictor.from_dir(model_dir("aux"), device=device, segment=segment)
    good = [torch.from_numpy(img.astype(np.float32)) for img in phantom_images(3, seed=2)]
    bad = good[1].clone()
    bad[3, 4] = float("inf")
    batch = [good[0], bad, good[2]]
    ids = ["a", "bad", "c"]
    got = predictor.predict(batch, image_ids=ids, batch_size=3, on_error="skip")
    assert got.skipped == [("bad", "the pixels contain NaN or infinity")]
    want = predictor.predict([good[0], good[2]], image_ids=["a", "c"], batch_size=2)
    assert _answers(got) == _answers(want)
    with pytest.raises(InvalidInputError, match="image 'bad'.*NaN or infinity"):
        predictor.predict(batch, image_ids=ids, batch_size=3)


@pytest.mark.parametrize("gate", [0.0, 1.0])
def test_gate_thresholds_at_the_ends_on_both_branches_agree_with_segment_all(device, gate):
    # gated: no row selection when every image passes, an empty stage 2 when none does
    images = phantom_images(4, seed=4)
    gated = pneumoseg.Predictor.from_dir(model_dir("classifier"), device=device, thresholds={"gate": gate})
    every = pneumoseg.Predictor.from_dir(model_dir("classifier"), device=device, segment="all",
                                         thresholds={"gate": gate})
    for batch_size in (1, 3):
        g = gated.predict(images, batch_size=batch_size)
        e = every.predict(images, batch_size=batch_size)
        assert [p.rle for p in g] == [p.rle for p in e]
        assert [p.score for p in g] == pytest.approx([p.score for p in e], abs=1e-6)
        assert all(p.segmented == (p.score >= gate) for p in g)
