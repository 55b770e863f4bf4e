from __future__ import annotations

import filecmp

import numpy as np
import pytest

import pneumoseg
from pneumoseg import rle
from pneumoseg.data import chest_phantom, find_dicoms, make_synthetic_siim, read_dicom, read_rle_csv
from factories import write_dicom
from reference import ref_decode

pydicom = pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    csv_path = make_synthetic_siim(root, n_images=12, size=128, positive_fraction=0.5, seed=5)
    return root, csv_path


# --- the synthetic study set -----------------------------------------------------------------------------


def test_synthetic_layout_and_csv(synth):
    root, csv_path = synth
    assert csv_path == root / "train-rle.csv"
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "ImageId, EncodedPixels"
    assert all(line.split(",", 1)[1].startswith(" ") for line in lines[1:])  # the original layout
    rles = read_rle_csv(csv_path)
    files = find_dicoms(root)
    assert set(rles) == set(files) and len(files) == 12
    for path in files.values():  # dicom-images-train/<study>/<series>/<ImageId>.dcm
        assert path.relative_to(root).parts[0] == "dicom-images-train" and len(path.relative_to(root).parts) == 4
    labels = [any(s != "-1" for s in v) for v in rles.values()]
    assert sum(labels) == 6
    assert any(len(v) >= 2 for v in rles.values()), "some positives carry two annotations"


def test_synthetic_dicoms_are_jpeg_baseline_with_siim_metadata(synth):
    root, _ = synth
    for image_id, path in find_dicoms(root).items():
        img = read_dicom(path)
        assert img.image_id == image_id
        assert img.pixels.shape == (128, 128) and img.pixels.dtype == np.uint8
        assert img.meta["transfer_syntax"] == "1.2.840.10008.1.2.4.50"
        assert img.meta["photometric_interpretation"] == "MONOCHROME2" and img.meta["bits_stored"] == 8
        assert img.meta["modality"] == "CR" and img.meta["body_part"] == "CHEST"
        assert img.meta["view_position"] in ("PA", "AP") and img.meta["sex"] in ("M", "F")
        assert 18 <= img.meta["age"] < 90 and len(img.meta["pixel_spacing"]) == 2


def test_synthetic_masks_lie_on_the_dark_crescent(synth):
    """Round trip: the CSV masks (union of annotations) sit on the darker region in the DICOM, and
    transposing them lands elsewhere (the RLE orientation is right)."""
    root, csv_path = synth
    rles, files = read_rle_csv(csv_path), find_dicoms(root)
    checked = 0
    for image_id, strings in rles.items():
        mask = rle.decode_union(strings, (128, 128))
        np.testing.assert_array_equal(mask, np.max([ref_decode(s, (128, 128)) for s in strings], axis=0))
        if mask.sum() > 20:
            pixels = read_dicom(files[image_id]).pixels.astype(float)
            inside = pixels[mask > 0].mean()
            assert inside < 70 and inside < pixels[mask.T > 0].mean() - 15
            checked += 1
    assert checked >= 3


def test_synthetic_is_deterministic_per_seed(tmp_path):
    a = make_synthetic_siim(tmp_path / "a", n_images=3, size=64, seed=5)
    b = make_synthetic_siim(tmp_path / "b", n_images=3, size=64, seed=5)
    c = make_synthetic_siim(tmp_path / "c", n_images=3, size=64, seed=6)
    assert a.read_text() == b.read_text() != c.read_text()
    fa, fb = find_dicoms(tmp_path / "a"), find_dicoms(tmp_path / "b")
    assert fa.keys() == fb.keys()
    assert all(filecmp.cmp(fa[k], fb[k], shallow=False) for k in fa)


def test_phantom_shapes():
    img, mask = chest_phantom(96, np.random.default_rng(0), True)
    assert img.shape == mask.shape == (96, 96) and img.dtype == np.uint8 and mask.any()
    assert not chest_phantom(96, np.random.default_rng(0), False)[1].any()


def test_synthetic_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_images"):
        make_synthetic_siim(tmp_path, n_images=0)
    with pytest.raises(ValueError, match="positive_fraction"):
        make_synthetic_siim(tmp_path, n_images=2, size=64, positive_fraction=1.5)


# --- the real SIIM-ACR files (skipped where ../shared is absent) ------------------------------------------


