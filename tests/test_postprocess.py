from __future__ import annotations

import numpy as np
import pytest

import pneumoseg
from factories import pneumothorax_blob, random_mask
from pneumoseg import postprocess as pp
from reference import ref_remove_small, ref_triplet, same_partition

try:
    from scipy import ndimage
except ImportError:  # the GPU machine may lack scipy: CUDA tests then check against our CPU labelling
    ndimage = None
needs_scipy = pytest.mark.skipif(ndimage is None, reason="scipy is the reference of the CPU tests")


def scipy_label(mask, connectivity):
    if ndimage is None:
        labels, areas = pp.label_components(np.asarray(mask), connectivity)
        return labels, len(areas)
    structure = np.ones((3, 3)) if connectivity == 8 else None
    return ndimage.label(mask != 0, structure=structure)


def spiral(n):
    m = np.zeros((n, n), np.uint8)
    r0, c0, r1, c1 = 0, 0, n - 1, n - 1
    while r0 <= r1 and c0 <= c1:
        m[r0, c0 : c1 + 1] = 1
        m[r0 : r1 + 1, c1] = 1
        if r1 - r0 >= 2:
            m[r1, c0 : c1 + 1] = 1
        if c1 - c0 >= 2 and r1 - r0 >= 4:
            m[r0 + 2 : r1 + 1, c0] = 1
            m[r0 + 2, c0 : c0 + 3] = 1 if c0 + 2 <= c1 else 0
        r0, c0, r1, c1 = r0 + 2, c0 + 2, r1 - 2, c1 - 2
    return m


def checkerboard(h, w):
    return ((np.add.outer(np.arange(h), np.arange(w)) % 2) == 0).astype(np.uint8)


def border_touching(h, w):
    m = np.zeros((h, w), np.uint8)
    m[0, :] = 1
    m[-1, ::2] = 1
    m[:, 0] = 1
    m[1::3, -1] = 1
    return m


CASES = {
    "empty": lambda: np.zeros((13, 17), np.uint8),
    "full": lambda: np.ones((13, 17), np.uint8),
    "single": lambda: np.pad(np.ones((1, 1), np.uint8), ((3, 5), (2, 4))),
    "corner": lambda: np.pad(np.ones((1, 1), np.uint8), ((0, 6), (6, 0))),
    "checker": lambda: checkerboard(16, 23),
    "spiral": lambda: spiral(41),
    "border": lambda: border_touching(19, 31),
    "row": lambda: np.ones((1, 37), np.uint8),
    "column": lambda: np.ones((29, 1), np.uint8),
    "1x1": lambda: np.ones((1, 1), np.uint8),
    "blob": lambda: pneumothorax_blob(256),
}


@needs_scipy
@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_label_components_structured(case, connectivity):
    mask = CASES[case]()
    labels, areas = pp.label_components(mask, connectivity)
    ref, k = scipy_label(mask, connectivity)
    assert labels.dtype == np.int32 and labels.shape == mask.shape
    assert same_partition(labels, ref)
    assert labels.max() == k == len(areas)
    np.testing.assert_array_equal(labels, ref)  # the same raster order as scipy
    np.testing.assert_array_equal(areas, np.bincount(ref.ravel(), minlength=k + 1)[1:])


def test_checkerboard_differs_between_connectivities():
    m = checkerboard(6, 6)
    assert pp.label_components(m, 8)[1].tolist() == [18]
    assert pp.label_components(m, 4)[1].tolist() == [1] * 18


@needs_scipy
@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.45, 0.59, 0.7, 0.95])
@pytest.mark.parametrize("shape", [(1, 1), (1, 50), (50, 1), (31, 47), (64, 64), (97, 130)])
def test_label_components_random_against_scipy(shape, density, connectivity):
    rng = np.random.default_rng(int(density * 100) + shape[0] * 7 + shape[1])
    mask = random_mask(rng, shape, density)
    labels, areas = pp.label_components(mask, connectivity)
    ref, k = scipy_label(mask, connectivity)
    np.testing.assert_array_equal(labels, ref)
    np.testing.assert_array_equal(areas, np.bincount(ref.ravel(), minlength=k + 1)[1:])


