"""pneumoseg.Predictor on the CPU: against an independent reference of the pipeline, over every input
kind, gate layout, option and backend that runs here; threads; bad input."""

from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pneumoseg  # noqa: E402
from pneumoseg import rle  # noqa: E402
from pneumoseg.errors import DataFormatError, DicomError, InvalidInputError  # noqa: E402
from pneumoseg.infer import Predictor  # noqa: E402
from pneumoseg.infer.predictor import STAGES  # noqa: E402

from factories import write_dicom  # noqa: E402
from infer_helpers import (  # noqa: E402
    THRESHOLDS, assert_latency_session_options, copy_model_dir, exported_model_dir, file_digests, model_dir, phantom_images,
    reference_predict,
)


def assert_matches_reference(preds, refs, images):
    assert len(preds) == len(refs)
    for p, r, img in zip(preds, refs, images):
        assert p.shape == img.shape
        assert p.score == pytest.approx(r["score"], abs=1e-5)
        assert p.mask.shape == img.shape and p.mask.dtype == np.uint8
        # float32 logits against float64 probabilities: a pixel exactly on a threshold may differ
        assert np.count_nonzero(p.mask != r["mask"]) <= max(2, img.size // 2000)
        assert (p.rle == "-1") == (r["rle"] == "-1")
        assert np.array_equal(rle.decode(p.rle, img.shape), p.mask)


@pytest.mark.parametrize("kind", ["classifier", "aux", "plain"])
def test_torch_predictor_matches_the_reference_pipeline(kind):
    images = phantom_images(6)
    preds = Predictor.from_dir(model_dir(kind)).predict(images, return_masks=True, batch_size=4)
    refs = reference_predict(model_dir(kind), images)
    assert_matches_reference(preds, refs, images)
    if kind != "plain":  # the tiny models are built so that the gate splits this set
        gated = [p.segmented for p in preds]
        assert any(gated) and not all(gated)
        assert all(p.rle == "-1" and p.n_components == 0 for p in preds if not p.segmented)
    assert any(p.positive for p in preds)
    for p in preds:
        assert p.n_components == (0 if p.rle == "-1" else int(len(pneumoseg.postprocess.label_components(p.mask)[1])))


def test_tta_matches_the_reference():
    images = phantom_images(4, seed=3)
    preds = Predictor.from_dir(model_dir("classifier"), tta=True).predict(images, return_masks=True)
    assert_matches_reference(preds, reference_predict(model_dir("classifier"), images, tta=True), images)


@pytest.mark.parametrize("kind", ["classifier", "aux"])
def test_segmenting_all_gives_the_same_answers_as_gating(kind):
    images = phantom_images(6, seed=1)
    gated = Predictor.from_dir(model_dir(kind)).predict(images)
    every = Predictor.from_dir(model_dir(kind), segment="all").predict(images)
    assert [p.rle for p in gated] == [p.rle for p in every]
    assert [p.score for p in gated] == pytest.approx([p.score for p in every], abs=1e-6)
    assert all(p.segmented for p in every) and not all(p.segmented for p in gated)


@pytest.mark.parametrize("kind", ["classifier", "aux"])
def test_a_gate_between_float32_values_gives_the_same_answers_gating_or_segmenting_all(kind):
    """Scores are float32: a gate a quarter of a float32 step above one image's score rounds to that score
    where torch compares (the gated path), so the image passes; the fused post-processing of
    segment="all" compared the same score in float64 and gated it out."""
    images = phantom_images(6, seed=1)
    scores = [p.score for p in Predictor.from_dir(model_dir(kind), batch_size=6).predict(images, batch_size=6)]
    s = np.float32(sorted(scores)[len(scores) // 2])
    gate = float(s) + float(np.spacing(s)) / 4  # not a float32: rounds to s
    gated = Predictor.from_dir(model_dir(kind), thresholds={"gate": gate}).predict(images, batch_size=6)
    every = Predictor.from_dir(model_dir(kind), thresholds={"gate": gate}, segment="all").predict(images, batch_size=6)
    assert [p.segmented for p in gated].count(True) == sum(np.float32(v) >= s for v in scores)
    assert [p.rle for p in gated] == [p.rle for p in every]


def test_threshold_overrides_are_used_and_checked():
    images = phantom_images(4, seed=2)
    overrides = {"gate": 0.0, "top": None, "bottom": 0.8, "min_component_area": 0}
    preds = Predictor.from_dir(model_dir("aux"), thresholds=overrides).predict(images, return_masks=True)
    assert all(p.segmented for p in preds)
    assert_matches_reference(preds, reference_predict(model_dir("aux"), images, {**overrides, "top": 0.0, "min_area": 0}),
                             images)
    with pytest.raises(InvalidInputError, match="unknown threshold"):
        Predictor.from_dir(model_dir("aux"), thresholds={"gates": 0.5})
    with pytest.raises(InvalidInputError, match="thresholds.bottom"):
        Predictor.from_dir(model_dir("aux"), thresholds={"bottom": 1.5})


def test_inputs_of_every_kind_give_the_same_answers(tmp_path):
    from pneumoseg.data import make_synthetic_siim
    from pneumoseg.data.siim import find_dicoms

    make_synthetic_siim(tmp_path / "siim", n_images=4, size=96, positive_fraction=0.5, seed=5)
    files = find_dicoms(tmp_path / "siim")
    from pneumoseg.data import read_dicom

    pixels = [read_dicom(p).pixels for p in files.values()]
    predictor = Predictor.from_dir(model_dir("classifier"))
    by_folder = predictor.predict(tmp_path / "siim")
    assert [p.image_id for p in by_folder] == list(files)  # the Kaggle ImageIds, from the nested layout
    by_files = predictor.predict([str(p) for p in files.values()])
    by_array = predictor.predict(np.stack(pixels), image_ids=list(files))
    by_tensor = predictor.predict(torch.from_numpy(np.stack(pixels))[:, None], image_ids=list(files))
    by_list = predictor.predict([pixels[0], torch.from_numpy(pixels[1]), *map(str, list(files.values())[2:])],
                                image_ids=list(files)[:2])
    one = predictor.predict(pixels[0])
    for other in (by_files, by_array, by_tensor, by_list):
        assert [p.image_id for p in other] == list(files)
        assert [p.rle for p in other] == [p.rle for p in by_folder]
        assert [p.score for p in other] == pytest.approx([p.score for p in by_folder], abs=1e-6)
    assert one[0].image_id == "image-00000" and one[0].rle == by_folder[0].rle
    assert by_folder[0].path == str(list(files.values())[0])
    # the same file twice is predicted once; two images under one ImageId are refused
    assert len(predictor.predict([str(tmp_path / "siim"), str(list(files.values())[0])])) == 4
    with pytest.raises(DataFormatError, match="appears twice"):
        predictor.predict([pixels[0], pixels[1]], image_ids=["a", "a"])
    with pytest.raises(InvalidInputError, match="image_ids has 1 names for 2"):
        predictor.predict([pixels[0], pixels[1]], image_ids=["a"])


def test_timings_and_batches():
    images = phantom_images(5)
    preds = Predictor.from_dir(model_dir("classifier")).predict(images, batch_size=2)
    assert [p.batch_size for p in preds] == [2, 2, 2, 2, 1]
    for p in preds:
        assert set(p.timings) == {*STAGES, "total"} and all(v >= 0 for v in p.timings.values())
        assert p.timings["total"] == pytest.approx(sum(p.timings[s] for s in STAGES))
    summary = preds.timings()
    assert summary["total"]["batches"] == 3 and summary["segment"]["p95_ms_per_image"] >= summary["segment"]["p50_ms_per_image"]


def test_predict_from_several_threads_equals_serial():
    predictor = Predictor.from_dir(model_dir("aux"), batch_size=3)
    sets = [phantom_images(5, seed=s) for s in range(4)]
    serial = [[(p.rle, p.score) for p in predictor.predict(images)] for images in sets]
    results: dict[int, list] = {}
    errors = []

    def work(k: int) -> None:
        try:
            for _ in range(2):
                results.setdefault(k, []).append([(p.rle, p.score) for p in predictor.predict(sets[k])])
        except Exception as exc:  # reported below, with the thread's own traceback lost otherwise
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(sets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k, runs in results.items():
        assert runs == [serial[k], serial[k]]


def test_preprocessing_equals_the_training_preprocessing():
    """What predict hands the segmenter is pneumoseg.data.preprocess of each image, for one batch of
    images of different shapes and dtypes."""
    from pneumoseg.data import preprocess

    predictor = Predictor.from_dir(model_dir("plain"))
    run, seen = predictor.backend.run, []

    def recording_run(part, *inputs):
        seen.append((part, inputs[0].clone()))
        return run(part, *inputs)

    predictor.backend.run = recording_run
    images = [np.random.default_rng(0).integers(0, 4096, (130, 70)).astype(np.uint16),
              np.random.default_rng(1).random((64, 64)).astype(np.float64), np.full((40, 50), 7, np.int16)]
    predictor.predict(images, batch_size=3)
    want = torch.cat([preprocess(img, 64) for img in images])
    assert len(seen) == 1
    torch.testing.assert_close(seen[0][1], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 2, 16])
def test_preprocessing_in_chunks_on_the_cpu_equals_one_batch(monkeypatch, chunk):
    """On a CPU the batch is preprocessed a few images at a time (cache-sized pieces): the input the
    network gets is the same to the bit, rows in their places, for groups that do not divide evenly."""
    import pneumoseg.infer.predictor as predictor_module
    from pneumoseg.data import preprocess

    monkeypatch.setattr(predictor_module, "_CPU_PREPROCESS_CHUNK", chunk)
    predictor = Predictor.from_dir(model_dir("plain"))
    run, seen = predictor.backend.run, []

    def recording_run(part, *inputs):
        seen.append(inputs[0].clone())
        return run(part, *inputs)

    predictor.backend.run = recording_run
    rng = np.random.default_rng(3)
    big = [rng.integers(0, 4096, (96, 80)).astype(np.uint16) for _ in range(5)]
    small = [rng.random((50, 50)).astype(np.float32) for _ in range(2)]
    images = [big[0], small[0], *big[1:4], small[1], big[4]]
    predictor.predict(images, batch_size=len(images))
    assert len(seen) == 1
    want = torch.cat([preprocess(img, 64) for img in images])
    assert torch.equal(seen[0], want)


def test_onnxruntime_backend_matches_torch():
    images = phantom_images(6, seed=4)
    for kind in ("classifier", "aux"):
        path = exported_model_dir(kind)
        want = Predictor.from_dir(path).predict(images)
        got = Predictor.from_dir(path, backend="onnxruntime", threads=1).predict(images)
        assert [p.rle for p in got] == [p.rle for p in want]
        assert [p.score for p in got] == pytest.approx([p.score for p in want], abs=1e-5)


class _CountedSession:
    def __init__(self, session, part, runs):
        self._session, self._part, self._runs = session, part, runs

    def run(self, outputs, feed):
        self._runs.append((self._part, next(iter(feed.values())).shape[0]))
        return self._session.run(outputs, feed)


def test_onnxruntime_warmup_runs_each_session_twice_at_the_batch_size():
    # A session plans its memory on its first run at a shape and allocates the plan on the second:
    # after one warm-up batch the first real batch of that size still paid for about 1 GB of fresh
    # pages (U-Net ResNet34 512, batch 16), a second or more.
    predictor = Predictor.from_dir(exported_model_dir("aux"), backend="onnxruntime", threads=1)
    assert_latency_session_options(predictor, 1)
    runs: list = []
    sessions = predictor.backend._sessions
    for part in list(sessions):
        sessions[part] = _CountedSession(sessions[part], part, runs)
    predictor.warmup(3)
    assert sorted(runs) == sorted([(part, 3) for part in sessions] * 2)


def test_automatic_backend_and_device():
    """backend="auto" takes onnxruntime on a CPU only where the directory holds the export for the
    precision, torch otherwise; device="auto" is CUDA only where pneumoseg's CUDA kernels can run."""
    exported = Predictor.from_dir(exported_model_dir("classifier"), backend="auto", device="cpu")
    assert exported.backend.name == "onnxruntime" and exported.backend.precision == "fp32"
    images = phantom_images(2, seed=31)
    torch_answers = Predictor.from_dir(exported_model_dir("classifier"), backend="torch").predict(images)
    assert [p.rle for p in exported.predict(images)] == [p.rle for p in torch_answers]
    plain = Predictor.from_dir(model_dir("classifier"), backend="auto", device="cpu")
    assert plain.backend.name == "torch"
    with pytest.raises(DataFormatError, match="pneumoseg export .* --precision int8"):  # int8 is onnxruntime's
        Predictor.from_dir(exported_model_dir("classifier"), backend="auto", device="cpu", precision="int8")
    chosen = Predictor.from_dir(model_dir("classifier"), device="auto").backend.device.type
    assert chosen == ("cuda" if pneumoseg.cuda_available() and torch.cuda.is_available() else "cpu")


def test_backend_and_option_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="backend must be one of"):
        Predictor.from_dir(model_dir("aux"), backend="tvm")
    with pytest.raises(InvalidInputError, match="fp16 with the torch backend needs device='cuda'"):
        Predictor.from_dir(model_dir("aux"), precision="fp16")
    with pytest.raises(InvalidInputError, match="int8"):
        Predictor.from_dir(model_dir("aux"), precision="int8")
    with pytest.raises(InvalidInputError, match="cuda_graphs=True needs device='cuda'"):
        Predictor.from_dir(model_dir("aux"), cuda_graphs=True)
    with pytest.raises(InvalidInputError, match="device must be"):
        Predictor.from_dir(model_dir("aux"), device="tpu")
    with pytest.raises(InvalidInputError, match="segment must be one of"):
        Predictor.from_dir(model_dir("aux"), segment="some")
    with pytest.raises(DataFormatError, match="pneumoseg export .* --format onnx"):
        Predictor.from_dir(model_dir("aux"), backend="onnxruntime")  # not exported
    with pytest.raises(DataFormatError, match="--precision int8 --calibrate"):
        Predictor.from_dir(exported_model_dir("aux"), backend="onnxruntime", precision="int8")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="no CUDA device"):
            Predictor.from_dir(model_dir("aux"), device="cuda")


def test_model_directory_with_a_missing_or_damaged_file(tmp_path):
    damaged = copy_model_dir("classifier", tmp_path / "m")
    (damaged / "classifier.safetensors").unlink()
    with pytest.raises(DataFormatError, match="classifier weights .* are missing"):
        Predictor.from_dir(damaged)
    exported = copy_model_dir("aux", tmp_path / "e", exported=True)
    (exported / "onnx" / "decoder.fp32.onnx").unlink()
    with pytest.raises(DataFormatError, match="decoder-onnx-fp32' listed in pneumoseg.json is missing"):
        Predictor.from_dir(exported, backend="onnxruntime")
    onnx_file = exported / "onnx" / "encoder.fp32.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-10])
    with pytest.raises(DataFormatError, match="fingerprint"):
        Predictor.from_dir(exported, backend="onnxruntime")
    with pytest.raises(DataFormatError, match="no such model directory"):
        Predictor.from_dir(tmp_path / "nowhere")


def _write_dicom(path, pixels, photometric="MONOCHROME2"):
    bits = pixels.dtype.itemsize * 8  # 8- or 16-bit, all bits stored
    return write_dicom(path, pixels, PhotometricInterpretation=photometric, BitsAllocated=bits, BitsStored=bits,
                       HighBit=bits - 1, PixelData=pixels.tobytes())


def test_bad_files_are_errors_or_reported_skips_and_inputs_stay_untouched(tmp_path):
    images = phantom_images(3, seed=6)
    folder = tmp_path / "in"
    folder.mkdir()
    for i, img in enumerate(images):
        _write_dicom(folder / f"good{i}.dcm", img)
    (folder / "notes.dcm").write_text("not a DICOM file")
    whole = (folder / "good0.dcm").read_bytes()
    (folder / "cut.dcm").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "empty").mkdir()
    before = file_digests(tmp_path)
    predictor = Predictor.from_dir(model_dir("classifier"))
    with pytest.raises(DicomError, match="cut.dcm"):
        predictor.predict(folder)
    out = predictor.predict([folder, tmp_path / "empty"], on_error="skip")
    assert [p.image_id for p in out] == ["good0", "good1", "good2"]
    reasons = dict(out.skipped)
    assert "truncated" in reasons[str(folder / "cut.dcm")] or "could not be decoded" in reasons[str(folder / "cut.dcm")]
    assert "not a DICOM file" in reasons[str(folder / "notes.dcm")]
    assert reasons[str(tmp_path / "empty")] == "a folder without .dcm files"
    assert [p.rle for p in out] == [p.rle for p in predictor.predict(images)]
    with pytest.raises(InvalidInputError, match="nothing to predict.*without .dcm files"):
        predictor.predict(tmp_path / "empty")
    with pytest.raises(InvalidInputError, match="does not exist"):
        predictor.predict(tmp_path / "missing.dcm")
    assert file_digests(tmp_path) == before  # no input file was modified


