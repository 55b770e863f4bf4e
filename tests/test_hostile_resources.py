"""Hostile or broken files that come with a model, a cache, a training run or a config: each is refused
quickly, in bounded memory, with a ValueError subclass naming the file (and, on the command line, one
line and exit 2), never a RecursionError, MemoryError, OverflowError, KeyError or a traceback. No test
here allocates much: each hostile file is small, and what it would have cost is in the docstring."""

from __future__ import annotations

import json

import pytest

import pneumoseg
from pneumoseg.cli import main


def _one_line_error(capsys, argv: list[str], expected: str) -> None:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("pneumoseg: error: ") and expected in err, err


# ------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("text, expected", [
    ("seed: " + "9" * 5000 + "\n", "4300 digits"),  # int() refuses it: a bare ValueError
    ("seed: 2020-13-45\n", "month must be in 1..12"),  # a timestamp the constructor refuses
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),  # RecursionError in PyYAML
])
def test_training_config_values_yaml_cannot_build_are_config_errors(tmp_path, capsys, text, expected):
    pytest.importorskip("torch")
    pytest.importorskip("yaml")
    from pneumoseg.train.config import ConfigError, read_config_mapping

    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        read_config_mapping(path)
    _one_line_error(capsys, ["train", path, "--out", tmp_path / "run", "--print-config"], expected)


def test_a_device_pipe_or_huge_file_as_training_config_is_refused_before_reading(tmp_path):
    """`pneumoseg train /dev/zero` read until memory ran out (MemoryError traceback; 2.7 GB under a
    3 GB ulimit, unbounded without); a 300 MB config was read whole (650 MB) before being refused."""
    import os

    pytest.importorskip("yaml")
    from pneumoseg.train.config import ConfigError, read_config_mapping

    if os.path.exists("/dev/zero"):
        with pytest.raises(ConfigError, match="not a regular file"):
            read_config_mapping("/dev/zero")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.yaml")  # open() would wait for a writer forever
        with pytest.raises(ConfigError, match="not a regular file"):
            read_config_mapping(tmp_path / "pipe.yaml")
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:  # sparse: 64 MiB of NUL bytes, nothing written to disk
        f.truncate(64 * 2**20)
    with pytest.raises(ConfigError, match="larger than 4 MiB"):
        read_config_mapping(big)


# ----------------------------------------------------------------------------- JSON descriptions

@pytest.mark.parametrize("text, expected", [
    # Python's int() refuses integers of over 4300 digits with a bare ValueError, which json.loads
    # lets through: a pneumoseg.json or index.json holding one printed a traceback
    ('{"format": "pneumoseg-model", "format_version": ' + "9" * 5000 + "}", "not valid JSON"),
    # 100,000 nested brackets raised RecursionError from the json module: a traceback from
    # `pneumoseg predict --model` and no DataFormatError for callers
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_malformed_json_descriptions_are_format_errors(tmp_path, capsys, text, expected):
    pytest.importorskip("torch")
    from pneumoseg.data.cache import CACHE_INDEX, load_cache_index
    from pneumoseg.models.model_dir import CONFIG_NAME, load_model_dir

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / CONFIG_NAME).write_text(text)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / CACHE_INDEX).write_text(text)
    with pytest.raises(pneumoseg.DataFormatError, match=expected):
        load_model_dir(tmp_path / "model")
    with pytest.raises(pneumoseg.DataFormatError, match=expected):
        load_cache_index(tmp_path / "cache")
    _one_line_error(capsys, ["predict", tmp_path, "--model", tmp_path / "model", "--out", tmp_path / "out"],
                    expected)


# ------------------------------------------------------------------------------------ cache folder