@needs_scipy
def test_label_components_batch_dtypes_and_strides():
    rng = np.random.default_rng(3)
    masks = random_mask(rng, (5, 40, 33), 0.5)
    labels, areas = pp.label_components(masks.astype(np.float32) * 0.5)
    assert labels.shape == masks.shape and len(areas) == 5
    for i in range(5):
        ref, k = scipy_label(masks[i], 8)
        np.testing.assert_array_equal(labels[i], ref)
        assert len(areas[i]) == k
    lt, _ = pp.label_components(masks.transpose(0, 2, 1))
    for i in range(5):
        np.testing.assert_array_equal(lt[i], scipy_label(masks[i].T, 8)[0])


@needs_scipy
def test_label_components_torch_in_torch_out():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    m = random_mask(rng, (2, 20, 30), 0.5)
    labels, areas = pp.label_components(torch.from_numpy(m).bool())
    assert isinstance(labels, torch.Tensor) and labels.dtype == torch.int32
    np.testing.assert_array_equal(labels[1].numpy(), scipy_label(m[1], 8)[0])
    labels, _ = pp.label_components(torch.from_numpy(m).to(torch.bfloat16))
    np.testing.assert_array_equal(labels[0].numpy(), scipy_label(m[0], 8)[0])


@needs_scipy
@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("min_area", [0, 1, 2, 5, 40])
def test_remove_small_components(min_area, connectivity):
    rng = np.random.default_rng(min_area)
    masks = random_mask(rng, (4, 45, 38), 0.4)
    out = pp.remove_small_components(masks, min_area, connectivity)
    np.testing.assert_array_equal(out, ref_remove_small(masks, min_area, connectivity))
    np.testing.assert_array_equal(pp.remove_small_components(masks[0], min_area, connectivity), out[0])


@pytest.mark.parametrize("top, min_area, bottom", [(0.75, 20, 0.3), (0.5, 0, 0.5), (0.9, 500, 0.1), (1.0, 1, 0.0)])
def test_triplet_threshold_against_reference(top, min_area, bottom):
    rng = np.random.default_rng(7)
    probs = rng.random((6, 30, 40)).astype(np.float32) ** 3
    probs[2] = 0.99
    out = pp.triplet_threshold(probs, top=top, min_area=min_area, bottom=bottom)
    np.testing.assert_array_equal(out, ref_triplet(probs, top, min_area, bottom))


def test_gate():
    rng = np.random.default_rng(8)
    masks = random_mask(rng, (4, 10, 12), 0.5)
    out = pp.gate(masks, [0.9, 0.1, 0.5, 0.49], 0.5)
    np.testing.assert_array_equal(out[0], masks[0])
    assert out[1].sum() == 0 and out[3].sum() == 0
    np.testing.assert_array_equal(out[2], masks[2])



def _thresholds_between_steps(dtype):
    """Scores one step apart in ``dtype`` and thresholds a quarter and three quarters of a step above
    the middle one (float64 values that are not ``dtype`` values), plus 0.7."""
    s = np.array(0.625, dtype)
    step = float(np.nextafter(s, np.array(1, dtype))) - float(s)
    scores = np.array([np.nextafter(s, np.array(0, dtype)), s, np.nextafter(s, np.array(1, dtype)),
                       np.array(0.7, dtype)], dtype)
    return scores, [float(s) + step / 4, float(s) + 3 * step / 4, 0.7]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gate_compares_in_the_scores_dtype_numpy(dtype):
    # The CPU compares as NumPy does (NEP 50: the threshold cast to the array's dtype), as CUDA
    # does in torch / CuPy: a threshold less than half a step above a score keeps its image.
    masks = np.ones((4, 3, 5), np.uint8)
    scores, thresholds = _thresholds_between_steps(dtype)
    for threshold in thresholds:
        expected = scores >= threshold
        assert expected[1] == (threshold < float(scores[1]) + (float(scores[2]) - float(scores[1])) / 2)
        got = pp.gate(masks, scores, threshold).reshape(4, -1).any(axis=1)
        np.testing.assert_array_equal(got, expected)
        fused = pp.postprocess(masks.astype(np.float32), scores, top=None, bottom=0.5, gate_threshold=threshold)
        np.testing.assert_array_equal(fused.reshape(4, -1).any(axis=1), expected)
    # 0.7 is not a float32 / float16 value: the score 0.7 rounded to the dtype reaches it.
    assert pp.gate(masks, scores, 0.7)[3].all()