def test_sixteen_bit_monochrome1_reads_as_its_eight_bit_image(tmp_path):
    img = phantom_images(1, seed=8, shapes=((96, 80),))[0]
    _write_dicom(tmp_path / "m2.dcm", img)
    inverted = (65535 - img.astype(np.uint32) * 257).astype(np.uint16)  # 16-bit, bright = low values
    _write_dicom(tmp_path / "m1.dcm", inverted, photometric="MONOCHROME1")
    preds = Predictor.from_dir(model_dir("classifier")).predict([tmp_path / "m2.dcm", tmp_path / "m1.dcm"])
    assert preds[0].rle == preds[1].rle and preds[0].score == pytest.approx(preds[1].score, abs=1e-5)


def test_a_large_non_square_image_gets_a_mask_of_its_own_size():
    big = np.kron(phantom_images(1, seed=1, shapes=((100, 125),))[0], np.ones((20, 20), np.uint8))  # 2000x2500
    preds = Predictor.from_dir(model_dir("classifier"), thresholds={"gate": 0.0}).predict(big, return_masks=True)
    p = preds[0]
    assert p.shape == (2000, 2500) and p.mask.shape == (2000, 2500) and p.positive
    assert np.array_equal(rle.decode(p.rle, (2000, 2500)), p.mask)
    # areas are counted at the network's input size: scaled by (2000 * 2500) / (64 * 64) here
    assert_matches_reference(preds, reference_predict(model_dir("classifier"), [big], {"gate": 0.0}), [big])


