"""Where training and export meet: one run folder that `pneumoseg train` writes, `pneumoseg export`
adds to, and `pneumoseg train` may write again (--resume, or a new run into the same folder).

Two bugs found walking README: (1) `--resume` of a finished, exported run rewrote pneumoseg.json
without its artefacts, orphaning the ONNX files, so `predict --backend auto` quietly fell back to
torch; (2) training into a run folder export had added to was refused as "pneumoseg did not write
it", although pneumoseg's export had. Artefacts here are written with ``ModelDir.add_artefact``, as
every export writes them (the real ONNX export takes ~15 s; one slow test runs it end to end)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("yaml")
pytest.importorskip("safetensors")

from pneumoseg._fs import check_output_folder  # noqa: E402
from pneumoseg.data import make_synthetic_siim  # noqa: E402
from pneumoseg.errors import OutputError  # noqa: E402
from pneumoseg.models import create_classifier, create_segmenter  # noqa: E402
from pneumoseg.models.model_dir import load_model_dir, save_model_dir  # noqa: E402
from pneumoseg.train.engine import train  # noqa: E402
from factories import TINY_TRAINING as TINY, training_config  # noqa: E402

WHAT = "training run folder"
# the names pneumoseg.export.tensorrt.EngineCache gives an engine, its sidecar and locks, and the timing cache
ENGINE_CACHE_FILES = ("tensorrt/" + "ab12" * 8 + ".engine", "tensorrt/" + "ab12" * 8 + ".json",
                      "tensorrt/" + "ab12" * 8 + ".lock", "tensorrt/timing-0123456789abcdef.cache",
                      "tensorrt/timing-0123456789abcdef.cache.lock")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("interplay-synth")
    make_synthetic_siim(root, n_images=8, size=64, positive_fraction=0.5, seed=5)
    return root


@pytest.fixture(scope="module")
def finished_run(synth, tmp_path_factory):
    """A finished tiny run (copy it with :func:`_copy`: its manifest records modification times)."""
    run = tmp_path_factory.mktemp("interplay-run") / "run"
    train(training_config(TINY, synth), run, progress=False)
    return run


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, copy_function=shutil.copy2)  # copy2 keeps the mtimes the manifest records
    return dest


def _export(run: Path, precision: str = "fp32", data: bytes = b"onnx graph of the run's segmenter") -> str:
    """What an export adds (an artefact file, pneumoseg.json rewritten); returns the artefact's key."""
    md = load_model_dir(run)
    key = f"segmenter-onnx-{precision}"
    md.add_artefact(key, f"onnx/segmenter.{precision}.onnx", data + precision.encode(), format="onnx",
                    network="segmenter", precision=precision,
                    meta={"source": {"weights_sha256": md.networks["segmenter"].sha256}})
    return key


def _engine_cache(run: Path) -> None:
    """What a TensorRT export or a prediction leaves in the model directory's engine cache."""
    for rel in ENGINE_CACHE_FILES:
        (run / rel).parent.mkdir(exist_ok=True)
        (run / rel).write_bytes(b"" if rel.endswith(".lock") else b"engine bytes " + rel.encode())


# -------------------------------------------------------------------------------------------------
# 1. --resume of a finished, exported run


def test_resume_of_a_finished_exported_run_keeps_its_artefacts(finished_run, tmp_path, synth):
    run = _copy(finished_run, tmp_path / "run")
    keys = [_export(run, "fp32"), _export(run, "fp16")]
    before = load_model_dir(run)
    result = train(training_config(TINY, synth), run, resume=True, progress=False)
    after = load_model_dir(run)
    # the weights did not change, so what was exported from them still holds: listed, verified
    assert after.networks["segmenter"].sha256 == before.networks["segmenter"].sha256
    assert {k: vars(a) for k, a in after.artefacts.items()} == {k: vars(a) for k, a in before.artefacts.items()}
    for key in keys:
        assert after.artefact_path(key).is_file()
    assert result.model_dir.artefacts.keys() == set(keys)
    assert any("already finished" in n and "kept" in n and "segmenter-onnx-fp32" in n for n in result.notes), result.notes