def _tiny_cache(folder, **changes):
    import numpy as np

    from pneumoseg.data.cache import (
        CACHE_FORMAT,
        CACHE_INDEX,
        CACHE_VERSION,
        IMAGES_FILE,
        MASKS_FILE,
    )

    folder.mkdir(exist_ok=True)
    np.save(folder / IMAGES_FILE, np.zeros((2, 8, 8), np.uint8))
    np.save(folder / MASKS_FILE, np.zeros((2, 8, 8), np.uint8))
    index = {"format": CACHE_FORMAT, "format_version": CACHE_VERSION, "size": 8, "count": 2, "has_masks": True,
             "ids": ["a", "b"], "rows": [0, 1], "labels": [0, 1], "shapes": [[8, 8], [8, 8]]}
    index.update(changes)
    for key in [k for k, v in changes.items() if v is KeyError]:
        del index[key]
    (folder / CACHE_INDEX).write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("changes, expected", [
    # int(Infinity) was an OverflowError; Infinity is now refused on reading, as not JSON
    ({"count": float("inf")}, r"not valid JSON \(Infinity is not a JSON value\)"),
    ({"rows": [0, float("inf")]}, r"not valid JSON \(Infinity is not a JSON value\)"),
    ({"count": 2.0}, "count must be an integer"),
    ({"rows": [0, 1.0]}, "a row must be an integer"),
    ({"size": 0}, "size must be an integer >= 1"),
    ({"size": "8"}, "size must be an integer"),
    ({"rows": [True, 1]}, "a row must be an integer"),
    ({"has_masks": KeyError}, "missing field 'has_masks'"),  # was a bare KeyError
    ({"has_masks": "no"}, "has_masks must be true or false"),
    ({"labels": ["x", 1]}, "a label must be an integer"),  # int('x') in CachedDataset: bare ValueError
    ({"labels": [{}, 1]}, "a label must be an integer"),  # int({}): TypeError
    ({"labels": [0, 7]}, "labels must be 0 or 1"),
    ({"labels": 5}, "labels must be a list"),
])
def test_a_cache_index_with_wrong_values_is_a_format_error(tmp_path, changes, expected):
    pytest.importorskip("torch")  # the cache module needs it
    from pneumoseg.data.cache import CachedDataset

    assert len(CachedDataset(_tiny_cache(tmp_path / "good"))) == 2
    malformed = "" if "JSON" in expected else "malformed cache index.*"
    with pytest.raises(pneumoseg.DataFormatError, match=f"index.json: {malformed}{expected}"):
        CachedDataset(_tiny_cache(tmp_path / "cache", **changes))


def test_cache_arrays_whose_header_declares_another_or_overflowing_shape_are_refused_unread(tmp_path):
    """A .npy header of shape (10**12, 10**6, 64): np.load's memory map warned of an int64 overflow
    (an error under warnings-as-errors, not a DataFormatError) before refusing the file."""
    pytest.importorskip("torch")
    np_format = pytest.importorskip("numpy").lib.format
    from pneumoseg.data.cache import IMAGES_FILE, CachedDataset

    folder = _tiny_cache(tmp_path / "cache")
    with open(folder / IMAGES_FILE, "wb") as f:
        np_format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (10**12, 10**6, 64)})
    with pytest.raises(pneumoseg.DataFormatError, match=r"images.npy: expected a uint8 array of shape \(2, 8, 8\)"):
        CachedDataset(folder)
    (folder / IMAGES_FILE).write_bytes((folder / IMAGES_FILE).read_bytes()[:4])
    with pytest.raises(pneumoseg.DataFormatError, match="images.npy: not a readable .npy array"):
        CachedDataset(folder)


def test_a_huge_cache_index_is_refused_unread(tmp_path):
    pytest.importorskip("torch")
    from pneumoseg.data.cache import CACHE_INDEX, load_cache_index

    folder = _tiny_cache(tmp_path / "cache")
    with open(folder / CACHE_INDEX, "r+b") as f:
        f.truncate(2**30)  # sparse
    with pytest.raises(pneumoseg.DataFormatError, match="larger than 256 MiB"):
        load_cache_index(folder)


# ------------------------------------------------------------------------------ torch.save archives

