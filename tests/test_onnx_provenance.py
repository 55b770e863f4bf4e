"""Exported ONNX parts record the network they were exported from (weights' SHA-256, construction
arguments, part, precision) and the backends refuse one exported from anything else: another model's
file copied in with its fingerprint edited to match would otherwise run silently in its place."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import TensorProto, helper  # noqa: E402

from pneumoseg.cli import main  # noqa: E402
from pneumoseg.errors import DataFormatError  # noqa: E402
from pneumoseg.export.onnx import OPSET, export_onnx  # noqa: E402
from pneumoseg.export.provenance import (  # noqa: E402
    PROVENANCE_FORMAT, StaleArtefactError, check_source, read_onnx_metadata, verified_onnx_artefact,
)
from pneumoseg.infer import Predictor  # noqa: E402
from pneumoseg.models.model_dir import CONFIG_NAME, load_model_dir, save_model_dir, sha256_of  # noqa: E402

from infer_helpers import SIZE, THRESHOLDS, copy_model_dir, exported_model_dir, phantom_images, tiny_networks  # noqa: E402

KEY = "segmenter-onnx-fp32"
ONNX_FILE = "onnx/segmenter.fp32.onnx"


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """Another model of the same architecture (other weights), exported: the source of the copied file."""
    path = tmp_path_factory.mktemp("other") / "m"
    save_model_dir(path, tiny_networks("plain", seed=1), input_sizes={"segmenter": SIZE}, thresholds=THRESHOLDS)
    export_onnx(path, "fp32", validation=phantom_images(2, seed=7))
    return path


def metadata_of(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def edit_config(folder, change) -> None:
    config = folder / CONFIG_NAME
    raw = json.loads(config.read_text())
    change(raw)
    config.write_text(json.dumps(raw, indent=2))


def plant(folder, source_file=None, *, keep_source_record: bool = True) -> None:
    """Put ``source_file`` (None: the file as it is now) in place of the folder's fp32 segmenter and
    edit its fingerprint to match, as someone copying files between model folders would."""
    if source_file is not None:
        shutil.copyfile(source_file, folder / ONNX_FILE)
    digest = sha256_of(folder / ONNX_FILE)

    def change(raw):
        raw["artefacts"][KEY]["sha256"] = digest
        if not keep_source_record:
            raw["artefacts"][KEY]["meta"].pop("source", None)
    edit_config(folder, change)


def test_every_exported_part_records_its_source():
    path = exported_model_dir("plain")
    md = load_model_dir(path)
    art = md.artefacts[KEY]
    file = md.artefact_path(KEY)
    meta = read_onnx_metadata(file)
    # the cheap reader sees what onnx and onnxruntime see
    assert meta == metadata_of(file)
    assert meta == ort.InferenceSession(str(file), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    seg = md.networks["segmenter"]
    assert meta["pneumoseg.provenance"] == str(PROVENANCE_FORMAT)
    assert (meta["pneumoseg.network"], meta["pneumoseg.part"], meta["pneumoseg.precision"]) == ("segmenter", "segmenter", "fp32")
    assert meta["pneumoseg.weights_sha256"] == seg.sha256 == sha256_of(md.weights_path("segmenter"))
    assert json.loads(meta["pneumoseg.config"]) == seg.config
    assert art.meta["source"]["weights_sha256"] == seg.sha256 and art.meta["source"]["part"] == "segmenter"


def test_another_models_onnx_with_an_edited_fingerprint_is_refused(tmp_path, other_model):
    path = copy_model_dir("plain", tmp_path / "m", exported=True)
    images = phantom_images(4, seed=5)
    own = [p.rle for p in Predictor.from_dir(path).predict(images)]
    foreign = [p.rle for p in Predictor.from_dir(other_model, backend="onnxruntime").predict(images)]
    assert own != foreign  # what the folder would silently answer with the copy
    plant(path, other_model / ONNX_FILE)
    load_model_dir(path).artefact_path(KEY)  # the fingerprint alone is satisfied
    with pytest.raises(StaleArtefactError) as caught:
        Predictor.from_dir(path, backend="onnxruntime")
    message = str(caught.value)
    assert isinstance(caught.value, DataFormatError)
    assert str(path / ONNX_FILE) in message and "segmenter" in message and "segmenter.safetensors" in message
    assert f"`pneumoseg export {path} --format onnx`" in message
    # the command it names repairs the folder
    assert main(["export", str(path), "--format", "onnx"]) == 0
    assert [p.rle for p in Predictor.from_dir(path, backend="onnxruntime").predict(images)] == own


def test_the_cli_refuses_it_in_one_line(tmp_path, other_model, capsys):
    path = copy_model_dir("plain", tmp_path / "m", exported=True)
    plant(path, other_model / ONNX_FILE, keep_source_record=False)
    images = tmp_path / "images"
    from pneumoseg.data import make_synthetic_siim

    make_synthetic_siim(images, n_images=2, size=64, seed=1)
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["predict", str(images), "--model", str(path), "--out", str(out), "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exported from another network" in err and "pneumoseg export" in err, err
    assert not (out / "submission.csv").exists()


def test_a_description_changed_after_export_is_refused(tmp_path):
    path = copy_model_dir("plain", tmp_path / "m", exported=True)
    edit_config(path, lambda raw: raw["networks"]["segmenter"]["config"].update(aux_dropout=0.4))
    with pytest.raises(StaleArtefactError, match=r"aux_dropout=0\.2 in the file, 0\.4 in the folder"):
        Predictor.from_dir(path, backend="onnxruntime")


def test_exported_parts_load_and_agree_with_torch():
    path = exported_model_dir("plain")
    images = phantom_images(5, seed=6)
    want = Predictor.from_dir(path).predict(images, return_masks=True)
    got = Predictor.from_dir(path, backend="onnxruntime").predict(images, return_masks=True)
    assert [p.score for p in got] == pytest.approx([p.score for p in want], abs=1e-4)
    overlap = sum(int((a.mask & b.mask).sum()) for a, b in zip(want, got))
    total = sum(int(a.mask.sum() + b.mask.sum()) for a, b in zip(want, got))
    assert total > 0 and 2 * overlap / total > 0.99


def strip_record(file) -> None:
    """The file as a pneumoseg without source records exported it."""
    model = onnx.load(str(file))
    kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith("pneumoseg.")]
    del model.metadata_props[:]
    for key, value in kept:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(file))


def test_parts_exported_before_the_record_still_load_with_an_info_line(tmp_path, caplog):
    path = copy_model_dir("plain", tmp_path / "m", exported=True)
    images = phantom_images(4, seed=8)
    want = [p.rle for p in Predictor.from_dir(path, backend="onnxruntime").predict(images)]
    strip_record(path / ONNX_FILE)
    plant(path, keep_source_record=False)  # an old folder: no record in file or description
    assert read_onnx_metadata(path / ONNX_FILE) == {}
    with caplog.at_level(logging.INFO, logger="pneumoseg.export.provenance"):
        got = [p.rle for p in Predictor.from_dir(path, backend="onnxruntime").predict(images)]
    assert got == want
    lines = [r.getMessage() for r in caplog.records if r.name == "pneumoseg.export.provenance"]
    assert len(lines) == 1 and "without a record of its source" in lines[0] and f"pneumoseg export {path}" in lines[0]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "pneumoseg.export.provenance")


def test_a_part_that_lost_its_record_after_export_is_refused(tmp_path):
    path = copy_model_dir("plain", tmp_path / "m", exported=True)
    strip_record(path / ONNX_FILE)
    plant(path, keep_source_record=True)  # pneumoseg.json still says it was recorded
    with pytest.raises(StaleArtefactError, match="replaced after export"):
        Predictor.from_dir(path, backend="onnxruntime")


@pytest.mark.slow
def test_fp16_and_int8_parts_record_their_own_source(tmp_path, other_model):
    path = copy_model_dir("plain", tmp_path / "m", exported=True)
    plant(path, other_model / ONNX_FILE)  # int8 must not quantise the stale fp32 graph it finds
    export_onnx(path, "fp16")
    export_onnx(path, "int8", calibrate=phantom_images(4, seed=9), min_dice=0.8)
    md = load_model_dir(path)
    seg = md.networks["segmenter"]
    for precision in ("fp32", "fp16", "int8"):
        key = f"segmenter-onnx-{precision}"
        file = verified_onnx_artefact(md, key, "segmenter")
        meta = read_onnx_metadata(file)
        assert meta == metadata_of(file)
        assert meta["pneumoseg.precision"] == precision and meta["pneumoseg.weights_sha256"] == seg.sha256
        assert json.loads(meta["pneumoseg.config"]) == seg.config
        assert md.artefacts[key].meta["source"]["precision"] == precision
    # one record in the int8 graph (the quantiser copied the fp32 graph's, which is replaced)
    keys = [p.key for p in onnx.load(str(path / "onnx/segmenter.int8.onnx")).metadata_props]
    assert keys.count("pneumoseg.precision") == 1
    Predictor.from_dir(path, backend="onnxruntime", precision="int8").predict(phantom_images(2))


def test_tensorrt_backend_checks_the_onnx_before_it_builds_or_finds_an_engine(tmp_path, other_model, monkeypatch):
    from pneumoseg.infer import tensorrt as trt_backend

    class Reached(Exception):
        pass

    def past_the_check(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: None)
    monkeypatch.setattr(trt_backend, "environment", lambda index: {"tensorrt": "10.9.0", "cuda": "12.8", "gpu": "GPU",
                                                                 "compute_capability": [9, 0]})
    monkeypatch.setattr(trt_backend, "timing_cache_path", past_the_check)  # the step before the cache lookup
    path = copy_model_dir("plain", tmp_path / "m", exported=True)
    with pytest.raises(Reached):
        trt_backend.TensorRTBackend(load_model_dir(path), ["segmenter"], "cuda:0", "fp32", engine_cache=tmp_path / "c")
    plant(path, other_model / ONNX_FILE)
    with pytest.raises(StaleArtefactError, match=r"--format tensorrt --precision fp32`"):
        trt_backend.TensorRTBackend(load_model_dir(path), ["segmenter"], "cuda:0", "fp32", engine_cache=tmp_path / "c")


def test_tensorrt_export_exports_a_stale_onnx_again(tmp_path, other_model):
    from pneumoseg.export.tensorrt import _needs_onnx

    path = copy_model_dir("plain", tmp_path / "m", exported=True)
    assert not _needs_onnx(load_model_dir(path), "segmenter", "fp32")
    assert _needs_onnx(load_model_dir(path), "segmenter", "fp16")  # none yet
    plant(path, other_model / ONNX_FILE)
    assert _needs_onnx(load_model_dir(path), "segmenter", "fp32")
    with open(path / ONNX_FILE, "r+b") as f:  # a damaged file stays an error, not a silent re-export
        f.seek(200)
        f.write(b"\xff" * 8)
    with pytest.raises(DataFormatError, match="does not match its fingerprint"):
        _needs_onnx(load_model_dir(path), "segmenter", "fp32")


def test_check_source_names_each_difference(tmp_path):
    md = load_model_dir(exported_model_dir("plain"))
    good = read_onnx_metadata(md.artefact_path(KEY))
    file = md.path / ONNX_FILE
    check_source(md, KEY, "segmenter", file, good)
    cases = [
        ({"pneumoseg.part": "decoder"}, "part 'decoder', not 'segmenter'"),
        ({"pneumoseg.precision": "fp16"}, "precision 'fp16', not 'fp32'"),
        ({"pneumoseg.weights_sha256": "0" * 64}, "weights with SHA-256 000000000000..., not those of segmenter.safetensors"),
        ({"pneumoseg.provenance": str(PROVENANCE_FORMAT + 1)}, "upgrade pneumoseg"),
        ({"pneumoseg.provenance": "x"}, "malformed"),
        ({"pneumoseg.config": json.dumps({**json.loads(good["pneumoseg.config"]), "encoder": "resnet34"})},
         'encoder="resnet34" in the file, "resnet_tiny" in the folder'),
    ]
    for change, message in cases:
        with pytest.raises(StaleArtefactError) as caught:
            check_source(md, KEY, "segmenter", file, {**good, **change})
        assert message in str(caught.value) and str(file) in str(caught.value)
    missing = {k: v for k, v in good.items() if k != "pneumoseg.weights_sha256"}
    with pytest.raises(StaleArtefactError, match="no weights_sha256 in its record"):
        check_source(md, KEY, "segmenter", file, missing)


def test_metadata_reader_skips_the_graph_and_refuses_what_is_not_onnx(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", OPSET)], doc_string="d" * 300, model_version=7)
    helper.set_model_props(model, {"a": "1", "pneumoseg.network": "segmenter", "ü": "ÿ" * 200, "": ""})
    file = tmp_path / "m.onnx"
    file.write_bytes(model.SerializeToString())
    assert read_onnx_metadata(file) == metadata_of(file) == {"a": "1", "pneumoseg.network": "segmenter", "ü": "ÿ" * 200, "": ""}
    data = file.read_bytes()
    for bad in (data[:-3], b"\x07" * 20, b"\x0a\xff\xff\xff\xff\x0f", b"\x00\x01"):
        file.write_bytes(bad)
        with pytest.raises(DataFormatError, match="not an ONNX model"):
            read_onnx_metadata(file)