@pytest.mark.parametrize("bad, match", [
    (np.zeros((0, 5)), "has no pixels"),
    (np.array([["a", "b"]]), "must hold numbers"),
    (np.zeros((2, 3, 4, 5)), "must be an image"),
    (None, "got None"),
    ([], "empty list"),
    (b"x.dcm", "bytes"),
])
def test_bad_arrays_are_clear_errors(bad, match):
    with pytest.raises(InvalidInputError, match=match):
        Predictor.from_dir(model_dir("plain")).predict(bad)



def _generator(images):
    yield from images


@pytest.mark.parametrize("make, name, kind", [
    (lambda imgs: _generator(imgs), "inputs", "generator"),
    (lambda imgs: iter(imgs), "inputs", "list_iterator"),
    (lambda imgs: map(np.asarray, imgs), "inputs", "map"),
    (lambda imgs: [imgs[0], (i for i in imgs[1:])], r"inputs\[1\]", "generator"),
])
@pytest.mark.parametrize("method", ["predict", "predict_iter"])
def test_a_generator_is_named_with_what_is_accepted(make, name, kind, method):
    # It was read as an array of one Python object: "inputs must hold numbers, got dtype object".
    images = phantom_images(3)
    given = make(images)
    with pytest.raises(InvalidInputError, match=rf"^{name} is a {kind} \(a one-shot iterator\); predict takes a path, "
                                                 r"a folder, an array or tensor, or a list of them: pass list\(\.\.\.\)"):
        getattr(Predictor.from_dir(model_dir("plain")), method)(given)