def _zip_bomb_checkpoint(path, floats: int) -> None:
    """A torch.save archive of one tensor whose pickle declares ``floats`` zeros, stored deflated: a
    few kB that torch.load inflates to 4 * floats bytes (at 2**28 floats: 1 MB -> 1.3 GB, 6.8 s)."""
    import io
    import struct
    import zipfile

    torch = pytest.importorskip("torch")
    seed = io.BytesIO()
    torch.save({"w": torch.zeros(1000003)}, seed)
    with zipfile.ZipFile(seed) as source, zipfile.ZipFile(path, "w") as out:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                data = data.replace(b"J" + struct.pack("<i", 1000003), b"J" + struct.pack("<i", floats))
            if info.filename.endswith("/data/0"):
                record = zipfile.ZipInfo(info.filename)
                record.compress_type = zipfile.ZIP_DEFLATED
                with out.open(record, "w") as f:
                    for _ in range(floats // 2**18):
                        f.write(bytes(2**20))
            else:
                out.writestr(info, data)


def test_a_zip_bomb_checkpoint_is_refused_before_torch_inflates_it(tmp_path):
    torch = pytest.importorskip("torch")
    from pneumoseg.models import create_classifier, load_pretrained
    from pneumoseg.train.checkpoint import load_checkpoint

    bomb = tmp_path / "weights.pth"
    _zip_bomb_checkpoint(bomb, 2**22)  # 16 MiB of zeros in about 16 kB
    assert bomb.stat().st_size < 2**16
    assert torch.load(bomb, weights_only=True)["w"].numel() == 2**22  # what torch would have built
    model = create_classifier("resnet_tiny", num_classes=1, in_channels=1)
    with pytest.raises(pneumoseg.DataFormatError, match="weights.pth: its records inflate to 16,7"):
        load_pretrained(model, bomb)
    with pytest.raises(pneumoseg.DataFormatError, match="zip bomb"):
        load_checkpoint(bomb)
    plain = tmp_path / "plain.pth"
    torch.save(model.state_dict(), plain)
    assert load_pretrained(model, plain).loaded_keys


# --------------------------------------------------------------------------------- model directory

@pytest.fixture
def tiny_model_dir(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from pneumoseg.models import create_segmenter
    from pneumoseg.models.model_dir import save_model_dir

    torch.manual_seed(0)
    seg = create_segmenter("unet", "resnet_tiny", in_channels=1, decoder_channels=(32, 16, 16, 8, 8), aux_classifier=True)
    return save_model_dir(tmp_path / "model", {"segmenter": seg.eval()}, input_sizes={"segmenter": 64}).path


def _edit_description(folder, edit) -> None:
    from pneumoseg.models.model_dir import CONFIG_NAME

    raw = json.loads((folder / CONFIG_NAME).read_text())
    edit(raw)
    (folder / CONFIG_NAME).write_text(json.dumps(raw))


def test_a_config_asking_for_a_huge_network_is_refused_before_it_is_built(tiny_model_dir, monkeypatch):
    """decoder_channels [20000, ...] beside the tiny weights: the network was built (14.4 GB
    allocated and initialised; [6000, ...] took 1.5 GB and 9.5 s) before its shapes were found not to
    match the weights. The config is now checked on the meta device, which allocates nothing."""
    import pneumoseg.models.config as model_config
    from pneumoseg.models.model_dir import load_model_dir

    torch = pytest.importorskip("torch")
    built_on = []
    real_build = model_config.build_model

    def recording_build(config):
        built_on.append(torch.empty(0).device.type)  # the device the network's tensors go to
        return real_build(config)

    monkeypatch.setattr(model_config, "build_model", recording_build)
    assert load_model_dir(tiny_model_dir).build("segmenter") is not None
    assert built_on == ["meta"]  # the checked skeleton takes the weights: no second build
    built_on.clear()
    _edit_description(tiny_model_dir, lambda raw: raw["networks"]["segmenter"]["config"].update(
        decoder_channels=[20000, 16, 16, 8, 8]))
    with pytest.raises(pneumoseg.DataFormatError, match=r"segmenter.safetensors: the weights do not match.*"
                                                        r"\(32, 192, 3, 3\) in the file, \(20000, 192, 3, 3\) in the config"):
        load_model_dir(tiny_model_dir).build("segmenter")
    assert built_on == ["meta"]


def test_a_network_input_size_past_the_limit_is_refused_on_loading(tiny_model_dir):
    """input_size [16384, 16384] was within the image limits: `pneumoseg predict` resized every image
    to it and the stem's convolution asked for tens of GB (a RuntimeError traceback under a 4 GB
    ulimit, 3.4 GB used by then)."""
    from pneumoseg import limits
    from pneumoseg.models import create_segmenter
    from pneumoseg.models.model_dir import load_model_dir, save_model_dir

    _edit_description(tiny_model_dir, lambda raw: raw["networks"]["segmenter"].update(input_size=[16384, 16384]))
    with pytest.raises(pneumoseg.DataFormatError, match=r"networks.segmenter.input_size=\[16384, 16384\] needs "
                                                   "max_network_pixels >= 268,435,456"):
        load_model_dir(tiny_model_dir)
    with limits.override(max_network_pixels=2**28):
        assert load_model_dir(tiny_model_dir).networks["segmenter"].input_size == (16384, 16384)
    seg = create_segmenter("unet", "resnet_tiny", decoder_channels=(32, 16, 16, 8, 8))
    with pytest.raises(pneumoseg.LimitError, match="max_network_pixels"):
        save_model_dir(tiny_model_dir.parent / "other", {"segmenter": seg}, input_sizes={"segmenter": 8192})


def test_running_out_of_memory_in_a_network_is_one_line_naming_the_batch(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """At an input size within the limit, a big batch can still exhaust memory: torch's allocator
    error came out of a convolution as a traceback; now it is one line saying what to lower."""
    from pneumoseg.infer.backends import TorchBackend

    def exhausted(self, part, *inputs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 1342177280 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(TorchBackend, "run", exhausted)
    predictor = pneumoseg.Predictor.from_dir(tiny_model_dir, backend="torch", device="cpu")
    image = __import__("numpy").zeros((64, 64), "float32")
    image[10:20, 10:20] = 1
    with pytest.raises(pneumoseg.PneumosegError, match="out of memory predicting a batch of 1 image.*64x64 on cpu"):
        predictor.predict([image])

    from test_hostile_files import write_dicom

    write_dicom(tmp_path / "a.dcm")
    _one_line_error(capsys, ["predict", tmp_path / "a.dcm", "--model", tiny_model_dir, "--out", tmp_path / "out",
                             "--backend", "torch", "--no-progress"], "lower the batch size")


# --------------------------------------------------------------------------- a run folder to resume

def _resume_state(model):
    return {"model": model.state_dict(), "ema": None,
            "progress": {"stage": 0, "epoch": 1, "batch": 0, "global_step": 2, "global_epoch": 1,
                         "stage_started": True, "stage_best": [0.5, -1.0], "bad_epochs": 0, "finished": False,
                         "loss_sum": 0.0, "loss_count": 0},
            "history": [{"epoch": 1}], "thresholds": None,
            "top_k": [{"score": 0.5, "key": [0.5, -1.0], "epoch": 1, "file": "epoch-001.pt"}]}


@pytest.mark.parametrize("change, expected", [
    # a top-k entry is deleted when a better epoch replaces it: '../../victim.txt' deleted a file
    # outside the run folder (seen with `pneumoseg train --resume`)
    (lambda s: s["top_k"][0].update(file="../../victim.txt"), "its top_k is not a list"),
    (lambda s: s["top_k"][0].update(file="/etc/hostname"), "its top_k is not a list"),
    (lambda s: s["top_k"][0].pop("key"), "its top_k is not a list"),
    (lambda s: s["model"].update({"encoder.conv1.weight": __import__("torch").zeros(3, 3, 3, 3)}),
     (r"its model weights do not fit the network: 1 of another shape \(e.g. encoder.conv1.weight: \(3, 3, 3, 3\) "
      r"in the checkpoint")),  # load_state_dict's RuntimeError traceback
    (lambda s: s["model"].pop("encoder.conv1.weight"), "its model weights do not fit the network: 1 missing"),
    (lambda s: s.update(ema={"decay": 0.9, "updates": 2, "weights": {}}), "its EMA weights do not fit"),
    (lambda s: s["progress"].update(stage="x"), "its progress field.s. stage are not"),  # TypeError in range()
    (lambda s: s.update(progress="x"), "its progress is not a mapping"),  # ValueError from dict.update
    (lambda s: s.update(history=[1, 2]), "its history is not a list of rows"),  # TypeError
])
def test_a_checkpoint_that_cannot_resume_the_run_is_refused_before_it_is_used(tmp_path, change, expected):
    pytest.importorskip("torch")
    from pneumoseg.models import create_segmenter
    from pneumoseg.train.checkpoint import check_resume_state

    model = create_segmenter("unet", "resnet_tiny", decoder_channels=(16, 16, 8, 8, 8))
    check_resume_state(_resume_state(model), model, tmp_path / "last.pt")  # what training writes
    state = _resume_state(model)
    change(state)
    with pytest.raises(pneumoseg.DataFormatError, match=f"last.pt: the checkpoint cannot resume this run: {expected}"):
        check_resume_state(state, model, tmp_path / "last.pt")


@pytest.mark.parametrize("shape, expected", [("shared", "holds more than 100,000 values"),
                                             ("deep", "nests deeper than 100 levels")])
def test_a_checkpoint_config_that_expands_or_nests_without_bound_is_refused_on_loading(tmp_path, shape, expected):
    """The pickle's memo shares objects: a config holding one mapping twice per level, 22 levels deep
    (4 million leaves in a 4 MB file), made --resume's config comparison run past a minute (20
    levels: 48 s, 509 MB); 3000 levels raised RecursionError."""
    torch = pytest.importorskip("torch")
    from pneumoseg.train.checkpoint import (
        CHECKPOINT_FORMAT,
        CHECKPOINT_VERSION,
        load_checkpoint,
    )

    node: object = {"leaf": 1}
    for _ in range(40 if shape == "shared" else 150):
        node = {"a": node, "b": node} if shape == "shared" else {"a": node}
    torch.save({"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "model": {}, "model_config": {},
                "config": {"log": node}}, tmp_path / "last.pt")
    assert (tmp_path / "last.pt").stat().st_size < 2**16
    with pytest.raises(pneumoseg.DataFormatError, match=f"last.pt: not a checkpoint pneumoseg wrote .it {expected}"):
        load_checkpoint(tmp_path / "last.pt")


def test_a_description_nested_hundreds_of_levels_deep_is_refused_on_loading(tiny_model_dir, capsys):
    """900 nested lists in pneumoseg.json's free-form training section parse (json.loads goes to about
    1000), but `pneumoseg export` then copied and rewrote the description and hit RecursionError."""
    from pneumoseg.models.model_dir import load_model_dir

    _edit_description(tiny_model_dir, lambda raw: raw["training"].update(x=json.loads("[" * 900 + "]" * 900)))
    with pytest.raises(pneumoseg.DataFormatError, match="pneumoseg.json: .*nested deeper than 64 levels"):
        load_model_dir(tiny_model_dir)
    _one_line_error(capsys, ["export", tiny_model_dir], "nested deeper than 64 levels")
    _edit_description(tiny_model_dir, lambda raw: raw["training"].update(x=json.loads("[" * 40 + "]" * 40)))
    load_model_dir(tiny_model_dir).save()


def _safetensors_file(path, declared: int, total: int | None = None) -> None:
    """A safetensors file listing one float tensor of ``declared`` bytes, zeros up to ``total`` bytes
    (default: where the tensor ends); sparse, so nothing but the header is written."""
    import struct

    text = json.dumps({"w": {"dtype": "F32", "shape": [declared // 4], "data_offsets": [0, declared]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(total if total is not None else 8 + len(text) + declared)


@pytest.mark.parametrize("declared, total, expected", [
    # a small header padded to 1 GiB: the whole file was read into memory before the fingerprint
    # and safetensors refused it (6 GB: a MemoryError traceback under a 4 GB ulimit)
    (16, 2**30, r"not a readable safetensors file \(its header describes [0-9]+ bytes, the file has 1,073,741,824\)"),
    # a header honestly listing one 1 GiB tensor the config does not have
    (2**30, None, "the weights do not match the segmenter config in pneumoseg.json: 136 missing"),
])
def test_big_weights_files_are_refused_from_their_header_before_being_read(tiny_model_dir, monkeypatch,
                                                                           declared, total, expected):
    from pathlib import Path

    from pneumoseg.models.model_dir import load_model_dir

    weights = tiny_model_dir / "segmenter.safetensors"
    _safetensors_file(weights, declared, total)
    read_whole = Path.read_bytes

    def refuse_to_read_the_weights(self):
        assert self != weights, "the weights were read whole"
        return read_whole(self)

    monkeypatch.setattr(Path, "read_bytes", refuse_to_read_the_weights)
    with pytest.raises(pneumoseg.DataFormatError, match=expected):
        load_model_dir(tiny_model_dir).build("segmenter")


# -------------------------------------------------------------------------------------- scores CSV

def test_a_scores_csv_that_is_a_device_or_has_a_huge_cell_is_a_format_error(tmp_path, capsys):
    """`pneumoseg evaluate --scores /dev/zero` was read until memory ran out (MemoryError traceback
    after 2.3 GB under a 3 GB ulimit); it is now read like the RLE CSVs, up to max_csv_bytes. A
    score cell past the csv module's 131,072-character field limit raised _csv.Error (a traceback);
    a 5000-digit score was echoed whole."""
    import os

    from pneumoseg import limits
    from pneumoseg.infer.evaluation import read_scores_csv

    huge = tmp_path / "scores.csv"
    huge.write_text("ImageId,Score\nimg1," + "1" * 200_000 + "\nimg2,0.1\n")
    with pytest.raises(pneumoseg.DataFormatError, match=r"scores.csv, line 2: not a scores CSV row \(field larger"):
        read_scores_csv(huge)
    huge.write_text("ImageId,Score\nimg1,0.5\n\nimg2," + "9" * 5000 + "\n")
    with pytest.raises(pneumoseg.DataFormatError, match=r"scores.csv, line 4: score '9{50,60}\.\.\. is not finite$"):
        read_scores_csv(huge)
    if os.path.exists("/dev/zero"):
        with limits.override(max_csv_bytes=2**20), \
                pytest.raises(pneumoseg.DataFormatError, match="/dev/zero: longer than max_csv_bytes"):
            read_scores_csv("/dev/zero")
    (tmp_path / "pred.csv").write_text("ImageId,EncodedPixels\nimg1,1 5\nimg2,-1\n")
    huge.write_text("ImageId,Score\nimg1," + "1" * 200_000 + "\nimg2,0.1\n")
    _one_line_error(capsys, ["evaluate", "--pred", tmp_path / "pred.csv", "--truth", tmp_path / "pred.csv",
                             "--scores", huge, "--out", tmp_path / "out"], "not a scores CSV row")


def test_running_out_of_memory_while_training_is_one_line(tmp_path, capsys, monkeypatch):
    """The classifier recipe (DenseNet121 at 512, batch 16) under a 4 GB ulimit stopped with torch's
    allocator error and a traceback from inside a convolution; now one line saying what to lower."""
    pytest.importorskip("torch")
    pytest.importorskip("yaml")
    from pneumoseg.train import engine

    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 201326592 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(engine, "train", exhausted)
    (tmp_path / "data").mkdir()
    _one_line_error(capsys, ["train", "--recipe", "demo", "--data", tmp_path / "data", "--out", tmp_path / "run",
                             "--no-progress"], "out of memory training at batch_size")

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")  # anything else keeps its traceback

    monkeypatch.setattr(engine, "train", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", "--recipe", "demo", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run2"),
              "--no-progress"])


def test_a_training_config_asking_for_a_huge_decoder_is_refused_before_it_is_built(tmp_path):
    """decoder_channels [20000, 16, 16, 8, 8] in a training config (or --set) made `pneumoseg train`
    allocate and initialise 14.4 GB (stopped only by the allocator under a ulimit); the parameters
    are now counted on the meta device first."""
    pytest.importorskip("torch")
    pytest.importorskip("yaml")
    from pneumoseg.train import ConfigError, config_from_dict
    from pneumoseg.train.engine import check_model_config

    def config(channels):
        return config_from_dict({"task": "segmentation", "data": {"root": str(tmp_path)},
                                 "model": {"encoder": "resnet_tiny", "decoder_channels": channels}})

    check_model_config(config([256, 128, 64, 32, 16]))
    with pytest.raises(ConfigError, match=r"model.decoder_channels: \[20000, 16, 16, 8, 8\] makes a network of "
                                          r"3,6\d\d,\d{3},\d{3} parameters, more than 268,435,456"):
        check_model_config(config([20000, 16, 16, 8, 8]))


def test_the_checked_skeleton_takes_the_weights_unless_it_holds_other_tensors(tiny_model_dir, monkeypatch):
    """ModelDir.build loads the weights into the network it built on the meta device to check them
    (a second build's random initialisation doubled DenseNet121's load time: 0.22 -> 0.55 s); a
    network holding tensors its state dict lacks (a non-persistent buffer) is built for real, as
    those would be left uninitialised."""
    import pneumoseg.models.config as model_config
    from pneumoseg.models.model_dir import _holds_only_its_state_dict, load_model_dir

    torch = pytest.importorskip("torch")
    folder = load_model_dir(tiny_model_dir)
    model = folder.build("segmenter")
    weights = folder.state_dict("segmenter")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"} and not model.training

    real_build = model_config.build_model
    built_on = []

    def with_a_table(config):
        built_on.append(torch.empty(0).device.type)
        network = real_build(config)
        network.register_buffer("table", torch.arange(4.0), persistent=False)
        return network

    monkeypatch.setattr(model_config, "build_model", with_a_table)
    model = load_model_dir(tiny_model_dir).build("segmenter")
    assert built_on == ["meta", "cpu"] and torch.equal(model.table, torch.arange(4.0))
    plain = torch.nn.Linear(2, 2)
    plain.scale = torch.ones(1)
    assert not _holds_only_its_state_dict(plain) and _holds_only_its_state_dict(torch.nn.Linear(2, 2))
