from __future__ import annotations

import csv
import re
import subprocess
import sys

import numpy as np
import pytest

import pneumoseg
from factories import blocky_mask, pneumothorax_blob, random_mask
from pneumoseg import rle
from pneumoseg._native import _C, as_view
from reference import competition_mask2rle, ref_decode, ref_encode

STYLES = ["siim", "absolute"]
SHAPES = [(1, 1), (1, 7), (9, 1), (4, 4), (5, 3), (31, 33), (32, 32), (33, 65), (97, 45), (64, 1025)]


def units_twin(masks: np.ndarray, style: str) -> list[str]:
    """The CUDA encoder's algorithm run serially on the CPU."""
    return _C.rle_encode_units_cpu(as_view(masks, "masks").view, {"siim": 0, "absolute": 1}[style])


def edge_masks(shape):
    h, w = shape
    empty = np.zeros(shape, np.uint8)
    full = np.ones(shape, np.uint8)
    last = empty.copy()
    last[-1, -1] = 1
    first = empty.copy()
    first[0, 0] = 1
    bottom_row = empty.copy()
    bottom_row[-1, :] = 1
    top_row = empty.copy()
    top_row[0, :] = 1
    last_column = empty.copy()
    last_column[:, -1] = 1
    return [empty, full, last, first, bottom_row, top_row, last_column]


# --- the format itself ----------------------------------------------------------------------------


def test_spec_example_4x4():
    expected = np.zeros((4, 4), np.uint8)
    expected[1, 0] = expected[2, 0] = expected[1, 1] = 1
    np.testing.assert_array_equal(rle.decode("1 2 2 1", (4, 4)), expected)
    assert rle.encode(expected) == "1 2 2 1"
    assert rle.encode(expected, style="absolute") == "2 2 6 1"


def test_reference_agrees_with_the_spec_example():
    m = ref_decode("1 2 2 1", (4, 4))
    assert m[1, 0] == m[2, 0] == m[1, 1] == 1 and m.sum() == 3
    assert ref_encode(m) == "1 2 2 1"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.02, 0.5, 0.97])
def test_encode_matches_competition_mask2rle(shape, density):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1] + int(density * 100))
    mask = random_mask(rng, shape, density)
    mask[-1, -1] = 0  # the competition's function drops a run that touches the last pixel
    h, w = shape
    assert rle.encode(mask) == (competition_mask2rle(mask.T * 255, w, h) or "-1")


def test_encode_matches_competition_mask2rle_on_1024_blob():
    blob = pneumothorax_blob()
    assert rle.encode(blob) == competition_mask2rle(blob.T * 255, 1024, 1024)


def test_encode_keeps_run_touching_last_pixel_unlike_competition_code():
    mask = np.zeros((4, 4), np.uint8)
    mask[2:, 3] = 1
    assert rle.encode(mask) == "14 2"
    assert competition_mask2rle(mask.T * 255, 4, 4) == ""  # the bug we do not copy
    np.testing.assert_array_equal(rle.decode("14 2", (4, 4)), mask)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("shape", SHAPES)
def test_encode_random_against_reference(shape, style):
    rng = np.random.default_rng(sum(shape))
    for density in (0.01, 0.3, 0.5, 0.9):
        m = random_mask(rng, shape, density)
        assert rle.encode(m, style=style) == ref_encode(m, style)
    m = blocky_mask(rng, shape)
    assert rle.encode(m, style=style) == ref_encode(m, style)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1), (3, 5), (64, 33)])
def test_edge_masks(shape, style):
    for m in edge_masks(shape):
        expected = ref_encode(m, style)
        assert rle.encode(m, style=style) == expected
        assert units_twin(m[None], style) == [expected]
        np.testing.assert_array_equal(rle.decode(expected, shape, style=style), m)


def test_empty_and_full_strings():
    assert rle.encode(np.zeros((5, 7))) == "-1"
    assert rle.encode(np.zeros((5, 7)), style="absolute") == ""
    assert rle.encode(np.ones((5, 7))) == "0 35"
    assert rle.encode(np.ones((5, 7)), style="absolute") == "1 35"
    assert rle.encode(np.zeros((0, 7))) == "-1"