@pytest.mark.parametrize("bad, match", [
    ({"a": np.zeros((4, 4))}, r"^inputs is a dict; predict takes a path, a folder, an array or tensor, or a list of them"),
    ({np.zeros(3).tobytes()}, r"^inputs is a set; predict takes .* a list of them"),
    (object(), r"^inputs has type object \(<object .*\); predict takes a path, a folder, an array or tensor, or a list of them"),
    ([["a.dcm", "b.dcm"]], r"^inputs\[0\] holds strings: .*not as a list of lists"),
])
def test_other_containers_are_named_with_what_is_accepted(bad, match):
    with pytest.raises(InvalidInputError, match=match):
        Predictor.from_dir(model_dir("plain")).predict(bad)


@pytest.mark.parametrize("dtype", [">u2", ">i2", ">u4", ">f4", ">f8", ">f2", ">i8", ">u8", np.longdouble])
def test_big_endian_and_long_double_arrays_predict_like_native_ones(dtype):
    # torch.from_numpy refuses non-native byte order (a ValueError from inside the batch) and
    # long double (a TypeError).
    img = phantom_images(1)[0]
    predictor = Predictor.from_dir(model_dir("classifier"))
    want = predictor.predict(img.astype(np.dtype(dtype).newbyteorder("=")))[0]
    got = predictor.predict(img.astype(dtype))[0]
    assert (got.rle, got.score) == (want.rle, want.score)