@pytest.mark.parametrize("dtype, step", [("float32", 2.0 ** -24), ("float16", 2.0 ** -11), ("bfloat16", 2.0 ** -8)])
def test_gate_compares_in_the_scores_dtype_torch(dtype, step):
    torch = pytest.importorskip("torch")
    masks = torch.ones((4, 3, 5), dtype=torch.uint8)
    # 0.625 and its neighbours, one step (the dtype's spacing there) apart, and 0.7 rounded.
    scores = torch.tensor([0.625 - step, 0.625, 0.625 + step, 0.7], dtype=getattr(torch, dtype))
    assert len(set(scores.tolist())) == 4
    for threshold, kept in ((0.625 + step / 4, True), (0.625 + 3 * step / 4, False), (0.7, None)):
        expected = torch.ge(scores, threshold)
        if kept is not None:
            assert bool(expected[1]) is kept
        got = pp.gate(masks, scores, threshold).reshape(4, -1).any(dim=1)
        assert got.tolist() == expected.tolist()
        fused = pp.postprocess(masks.float(), scores, top=None, bottom=0.5, gate_threshold=threshold)
        assert fused.reshape(4, -1).any(dim=1).tolist() == expected.tolist()
    assert pp.gate(masks, scores, 0.7)[3].all()


def test_gate_integer_scores_compare_exactly():
    masks = np.ones((3, 2, 2), np.uint8)
    for scores in (np.array([0, 1, 2], np.int64), np.array([0, 1, 2], np.uint8)):
        assert pp.gate(masks, scores, 0.0).reshape(3, -1).any(axis=1).tolist() == [True, True, True]
        assert pp.gate(masks, scores, 0.7).reshape(3, -1).any(axis=1).tolist() == [False, True, True]
        assert pp.gate(masks, scores, 1.0).reshape(3, -1).any(axis=1).tolist() == [False, True, True]


def test_gate_nan_scores_still_refused_after_rounding():
    with pytest.raises(pneumoseg.InvalidInputError, match="NaN"):
        pp.gate(np.ones((2, 2, 2), np.uint8), np.array([0.9, np.nan], np.float16), 0.5)

@needs_scipy
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("min_component_area", [0, 30])
@pytest.mark.parametrize("connectivity", [4, 8])
def test_postprocess_fused_equals_the_steps(from_logits, min_component_area, connectivity):
    rng = np.random.default_rng(9)
    probs = (rng.random((5, 48, 36)) ** 2).astype(np.float64)
    probs[3] = 0.95
    scores = np.array([0.9, 0.8, 0.2, 0.7, 0.6])
    expected = ref_triplet(probs, 0.75, 40, 0.3)
    expected[scores < 0.5] = 0
    if min_component_area:
        expected = ref_remove_small(expected, min_component_area, connectivity)
    x = np.log(probs / (1 - probs)) if from_logits else probs
    out = pp.postprocess(x, scores, from_logits=from_logits, top=0.75, min_area=40, bottom=0.3,
                         gate_threshold=0.5, min_component_area=min_component_area, connectivity=connectivity)
    np.testing.assert_array_equal(out, expected)
    strings = pp.postprocess(x, scores, from_logits=from_logits, top=0.75, min_area=40, bottom=0.3,
                             gate_threshold=0.5, min_component_area=min_component_area,
                             connectivity=connectivity, to_rle=True)
    assert strings == pneumoseg.rle.encode_batch(expected)


