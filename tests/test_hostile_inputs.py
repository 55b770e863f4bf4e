"""Careless and hostile arguments to the public API: every wrong value is refused with a ValueError-family
error naming the argument (never accepted silently, never a TypeError, IndexError, RuntimeError or a
pybind message), and every valid-but-unusual value gets the right answer. These checks happen in
Python before any native call, so they run in this process; see test_hostile_native.py for the cases
that reach the native core."""

from __future__ import annotations

import math

import numpy as np
import pytest

import pneumoseg
from pneumoseg import limits, postprocess as pp, rle
from pneumoseg._checks import (
    check_bool, check_choice, check_image_size, check_int, check_path, check_probability, check_real, check_shape,
    check_str_sequence,
)
from pneumoseg.data import read_dicom
from pneumoseg.samples import pneumothorax_mask

torch = pytest.importorskip("torch")

from pneumoseg import losses, metrics  # noqa: E402  (needs torch)
from pneumoseg.data import Augment, PositiveRatioSampler, SIIMDataset, chest_crop, preprocess, stratified_kfold  # noqa: E402
from pneumoseg.data.transforms import resize_mask  # noqa: E402

Z33 = np.zeros((3, 3), np.float32)
T = torch.zeros(1, 1, 4, 4)


def gen():
    yield "-1"