def test_read_only_arrays_predict_without_a_warning():
    # torch.from_numpy of a read-only array warns (an error under strict filters)
    img = phantom_images(1)[0].astype(np.float32)
    frozen = img.copy()
    frozen.flags.writeable = False
    predictor = Predictor.from_dir(model_dir("plain"))
    assert predictor.predict(frozen)[0].rle == predictor.predict(img)[0].rle


def test_a_big_endian_dicom_predicts_like_its_little_endian_twin(tmp_path):
    from pydicom.uid import ExplicitVRBigEndian

    raw = phantom_images(1)[0].astype(np.uint16) * 16
    little = write_dicom(tmp_path / "little.dcm", raw)
    big = write_dicom(tmp_path / "big.dcm", raw, syntax=ExplicitVRBigEndian, PixelData=raw.astype(">u2").tobytes())
    from pneumoseg.data import read_dicom

    pixels = read_dicom(big).pixels
    assert pixels.dtype.isnative and np.array_equal(pixels, raw)
    predictor = Predictor.from_dir(model_dir("classifier"))
    # one image per batch: torch's CPU Linear may round two identical rows of one batch 1 ulp apart
    a, b = predictor.predict([str(little), str(big)], on_error="skip", batch_size=1)
    assert (a.rle, a.score) == (b.rle, b.score)