def test_1024_blob_is_realistic_and_exact():
    blob = pneumothorax_blob()
    runs = len(ref_encode(blob).split()) // 2
    assert 10_000 < blob.sum() < 100_000 and 100 < runs < 400
    assert rle.encode(blob) == ref_encode(blob)
    np.testing.assert_array_equal(rle.decode(rle.encode(blob)), blob)


# --- dtypes, layouts and frameworks ------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [np.bool_, np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
              np.float16, np.float32, np.float64]
)
def test_any_dtype_nonzero_is_foreground(dtype):
    rng = np.random.default_rng(3)
    base = random_mask(rng, (37, 29), 0.4)
    values = np.where(base == 1, 255 if dtype not in (np.bool_, np.int8) else 1, 0).astype(dtype)
    assert rle.encode(values) == ref_encode(base)


def test_float_values_negative_fraction_nan_are_foreground():
    m = np.zeros((3, 3), np.float32)
    m[0, 0], m[1, 1], m[2, 2] = -3.0, 0.25, np.nan
    m[0, 1] = -0.0  # negative zero is zero
    assert rle.encode(m) == ref_encode(np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]]))


@pytest.mark.parametrize("layout", ["transposed", "step", "flipped", "fortran", "broadcast_row"])
def test_strided_views(layout):
    rng = np.random.default_rng(5)
    big = random_mask(rng, (60, 70), 0.3)
    view = {
        "transposed": big.T,
        "step": big[::3, 1::2],
        "flipped": big[::-1, ::-1],
        "fortran": np.asfortranarray(big),
        "broadcast_row": np.broadcast_to(big[7], (20, 70)),
    }[layout]
    assert rle.encode(view) == ref_encode(np.ascontiguousarray(view))
    assert units_twin(view[None], "siim") == [ref_encode(np.ascontiguousarray(view))]


def test_torch_cpu_tensors_and_bfloat16():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    m = random_mask(rng, (3, 41, 19), 0.5)
    expected = [ref_encode(x) for x in m]
    assert rle.encode_batch(torch.from_numpy(m)) == expected
    assert rle.encode_batch(torch.from_numpy(m).to(torch.bfloat16) * 0.5) == expected
    assert rle.encode_batch(torch.from_numpy(m).bool().transpose(1, 2)) == [ref_encode(x.T) for x in m]
    assert rle.encode(torch.from_numpy(m[0]).float().requires_grad_()) == expected[0]


def test_big_endian_numpy():
    m = random_mask(np.random.default_rng(9), (8, 9)).astype(">i4")
    assert rle.encode(m) == ref_encode(m.astype(np.int32))


# --- batches ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 17])
@pytest.mark.parametrize("style", STYLES)
def test_encode_batch_equals_single(n, style):
    rng = np.random.default_rng(n)
    masks = random_mask(rng, (n, 33, 20), 0.3)
    masks[0] = 0
    expected = [ref_encode(m, style) for m in masks]
    assert rle.encode_batch(masks, style=style) == expected
    assert units_twin(masks, style) == expected


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (33, 20), (64, 3), (65, 2)])
@pytest.mark.parametrize("style", STYLES)
def test_batch_scans_restart_at_every_image(shape, style):
    """The encoder scans the whole batch at once (CUDA, and the serial units twin that mirrors it):
    transitions of one image must never count in the next. Neighbouring images here end and begin on
    foreground, are full, empty or hold one pixel at either end."""
    h, w = shape
    full, empty = np.ones(shape, np.uint8), np.zeros(shape, np.uint8)
    first, last = empty.copy(), empty.copy()
    first[0, 0], last[-1, -1] = 1, 1
    rng = np.random.default_rng(h * 100 + w)
    masks = np.stack([full, full, last, first, empty, full, random_mask(rng, shape, 0.5), last, last, empty, first])
    expected = [ref_encode(m, style) for m in masks]
    assert units_twin(masks, style) == expected
    assert rle.encode_batch(masks, style=style) == expected
    if pneumoseg.cuda_available():
        torch = pytest.importorskip("torch")
        assert rle.encode_batch(torch.from_numpy(masks).cuda(), style=style) == expected