def scipy_component_counts(masks, connectivity):
    return [scipy_label(m, connectivity)[1] for m in masks]


@needs_scipy
@pytest.mark.parametrize("min_component_area", [0, 1, 30])
@pytest.mark.parametrize("connectivity", [4, 8])
def test_postprocess_counts_the_components_it_leaves(min_component_area, connectivity):
    # The count returned with the masks is what labelling the output again gives (scipy), with and
    # without the area filter, for gated, triplet-emptied, full, empty and last-pixel images.
    rng = np.random.default_rng(12)
    probs = (rng.random((8, 37, 45)) ** 2).astype(np.float32)
    probs[3] = 0.95  # one component covering everything
    probs[4] = 0.0
    probs[5] = 0.0
    probs[5, -1, -1] = 0.99  # a lone last pixel, kept only without the area filter
    probs[6] = pneumothorax_blob(64)[:37, :45] * 0.9
    scores = np.array([0.9, 0.8, 0.2, 0.7, 0.6, 0.9, 0.9, 0.95])
    for kw in (dict(top=None), dict(top=0.75, min_area=40)):
        masks, counts = pp.postprocess(probs, scores, bottom=0.3, gate_threshold=0.5, connectivity=connectivity,
                                       min_component_area=min_component_area, return_components=True, **kw)
        assert counts.dtype == np.int32 and counts.shape == (8,)
        assert counts.tolist() == scipy_component_counts(masks, connectivity)
        np.testing.assert_array_equal(masks, pp.postprocess(probs, scores, bottom=0.3, connectivity=connectivity,
                                                            min_component_area=min_component_area, **kw))
        assert counts[2] == 0 and counts[4] == 0  # gated out; empty
    strings, counts = pp.postprocess(probs, scores, top=None, min_component_area=min_component_area,
                                     connectivity=connectivity, to_rle=True, return_components=True)
    assert strings == pp.postprocess(probs, scores, top=None, min_component_area=min_component_area,
                                     connectivity=connectivity, to_rle=True)
    assert counts.tolist() == scipy_component_counts(
        pp.postprocess(probs, scores, top=None, min_component_area=min_component_area, connectivity=connectivity),
        connectivity)


@needs_scipy
@pytest.mark.parametrize("shape", [(1, 1), (1, 57), (31, 1), (64, 64), (65, 97)])
def test_postprocess_component_counts_on_noise_and_odd_sizes(shape):
    rng = np.random.default_rng(sum(shape))
    probs = rng.random((3, *shape)).astype(np.float64)
    for connectivity in (4, 8):
        masks, counts = pp.postprocess(probs, top=None, bottom=0.5, connectivity=connectivity,
                                       return_components=True)
        assert counts.tolist() == scipy_component_counts(masks, connectivity)


def test_postprocess_component_counts_kinds_and_empty_batches():
    torch = pytest.importorskip("torch")
    probs = np.zeros((2, 9, 9), np.float32)
    probs[0, 1:3, 1:3] = probs[0, 6:8, 6:8] = 0.9
    masks, counts = pp.postprocess(torch.from_numpy(probs), top=None, return_components=True)
    assert isinstance(counts, torch.Tensor) and counts.dtype == torch.int32 and counts.tolist() == [2, 0]
    mask, count = pp.postprocess(probs[0], top=None, return_components=True)  # one 2-D map: a scalar
    assert mask.shape == (9, 9) and int(count) == 2
    for empty in (np.zeros((0, 9, 9), np.float32), np.zeros((3, 0, 9), np.float32)):
        masks, counts = pp.postprocess(empty, top=None, return_components=True)
        assert masks.shape == empty.shape and counts.tolist() == [0] * empty.shape[0]
    with pytest.raises(pneumoseg.InvalidInputError, match="return_components"):
        pp.postprocess(probs, return_components="yes")