def test_float64_pixels_beyond_float32_are_a_clear_error():
    # cast to float32 they became infinities: NumPy warned, then "NaN or infinity" blamed the pixels
    img = phantom_images(1)[0] * 1e300
    with pytest.raises(InvalidInputError, match="beyond float32"):
        Predictor.from_dir(model_dir("plain")).predict(img)

def test_non_finite_pixels_are_an_error():
    img = np.ones((64, 64), np.float32)
    img[3, 4] = np.nan
    predictor = Predictor.from_dir(model_dir("plain"))
    with pytest.raises(InvalidInputError, match="NaN or infinity"):
        predictor.predict(img)
    with pytest.raises(InvalidInputError, match="NaN or infinity"):
        predictor.predict(torch.from_numpy(img))


def test_in_memory_images_are_loaded_inline_and_files_on_reader_threads(tmp_path, monkeypatch):
    """Arrays and tensors need no reader thread (its start-up and hand-off cost more than the load);
    files are read on the pool while the previous batch runs; a bad in-memory image in a mixed input is
    skipped or raised in input order either way."""
    from pneumoseg.infer import predictor as predictor_module

    pools = []

    class CountingPool(predictor_module.ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(predictor_module, "ThreadPoolExecutor", CountingPool)
    images = phantom_images(3, seed=12)
    predictor = Predictor.from_dir(model_dir("classifier"))
    in_memory = predictor.predict(images + [torch.from_numpy(images[0])], batch_size=2)
    assert pools == []
    _write_dicom(tmp_path / "a.dcm", images[1])
    bad = np.ones((64, 64), np.float32)
    bad[0, 0] = np.inf
    mixed = predictor.predict([images[0], tmp_path / "a.dcm", bad, images[2]], batch_size=2, on_error="skip")
    assert len(pools) == 1
    assert [p.rle for p in mixed] == [in_memory[0].rle, in_memory[1].rle, in_memory[2].rle]
    assert mixed.skipped == [("image-00001", "the pixels contain NaN or infinity")]
    with pytest.raises(InvalidInputError, match="NaN or infinity"):
        predictor.predict([images[0], tmp_path / "a.dcm", bad], batch_size=1)


def test_pneumoseg_predictor_is_the_public_name():
    assert pneumoseg.Predictor is Predictor
    d = Predictor.from_dir(model_dir("aux")).describe()
    assert d["backend"] == "torch" and d["gate"] == "encoder" and d["segment_part"] == "decoder"
    assert d["thresholds"] == THRESHOLDS and d["input_size"] == [64, 64]


@pytest.mark.parametrize("kind, network, which", [("classifier", "classifier", 0), ("classifier", "segmenter", 0),
                                                  ("aux", "encoder", 0), ("aux", "segmenter", 0)])
@pytest.mark.parametrize("segment", ["gated", "all"])
def test_a_network_answering_nan_is_an_error_not_a_negative(kind, network, which, segment):
    # NaN compares false with every threshold: unchecked, a NaN score or map reads as "no pneumothorax".
    predictor = Predictor.from_dir(model_dir(kind), segment=segment, thresholds={"gate": 0.0})
    parts = {"classifier": "classifier", "encoder": "encoder", "segmenter": "segmenter"}
    run = predictor.backend.run

    def poisoned(part, *inputs):
        out = list(run(part, *inputs))
        if part == parts[network] or (network == "segmenter" and part == "decoder"):
            out[which] = out[which].clone()
            out[which][-1] = float("nan")  # the batch's last image
        return tuple(out)

    predictor.backend.run = poisoned
    images = phantom_images(3, seed=5)
    with pytest.raises(pneumoseg.PneumosegError, match=r"image .*'2'.* NaN .*precision fp32"):
        predictor.predict(images, image_ids=["0", "1", "2"])
    predictor.backend.run = run
    assert len(predictor.predict(images)) == 3


@pytest.mark.parametrize("network, size", [("classifier", [33, 97]), ("segmenter", [96, 64])])
def test_an_onnx_graph_of_another_size_than_the_description_is_refused_at_load(tmp_path, network, size):
    # onnxruntime refused every batch with its own InvalidArgument error (a traceback from pneumoseg predict).
    import json

    folder = copy_model_dir("classifier", tmp_path / "model", exported=True)
    raw = json.loads((folder / "pneumoseg.json").read_text())
    raw["networks"][network]["input_size"] = size
    (folder / "pneumoseg.json").write_text(json.dumps(raw))
    with pytest.raises(DataFormatError, match=rf"{network}\.fp32\.onnx: the {network} graph takes images of shape "
                                              rf"\[.*, 1, \d+, \d+\], but pneumoseg\.json gives the network an input "
                                              rf"size of \[{size[0]}, {size[1]}\]"):
        Predictor.from_dir(folder, backend="onnxruntime")
    assert len(Predictor.from_dir(folder, backend="torch").predict(phantom_images(1))) == 1


def test_a_classifier_trained_on_chest_crops_is_given_chest_crops(tmp_path):
    # The crop was recorded only in the training section, and the Predictor gave such a classifier
    # whole images: scores from another input distribution than it was trained on, without a word.
    import json

    path = copy_model_dir("classifier", tmp_path / "m")
    raw = json.loads((path / "pneumoseg.json").read_text())
    raw["networks"]["classifier"]["crop"] = "chest"
    (path / "pneumoseg.json").write_text(json.dumps(raw))
    images = [np.pad(img, 40) for img in phantom_images(4, seed=6)]  # a wide empty border the crop removes
    predictor = Predictor.from_dir(path)
    assert predictor.describe()["gate_crop"] == "chest"
    preds = predictor.predict(images)
    refs = reference_predict(path, images)
    assert [p.score for p in preds] == pytest.approx([r["score"] for r in refs], abs=1e-5)
    uncropped = Predictor.from_dir(model_dir("classifier")).predict(images)
    assert max(abs(a.score - b.score) for a, b in zip(preds, uncropped)) > 1e-3  # the crop changed the input