def test_real_siim_files(siim_sample_dir):
    rles = read_rle_csv(siim_sample_dir / "train-rle.csv")
    files = find_dicoms(siim_sample_dir)
    assert set(rles) == set(files) and len(files) == 4
    positives = 0
    for image_id, path in files.items():
        img = read_dicom(path)
        assert img.pixels.shape == (1024, 1024) and img.pixels.dtype == np.uint8
        assert img.image_id == image_id
        assert img.meta["transfer_syntax"] == "1.2.840.10008.1.2.4.50"
        assert img.meta["photometric_interpretation"] == "MONOCHROME2"
        mask = rle.decode_union(rles[image_id], img.pixels.shape)
        if mask.any():
            positives += 1
            # Pneumothorax is air: the masked region is darker than the same mask transposed (checked
            # by eye too: both masks follow the lung apex and lateral chest wall).
            p = img.pixels.astype(float)
            assert p[mask > 0].mean() < p[mask.T > 0].mean() - 10
            assert rle.encode(mask) == rles[image_id][0]
    assert positives == 2
    first = read_dicom(siim_sample_dir / "1.2.276.0.7230010.3.1.4.8323329.1000.1517875165.878027.dcm")
    assert first.meta["age"] == 38 and first.meta["sex"] == "M" and first.meta["view_position"] == "PA"
    assert first.meta["pixel_spacing"] == (0.168, 0.168)


# --- CSV layouts and errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "ImageId, EncodedPixels\na, -1\nb, 1 2 2 1\nb, 5 1\n",  # train-rle.csv
        "ImageId,EncodedPixels\na,-1\nb,1 2 2 1\nb,5 1\n",  # stage_2_train.csv
        "\ufeffImageId,EncodedPixels\r\na,-1\r\nb,1 2 2 1\r\nb,5 1\r\n",  # BOM, CRLF
        "a, -1\nb, 1 2 2 1\nb, 5 1\n",  # the header-less sample CSV
    ],
)
def test_read_rle_csv_layouts(tmp_path, text):
    path = tmp_path / "x.csv"
    path.write_bytes(text.encode("utf-8"))
    assert read_rle_csv(path) == {"a": ["-1"], "b": ["1 2 2 1", "5 1"]}


