"""The model directory: written, read back and rebuilt bit for bit; refused when newer, damaged,
mismatched or incomplete; never unpickled."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from pneumoseg.errors import DataFormatError, InvalidInputError, OutputError  # noqa: E402
from pneumoseg.models import create_classifier, create_segmenter  # noqa: E402
from pneumoseg.models.model_dir import (  # noqa: E402
    CONFIG_NAME, FORMAT_VERSION, Thresholds, load_model_dir, save_model_dir,
)


@pytest.fixture
def networks():
    torch.manual_seed(0)
    seg = create_segmenter("unet", "resnet_tiny", in_channels=1, decoder_channels=(32, 16, 16, 8, 8), aux_classifier=True)
    cls = create_classifier("resnet_tiny", num_classes=1, in_channels=1)
    for m in (seg, cls):  # non-trivial BN statistics, so a lost buffer would show
        m.train()
        with torch.no_grad():
            m(torch.randn(2, 1, 64, 64))
    return {"segmenter": seg.eval(), "classifier": cls.eval()}


def test_round_trip_rebuilds_identical_networks(tmp_path, networks):
    out = save_model_dir(tmp_path / "run", networks, input_sizes={"segmenter": 64, "classifier": (64, 96)},
                         thresholds={"gate": 0.4, "top": 0.7, "min_area": 10, "bottom": 0.2}, metrics={"dice": 0.5})
    loaded = load_model_dir(out.path)
    assert loaded.thresholds == Thresholds(gate=0.4, top=0.7, min_area=10, bottom=0.2)
    assert loaded.networks["classifier"].input_size == (64, 96)
    assert loaded.gate_source == "classifier" and loaded.metrics == {"dice": 0.5}
    x = torch.randn(3, 1, 64, 64)
    for name, model in networks.items():
        rebuilt = loaded.build(name)
        assert not rebuilt.training
        with torch.no_grad():
            a, b = model(x), rebuilt(x)
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_gate_source_follows_the_networks(tmp_path, networks):
    only_seg = save_model_dir(tmp_path / "a", {"segmenter": networks["segmenter"]}, input_sizes={"segmenter": 64})
    assert only_seg.gate_source == "segmenter"
    plain = create_segmenter("unet", "resnet_tiny", decoder_channels=(32, 16, 16, 8, 8))
    assert save_model_dir(tmp_path / "b", {"segmenter": plain}, input_sizes={"segmenter": 64}).gate_source is None


def test_newer_format_is_refused(tmp_path, networks):
    out = save_model_dir(tmp_path / "run", networks, input_sizes={"segmenter": 64, "classifier": 64})
    raw = json.loads((out.path / CONFIG_NAME).read_text())
    raw["format_version"] = FORMAT_VERSION + 1
    (out.path / CONFIG_NAME).write_text(json.dumps(raw))
    with pytest.raises(DataFormatError, match="upgrade pneumoseg"):
        load_model_dir(out.path)


@pytest.mark.parametrize("damage", ["flip", "missing", "swap"])
def test_damaged_or_mismatched_weights_are_refused(tmp_path, networks, damage):
    out = save_model_dir(tmp_path / "run", networks, input_sizes={"segmenter": 64, "classifier": 64})
    weights = out.path / "segmenter.safetensors"
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
        match = "fingerprint"
    elif damage == "missing":
        weights.unlink()
        match = "missing"
    else:  # a classifier's weights under the segmenter's name, fingerprint updated: shapes must not match
        raw = json.loads((out.path / CONFIG_NAME).read_text())
        raw["networks"]["segmenter"]["weights"] = "classifier.safetensors"
        raw["networks"]["segmenter"]["sha256"] = raw["networks"]["classifier"]["sha256"]
        (out.path / CONFIG_NAME).write_text(json.dumps(raw))
        match = "do not match the segmenter config"
    with pytest.raises(DataFormatError, match=match):
        load_model_dir(out.path).build("segmenter")


@pytest.mark.parametrize("content", ["", "{", "[]", '{"format": "other"}', '{"format": "pneumoseg-model", "format_version": 1}'])
def test_malformed_descriptions_are_refused(tmp_path, content):
    (tmp_path / CONFIG_NAME).write_text(content)
    with pytest.raises(DataFormatError, match=CONFIG_NAME):
        load_model_dir(tmp_path)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(DataFormatError, match="not a model directory"):
        load_model_dir(tmp_path)
    with pytest.raises(DataFormatError, match="no such model directory"):
        load_model_dir(tmp_path / "absent")


def test_artefacts_are_fingerprinted(tmp_path, networks):
    out = save_model_dir(tmp_path / "run", networks, input_sizes={"segmenter": 64, "classifier": 64})
    path = out.add_artefact("segmenter-onnx", "onnx/segmenter.onnx", b"graph", format="onnx",
                            network="segmenter", precision="fp32", meta={"opset": 18})
    assert path.read_bytes() == b"graph"
    again = load_model_dir(out.path)
    assert again.artefact_path("segmenter-onnx") == path and again.artefacts["segmenter-onnx"].meta == {"opset": 18}
    path.write_bytes(b"other")
    with pytest.raises(DataFormatError, match="fingerprint"):
        again.artefact_path("segmenter-onnx")
    with pytest.raises(OutputError, match="artefact path '..' cannot be used as a file name"):
        out.add_artefact("x", "../escape.onnx", b"", format="onnx", network="segmenter", precision="fp32")


def test_bad_arguments(tmp_path, networks):
    with pytest.raises(InvalidInputError, match="input_sizes has no entry"):
        save_model_dir(tmp_path / "a", networks, input_sizes={"segmenter": 64})
    with pytest.raises(InvalidInputError, match="multiple of 32"):
        save_model_dir(tmp_path / "b", {"segmenter": networks["segmenter"]}, input_sizes={"segmenter": 48})
    with pytest.raises(InvalidInputError, match="network names"):
        save_model_dir(tmp_path / "c", {"decoder": networks["segmenter"]}, input_sizes={"decoder": 64})
    with pytest.raises(InvalidInputError, match="thresholds.gate"):
        save_model_dir(tmp_path / "d", networks, input_sizes={"segmenter": 64, "classifier": 64}, thresholds={"gate": True})
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "labels.csv").write_text("precious")
    with pytest.raises(OutputError, match="not empty"):
        save_model_dir(tmp_path / "e", networks, input_sizes={"segmenter": 64, "classifier": 64})
    assert (tmp_path / "e" / "labels.csv").read_text() == "precious"


# --- tampered descriptions: every field's type checked at load, a DataFormatError naming the field -----------

def _artefact_of(raw, network):
    return next(a for a in raw["artefacts"].values() if a["network"] == network)


TAMPERED = {
    # AttributeError / TypeError / ValueError tracebacks before
    "networks a list": (lambda raw: raw.update(networks=[]), "networks must be a JSON object, got list"),
    "artefacts null": (lambda raw: raw.update(artefacts=None), "artefacts must be a JSON object, got NoneType"),
    "metrics a list": (lambda raw: raw.update(metrics=[1, 2]), "metrics must be a JSON object, got list"),
    "training a string": (lambda raw: raw.update(training="abc"), "training must be a JSON object, got str"),
    "artefact path a number": (lambda raw: _artefact_of(raw, "segmenter").update(path=3),
                               r"artefacts\.segmenter-onnx-fp32\.path must be a non-empty string, got int 3"),
    # accepted before, then failing late or answering wrongly
    "std negative": (lambda raw: raw["preprocessing"].update(std=-1), r"preprocessing\.std must be in \(0, inf\), got -1"),
    "std zero": (lambda raw: raw["preprocessing"].update(std=0), r"preprocessing\.std must be in \(0, inf\)"),
    "mean text": (lambda raw: raw["preprocessing"].update(mean="x"), r"preprocessing\.mean must be a real number, got str"),
    "thresholds missing": (lambda raw: raw.pop("thresholds"), "missing field 'thresholds'"),
    "a threshold missing": (lambda raw: raw["thresholds"].pop("min_area"), "thresholds lacks 'min_area'"),
    "weights outside": (lambda raw: raw["networks"]["segmenter"].update(weights="../other/segmenter.safetensors"),
                        r"networks\.segmenter\.weights '\.\./other/segmenter\.safetensors' is not a path inside the model directory"),
    "weights a number": (lambda raw: raw["networks"]["segmenter"].update(weights=5),
                         r"networks\.segmenter\.weights must be a non-empty string, got int 5"),
    "fingerprint a number": (lambda raw: raw["networks"]["classifier"].update(sha256=0),
                             r"networks\.classifier\.sha256 must be a SHA-256 fingerprint"),
    "artefact fingerprint short": (lambda raw: _artefact_of(raw, "classifier").update(sha256="abc"),
                                   r"artefacts\.classifier-onnx-fp32\.sha256 must be a SHA-256 fingerprint"),
    "segmenter size not a multiple of 32": (lambda raw: raw["networks"]["segmenter"].update(input_size=[48, 48]),
                                            r"networks\.segmenter\.input_size must be a multiple of 32"),
    "network entry unknown field": (lambda raw: raw["networks"]["segmenter"].update(wieghts="x"),
                                    r"networks\.segmenter has unknown field\(s\) 'wieghts'"),
    "artefact of no network": (lambda raw: _artefact_of(raw, "segmenter").update(network="decoder"),
                               r"artefacts\.segmenter-onnx-fp32\.network is 'decoder', which is not one of"),
    "artefact meta a list": (lambda raw: _artefact_of(raw, "classifier").update(meta=[1]),
                             r"artefacts\.classifier-onnx-fp32\.meta must be a JSON object"),
    "three input channels": (lambda raw: raw["networks"]["classifier"]["config"].update(in_channels=3),
                             r"networks\.classifier\.config: the classifier takes in_channels=3, but radiographs"),
    "two classes": (lambda raw: raw["networks"]["classifier"]["config"].update(num_classes=2),
                    r"the classifier has num_classes=2, but the pipeline reads one pneumothorax logit per image"),
    "crop unknown": (lambda raw: raw["networks"]["classifier"].update(crop="lungs"),
                     r"networks\.classifier\.crop must be null or 'chest', got 'lungs'"),
    "segmenter cropped": (lambda raw: raw["networks"]["segmenter"].update(crop="chest"),
                          r"networks\.segmenter\.crop: only a classifier may be cropped"),
}


@pytest.mark.parametrize("name", list(TAMPERED))
def test_tampered_descriptions_are_refused_at_load_naming_the_field(tmp_path, name):
    from pneumoseg.cli import main

    from infer_helpers import copy_model_dir

    tamper, match = TAMPERED[name]
    folder = copy_model_dir("classifier", tmp_path / "model", exported=True)
    raw = json.loads((folder / CONFIG_NAME).read_text())
    tamper(raw)
    (folder / CONFIG_NAME).write_text(json.dumps(raw))
    with pytest.raises(DataFormatError, match=rf"{CONFIG_NAME}: malformed model description \(.*{match}"):
        load_model_dir(folder)
    assert main(["export", str(folder)]) == 2


def _rewrite_weights(folder, name, change):
    """Apply ``change`` to the weights of ``name`` and record the new file's fingerprint, as someone
    who edits both would."""
    import hashlib

    from safetensors.torch import load_file, save_file

    weights = folder / f"{name}.safetensors"
    tensors = change(load_file(weights))
    save_file(tensors, weights)
    raw = json.loads((folder / CONFIG_NAME).read_text())
    raw["networks"][name]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (folder / CONFIG_NAME).write_text(json.dumps(raw))


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.uint8, torch.complex64])
def test_weights_of_another_kind_of_number_are_refused(tmp_path, dtype):
    # load_state_dict cast them: bool weights loaded as 0/1, complex ones lost their imaginary part.
    if dtype == torch.complex64:  # older ones cannot write the file (and refuse to read it: "C64" unknown)
        pytest.importorskip("safetensors", minversion="0.7")  # the first to write complex tensors
    from infer_helpers import copy_model_dir

    folder = copy_model_dir("plain", tmp_path / "model")
    _rewrite_weights(folder, "segmenter", lambda t: {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in t.items()})
    with pytest.raises(DataFormatError, match=rf"of another kind of number \(e\.g\. .*: {dtype} in the file, torch\.float32"):
        load_model_dir(folder).build("segmenter")


def test_weights_in_another_float_precision_still_load(tmp_path):
    from infer_helpers import copy_model_dir

    folder = copy_model_dir("plain", tmp_path / "model")
    want = load_model_dir(folder).build("segmenter").state_dict()
    _rewrite_weights(folder, "segmenter", lambda t: {k: (v.double() if v.is_floating_point() else v) for k, v in t.items()})
    got = load_model_dir(folder).build("segmenter").state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_float8_weights_load_instead_of_failing_the_finiteness_check(tmp_path):
    # torch.isfinite has no float8 kernel: building the network ended in NotImplementedError.
    from infer_helpers import copy_model_dir

    folder = copy_model_dir("plain", tmp_path / "model")
    _rewrite_weights(folder, "segmenter",
                     lambda t: {k: (v.to(torch.float8_e4m3fn) if v.is_floating_point() else v) for k, v in t.items()})
    stored = {k: v.float() for k, v in _load_weights(folder, "segmenter").items()}
    got = load_model_dir(folder).build("segmenter").state_dict()
    assert all(torch.equal(got[k].float(), stored[k].float()) for k in got)


def _load_weights(folder, name):
    from safetensors.torch import load_file

    return load_file(folder / f"{name}.safetensors")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused(tmp_path, value):
    # An infinite weight saturates the sigmoid: every image would read as certain, without a word.
    from infer_helpers import copy_model_dir

    folder = copy_model_dir("plain", tmp_path / "model")

    def poison(tensors):
        tensors["segmentation_head.0.weight"][0, 0, 0, 0] = value
        return tensors

    _rewrite_weights(folder, "segmenter", poison)
    with pytest.raises(DataFormatError, match=r"1 weight tensor\(s\) hold NaN or infinity \(e\.g\. segmentation_head\.0\.weight\)"):
        load_model_dir(folder).build("segmenter")


def test_a_config_too_large_for_memory_is_a_format_error(tmp_path):
    # torch's allocator raised RuntimeError (6.9 TB asked for) through Predictor.from_dir and the CLI.
    from pneumoseg.cli import main

    from infer_helpers import copy_model_dir

    folder = copy_model_dir("plain", tmp_path / "model")
    raw = json.loads((folder / CONFIG_NAME).read_text())
    raw["networks"]["segmenter"]["config"]["decoder_channels"] = [10**9] * 5
    (folder / CONFIG_NAME).write_text(json.dumps(raw))
    with pytest.raises(DataFormatError, match=r"the segmenter config cannot be built \(RuntimeError: .*do not fit in memory"):
        load_model_dir(folder).build("segmenter")
    assert main(["predict", str(tmp_path), "--model", str(folder), "--out", str(tmp_path / "out")]) == 2


@pytest.mark.parametrize("network, edit, match", [
    # the builder's own TypeError ("missing 1 required positional argument") escaped the CLI as a traceback
    ("classifier", lambda config: config.pop("encoder"), r"classifier config lacks required key\(s\) 'encoder'"),
    # past int64: torch's TypeError ("Overflow when unpacking long long") while building on the meta device
    ("segmenter", lambda config: config.update(decoder_channels=[2**70, 16, 16, 8, 8]),
     r"decoder_channels entries must be an integer >= 1 \(and at most 2\*\*63 - 1\), got 1180591620717411303424"),
])
def test_a_config_the_builder_cannot_take_is_a_format_error(tmp_path, network, edit, match):
    from pneumoseg.cli import main

    from infer_helpers import copy_model_dir

    folder = copy_model_dir("classifier", tmp_path / "model")
    raw = json.loads((folder / CONFIG_NAME).read_text())
    edit(raw["networks"][network]["config"])
    (folder / CONFIG_NAME).write_text(json.dumps(raw))
    with pytest.raises(DataFormatError, match=rf"the {network} config cannot be built: {match}"):
        load_model_dir(folder).build(network)
    assert main(["predict", str(tmp_path), "--model", str(folder), "--out", str(tmp_path / "out")]) == 2


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_or_infinity_in_the_description_is_not_json(tmp_path, constant):
    # Python's json read them; a NaN segmenter 'kind' reached the onnxruntime backend's provenance
    # check, whose json.dumps(allow_nan=False) raised a bare ValueError through Predictor.from_dir.
    from infer_helpers import copy_model_dir

    folder = copy_model_dir("classifier", tmp_path / "model", exported=True)
    text = (folder / CONFIG_NAME).read_text()
    assert text.count('"kind": "segmenter"') == 1
    (folder / CONFIG_NAME).write_text(text.replace('"kind": "segmenter"', f'"kind": {constant}'))
    with pytest.raises(DataFormatError, match=rf"{CONFIG_NAME}: not valid JSON \({constant} is not a JSON value\)"):
        load_model_dir(folder)


def test_weights_that_are_a_pipe_are_refused_without_reading(tmp_path):
    # read_bytes() on a FIFO blocked until a writer came (Predictor.from_dir hung); on /dev/zero it never ended.
    import os
    import threading

    from infer_helpers import copy_model_dir

    folder = copy_model_dir("plain", tmp_path / "model")
    weights = folder / "segmenter.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    writer = threading.Thread(target=lambda: open(weights, "wb").close(), daemon=True)  # ends a blocked read
    writer.start()
    with pytest.raises(DataFormatError, match=r"segmenter\.safetensors: the segmenter weights .* not a regular file"):
        load_model_dir(folder).build("segmenter")
    os.close(os.open(weights, os.O_RDONLY | os.O_NONBLOCK))  # lets the writer's open return
    writer.join(5)
    weights.unlink()
    weights.symlink_to("/dev/zero")
    with pytest.raises(DataFormatError, match="not a regular file"):
        load_model_dir(folder).build("segmenter")


@pytest.mark.parametrize("linked", ["onnx", CONFIG_NAME, "onnx/segmenter.fp32.onnx"])
def test_export_never_writes_through_a_link_out_of_the_model_directory(tmp_path, linked):
    # Atomic writes follow links: a model directory whose files or folders are links into a shared
    # cache (or another run) would have them rewritten by export.
    import shutil

    from pneumoseg.cli import main

    from infer_helpers import copy_model_dir, file_digests

    folder = copy_model_dir("plain", tmp_path / "model", exported=True)
    outside = tmp_path / "shared"
    outside.mkdir()
    inside = folder / linked
    shutil.move(inside, outside / inside.name)
    inside.symlink_to(outside / inside.name)
    before = file_digests(outside)
    md = load_model_dir(folder)  # reading through the link is fine: the fingerprints are checked
    assert md.build("segmenter") is not None and md.artefact_path("segmenter-onnx-fp32").is_file()
    with pytest.raises(OutputError, match=r"leads out of the model directory .*symbolic link to .*shared"):
        md.add_artefact("segmenter-onnx-fp32", "onnx/segmenter.fp32.onnx", b"graph", format="onnx",
                        network="segmenter", precision="fp32") if linked != CONFIG_NAME else md.save()
    assert main(["export", str(folder)]) == 2
    assert file_digests(outside) == before and inside.is_symlink()


def test_a_classifier_crop_round_trips_and_old_classifier_runs_keep_theirs(tmp_path, networks):
    out = save_model_dir(tmp_path / "run", networks, input_sizes={"segmenter": 64, "classifier": 64},
                         crops={"classifier": "chest"})
    raw = json.loads((out.path / CONFIG_NAME).read_text())
    assert raw["networks"]["classifier"]["crop"] == "chest" and "crop" not in raw["networks"]["segmenter"]
    assert load_model_dir(out.path).networks["classifier"].crop == "chest"
    with pytest.raises(InvalidInputError, match="only a classifier may be cropped"):
        save_model_dir(tmp_path / "bad", networks, input_sizes={"segmenter": 64, "classifier": 64},
                       crops={"segmenter": "chest"})
    with pytest.raises(InvalidInputError, match="crops names network"):
        save_model_dir(tmp_path / "bad2", {"segmenter": networks["segmenter"]}, input_sizes={"segmenter": 64},
                       crops={"classifier": "chest"})
    assert not (tmp_path / "bad2" / "segmenter.safetensors").exists()  # refused before anything was written
    # A classifier run of 0.1.0 recorded its crop only as training.chest_crop.
    old = save_model_dir(tmp_path / "old", {"classifier": networks["classifier"]}, input_sizes={"classifier": 64},
                         training={"chest_crop": True})
    raw = json.loads((old.path / CONFIG_NAME).read_text())
    del raw["networks"]["classifier"]["crop"]
    (old.path / CONFIG_NAME).write_text(json.dumps(raw))
    assert load_model_dir(old.path).networks["classifier"].crop == "chest"
    raw["training"]["chest_crop"] = "yes"
    (old.path / CONFIG_NAME).write_text(json.dumps(raw))
    with pytest.raises(DataFormatError, match="training.chest_crop must be true or false"):
        load_model_dir(old.path)


@pytest.mark.parametrize("make, match", [
    # a traceback (IndexError) or a shape error at the first batch before
    (lambda: {"classifier": create_classifier("resnet_tiny", num_classes=2, in_channels=1)}, "num_classes=2"),
    (lambda: {"segmenter": create_segmenter("unet", "resnet_tiny", classes=2, decoder_channels=(16, 16, 8, 8, 8))},
     "classes=2, but the pipeline reads one pneumothorax logit per pixel"),
    (lambda: {"segmenter": create_segmenter("unet", "resnet_tiny", in_channels=3, decoder_channels=(16, 16, 8, 8, 8))},
     "in_channels=3, but radiographs are one grey channel"),
])
def test_networks_the_pipeline_cannot_feed_are_refused_before_writing(tmp_path, make, match):
    networks = make()
    with pytest.raises(InvalidInputError, match=match):
        save_model_dir(tmp_path / "m", networks, input_sizes={name: 64 for name in networks})
    assert not any((tmp_path / "m").glob("*.safetensors"))


def test_saving_into_a_prepared_output_folder_needs_prepare_false(tmp_path):
    # A caller's OutputFolder is already prepared and held: preparing it again (prepare=True, the
    # default) would write a second manifest of another kind over the caller's, so it is refused.
    from pneumoseg._fs import prepare_output_folder

    seg = create_segmenter("unet", encoder="resnet_tiny", decoder_channels=(16, 16, 8, 8, 8))
    with prepare_output_folder(tmp_path / "m") as folder:
        manifest = (tmp_path / "m" / ".pneumoseg-manifest").read_bytes()
        with pytest.raises(InvalidInputError, match="prepare=False"):
            save_model_dir(folder, {"segmenter": seg}, input_sizes={"segmenter": 64})
        assert (tmp_path / "m" / ".pneumoseg-manifest").read_bytes() == manifest
        save_model_dir(folder, {"segmenter": seg}, input_sizes={"segmenter": 64}, prepare=False)
    assert load_model_dir(tmp_path / "m").networks.keys() == {"segmenter"}
