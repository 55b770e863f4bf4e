"""A hostile user's review of the metrics, the RLE codec, the post-processing and the SIIM CSV reader:
each test is a problem the review found (a crash, a silent wrong answer or an unclear exception).
Crash cases run in a child process, so a segfault fails one test instead of the run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pneumoseg
from pneumoseg import metrics
from pneumoseg import postprocess as pp
from pneumoseg import rle
from pneumoseg.data import read_rle_csv
from isolated import run_isolated

torch = pytest.importorskip("torch")


def check(code: str) -> None:
    result = run_isolated(code)
    assert result.returncode == 0 and "OK" in result.stdout, result.describe()


# --------------------------------------------------------------- tensors without readable memory

_NATIVE_CALLS = {
    "rle.encode": "rle.encode(img)",
    "rle.encode_batch": "rle.encode_batch(x)",
    "label_components": "pp.label_components(x)",
    "remove_small_components": "pp.remove_small_components(x, 3)",
    "triplet_threshold": "pp.triplet_threshold(x)",
    "postprocess": "pp.postprocess(x)",
    "gate": "pp.gate(x, [0.9, 0.1], 0.5)",
    "gate scores": "pp.gate(torch.ones(2, 5, 7), vec, 0.5)",
    "dice_per_image": "metrics.dice_per_image(x, torch.zeros(2, 64, 64))",
    "overlap_counts truth": "metrics.overlap_counts(torch.zeros(2, 64, 64), x)",
    "roc_auc": "metrics.roc_auc([0, 1], vec)",
    "best_triplet": "metrics.best_triplet(x, torch.zeros(2, 64, 64), tops=[0.5], min_areas=[0], bottoms=[0.3])",
}


def _each_call(setup: str, expected: str) -> str:
    """A child program that makes every call of _NATIVE_CALLS after ``setup`` and prints the name of
    each that raised InvalidInputError naming ``expected`` (a crash stops at the call printed last)."""
    lines = [setup]
    for name, call in _NATIVE_CALLS.items():
        lines += [f"print('calling {name}', flush=True)",
                  "try:", f"    {call}", f"    print('not refused: {name}')",
                  "except pneumoseg.InvalidInputError as exc:",
                  f"    assert {expected!r} in str(exc), exc", f"    print('refused: {name}')"]
    return "\n".join(lines) + "\n"


def _check_each_call(setup: str, expected: str) -> None:
    result = run_isolated(_each_call(setup, expected))
    refused = [line for line in result.stdout.splitlines() if line.startswith("refused: ")]
    assert result.returncode == 0 and len(refused) == len(_NATIVE_CALLS), result.describe()


def test_a_fake_tensor_is_refused_not_read():
    # FakeTensors (FakeTensorMode, make_fx, torch.compile's tracing) report device "cpu" but hold no
    # data: the native core read through their null pointer (a segfault in rle.encode, every
    # post-processing function), and the metrics raised a bare RuntimeError from .numpy().
    _check_each_call("""
import warnings
warnings.simplefilter("error")  # torch warns when a FakeTensor's data pointer is read
import torch, pneumoseg
from pneumoseg import rle, metrics, postprocess as pp
from torch._subclasses.fake_tensor import FakeTensorMode
FakeTensorMode().__enter__()
x, img, vec = torch.zeros(2, 64, 64), torch.zeros(64, 64), torch.zeros(2)
""", "FakeTensor")


def test_a_tensor_whose_storage_was_freed_is_refused_not_read():
    # A storage resized to 0 (as FSDP frees parameters) leaves a tensor with its shape and a null or
    # dangling data pointer: the native core segfaulted, the metrics read freed memory through NumPy.
    # (torch's own operators segfault on such a tensor too, so nothing but the call touches it.)
    _check_each_call("""
import torch, pneumoseg
from pneumoseg import rle, metrics, postprocess as pp
x, img, vec = torch.zeros(2, 64, 64), torch.zeros(64, 64), torch.zeros(2)
for t in (x, img, vec):
    t.untyped_storage().resize_(0)
