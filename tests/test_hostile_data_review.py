"""Adversarial review of the data layer (DICOM reading, transforms, the cache, the synthetic set) and of
the native binding's array intake. Each test here failed before its fix, or guards a property the
review checked (marked "guard"). Crash-prone cases run in a child process (tests/isolated.py)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pneumoseg  # noqa: E402
from factories import write_dicom  # noqa: E402
from isolated import run_isolated  # noqa: E402
from pneumoseg import rle  # noqa: E402
from pneumoseg.data import (  # noqa: E402
    Augment,
    SIIMDataset,
    find_dicoms,
    make_synthetic_siim,
    preprocess,
    read_dicom,
    read_rle_csv,
)
from pneumoseg.data.cache import CachedDataset, build_cache  # noqa: E402
from pneumoseg.data.dicom import read_sop_instance_uid  # noqa: E402


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("review-synth")
    csv = make_synthetic_siim(root, n_images=4, size=32, positive_fraction=0.5, seed=2)
    return root, csv


# --- DICOM ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attrs", [dict(Rows=3), dict(Columns=3), dict(Rows=2, Columns=6)])
def test_pixel_data_a_row_longer_than_the_header_says_is_refused(tmp_path, attrs):
    # 4x4 pixels under a header of fewer: pydicom warned of "excess padding", cut the data to the
    # header's size and returned a cropped or sheared image (an error only under strict warnings).
    raw = np.arange(16, dtype=np.uint16).reshape(4, 4)
    path = write_dicom(tmp_path / "x.dcm", raw, **attrs)
    for action in ("ignore", "error"):
        with warnings.catch_warnings():
            warnings.simplefilter(action)
            with pytest.raises(pneumoseg.DicomError, match=r"x\.dcm: the pixel data holds 32 bytes.*Rows"):
                read_dicom(path)


def test_one_byte_of_padding_is_still_read(tmp_path):
    # guard: an odd-length 8-bit image padded to an even length, as DICOM requires
    raw = np.arange(9, dtype=np.uint8).reshape(3, 3)
    path = write_dicom(tmp_path / "odd.dcm", raw, BitsAllocated=8, BitsStored=8, HighBit=7,
                       PixelData=raw.tobytes() + b"\0")
    np.testing.assert_array_equal(read_dicom(path).pixels, raw)


def test_zero_padding_past_the_image_is_read_as_pydicom_reads_it(tmp_path):
    # guard: trailing zeros are padding (pydicom warns and drops them), not a header that lies
    raw = np.arange(16, dtype=np.uint16).reshape(4, 4) + 1
    path = write_dicom(tmp_path / "pad.dcm", raw, PixelData=raw.tobytes() + bytes(8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(read_dicom(path).pixels, raw)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.201"])
def test_a_compressed_syntax_without_its_decoder_names_what_to_install(tmp_path, syntax):
    # The message was cut after pydicom's first line, "... because all plugins are missing
    # dependencies:", naming nothing to install.
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder

    if get_decoder(syntax).is_available:  # JPEG-LS: pyjpegls, which the pacs extra's highdicom brings
        pytest.skip(f"a decoder for {syntax} is installed here, so there is nothing missing to name")

    path = write_dicom(tmp_path / "c.dcm", syntax=syntax, PixelData=encapsulate([b"\xff\xd8\xff\xd9"]))
    with pytest.raises(pneumoseg.DicomError, match=r"pneumoseg\[dicom-codecs\].*pylibjpeg") as info:
        read_dicom(path)
    assert str(path) in str(info.value) and syntax in str(info.value)


def test_signed_and_garbage_high_bit_pixels_and_monochrome1(tmp_path):
    # guard: BitsStored 12 of 16 with garbage above bit 11, signed 12-bit, MONOCHROME1 of signed 16-bit
    junk = np.array([[0x1000 | 5, 7], [0xF000 | 9, 4095]], np.uint16)
    np.testing.assert_array_equal(read_dicom(write_dicom(tmp_path / "a.dcm", junk)).pixels, [[5, 7], [9, 4095]])
    signed = np.array([[0xFFB, 5], [0x800, 0x7FF]], np.uint16)
    np.testing.assert_array_equal(read_dicom(write_dicom(tmp_path / "b.dcm", signed, PixelRepresentation=1)).pixels,
                                  [[-5, 5], [-2048, 2047]])
    extremes = np.array([[-5, 5], [-32768, 32767]], np.int16)
    img = read_dicom(write_dicom(tmp_path / "c.dcm", extremes.view(np.uint16), PixelRepresentation=1, BitsStored=16,
                                 HighBit=15, PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_array_equal(img.pixels, 32767 + -32768 - extremes.astype(np.int64))
    assert img.pixels.dtype == np.int16


def test_real_siim_ids_are_file_stems_and_sop_instance_uids(siim_sample_dir):
    # guard: the dataset names images by file stem, DicomImage by SOPInstanceUID; in the Kaggle files
    # both are the train-rle.csv ImageIds
    files = find_dicoms(siim_sample_dir)
    assert sorted(files) == sorted(read_rle_csv(siim_sample_dir / "train-rle.csv"))
    for image_id, path in files.items():
        assert read_dicom(path, with_dataset=False).image_id == image_id == read_sop_instance_uid(path)


# --- transforms -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_preprocess_of_pixels_spanning_past_float32s_range_is_finite(dtype):
    # max - min overflowed float32: the image became NaN without a word (the Predictor halves such images)
    pixels = np.array([[-3e38, 3e38], [0.0, 1.5e38]], dtype)
    out = preprocess(pixels, 2)[0, 0].double()
    reference = (pixels.astype(np.float64) - -3e38) / 6e38
    assert torch.isfinite(out).all(), out
    np.testing.assert_allclose(out.numpy(), (reference - 0.5) / 0.25, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("flip", [np.flipud, np.fliplr])
def test_preprocess_of_a_flipped_one_pixel_wide_image(flip):
    # np.fliplr of an (H, 1) image (flipud of a (1, W) one) is a view NumPy calls contiguous with a
    # negative step, which torch.from_numpy refused with a bare ValueError (the Predictor copied it)
    line = np.arange(40, dtype=np.float32).reshape((40, 1) if flip is np.fliplr else (1, 40))
    view = flip(line)
    assert any(step < 0 for step in view.strides)
    np.testing.assert_array_equal(preprocess(view, 64).numpy(), preprocess(view.copy(), 64).numpy())


@pytest.mark.parametrize("shape", [(2, 1, 0, 4), (2, 1, 4, 0)])
def test_augment_of_images_without_pixels_is_a_clear_error(shape):
    # torch's "Expected non-zero, positive output size" or a reduction error came out
    with pytest.raises(pneumoseg.InvalidInputError, match="images has no pixels"):
        Augment(seed=0, affine_p=1.0)(torch.zeros(shape), torch.zeros(shape))


def test_augment_moves_a_marker_pixel_identically_in_image_and_mask():
    # guard: flips are exact; an affine warp samples the image bilinearly and the mask by nearest
    # neighbour at the same points, so a mask pixel's sample lies within half a pixel of the marker
    # (bilinear weight >= 1/4), and an image pixel with weight > 1/2 must be a mask pixel.
    flip_only = Augment(seed=1, hflip=1.0, affine_p=0.0, intensity_p=0.0)
    img = torch.zeros(3, 1, 9, 7)
    img[:, 0, 2, 1] = 1.0
    out, mask = flip_only(img, img.clone())
    assert out[:, 0, 2, 5].eq(1).all() and mask[:, 0, 2, 5].eq(1).all() and mask.sum() == 3
    warp = Augment(seed=3, hflip=0.5, affine_p=1.0, intensity_p=0.0, rotate_degrees=180, scale=0.5, shift=0.3)
    rng = np.random.default_rng(0)
    seen = 0
    for _ in range(100):
        img = torch.zeros(4, 1, 33, 31, dtype=torch.float64)
        for k, (r, c) in enumerate(rng.integers(6, 25, (4, 2))):
            img[k, 0, r, c] = 1.0
        out, mask = warp(img, img.to(torch.uint8))
        assert ((mask == 0) | (mask == 1)).all()
        assert (out[mask == 1] >= 0.25 - 1e-5).all()
        assert (mask[out > 0.5 + 1e-5] == 1).all()
        seen += int(mask.sum())
    assert seen > 100


def test_augment_is_deterministic_per_seed():
    # guard
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    a, b = Augment(seed=7)(x, (x > 0.5).float()), Augment(seed=7)(x, (x > 0.5).float())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --- dataset and cache ------------------------------------------------------------------------------------


def _csv_with_overrunning_annotation(synth, tmp_path):
    root, csv = synth
    rows = read_rle_csv(csv)
    bad_id = sorted(rows)[1]
    lines = ["ImageId, EncodedPixels"] + [f"{i}, {'1020 10' if i == bad_id else s}" for i in rows for s in rows[i]]
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    return root, path, bad_id


def test_an_annotation_that_does_not_fit_its_image_names_the_image(synth, tmp_path):
    # "rles[0]: run 0 ... leaves the 32x32 image": which of the CSV's images was not said, and one
    # such row aborted a whole cache build
    root, csv, bad_id = _csv_with_overrunning_annotation(synth, tmp_path)
    dataset = SIIMDataset(root, csv, image_size=16)
    with pytest.raises(pneumoseg.DataFormatError, match=rf"{bad_id}.*{csv.name}.*leaves the 32x32 image"):
        dataset[dataset.ids.index(bad_id)]
    with pytest.warns(pneumoseg.DataWarning, match="1 DICOMs could not be read"):
        build_cache(root, csv, size=16, out=tmp_path / "cache", progress=False)
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert bad_id not in index["ids"] and len(index["ids"]) == 3
    assert [s["id"] for s in index["skipped"]] == [bad_id] and "leaves the 32x32 image" in index["skipped"][0]["reason"]


@pytest.mark.parametrize("change, match", [
    (lambda ix: ix.update(rows=[0] * len(ix["rows"])), "rows must be distinct"),
    (lambda ix: ix.update(labels=None), "has_masks is true but labels"),
])
def test_a_cache_index_that_mixes_up_rows_is_refused(synth, tmp_path, change, match):
    # every id read row 0's image (and mask) without a word; a segmentation cache without labels gave
    # items without masks
    root, csv = synth
    build_cache(root, csv, size=16, out=tmp_path / "cache", progress=False)
    path = tmp_path / "cache" / "index.json"
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index))
    with pytest.raises(pneumoseg.DataFormatError, match=match):
        CachedDataset(tmp_path / "cache")


def test_a_synthetic_two_reader_split_never_writes_an_empty_annotation(tmp_path, monkeypatch):
    # A positive region one row high was split into an empty upper part ("-1") and the region: a
    # positive image with a "-1" row, which Kaggle's files never have.
    from pneumoseg.data import synthetic

    def one_row_phantom(size, rng, pneumothorax):
        rng.random()  # the draws of the real phantom do not matter here
        mask = np.zeros((size, size), np.uint8)
        if pneumothorax:
            mask[10, 5:9] = 1
        return np.full((size, size), 60, np.uint8), mask

    monkeypatch.setattr(synthetic, "chest_phantom", one_row_phantom)
    rows = read_rle_csv(make_synthetic_siim(tmp_path, n_images=12, size=32, positive_fraction=1.0, seed=0))
    assert all("-1" not in strings for strings in rows.values()), rows
    assert all(rle.decode_union(s, (32, 32)).sum() == 4 for s in rows.values())


# --- the native binding's array intake --------------------------------------------------------------------


class _DeviceArray:
    """A GPU array of a library pneumoseg does not know (Numba, PyCUDA, JAX): only the CUDA array
    interface."""

    __cuda_array_interface__ = {"shape": (4, 5), "typestr": "|u1", "data": (0, False), "version": 3}


@pytest.mark.parametrize("call", [
    lambda x: rle.encode(x),
    lambda x: rle.encode_batch(x),
    lambda x: pneumoseg.postprocess.remove_small_components(x, 1),
])
def test_an_unknown_cuda_array_is_named_as_such(call):
    # "mask must be 2-D (height, width), got shape ()": NumPy wrapped it as one object
    with pytest.raises(pneumoseg.InvalidInputError, match=r"CUDA array interface.*torch\.as_tensor"):
        call(_DeviceArray())


def test_more_than_four_dimensions_names_the_argument():
    with pytest.raises(pneumoseg.InvalidInputError, match=r"^masks has 5 dimensions"):
        rle.encode_batch(np.zeros((1, 1, 1, 1, 1), np.uint8))


@pytest.mark.parametrize("make", [
    "m[::-1, ::-2]",                                           # negative strides
    "np.broadcast_to(m[:1], (6, 7))",                          # zero strides
    "np.frombuffer(b'x' + m.astype(np.float32).tobytes(), np.float32, offset=1).reshape(6, 7)",  # misaligned
    "m.astype('>f8')",                                         # byte-swapped
    "ro",                                                      # read-only
    "np.zeros((0, 7), np.uint8)",
    "np.zeros((6, 0), np.uint8)",
])
def test_awkward_numpy_layouts_read_as_their_values(make):
    # guard, in a child: each layout gives the answer of its contiguous copy
    result = run_isolated(f"""
        import numpy as np
        from pneumoseg import rle, postprocess
        m = (np.random.default_rng(0).random((6, 7)) > 0.5).astype(np.uint8)
        ro = m.copy(); ro.flags.writeable = False
        x = {make}
        plain = np.ascontiguousarray(x).astype(np.float64)
        assert rle.encode(x) == rle.encode(plain)
        np.testing.assert_array_equal(postprocess.remove_small_components(x, 2),
                                      postprocess.remove_small_components(plain, 2))
        labels, _ = postprocess.label_components(x)
        np.testing.assert_array_equal(labels, postprocess.label_components(plain)[0])
        print("OK")
    """)
    assert result.returncode == 0 and "OK" in result.stdout, result.describe()


def test_write_rle_csv_refuses_an_id_that_is_not_utf8_before_writing(tmp_path):
    # os.fsdecode of a Latin-1 file name holds surrogate escapes: the write raised a
    # UnicodeEncodeError that named neither the id nor the rule (the file itself was left untouched)
    from pneumoseg.data import write_rle_csv

    target = tmp_path / "out.csv"
    target.write_text("ImageId, EncodedPixels\nold, -1\n")
    with pytest.raises(pneumoseg.errors.InvalidInputError, match="not valid UTF-8"):
        write_rle_csv(target, {"ok": "-1", "scan\udce9": "-1"})
    assert target.read_text() == "ImageId, EncodedPixels\nold, -1\n"