def test_encode_batch_threads_on_large_batch():
    rng = np.random.default_rng(11)
    masks = random_mask(rng, (12, 512, 512), 0.01)  # big enough to be split across threads
    assert rle.encode_batch(masks) == [ref_encode(m) for m in masks]


def test_encode_batch_of_zero_and_ragged_list():
    assert rle.encode_batch(np.zeros((0, 5, 5), np.uint8)) == []
    rng = np.random.default_rng(12)
    a, b = random_mask(rng, (4, 6)), random_mask(rng, (7, 3))
    assert rle.encode_batch([a, b]) == [ref_encode(a), ref_encode(b)]
    assert rle.encode_batch([a, a]) == [ref_encode(a)] * 2


@pytest.mark.parametrize("style", STYLES)
def test_decode_batch_and_union(style):
    rng = np.random.default_rng(13)
    masks = random_mask(rng, (5, 21, 34), 0.3)
    strings = [ref_encode(m, style) for m in masks]
    out = rle.decode_batch(strings, (21, 34), style=style)
    assert out.dtype == np.uint8 and out.shape == (5, 21, 34)
    np.testing.assert_array_equal(out, masks)
    union = rle.decode_union(strings[:3], (21, 34), style=style)
    np.testing.assert_array_equal(union, masks[:3].max(axis=0))
    mixed = rle.decode_batch([strings[0], strings[1:4], "-1"], (21, 34), style=style)
    np.testing.assert_array_equal(mixed[1], masks[1:4].max(axis=0))
    assert mixed[2].sum() == 0
    assert rle.decode_batch([], (3, 3)).shape == (0, 3, 3)


@pytest.mark.parametrize("text", ["-1", " -1", "", "   ", "\t-1\n", " -1 "])
def test_decode_empty_forms(text):
    for style in STYLES:
        out = rle.decode(text, (6, 4), style=style)
        assert out.shape == (6, 4) and out.sum() == 0


def test_decode_whitespace_and_bytes():
    expected = ref_decode("1 2 2 1", (4, 4))
    for text in ["  1 2 2 1  ", "1\t2\n2  1", b"1 2 2 1", "\n1 2 2 1\r\n"]:
        np.testing.assert_array_equal(rle.decode(text, (4, 4)), expected)


def test_decode_zero_length_run_is_a_no_op():
    np.testing.assert_array_equal(rle.decode("3 0 1 2", (4, 4)), ref_decode("4 2", (4, 4)))


def test_default_shape_is_1024():
    assert rle.decode("-1").shape == (1024, 1024)


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, match",
    [
        ("1 2 x 4", r"token 2 \('x'\) is not a non-negative integer"),
        ("1 2 3", r"odd number of values \(3\)"),
        ("1 -2", r"token 1 \('-2'\) is negative"),
        ("-1 5", r"token 0 \('-1'\) is negative"),
        ("0 17", r"leaves the 4x4 image"),
        ("10 3 3 2", r"run 1 .* leaves the 4x4 image"),
        ("1.5 2", r"token 0 \('1.5'\) is not"),
        ("1e3 2", r"token 0 \('1e3'\) is not"),
        ("99999999999999999999999 1", r"too large"),
        ("1,2", r"not a non-negative integer"),
        ("\u0661 2", r"not a non-negative integer"),
    ],
)
def test_decode_errors_name_the_token(text, match):
    with pytest.raises(pneumoseg.RLEError, match=match):
        rle.decode(text, (4, 4))


def test_absolute_style_start_zero_is_an_error():
    with pytest.raises(pneumoseg.RLEError, match="1-based"):
        rle.decode("0 2", (4, 4), style="absolute")