# (call, expected error class, regex the message must match)
def _quantized(*shape):
    """A quint8 tensor (torch deprecates making them, with a warning this suite would raise)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(torch.rand(*shape), 0.1, 0, torch.quint8)


REFUSED = {
    # --- class 7: wrong values once accepted silently
    "bool as top": (lambda: pp.triplet_threshold(Z33, top=True), pneumoseg.InvalidInputError, "top must be a real number, got bool"),
    "str as threshold": (lambda: pp.gate(Z33, [0.5], "0.5"), pneumoseg.InvalidInputError, "threshold must be a real number, got str"),
    "NaN bottom": (lambda: pp.postprocess(Z33, bottom=float("nan")), pneumoseg.InvalidInputError, "bottom must be a finite number"),
    "str from_logits": (lambda: pp.postprocess(Z33, from_logits="no"), pneumoseg.InvalidInputError, "from_logits must be True or False"),
    "int to_rle": (lambda: pp.postprocess(Z33, to_rle=1), pneumoseg.InvalidInputError, "to_rle must be True or False"),
    "float connectivity": (lambda: pp.label_components(Z33, connectivity=8.0), pneumoseg.InvalidInputError, "connectivity must be one of 4, 8"),
    "bool connectivity": (lambda: pp.label_components(Z33, connectivity=True), pneumoseg.InvalidInputError, "connectivity"),
    "bool min_area": (lambda: pp.remove_small_components(Z33, True), pneumoseg.InvalidInputError, "min_area must be an integer, got bool"),
    "str scores": (lambda: pp.gate(Z33, ["0.9"], 0.5), pneumoseg.InvalidInputError, "scores must be real numbers"),
    "bool scores": (lambda: pp.gate(Z33, [True], 0.5), pneumoseg.InvalidInputError, "scores must be real numbers"),
    "bool loss weight": (lambda: losses.combo_loss(T, T, bce_weight=True), pneumoseg.InvalidInputError, "bce_weight must be a real number, got bool"),
    "str loss weight": (lambda: losses.combo_loss(T, T, dice_weight="1"), pneumoseg.InvalidInputError, "dice_weight must be a real number, got str"),
    "inf focal_gamma": (lambda: losses.combo_loss(T, T, focal_gamma=math.inf), pneumoseg.InvalidInputError, "focal_gamma must be a finite number"),
    "str per_image": (lambda: losses.combo_loss(T, T, per_image="yes"), pneumoseg.InvalidInputError, "per_image must be True or False"),
    "int validate": (lambda: losses.ComboLoss(validate=1), pneumoseg.InvalidInputError, "validate must be True, False or None"),
    "bool pos_weight tensor": (lambda: losses.combo_loss(T, T, pos_weight=torch.tensor(True)), pneumoseg.InvalidInputError, "pos_weight must be a real number"),
    "bool shape": (lambda: rle.decode("-1", (True, True)), pneumoseg.RLEError, r"shape\[0\] must be an integer, got bool"),
    "float shape": (lambda: rle.decode("-1", (4.0, 4)), pneumoseg.RLEError, r"shape\[0\] must be an integer, got float"),
    "str shape": (lambda: rle.decode("-1", "44"), pneumoseg.RLEError, "shape must be a pair"),
    "bool style": (lambda: rle.decode("-1", (4, 4), style=True), pneumoseg.RLEError, "style must be one of"),
    "negative margin": (lambda: chest_crop(np.random.default_rng(0).random((20, 20)), margin=-1), pneumoseg.InvalidInputError, r"margin must be in \[0, 0.5\]"),
    "NaN margin": (lambda: chest_crop(np.ones((4, 4)), margin=float("nan")), pneumoseg.InvalidInputError, "margin must be a finite"),
    "NaN pixels to chest_crop": (lambda: chest_crop(np.full((4, 4), np.nan)), pneumoseg.InvalidInputError, "NaN"),
    "num_samples=0": (lambda: PositiveRatioSampler([0, 1], num_samples=0), pneumoseg.InvalidInputError, "num_samples must be at least 1"),
    "epochs=0": (lambda: PositiveRatioSampler([0, 1], epochs=0), pneumoseg.InvalidInputError, "epochs must be at least 1"),
    "label 2": (lambda: PositiveRatioSampler([0, 1, 2]), pneumoseg.InvalidInputError, "labels must be 0 or 1"),
    "NaN ratio": (lambda: PositiveRatioSampler([0, 1], float("nan")), pneumoseg.InvalidInputError, "positive_ratio must be a finite"),
    "ratio schedule of 3": (lambda: PositiveRatioSampler([0, 1], (0.1, 0.2, 0.3)), pneumoseg.InvalidInputError, r"\(start, end\) pair"),
    "str k": (lambda: stratified_kfold(["a", "b"], [0, 1], k="2"), pneumoseg.InvalidInputError, "k must be an integer"),
    "float labels for folds": (lambda: stratified_kfold(["a", "b"], [0.5, 1], k=2), pneumoseg.InvalidInputError, "labels must be integers"),
    "NaN augment": (lambda: Augment(hflip=float("nan")), pneumoseg.InvalidInputError, "hflip must be a finite"),
    "negative shift": (lambda: Augment(shift=-0.1), pneumoseg.InvalidInputError, "shift must be in"),
    "NaN gamma": (lambda: Augment(gamma=(float("nan"), 1.0)), pneumoseg.InvalidInputError, r"gamma\[0\] must be a finite"),
    "str gamma": (lambda: Augment(gamma="12"), pneumoseg.InvalidInputError, "gamma must be a"),
    "NaN preprocess input": (lambda: preprocess(np.full((4, 4), np.nan)), pneumoseg.InvalidInputError, "NaN"),
    "NaN mask to resize": (lambda: resize_mask(np.full((4, 4), np.nan), 8), pneumoseg.InvalidInputError, "mask contains NaN"),
    "inf preprocess input": (lambda: preprocess(torch.tensor([[1.0, math.inf]])), pneumoseg.InvalidInputError, "infinity"),
    "str preprocess input": (lambda: preprocess(np.array([["a", "b"]])), pneumoseg.InvalidInputError, "numeric"),
    "bool preprocess size": (lambda: preprocess(np.zeros((4, 4)), size=True), pneumoseg.InvalidInputError, "size must be an integer"),
    "huge preprocess size": (lambda: preprocess(np.zeros((4, 4)), size=10**6), pneumoseg.LimitError, "max_image_side"),
    "huge dataset image_size": (lambda: SIIMDataset(".", image_size=2**17), pneumoseg.LimitError, "max_image_side"),
    "bool dataset image_size": (lambda: SIIMDataset(".", image_size=True), pneumoseg.InvalidInputError, "image_size must be an integer"),
    "sample mask size": (lambda: pneumothorax_mask(10**6), pneumoseg.LimitError, "max_image_side"),
    "overflowing float": (lambda: pp.gate(Z33, [0.1], 10**400), pneumoseg.InvalidInputError, "fits a float"),
    # --- class 8: wrong exception types once
    "decode_union(None)": (lambda: rle.decode_union(None), pneumoseg.RLEError, "rles must be a list of str or bytes, got None"),
    "decode_union(int)": (lambda: rle.decode_union(5), pneumoseg.RLEError, "rles must be a list"),
    "decode_union(generator)": (lambda: rle.decode_union(gen()), pneumoseg.RLEError, "one-shot iterator"),
    "decode_batch(generator)": (lambda: rle.decode_batch(gen(), (2, 2)), pneumoseg.RLEError, "one-shot iterator"),
    "decode_batch(None)": (lambda: rle.decode_batch(None, (2, 2)), pneumoseg.RLEError, "got NoneType"),
    "decode_batch(dict)": (lambda: rle.decode_batch({"a": "-1"}, (2, 2)), pneumoseg.RLEError, "got dict"),
    "decode_batch union of ints": (lambda: rle.decode_batch([["-1", 5]], (2, 2)), pneumoseg.RLEError, r"rles\[0\]\[1\] must be a str"),
    "decode(None)": (lambda: rle.decode(None), pneumoseg.RLEError, "rle must be a str, got NoneType"),
    # bytes that are not UTF-8 once came back as a UnicodeDecodeError (the native message quotes the token)
    "decode non-UTF-8 bytes": (lambda: rle.decode(b"1 2 \xff\xfe", (2, 2)), pneumoseg.RLEError, r"^token 2 \('\\xff\\xfe'\) is not a non-negative integer"),
    "decode a character cut by the quote": (lambda: rle.decode("1 a" + "\u20ac" * 20, (4, 4)), pneumoseg.RLEError, r"^token 1 \('a\\xe2\\x82\\xac.*\.\.\.'\) is not a non-negative integer"),
    "decode control and NUL bytes": (lambda: rle.decode("1 2\x00\x07", (2, 2)), pneumoseg.RLEError, r"^token 1 \('2\\x00\\x07'\)"),
    "decode_union lone surrogate": (lambda: rle.decode_union(["1 1", "1 \ud800"], (4, 4)), pneumoseg.RLEError, r"^rles\[1\]: token 1"),
    "decode_batch union non-UTF-8": (lambda: rle.decode_batch(["-1", ["1 1", b"\xff"]], (2, 2)), pneumoseg.RLEError, r"^rles\[1\]: token 0"),
    "sparse mask": (lambda: rle.encode(torch.zeros(3, 3).to_sparse()), pneumoseg.RLEError, "sparse_coo tensor; pass a dense one"),
    "sparse COO batch": (lambda: rle.encode_batch(torch.zeros(2, 3, 3).to_sparse()), pneumoseg.RLEError, "sparse"),
    "sparse probs": (lambda: pp.postprocess(torch.zeros(2, 3, 3).to_sparse()), pneumoseg.InvalidInputError, "sparse"),
    "sparse logits": (lambda: losses.combo_loss(T.to_sparse(), T), pneumoseg.InvalidInputError, "logits is a torch.sparse_coo"),
    "meta tensor": (lambda: pp.label_components(torch.zeros(3, 3, device="meta")), pneumoseg.InvalidInputError, "meta"),
    "float8 mask metric": (lambda: metrics.kaggle_dice(torch.zeros(1, 2, 2).to(torch.float8_e5m2), torch.zeros(1, 2, 2)), pneumoseg.InvalidInputError, "pred has dtype torch.float8_e5m2"),
    "float8 scores": (lambda: metrics.roc_auc(torch.tensor([0, 1]), torch.tensor([0.1, 0.9]).to(torch.float8_e4m3fn)), pneumoseg.InvalidInputError, "scores has dtype torch.float8_e4m3fn"),
    "meta image to predict": (lambda: preprocess(torch.zeros(1, 8, 8, device="meta"), 8), pneumoseg.InvalidInputError, "pixels is on device meta"),
    "quantized image": (lambda: preprocess(_quantized(1, 8, 8), 8), pneumoseg.InvalidInputError, r"quantized tensor \(torch.quint8\); pass pixels.dequantize\(\)"),
    "quantized chest_crop": (lambda: chest_crop(_quantized(8, 8)), pneumoseg.InvalidInputError, "quantized tensor"),
    "quantized augment": (lambda: Augment()(_quantized(1, 1, 8, 8)), pneumoseg.InvalidInputError, "images is a quantized tensor"),
    "augment masks elsewhere": (lambda: Augment()(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8, device="meta")), pneumoseg.InvalidInputError, "masks is on device meta"),
    "meta gate scores": (lambda: pp.gate(Z33, torch.zeros(1, device="meta"), 0.5), pneumoseg.InvalidInputError, "scores is on device meta"),
    "quantized postprocess scores": (lambda: pp.postprocess(Z33, _quantized(1)), pneumoseg.InvalidInputError, "scores is a quantized tensor"),
    "meta scores": (lambda: metrics.roc_auc(torch.zeros(4, device="meta"), torch.zeros(4, device="meta")), pneumoseg.InvalidInputError, "labels is on device meta"),
    "sparse scores": (lambda: metrics.average_precision(torch.tensor([0.0, 1.0]), torch.tensor([0.2, 0.9]).to_sparse()), pneumoseg.InvalidInputError, "scores is a torch.sparse_coo tensor"),
    "meta logits": (lambda: losses.combo_loss(torch.zeros(1, 3, 3, device="meta"), torch.zeros(1, 3, 3, device="meta")), pneumoseg.InvalidInputError, "logits is on device meta"),
    "int 1 then bool True loss weight": (lambda: (losses.combo_loss(T, T, bce_weight=1), losses.combo_loss(T, T, bce_weight=True)), pneumoseg.InvalidInputError, "bce_weight must be a real number, got bool"),
    "bool per_image after a False": (lambda: (losses.combo_loss(T, T, per_image=False), losses.combo_loss(T, T, per_image=0)), pneumoseg.InvalidInputError, "per_image must be True or False"),
    "masked array": (lambda: rle.encode(np.ma.masked_array(np.ones((2, 2)), mask=[[1, 0], [0, 0]])), pneumoseg.RLEError, "masked array"),
    "None mask": (lambda: rle.encode(None), pneumoseg.RLEError, "mask must be an array, got None"),
    "ragged mask list": (lambda: rle.encode([[1, 0], [1]]), pneumoseg.RLEError, "could not be read as an array"),
    # postprocess's batches read a list's shape before the bridge did: NumPy's own ValueError escaped
    "ragged probs list": (lambda: pp.postprocess([[0.1], [0.2, 0.3]]), pneumoseg.InvalidInputError, "probs could not be read as an array"),
    "object mask": (lambda: pp.label_components(np.array([[None, 1]])), pneumoseg.InvalidInputError, "unsupported dtype"),
    "read_dicom(None)": (lambda: read_dicom(None), pneumoseg.DicomError, "path must be a path"),
    "read_dicom(b'x.dcm')": (lambda: read_dicom(b"x.dcm"), pneumoseg.DicomError, "path must be a path"),
    "read_dicom('')": (lambda: read_dicom(""), pneumoseg.DicomError, "must not be empty"),
    "read_dicom NUL": (lambda: read_dicom("a\x00b.dcm"), pneumoseg.DicomError, "NUL"),
    "window NaN": (lambda: pneumoseg.data.DicomImage(np.ones((2, 2)), "x").window(float("nan"), 10), pneumoseg.DicomError, "window center must be a finite"),
    "window half": (lambda: pneumoseg.data.DicomImage(np.ones((2, 2)), "x").window(center=3), pneumoseg.DicomError, "both center and width"),
    "write_rle_csv(list)": (lambda: pneumoseg.data.write_rle_csv("x.csv", [("a", "-1")]), pneumoseg.InvalidInputError, "rles must be a dict"),
    "read_rle_csv(None)": (lambda: pneumoseg.data.read_rle_csv(None), pneumoseg.DataFormatError, "path must be a path"),
    "find_dicoms(3)": (lambda: pneumoseg.data.find_dicoms(3), pneumoseg.DataFormatError, "root must be a path"),
    "limits: unknown": (lambda: limits.set_limits(max_everything=3), pneumoseg.InvalidInputError, "unknown limit"),
    "limits: zero": (lambda: limits.set_limits(max_image_pixels=0), pneumoseg.InvalidInputError, "max_image_pixels must be an integer in"),
    "limits: bool": (lambda: limits.set_limits(max_image_pixels=True), pneumoseg.InvalidInputError, "max_image_pixels"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_with_a_value_error_naming_the_argument(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written anywhere else
    call, error, match = REFUSED[name]
    with pytest.raises(error, match=match) as info:
        call()
    assert isinstance(info.value, ValueError) and isinstance(info.value, pneumoseg.PneumosegError)
    assert list(tmp_path.iterdir()) == []


# --- class 6: valid input once rejected or mis-described -----------------------------------------------------


def test_lazily_negated_tensor_views_are_read_as_their_values():
    """torch's neg bit leaves -x in memory; .numpy() refuses such a tensor with a RuntimeError, and the
    native core would read the raw bytes: every tensor entry point resolves it first."""
    def neg(values):
        return torch._neg_view(-torch.tensor(values))

    assert metrics.roc_auc(neg([0.0, 1.0, 0.0]), neg([0.2, 0.9, 0.1])) == 1.0
    assert metrics.average_precision(neg([0.0, 1.0]), neg([0.2, 0.9])) == 1.0
    assert metrics.dice_per_image(neg([[[0.9, 0.1]]]), torch.tensor([[[1, 0]]]), threshold=0.5).tolist() == [1.0]
    assert pp.gate(torch.ones(2, 2, 2), neg([0.9, 0.1]), 0.5)[:, 0, 0].tolist() == [1, 0]
    probs = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = pp.postprocess(probs, to_rle=True, min_area=3)
    assert "-1" not in expected
    assert pp.postprocess(torch._neg_view(-probs), to_rle=True, min_area=3) == expected


def test_empty_numpy_batches_go_through_every_postprocessing_function():
    for dtype in (np.uint8, np.float32, np.bool_):
        empty = np.zeros((0, 5, 7), dtype)
        assert pp.postprocess(empty).shape == (0, 5, 7)
        assert pp.postprocess(empty, np.zeros(0), to_rle=True) == []
        assert pp.remove_small_components(empty, 3).shape == (0, 5, 7)
        assert pp.triplet_threshold(empty).shape == (0, 5, 7)
        assert pp.gate(empty, np.zeros(0), 0.5).shape == (0, 5, 7)
        labels, areas = pp.label_components(empty)
        assert labels.shape == (0, 5, 7) and areas == []
    for shape in [(3, 0, 4), (2, 4, 0), (0, 0)]:
        assert pp.postprocess(np.zeros(shape, np.float32)).shape == shape
        assert pp.remove_small_components(np.zeros(shape, np.uint8), 2).shape == shape


@pytest.mark.parametrize("min_area", [2**63 - 1, 2**63, 10**30, np.uint64(2**64 - 1)])
def test_areas_beyond_int64_mean_every_component_is_too_small(min_area):
    mask = np.ones((4, 5), np.uint8)
    assert pp.remove_small_components(mask, min_area).sum() == 0
    assert pp.triplet_threshold(mask.astype(np.float32), top=0.5, min_area=min_area).sum() == 0
    assert pp.postprocess(mask.astype(np.float32), min_component_area=min_area).sum() == 0


def test_numpy_and_tensor_scalars_are_numbers():
    probs = np.array([[0.2, 0.8]], np.float32)
    expected = (probs > 0.5).astype(np.uint8)
    for t in (np.float32(0.5), np.float64(0.5), np.array(0.5), torch.tensor(0.5), 0.5, 1 / 2):
        np.testing.assert_array_equal(pp.postprocess(probs, top=None, bottom=t), expected)
    assert pp.remove_small_components(np.ones((2, 2)), np.int64(5)).sum() == 0
    assert pp.label_components(np.ones((2, 2)), connectivity=np.int32(4))[1].tolist() == [4]
    assert rle.decode("1 2", (np.int64(2), np.uint16(2))).sum() == 2


def test_tuples_arrays_and_bytes_are_lists_of_strings():
    texts = ("1 1", b"3 1", np.str_("2 1"))
    assert rle.decode_union(texts, (2, 2)).sum() == 3
    assert rle.decode_union(np.array(["1 1", "3 1"]), (2, 2)).sum() == 2
    assert rle.decode_batch([("1 1", "3 1"), "-1"], (2, 2)).reshape(2, -1).sum(axis=1).tolist() == [2, 0]


def test_limits_can_be_raised_and_restored():
    with limits.override(max_image_side=10):
        with pytest.raises(pneumoseg.LimitError, match="max_image_side >= 11"):
            rle.decode("-1", (11, 1))
        assert rle.decode("-1", (10, 1)).shape == (10, 1)
    assert rle.decode("-1", (11, 1)).shape == (11, 1)
    previous = limits.set_limits(max_rle_chars=3)
    try:
        with pytest.raises(pneumoseg.RLEError, match="max_rle_chars"):
            rle.decode("1 1 1", (4, 4))
    finally:
        limits.set_limits(max_rle_chars=previous.max_rle_chars)
    assert rle.decode("1 1 1 1", (4, 4)).sum() == 2


def test_limit_overrides_in_threads_may_end_in_any_order():
    # Restoring "the limits before my block" is wrong when blocks in two threads interleave: the
    # first to end would undo the other's change, and the last would leave the first's in force.
    import threading

    entered = [threading.Event(), threading.Event()]
    leave = [threading.Event(), threading.Event()]
    left = [threading.Event(), threading.Event()]
    seen = {}

    def block(i: int, side: int) -> None:
        with limits.override(max_image_side=side):
            entered[i].set()
            leave[i].wait(10)
        left[i].set()

    threads = [threading.Thread(target=block, args=(0, 100)), threading.Thread(target=block, args=(1, 200))]
    threads[0].start()
    entered[0].wait(10)
    threads[1].start()
    entered[1].wait(10)
    seen["both open"] = limits.current().max_image_side
    leave[0].set()
    left[0].wait(10)
    seen["the first ended"] = limits.current().max_image_side
    with limits.override(max_rle_chars=7):
        seen["nested"] = (limits.current().max_image_side, limits.current().max_rle_chars)
    leave[1].set()
    for t in threads:
        t.join(10)
    assert seen == {"both open": 200, "the first ended": 200, "nested": (200, 7)}
    assert limits.current() == limits.Limits()


def test_limits_from_the_environment(monkeypatch):
    monkeypatch.setenv("PNEUMOSEG_MAX_IMAGE_PIXELS", "1_000")
    try:
        assert limits.reset().max_image_pixels == 1000
        with pytest.raises(pneumoseg.LimitError, match="PNEUMOSEG_MAX_IMAGE_PIXELS"):
            rle.decode("-1", (100, 11))
        monkeypatch.setenv("PNEUMOSEG_MAX_IMAGE_PIXELS", "lots")
        with pytest.raises(pneumoseg.InvalidInputError, match="PNEUMOSEG_MAX_IMAGE_PIXELS must be a positive integer"):
            limits.reset()
    finally:
        monkeypatch.delenv("PNEUMOSEG_MAX_IMAGE_PIXELS")
        limits.reset()
    assert limits.current() == limits.Limits()


def test_limits_reset_refused_by_the_environment_changes_nothing(monkeypatch):
    # A reset() refused for a bad variable once left the process unable to set_limits (a TypeError).
    previous = limits.set_limits(max_image_side=300)
    try:
        monkeypatch.setenv("PNEUMOSEG_MAX_IMAGE_SIDE", "lots")
        with pytest.raises(pneumoseg.InvalidInputError, match="PNEUMOSEG_MAX_IMAGE_SIDE must be a positive integer"):
            limits.reset()
        assert limits.current().max_image_side == 300
        assert limits.set_limits(max_rle_chars=9).max_rle_chars == previous.max_rle_chars
        assert (limits.current().max_image_side, limits.current().max_rle_chars) == (300, 9)
    finally:
        monkeypatch.delenv("PNEUMOSEG_MAX_IMAGE_SIDE")
        limits.reset()
    assert limits.current() == limits.Limits()


# --- the checking layer itself ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, np.bool_(False), "1", b"1", None, [1.0], float("nan"), float("inf"), 1j,
                                   np.array([1.0, 2.0]), torch.tensor([1.0, 2.0]), torch.tensor(True)])
def test_check_real_refuses(value):
    with pytest.raises(pneumoseg.InvalidInputError, match="^x must be"):
        check_real(value, "x")


@pytest.mark.parametrize("value", [True, 2.0, "2", None, 2**63, -1, np.float64(2), torch.tensor(2.5)])
def test_check_int_refuses(value):
    with pytest.raises(pneumoseg.InvalidInputError, match="^n must be"):
        check_int(value, "n", low=0)


HUGE = 10**5000  # past Python's 4300-digit limit on str(int): repr() of it raises ValueError


@pytest.mark.parametrize("call, error, match", [
    (lambda: rle.decode("-1", (HUGE, 4)), pneumoseg.RLEError, "shape.0. must be at most .*, got an integer of 16,610 bits"),
    (lambda: rle.decode_batch(["-1"], (4, -HUGE)), pneumoseg.RLEError, "got a negative integer of 16,610 bits"),
    (lambda: limits.set_limits(max_image_side=HUGE), pneumoseg.InvalidInputError, "max_image_side .* got an integer of"),
    (lambda: metrics.best_triplet(np.zeros((1, 8, 8)), np.zeros((1, 8, 8)), min_areas=[-HUGE]),
     pneumoseg.InvalidInputError, "min_areas value must be a non-negative integer, got a negative integer of"),
    (lambda: check_shape([(HUGE,), 4], "s"), pneumoseg.InvalidInputError, "too large to print"),
])
def test_an_integer_too_long_to_print_is_described_in_the_error(call, error, match):
    # The error message itself raised Python's ValueError ("Exceeds the limit (4300 digits) for
    # integer string conversion") instead of the error naming the argument.
    with pytest.raises(error, match=match):
        call()


def test_checks_accept_and_normalise():
    assert check_real(np.float32(0.25), "x") == 0.25 and type(check_real(1, "x")) is float
    assert check_int(np.uint8(7), "n") == 7 and check_int(torch.tensor(7), "n") == 7
    assert check_int(2**70, "n", saturate=True) == 2**63 - 1
    assert check_bool(np.bool_(True), "f") is True and check_bool(None, "f", allow_none=True) is None
    assert check_choice(np.int64(4), "c", (4, 8)) == 4
    assert check_shape([np.int16(3), 4], "s") == (3, 4)
    assert check_image_size(5, "size") == (5, 5) and check_image_size((3, 4), "size") == (3, 4)
    assert check_str_sequence(("a", "b"), "s") == ["a", "b"]
    assert check_probability(1, "p") == 1.0
    assert str(check_path("a/b", "p")) == "a/b"
    with pytest.raises(pneumoseg.InvalidInputError, match="wrap it in a list"):
        check_str_sequence("abc", "s")
    with pytest.raises(pneumoseg.InvalidInputError, match=r"\(0, 1\]"):
        check_real(0, "x", low=0, high=1, low_open=True)