def test_resume_that_writes_other_weights_drops_and_removes_what_was_exported_from_the_old(finished_run, tmp_path,
                                                                                           synth):
    # As if the artefact had been exported from other weights than those the run now writes (the
    # description edited here to say so): it must not stay listed, nor its file stay looking valid.
    run = _copy(finished_run, tmp_path / "run")
    key = _export(run)
    description = run / "pneumoseg.json"
    raw = json.loads(description.read_text())
    raw["networks"]["segmenter"]["sha256"] = "0" * 64
    description.write_text(json.dumps(raw))
    result = train(training_config(TINY, synth), run, resume=True, progress=False)
    assert load_model_dir(run).artefacts == {} and not (run / "onnx").exists()
    assert set(result.model_dir.removed_artefacts) == {key}
    assert any("removed the exported artefacts" in n and key in n and "export again" in n for n in result.notes), \
        result.notes


def test_rewriting_a_model_directory_with_other_weights_removes_the_stale_artefacts(tmp_path):
    # What was exported from weights that are no longer the directory's must not stay listed (a stale
    # ONNX answers with the old weights) nor stay on disk looking valid; a network that did not
    # change keeps its artefacts.
    torch.manual_seed(0)
    seg = create_segmenter("unet", encoder="resnet_tiny", decoder_channels=(16, 16, 8, 8, 8))
    cls = create_classifier("resnet_tiny", in_channels=1)
    sizes = {"segmenter": 64, "classifier": 64}
    path = tmp_path / "m"
    md = save_model_dir(path, {"segmenter": seg, "classifier": cls}, input_sizes=sizes)
    md.add_artefact("segmenter-onnx-fp32", "onnx/segmenter.fp32.onnx", b"old segmenter", format="onnx",
                    network="segmenter", precision="fp32")
    md.add_artefact("classifier-onnx-fp32", "onnx/classifier.fp32.onnx", b"classifier", format="onnx",
                    network="classifier", precision="fp32")
    with torch.no_grad():
        next(seg.parameters()).add_(1.0)
    again = save_model_dir(path, {"segmenter": seg, "classifier": cls}, input_sizes=sizes, prepare=False)
    assert set(again.artefacts) == {"classifier-onnx-fp32"}
    assert set(load_model_dir(path).artefacts) == {"classifier-onnx-fp32"}
    assert not (path / "onnx" / "segmenter.fp32.onnx").exists()
    assert (path / "onnx" / "classifier.fp32.onnx").read_bytes() == b"classifier"
    assert [a for a in again.removed_artefacts] == ["segmenter-onnx-fp32"] and again.left_artefacts == {}
    # a file changed since export is not pneumoseg's to remove: unlisted, left where it is
    again.add_artefact("segmenter-onnx-fp32", "onnx/segmenter.fp32.onnx", b"segmenter", format="onnx",
                       network="segmenter", precision="fp32")
    (path / "onnx" / "segmenter.fp32.onnx").write_bytes(b"someone's edit")
    with torch.no_grad():
        next(seg.parameters()).add_(1.0)
    third = save_model_dir(path, {"segmenter": seg, "classifier": cls}, input_sizes=sizes, prepare=False)
    assert set(third.artefacts) == {"classifier-onnx-fp32"}
    assert (path / "onnx" / "segmenter.fp32.onnx").read_bytes() == b"someone's edit"
    # dropped from the description, but its file stayed: reported as left, not as removed
    assert set(third.removed_artefacts) == set(third.left_artefacts) == {"segmenter-onnx-fp32"}


def test_the_training_note_does_not_call_a_file_left_in_place_removed():
    from pneumoseg.train.engine import _artefacts_note

    note = _artefacts_note(Path("run"), False, [], [], ["segmenter-onnx-fp32"])
    assert "left in place" in note and "segmenter-onnx-fp32" in note and "removed the" not in note
    both = _artefacts_note(Path("run"), False, [], ["classifier-onnx-fp32"], ["segmenter-onnx-fp32"])
    removed, left = both.split("; run: ")  # one part per kind, each starting with the run folder
    assert "classifier-onnx-fp32" in removed and "segmenter" not in removed
    assert "segmenter-onnx-fp32" in left and "left in place" in left


# -------------------------------------------------------------------------------------------------
# 2. training into a run folder export has added to