def test_errors_are_value_errors_and_name_the_argument():
    assert issubclass(pneumoseg.RLEError, ValueError) and issubclass(pneumoseg.RLEError, pneumoseg.PneumosegError)
    with pytest.raises(pneumoseg.RLEError, match="mask must be 2-D"):
        rle.encode(np.zeros((2, 3, 4)))
    with pytest.raises(pneumoseg.RLEError, match="masks must be 3-D"):
        rle.encode_batch(np.zeros((3, 4)))
    with pytest.raises(pneumoseg.RLEError, match="shape must be a pair"):
        rle.decode("-1", (4, 4, 4))
    with pytest.raises(pneumoseg.RLEError, match=r"shape\[1\] must be at least 0, got -1"):
        rle.decode("-1", (4, -1))
    with pytest.raises(pneumoseg.RLEError, match="shape must be a pair"):
        rle.decode("-1", 4)
    with pytest.raises(pneumoseg.RLEError, match="style must be"):
        rle.decode("-1", (4, 4), style="rowmajor")
    with pytest.raises(pneumoseg.RLEError, match="style must be"):
        rle.encode(np.zeros((2, 2)), style="coco")
    with pytest.raises(pneumoseg.RLEError, match="rle must be a str, got float"):
        rle.decode(float("nan"), (4, 4))
    with pytest.raises(pneumoseg.RLEError, match=r"rles\[1\] must be a str"):
        rle.decode_batch(["-1", None], (4, 4))
    with pytest.raises(pneumoseg.RLEError, match=r"rles\[2\]: token 0 \('x'\)"):
        rle.decode_batch(["-1", "1 1", "x 1"], (4, 4))
    with pytest.raises(pneumoseg.RLEError, match=r"rles\[1\] must be a str"):
        rle.decode_union(["-1", 3], (4, 4))
    with pytest.raises(pneumoseg.RLEError, match="unsupported dtype"):
        rle.encode(np.zeros((2, 2), np.complex64))
    with pytest.raises(pneumoseg.RLEError, match="unsupported dtype"):
        rle.encode(np.array([["a", "b"]]))
    with pytest.raises(pneumoseg.RLEError, match="device must be"):
        rle.decode_batch(["-1"], (2, 2), device="tpu")


@pytest.mark.parametrize("rles", [
    np.array([["1 1", "3 1"], ["-1", "-1"]]),      # a table: its rows were read as unions
    np.array([["1 1"], ["2 1"]], dtype=object),
    np.array("1 1"),                               # 0-d: its characters were read as images
    np.zeros((2, 2, 1), dtype="S3"),
])
def test_decode_batch_refuses_arrays_that_are_not_one_dimensional(rles):
    with pytest.raises(pneumoseg.RLEError, match=rf"rles must be a 1-D .*got an array of shape {re.escape(str(rles.shape))}"):
        rle.decode_batch(rles, (2, 2))


def test_decode_batch_refuses_unions_nested_deeper_than_one_list():
    with pytest.raises(pneumoseg.RLEError, match=r"rles\[0\]\[0\] must be a str or bytes, got list"):
        rle.decode_batch([[["1 1"]]], (2, 2))
    with pytest.raises(pneumoseg.RLEError, match=r"rles\[1\] must be a str .*got ndarray"):
        rle.decode_batch(["-1", np.array([["1 1"]])], (2, 2))
    # A 1-D array of strings and a ragged object array of unions stay accepted.
    assert rle.decode_batch(np.array(["1 1", "-1"]), (2, 2)).reshape(2, -1).sum(axis=1).tolist() == [1, 0]
    ragged = np.empty(2, dtype=object)
    ragged[:] = [["1 1", "3 1"], "-1"]
    assert rle.decode_batch(ragged, (2, 2)).reshape(2, -1).sum(axis=1).tolist() == [2, 0]


def test_cuda_device_without_a_gpu_is_a_clear_error():
    if pneumoseg.cuda_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(pneumoseg.RLEError, match="no CUDA device is available|built without CUDA support"):
        rle.decode_batch(["-1"], (2, 2), device="cuda:0")


def test_cuda_array_with_cpu_only_build_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_C, "built_with_cuda", lambda: False)
    with pytest.raises(pneumoseg.RLEError, match="built without CUDA support"):
        rle.decode_batch(["-1"], (2, 2), device="cuda")


# --- packaging ---------------------------------------------------------------------------------------


def test_import_needs_only_numpy():
    code = "import sys, pneumoseg; print(pneumoseg.cuda_available()); assert 'torch' not in sys.modules and 'cupy' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() in ("True", "False")