def test_postprocess_without_triplet_or_scores():
    rng = np.random.default_rng(10)
    probs = rng.random((2, 20, 20)).astype(np.float32)
    np.testing.assert_array_equal(pp.postprocess(probs, top=None, bottom=0.5), (probs > 0.5).astype(np.uint8))


def test_postprocess_torch_half():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    probs = rng.random((3, 16, 18)).astype(np.float32)
    for dtype in (torch.float16, torch.bfloat16):
        t = torch.from_numpy(probs).to(dtype)
        out = pp.postprocess(t, top=None, bottom=0.5)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8
        np.testing.assert_array_equal(out.numpy(), (t.float().numpy() > 0.5).astype(np.uint8))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: pp.label_components(np.zeros((2, 2, 2, 2))), r"\(H, W\) or \(N, H, W\)"),
        (lambda: pp.label_components(np.zeros((3, 3)), connectivity=6), "connectivity must be one of 4, 8"),
        (lambda: pp.remove_small_components(np.zeros((3, 3)), -1), "min_area must be at least 0, got -1"),
        (lambda: pp.remove_small_components(np.zeros((3, 3)), 2.5), "min_area must be an integer, got float 2.5"),
        (lambda: pp.triplet_threshold(np.zeros((3, 3)), top=1.5), r"top must be in \[0, 1\], got 1.5"),
        (lambda: pp.triplet_threshold(np.zeros((3, 3)), bottom=-0.1), "bottom"),
        (lambda: pp.gate(np.zeros((2, 3, 3)), [0.5], 0.5), "scores has 1 values for a batch of 2"),
        (lambda: pp.gate(np.zeros((1, 3, 3)), [float("nan")], 0.5), "NaN"),
        (lambda: pp.postprocess(np.zeros((2, 3, 3)), [0.1, 0.2, 0.3]), "scores has 3 values"),
        (lambda: pp.postprocess(np.zeros((3, 3)), gate_threshold=2.0, scores=[1.0]), "gate_threshold"),
        (lambda: pp.label_components(np.zeros((3, 3), np.complex64)), "unsupported dtype"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(pneumoseg.InvalidInputError, match=match) as info:
        call()
    assert isinstance(info.value, ValueError)



def test_scores_as_bfloat16_and_float8_tensors_gate_like_float32():
    # A classifier under bf16 autocast gives bf16 scores; NumPy cannot hold them, and .numpy() raised
    # torch's TypeError.
    torch = pytest.importorskip("torch")
    probs = np.full((3, 4, 4), 0.9, np.float32)
    scores = torch.tensor([0.75, 0.25, 0.5])
    expected = pp.postprocess(probs, scores, top=None)
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        np.testing.assert_array_equal(pp.postprocess(probs, scores.to(dtype), top=None), expected)
        np.testing.assert_array_equal(pp.gate(probs, scores.to(dtype), 0.5), pp.gate(probs, scores, 0.5))


# --- CUDA (skipped without a GPU) ----------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("connectivity", [4, 8])
def test_cuda_label_components_matches_scipy(connectivity):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(20)
    masks = np.stack([random_mask(rng, (97, 130), d) for d in (0.0, 0.3, 0.45, 0.59, 0.9, 1.0)])
    masks = np.concatenate([masks, np.stack([np.pad(checkerboard(96, 129), ((0, 1), (0, 1)))])])
    labels, areas = pp.label_components(torch.from_numpy(masks).cuda(), connectivity)
    assert labels.is_cuda and labels.dtype == torch.int32
    for i, m in enumerate(masks):
        ref, k = scipy_label(m, connectivity)
        np.testing.assert_array_equal(labels[i].cpu().numpy(), ref)
        np.testing.assert_array_equal(areas[i].cpu().numpy(), np.bincount(ref.ravel(), minlength=k + 1)[1:])


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_structured_cases(case):
    torch = pytest.importorskip("torch")
    m = CASES[case]()
    for connectivity in (4, 8):
        labels, _ = pp.label_components(torch.from_numpy(m).cuda(), connectivity)
        np.testing.assert_array_equal(labels.cpu().numpy(), scipy_label(m, connectivity)[0])


# Shapes around the CUDA labeller's 32x32 tiles: one pixel wide or tall, one past a tile edge, one short
# of it, several tiles, non-square; components that snake across many tile borders.
TILE_SHAPES = [(1, 1), (1, 70), (70, 1), (31, 33), (32, 32), (33, 31), (64, 65), (97, 200), (129, 63)]


def snake(h, w):
    """One 1-pixel-wide path that turns at every other row: a single component crossing every tile."""
    m = np.zeros((h, w), dtype=np.uint8)
    m[::2] = 1
    m[1::4, -1] = 1
    m[3::4, 0] = 1
    return m


@pytest.mark.cuda
@pytest.mark.parametrize("shape", TILE_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cuda_labels_across_tile_borders_match_scipy(shape):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    masks = [random_mask(rng, shape, d) for d in (0.3, 0.5, 0.62, 0.8)]
    masks += [np.ones(shape, np.uint8), np.zeros(shape, np.uint8), snake(*shape)]
    last = np.zeros(shape, np.uint8)
    last[-1, -1] = 1
    masks.append(last)
    batch = np.stack(masks)
    for connectivity in (4, 8):
        labels, areas = pp.label_components(torch.from_numpy(batch).cuda(), connectivity)
        for i, m in enumerate(batch):
            ref, k = scipy_label(m, connectivity)
            np.testing.assert_array_equal(labels[i].cpu().numpy(), ref, err_msg=f"image {i}, {connectivity}-conn")
            np.testing.assert_array_equal(areas[i].cpu().numpy(), np.bincount(ref.ravel(), minlength=k + 1)[1:])
        # The fused post-processing (area filter over the same components) agrees with the CPU.
        probs = torch.from_numpy(batch.astype(np.float32) * 0.9).cuda()
        kw = dict(top=None, bottom=0.5, min_component_area=3, connectivity=connectivity)
        np.testing.assert_array_equal(pp.postprocess(probs, **kw).cpu().numpy(),
                                      pp.postprocess(batch.astype(np.float32) * 0.9, **kw))
        # Component counts from the final roots, with and without the area filter (0 forces passes 2-3).
        for min_area in (0, 3):
            kw = dict(top=None, bottom=0.5, min_component_area=min_area, connectivity=connectivity,
                      return_components=True)
            _, counts = pp.postprocess(probs, **kw)
            _, cpu_counts = pp.postprocess(batch.astype(np.float32) * 0.9, **kw)
            assert counts.cpu().tolist() == cpu_counts.tolist()


@pytest.mark.cuda
def test_cuda_labels_of_strided_float_maps_match_scipy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    probs = torch.from_numpy(rng.random((3, 150, 90)).astype(np.float32)).cuda()
    view = probs.transpose(1, 2)[:, ::2]  # non-contiguous, (3, 45, 150)
    labels, _ = pp.label_components(view > 0.4, 8)
    for i in range(3):
        ref, _ = scipy_label((view[i] > 0.4).cpu().numpy().astype(np.uint8), 8)
        np.testing.assert_array_equal(labels[i].cpu().numpy(), ref)


@pytest.mark.cuda
@pytest.mark.parametrize("min_component_area", [0, 30])
def test_cuda_postprocess_matches_cpu_and_stays_on_device(min_component_area):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(21)
    probs = (rng.random((6, 64, 80)) ** 2).astype(np.float32)
    probs[4] = 0.97
    scores = np.array([0.9, 0.8, 0.2, 0.7, 0.6, 0.55], dtype=np.float32)
    kw = dict(top=0.75, min_area=40, bottom=0.3, gate_threshold=0.5, min_component_area=min_component_area)
    cpu = pp.postprocess(probs, scores, **kw)
    gpu = pp.postprocess(torch.from_numpy(probs).cuda(), torch.from_numpy(scores).cuda(), **kw)
    assert gpu.is_cuda
    np.testing.assert_array_equal(gpu.cpu().numpy(), cpu)
    logits = torch.logit(torch.from_numpy(probs).double()).float().cuda()
    np.testing.assert_array_equal(pp.postprocess(logits, scores, from_logits=True, **kw).cpu().numpy(), cpu)
    strings = pp.postprocess(torch.from_numpy(probs).cuda(), scores, to_rle=True, **kw)
    assert strings == pneumoseg.rle.encode_batch(cpu)
    masks, counts = pp.postprocess(torch.from_numpy(probs).cuda(), scores, return_components=True, **kw)
    assert counts.is_cuda and counts.dtype == torch.int32
    _, cpu_counts = pp.postprocess(probs, scores, return_components=True, **kw)
    assert counts.cpu().tolist() == cpu_counts.tolist() == [len(a) for a in pp.label_components(cpu)[1]]
    np.testing.assert_array_equal(pp.gate(torch.from_numpy(cpu).cuda(), scores, 0.5).cpu().numpy(),
                                  pp.gate(cpu, scores, 0.5))



@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_gate_compares_in_the_scores_dtype_as_the_cpu(dtype):
    torch = pytest.importorskip("torch")
    masks = np.ones((4, 3, 5), np.uint8)
    scores, thresholds = _thresholds_between_steps(getattr(np, dtype))
    for threshold in thresholds:
        expected = (scores >= threshold).tolist()
        for s in (scores, torch.from_numpy(scores), torch.from_numpy(scores).cuda()):
            got = pp.gate(torch.from_numpy(masks).cuda(), s, threshold)
            assert got.reshape(4, -1).any(dim=1).cpu().tolist() == expected
            fused = pp.postprocess(torch.from_numpy(masks).float().cuda(), s, top=None, bottom=0.5,
                                   gate_threshold=threshold)
            assert fused.reshape(4, -1).any(dim=1).cpu().tolist() == expected
        cpu = pp.gate(masks, scores, threshold).reshape(4, -1).any(axis=1).tolist()
        assert cpu == expected

@needs_scipy
@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("density", [0.2, 0.45, 0.59, 0.8])
def test_large_single_images_are_labelled_in_stripes(density, connectivity):
    """Images large enough to be split into row stripes on several threads (and joined again)."""
    rng = np.random.default_rng(int(density * 100) + connectivity)
    mask = random_mask(rng, (301, 257), density)
    labels, areas = pp.label_components(mask, connectivity)
    ref, k = scipy_label(mask, connectivity)
    np.testing.assert_array_equal(labels, ref)
    np.testing.assert_array_equal(areas, np.bincount(ref.ravel(), minlength=k + 1)[1:])
    np.testing.assert_array_equal(pp.remove_small_components(mask, 3, connectivity),
                                  ref_remove_small(mask[None], 3, connectivity)[0])


@pytest.mark.parametrize("single", [True, False])
def test_label_components_answers_torch_input_with_torch_areas(single):
    torch = pytest.importorskip("torch")
    mask = np.zeros((2, 9, 11), np.uint8)
    mask[0, 1:3, 1:3] = 1
    mask[1, 5:, 7:] = 1
    mask[1, 0, 0] = 1
    x = torch.from_numpy(mask[0] if single else mask)
    labels, areas = pp.label_components(x, 8)
    assert isinstance(labels, torch.Tensor) and labels.dtype == torch.int32
    for a, want in zip([areas] if single else areas, [[4]] if single else [[4], [1, 16]]):
        assert isinstance(a, torch.Tensor) and a.dtype == torch.int64
        assert a.tolist() == want