def test_training_again_into_an_exported_run_folder_needs_no_force(finished_run, tmp_path, synth):
    run = _copy(finished_run, tmp_path / "run")
    _export(run, "fp32")
    _export(run, "int8")  # a second export (fp32, then int8) rewrites pneumoseg.json again
    _engine_cache(run)
    assert check_output_folder(run, what=WHAT) == run
    result = train(training_config(TINY, synth), run, progress=False)
    md = load_model_dir(run)
    assert md.artefacts == {} and result.model_dir.artefacts == {}
    # the earlier run's exports went with the rest of its output: none is left looking valid
    assert not (run / "onnx").exists() and not (run / "tensorrt").exists()


@pytest.mark.parametrize("change", ["edited artefact", "foreign file in onnx", "edited description",
                                    "foreign file in tensorrt"])
def test_a_folder_with_foreign_files_beside_exported_artefacts_is_still_refused(finished_run, tmp_path, synth, change):
    run = _copy(finished_run, tmp_path / "run")
    _export(run)
    _engine_cache(run)
    if change == "edited artefact":
        target = run / "onnx" / "segmenter.fp32.onnx"
        target.write_bytes(target.read_bytes() + b"!")
    elif change == "foreign file in onnx":
        target = run / "onnx" / "my-notes.txt"
        target.write_text("mine")
    elif change == "edited description":
        target = run / "pneumoseg.json"
        raw = json.loads(target.read_text())
        raw["thresholds"]["gate"] = 0.25
        target.write_text(json.dumps(raw))
    else:
        target = run / "tensorrt" / "my-engine.plan"
        target.write_bytes(b"mine")
    kept = target.read_bytes()
    with pytest.raises(OutputError, match=rf"{target.relative_to(run)}.*pneumoseg did not write it"):
        check_output_folder(run, what=WHAT)
    with pytest.raises(OutputError, match="pneumoseg did not write it"):
        train(training_config(TINY, synth), run, progress=False)
    assert target.read_bytes() == kept


# -------------------------------------------------------------------------------------------------
# the README walk, on the command line, with a real ONNX export


@pytest.mark.slow
def test_cli_export_resume_predict_and_train_again(synth, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import yaml

    from pneumoseg.cli import main

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "root": str(synth)}}))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--no-progress"]) == 0
    assert main(["export", str(run), "--format", "onnx"]) == 0
    onnx = (run / "onnx" / "segmenter.fp32.onnx").read_bytes()
    capsys.readouterr()
    assert main(["train", str(cfg), "--out", str(run), "--resume", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "already finished" in err and "segmenter-onnx-fp32" in err, err
    assert load_model_dir(run).artefact_path("segmenter-onnx-fp32").read_bytes() == onnx
    dicoms = sorted(synth.rglob("*.dcm"))[:2]
    assert main(["predict", *map(str, dicoms), "--model", str(run), "--out", str(tmp_path / "pred"),
                 "--device", "cpu", "--no-overlays"]) == 0
    assert "with onnxruntime fp32 on cpu" in capsys.readouterr().out
    # a new run into the same folder: the exported run is pneumoseg's own output, replaced whole
    assert main(["train", str(cfg), "--out", str(run), "--no-progress"]) == 0
    assert load_model_dir(run).artefacts == {} and not (run / "onnx").exists()


def test_the_same_weights_always_make_the_same_weights_file(tmp_path):
    # safetensors wrote its metadata in a hash map's order, which changed from call to call: the same
    # weights got another fingerprint, so a finished run's --resume (which writes them again) made
    # every exported artefact look exported from other weights.
    from safetensors.torch import load_file

    torch.manual_seed(0)
    seg = create_segmenter("unet", encoder="resnet_tiny", decoder_channels=(16, 16, 8, 8, 8))
    written = set()
    for i in range(8):
        md = save_model_dir(tmp_path / str(i), {"segmenter": seg}, input_sizes={"segmenter": 64})
        written.add((tmp_path / str(i) / "segmenter.safetensors").read_bytes())
        assert md.networks["segmenter"].sha256 == load_model_dir(tmp_path / str(i)).networks["segmenter"].sha256
    assert len(written) == 1
    state = load_file(tmp_path / "0" / "segmenter.safetensors")
    assert all(torch.equal(state[k], v) for k, v in seg.state_dict().items())
    assert load_model_dir(tmp_path / "0").build("segmenter") is not None