def test_cuda_available_is_false_without_a_device():
    assert isinstance(pneumoseg.cuda_available(), bool)
    if _C.cuda_device_count() == 0:
        assert pneumoseg.cuda_available() is False


# --- the real SIIM-ACR sample files (skipped where ../shared is absent) -------------------------------


def test_real_siim_csv_rows_round_trip_exactly(siim_sample_dir):
    with open(siim_sample_dir / "train-rle.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ImageId", " EncodedPixels"]
    positives = 0
    for image_id, encoded in rows[1:]:
        mask = rle.decode(encoded)
        text = encoded.strip()
        assert rle.encode(mask) == text, image_id
        np.testing.assert_array_equal(mask, ref_decode(text, (1024, 1024)))
        positives += mask.any()
    assert positives == 2


# --- CUDA (skipped without a GPU) --------------------------------------------------------------------


def _cuda_frameworks():
    out = []
    try:
        import torch

        if torch.cuda.is_available():
            out.append("torch")
    except ImportError:
        pass
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            out.append("cupy")
    except Exception:
        pass
    return out


def _to_cuda(a: np.ndarray, framework: str):
    if framework == "torch":
        import torch

        return torch.from_numpy(a).cuda()
    import cupy

    return cupy.asarray(a)


@pytest.mark.cuda
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (31, 33), (64, 65), (97, 45), (1024, 1024)])
def test_cuda_encode_batch_matches_reference(shape, style):
    rng = np.random.default_rng(21)
    n = 5 if shape != (1024, 1024) else 3
    masks = random_mask(rng, (n,) + shape, 0.2)
    masks[0] = 0
    if n > 2:
        masks[1] = 1
    if shape == (1024, 1024):
        masks[2] = pneumothorax_blob()
    expected = [ref_encode(m, style) if m.size < 70_000 else rle.encode(m, style=style) for m in masks]
    for fw in _cuda_frameworks():
        assert rle.encode_batch(_to_cuda(masks, fw), style=style) == expected, fw


@pytest.mark.cuda
def test_cuda_encode_dense_noise_takes_the_retry_path():
    rng = np.random.default_rng(22)
    masks = random_mask(rng, (4, 512, 512), 0.5)  # ~1 MB of text per mask, past the 16 KB window
    expected = rle.encode_batch(masks)
    for fw in _cuda_frameworks():
        assert rle.encode_batch(_to_cuda(masks, fw)) == expected


@pytest.mark.cuda
def test_cuda_encode_strided_dtypes_and_streams():
    import torch

    rng = np.random.default_rng(23)
    m = random_mask(rng, (3, 70, 90), 0.3)
    t = torch.from_numpy(m).cuda()
    expected = [ref_encode(x.T) for x in m]
    assert rle.encode_batch(t.transpose(1, 2)) == expected
    assert rle.encode_batch(t.transpose(1, 2).to(torch.bfloat16)) == expected
    assert rle.encode_batch(t.transpose(1, 2).float() * 0.5) == expected
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        u = t.transpose(1, 2) * 3  # produced on s: the encoder must read after it on the same stream
        assert rle.encode_batch(u) == expected
    assert rle.encode(t[1]) == ref_encode(m[1])
    assert rle.encode_batch(t[:0]) == []


@pytest.mark.cuda
@pytest.mark.parametrize("style", STYLES)
def test_cuda_decode_batch_matches_cpu(style):
    import torch

    rng = np.random.default_rng(24)
    masks = random_mask(rng, (6, 97, 45), 0.3)
    masks[0] = 1  # one long run, painted in pieces
    masks[1] = 0
    strings = [ref_encode(m, style) for m in masks]
    out = rle.decode_batch(strings, (97, 45), device="cuda", style=style)
    assert isinstance(out, torch.Tensor) and out.is_cuda and out.dtype == torch.uint8
    np.testing.assert_array_equal(out.cpu().numpy(), masks)
    big = rle.decode_batch([rle.encode(pneumothorax_blob()), "0 1048576"], device="cuda:0")
    assert big[0].sum().item() == pneumothorax_blob().sum() and big[1].sum().item() == 1024 * 1024