@pytest.mark.parametrize(
    "text, match",
    [
        ("ImageId,EncodedPixels\na,-1\nb,1 2,3\n", "line 3: expected 2 columns"),
        ("ImageId,EncodedPixels\na,1 x\n", "line 2: EncodedPixels has a bad token 'x'"),
        ("ImageId,EncodedPixels\na,1 2 3\n", "line 2: EncodedPixels has an odd number"),
        ("ImageId,EncodedPixels\n,1 2\n", "line 2: empty ImageId"),
        ("Image,Pixels\na,-1\n", "line 1: EncodedPixels has a bad token 'Pixels'"),
        ("ImageId,EncodedPixels,Extra\na,-1,0\n", "line 1: expected 2 columns"),
    ],
)
def test_read_rle_csv_errors_name_the_line(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(pneumoseg.DataFormatError, match=match) as info:
        read_rle_csv(path)
    assert str(path) in str(info.value) and isinstance(info.value, ValueError)


def test_read_rle_csv_missing_and_binary(tmp_path):
    with pytest.raises(pneumoseg.DataFormatError, match="no such file"):
        read_rle_csv(tmp_path / "none.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(pneumoseg.DataFormatError, match="not UTF-8"):
        read_rle_csv(tmp_path / "bin.csv")


def test_find_dicoms_flat_and_duplicates(tmp_path, synth):
    root, _ = synth
    files = find_dicoms(root)
    flat = tmp_path / "flat"
    flat.mkdir()
    for image_id, p in list(files.items())[:3]:
        (flat / f"{image_id}.dcm").write_bytes(p.read_bytes())
    assert len(find_dicoms(flat)) == 3
    (flat / "sub").mkdir()
    first = next(iter(files))
    (flat / "sub" / f"{first}.dcm").write_bytes(files[first].read_bytes())
    with pytest.raises(pneumoseg.DataFormatError, match="appears twice"):
        find_dicoms(flat)
    with pytest.raises(pneumoseg.DataFormatError, match="not a folder"):
        find_dicoms(tmp_path / "nope")


# --- DICOM reading: other hospitals' images and broken files ----------------------------------------------


def write_uncompressed(path, raw, photometric="MONOCHROME2", slope=None, intercept=None, window=None, pixel_data=True):
    """A 12-bit (in 16) uncompressed DICOM of ``raw``, with the given rescale and window."""
    window_center, window_width = window if window is not None else (None, None)
    return write_dicom(path, raw, PhotometricInterpretation=photometric, RescaleSlope=slope, RescaleIntercept=intercept,
                       WindowCenter=window_center, WindowWidth=window_width, PixelData=None if not pixel_data else raw.astype(np.uint16).tobytes())


def test_twelve_bit_monochrome1_rescale_and_window(tmp_path):
    raw = np.random.default_rng(0).integers(0, 4096, (40, 30)).astype(np.uint16)
    img = read_dicom(write_uncompressed(tmp_path / "m1.dcm", raw, "MONOCHROME1", slope=2.0, intercept=-100.0,
                                        window=(3000, 4000)))
    rescaled = raw.astype(np.float64) * 2 - 100
    np.testing.assert_allclose(img.pixels, rescaled.max() + rescaled.min() - rescaled)  # inverted: bright is dense
    assert img.meta["bits_stored"] == 12 and img.meta["rescale"] == (2.0, -100.0)
    w = img.window()
    assert w.dtype == np.float32 and w.min() >= 0 and w.max() <= 1
    # MONOCHROME1: the brightest stored value is the darkest displayed one.
    assert w.ravel()[np.argmax(raw)] == w.min()
    manual = img.window(center=2000, width=1000)
    # the window [1500, 2500] of the rescaled values onto [0, 1], then inverted for display
    np.testing.assert_allclose(manual, 1.0 - np.clip((rescaled - 1500.0) / 1000.0, 0.0, 1.0), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="width must be positive"):
        img.window(center=1, width=0)


@pytest.mark.parametrize("photometric, attrs", [
    ("PALETTE COLOR", {}),                                  # one sample per pixel: indices into a colour table
    ("RGB", {}),                                            # a header that lies about its one sample
    ("YBR_FULL", {}),
    ("RGB", {"SamplesPerPixel": 3, "PlanarConfiguration": 0}),
    ("YBR_FULL_422", {"SamplesPerPixel": 3, "PlanarConfiguration": 0}),
    ("HSV", {}),
])
def test_colour_photometric_interpretations_are_refused_not_read_as_grey(tmp_path, photometric, attrs):
    from pneumoseg.data import read_dicom_shape

    samples = attrs.get("SamplesPerPixel", 1)
    raw = np.arange(12 * samples, dtype=np.uint16).reshape(samples, 3, 4).transpose(1, 2, 0).reshape(3, 4 * samples)
    path = write_dicom(tmp_path / "colour.dcm", raw, Columns=4, PhotometricInterpretation=photometric, **attrs)
    expected = rf"{tmp_path / 'colour.dcm'}: PhotometricInterpretation '{photometric}' is not supported"
    with pytest.raises(pneumoseg.DicomError, match=expected):
        read_dicom(path)
    with pytest.raises(pneumoseg.DicomError, match=expected):
        read_dicom_shape(path)


def test_missing_photometric_interpretation_is_named_by_the_shape_read_too(tmp_path):
    from pneumoseg.data import read_dicom_shape

    path = write_dicom(tmp_path / "none.dcm", PhotometricInterpretation=None)
    for read in (read_dicom, read_dicom_shape):
        with pytest.raises(pneumoseg.DicomError, match=r"none\.dcm: .*Photometric ?Interpretation"):
            read(path)


def test_monochrome2_uncompressed_plain(tmp_path):
    raw = np.arange(12, dtype=np.uint16).reshape(3, 4) * 100
    img = read_dicom(write_uncompressed(tmp_path / "m2.dcm", raw))
    np.testing.assert_array_equal(img.pixels, raw)
    np.testing.assert_allclose(img.window(), raw / raw.max())


def test_broken_files_give_dicom_errors(tmp_path, synth):
    root, _ = synth
    good = next(iter(find_dicoms(root).values()))
    (tmp_path / "random.dcm").write_bytes(np.random.default_rng(0).bytes(4000))
    (tmp_path / "truncated.dcm").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (tmp_path / "empty.dcm").write_bytes(b"")
    write_uncompressed(tmp_path / "nopixels.dcm", np.zeros((4, 4)), pixel_data=False)
    ds = pydicom.dcmread(good)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"  # JPEG-LS: raw pixels, which no JPEG-LS decoder (pyjpegls, with the pacs extra) nor a missing one reads
    ds.save_as(tmp_path / "wrong-syntax.dcm", enforce_file_format=True)
    cases = {
        "random.dcm": "not a DICOM file|unreadable",
        "truncated.dcm": "truncated",
        "empty.dcm": "not a DICOM file|unreadable",
        "nopixels.dcm": "no pixel data",
        "wrong-syntax.dcm": r"could not be decoded \(transfer syntax 1.2.840.10008.1.2.4.80\)",
        "missing.dcm": "no such file",
    }
    for name, match in cases.items():
        with pytest.raises(pneumoseg.DicomError, match=match) as info:
            read_dicom(tmp_path / name)
        assert name in str(info.value) and isinstance(info.value, ValueError)
    assert good.exists() and good.stat().st_size > 0  # reading never harms the files


# --- CLI -------------------------------------------------------------------------------------------------


def test_cli_synth_and_masks(tmp_path, capsys):
    from pneumoseg.cli import main
    from test_cli import read_png

    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--n", "5", "--size", "64", "--seed", "2"]) == 0
    rles = read_rle_csv(tmp_path / "s" / "train-rle.csv")
    assert main(["data", "masks", "--csv", str(tmp_path / "s" / "train-rle.csv"), "--out", str(tmp_path / "m"),
                 "--dicoms", str(tmp_path / "s")]) == 0
    for image_id, strings in rles.items():
        np.testing.assert_array_equal(read_png(tmp_path / "m" / f"{image_id}.png"),
                                      rle.decode_union(strings, (64, 64)) * 255)
    assert main(["data", "masks", "--csv", str(tmp_path / "none.csv"), "--out", str(tmp_path / "m")]) == 2
    assert "no such file" in capsys.readouterr().err