""", "storage")


def test_valid_views_still_pass_the_storage_check():
    base = torch.zeros(3, 10, 12)
    base[:, 2:5, 3:9] = 0.9
    for view in (base[1:], base[:, 1:, 2:], base.flip(1), base.transpose(1, 2), base[:1].expand(4, 10, 12),
                 torch.zeros(0, 5, 5), base[:, ::2, ::3]):
        np.testing.assert_array_equal(pp.postprocess(view, top=None).numpy(),
                                      pp.postprocess(view.contiguous(), top=None).numpy())
        assert rle.encode_batch(view) == rle.encode_batch(view.contiguous())
        np.testing.assert_array_equal(metrics.dice_per_image(view, view > 0.5, threshold=0.5).numpy(),
                                      metrics.dice_per_image(view.contiguous(), view > 0.5, threshold=0.5).numpy())


# ----------------------------------------------------------------------------------- classifier metrics


def _pairs_auc(labels, scores) -> float:
    """The Mann-Whitney definition over all pairs, in exact Python integers."""
    pos = [s for y, s in zip(labels, scores) if y]
    neg = [s for y, s in zip(labels, scores) if not y]
    twice = sum(2 if a > b else 1 if a == b else 0 for a in pos for b in neg)
    return twice / (2 * len(pos) * len(neg))


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_integer_scores_are_ranked_exactly(dtype):
    # Integer scores (counts, fixed-point logits) were cast to float64, which merges integers above
    # 2**53 into ties: a perfectly wrong ranking scored 0.5 instead of 0.
    base = 2**62 if dtype == np.int64 else 2**63
    scores = np.array([base + 3, base + 2, base + 1, base], dtype=dtype)
    labels = [0, 0, 1, 1]
    expected = _pairs_auc(labels, [int(s) for s in scores])
    assert expected == 0.0
    assert metrics.roc_auc(labels, scores) == expected
    assert metrics.average_precision(labels, scores) == pytest.approx(0.5 * (1 / 3) + 0.5 * (2 / 4))
    fpr, tpr, thresholds = metrics.roc_curve(labels, scores, drop_intermediate=False)
    assert tpr.tolist() == [0.0, 0.0, 0.0, 0.5, 1.0]
    precision, recall, _ = metrics.precision_recall_curve(labels, scores)
    assert recall.tolist() == [1.0, 0.5, 0.0, 0.0, 0.0]


def test_integer_scores_extremes_do_not_wrap():
    # -s of the int64 minimum and of any uint64 wraps around: sorting by it misorders
    scores = np.array([np.iinfo(np.int64).min, 0, np.iinfo(np.int64).max], dtype=np.int64)
    assert metrics.roc_auc([0, 1, 1], scores) == 1.0
    assert metrics.roc_auc([1, 0, 0], scores) == 0.0
    uscores = np.array([0, 1, np.iinfo(np.uint64).max], dtype=np.uint64)
    assert metrics.roc_auc([0, 1, 1], uscores) == 1.0


def test_thresholding_integer_scores_is_exact():
    scores = np.array([2**53 + 1, 2**53], dtype=np.int64)
    # score >= 2**53 + 1 holds for the first only; as float64 both were 2**53
    np.testing.assert_array_equal(metrics.confusion_matrix([0, 1], scores, threshold=2**53 + 1), [[0, 1], [1, 0]])
    # a float threshold too: 2**53 + 3 >= 2**53 + 4 is false, but as float64 it was 2**53 + 4
    scores = np.array([2**53 + 4, 2**53 + 3], dtype=np.int64)
    np.testing.assert_array_equal(metrics.confusion_matrix([0, 1], scores, threshold=float(2**53 + 4)),
                                  [[0, 1], [1, 0]])
    np.testing.assert_array_equal(metrics.confusion_matrix([0, 1], scores, threshold=np.float64(2**53 + 3.5)),
                                  [[0, 1], [1, 0]])
    np.testing.assert_array_equal(metrics.confusion_matrix([0, 1], scores, threshold=-0.5), [[0, 1], [0, 1]])


def test_float_scores_still_match_sklearn_with_ties():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200), 1)  # many ties
    assert metrics.roc_auc(labels, scores) == pytest.approx(sk.roc_auc_score(labels, scores), abs=1e-15)
    assert metrics.average_precision(labels, scores) == pytest.approx(
        sk.average_precision_score(labels, scores), abs=1e-15)
    assert metrics.roc_auc(labels, scores.astype(np.float16)) == pytest.approx(
        sk.roc_auc_score(labels, scores.astype(np.float16)), abs=1e-15)


@pytest.mark.parametrize("threshold", [np.array(0.5), "tensor"])
def test_metrics_take_a_threshold_as_a_zero_dim_array_or_one_element_tensor(threshold):
    # as the post-processing does; the metrics refused them as "must be a finite number, got tensor(0.5)"
    if threshold == "tensor":
        threshold = torch.tensor(0.5)
    labels, scores = [0, 1, 1], [0.2, 0.7, 0.4]
    assert metrics.sensitivity_specificity(labels, scores, threshold=threshold) == (0.5, 1.0)
    assert metrics.dice_per_image(np.array([[0.7, 0.2]]), np.array([[1, 0]]), threshold=threshold) == 1.0


def test_metrics_refuse_a_many_element_threshold_clearly():
    with pytest.raises(pneumoseg.InvalidInputError, match="threshold"):
        metrics.confusion_matrix([0, 1], [0.2, 0.7], threshold=np.array([0.5, 0.6]))


# -------------------------------------------------------------------------------- post-processing


def test_postprocess_to_rle_of_one_image_is_one_string():
    # A (H, W) input is answered as one image everywhere (masks (H, W), the component count a scalar)
    # except to_rle, which gave a one-item list: f"{image_id},{rle}" then wrote "['0 1 4 2']".
    probs = np.zeros((4, 5), np.float32)
    probs[1:3, 1:4] = 0.9
    text = pp.postprocess(probs, min_area=1, to_rle=True)
    assert isinstance(text, str) and text == rle.encode(pp.postprocess(probs, min_area=1))
    text, count = pp.postprocess(probs, min_area=1, to_rle=True, return_components=True)
    assert isinstance(text, str) and count == 1
    assert pp.postprocess(probs[None], min_area=1, to_rle=True) == [text]


# ------------------------------------------------------------------------------------- SIIM CSV


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "train-rle.csv"
    path.write_bytes(text.encode("utf-8"))
    return path


def test_a_string_that_paints_nothing_reads_as_negative(tmp_path):
    # "5 0" (zero-length runs only) decodes to an empty mask but was kept as is, and every consumer
    # (datasets, cache, evaluate) calls an image positive when a string is not "-1": a positive
    # label with an empty mask
    rles = read_rle_csv(_csv(tmp_path, "ImageId,EncodedPixels\na,5 0\nb,0 0 3 0\nc,5 0 1 2\n"))
    assert rles == {"a": ["-1"], "b": ["-1"], "c": ["5 0 1 2"]}
    assert rle.decode_union(rles["c"], (4, 4)).sum() == 2


@pytest.mark.parametrize("header", ["id,rle", "EncodedPixels,ImageId", "ImageId,Mask"])
def test_a_wrong_header_is_named_as_such(tmp_path, header):
    with pytest.raises(pneumoseg.DataFormatError, match="line 1.*header"):
        read_rle_csv(_csv(tmp_path, f"{header}\na,-1\n"))


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"])
def test_csv_line_ends_bom_and_spaces_stay_accepted(tmp_path, ending):
    text = ending.join(["\ufeffImageId, EncodedPixels", "a, -1", "b, 1 2 3 4", '"b"," 10 2 "', "c,", ""])
    assert read_rle_csv(_csv(tmp_path, text)) == {"a": ["-1"], "b": ["1 2 3 4", "10 2"], "c": ["-1"]}


def test_a_bad_line_is_still_named_after_blank_and_crlf_lines(tmp_path):
    path = _csv(tmp_path, "ImageId,EncodedPixels\r\n\r\na,-1\r\nb,1 x\r\n")
    with pytest.raises(pneumoseg.DataFormatError, match="line 4: EncodedPixels has a bad token 'x'"):
        read_rle_csv(path)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "train-rle.csv"
    path.write_bytes(b"ImageId,EncodedPixels\na,-1\nb\xff,-1\n")
    with pytest.raises(pneumoseg.DataFormatError, match="not UTF-8"):
        read_rle_csv(path)


def test_reading_a_large_csv_keeps_memory_near_the_result():
    # The reader held the file's bytes, their decoded text and a list of all its lines at once:
    # about 3.4x the file at peak (684 MB for a 200 MB file). Line by line, it holds the result
    # plus one line.
    check("""
        import pneumoseg, tempfile, os
        from pneumoseg.data import read_rle_csv
        row = " ".join(str(7 + i % 900) for i in range(400))
        path = os.path.join(tempfile.mkdtemp(), "big.csv")
        with open(path, "w") as f:
            f.write("ImageId, EncodedPixels\\n")
            for i in range(40000):  # about 64 MB
                f.write(f"1.2.276.0.7230010.3.1.4.8323329.{i}.1517875188.959090, {row}\\n")
        size = os.path.getsize(path)
        before = rss_bytes()
        limit_memory(int(size * 2.2) // 2**20)
        rles = read_rle_csv(path)
        assert len(rles) == 40000 and rles["1.2.276.0.7230010.3.1.4.8323329.7.1517875188.959090"] == [row]
        print("OK")
    """)
