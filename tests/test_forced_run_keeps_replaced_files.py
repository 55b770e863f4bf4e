"""A run forced (``--force``, ``overwrite=True``) into a folder holding someone's files wrote over a
same-named file (a user's submission.csv, an edited pneumoseg.json) in place. If that run then failed
(a full disk, Ctrl-C, SIGTERM, an error found late) or was killed, the user's file was gone: nothing
had been set aside. A file a forced run replaces is now moved into the folder's holding folder just
before it is replaced, put back byte for byte when the run fails, by the next run of the same command
after a SIGKILL, and removed only when the run succeeds. Files the run does not replace, folders and
symbolic links are never moved."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pneumoseg._fs import (MANIFEST_NAME, PREVIOUS_NAME, OutputKind, check_output_folder, prepare_output_folder)
from pneumoseg.cli import main
from pneumoseg.errors import OutputError

from isolated import run_isolated


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under ``folder`` but the manifest: its bytes, mtime and mode."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode)
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink() and p.name != MANIFEST_NAME}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".pneumoseg-") and p.name != MANIFEST_NAME)


def _users_folder(out: Path) -> dict[str, tuple[bytes, int, int]]:
    """Someone's folder: a file at an output's path, one beside it, one deeper, an empty folder."""
    (out / "deep").mkdir(parents=True)
    (out / "empty").mkdir()
    (out / "submission.csv").write_bytes(b"ImageId,EncodedPixels\nmine,-1\n")
    os.chmod(out / "submission.csv", 0o640)
    os.utime(out / "submission.csv", ns=(1_000_000_000, 1_234_567_891_011))
    (out / "notes.txt").write_text("not an output's name")
    (out / "deep" / "b.txt").write_text("someone's b")
    return _snapshot(out)


def _forced_run(folder) -> None:
    folder.write_bytes("submission.csv", data="ImageId,EncodedPixels\nnew,-1\n")
    folder.write_bytes("submission.csv", data="ImageId,EncodedPixels\nnewer,-1\n")  # written twice
    folder.write_bytes("deep", "b.txt", data="the run's b")
    folder.write_bytes("only-new.txt", data="the run's own")


# ---------------------------------------------------------------------------------------------------
# The rule, on prepare_output_folder


@pytest.mark.parametrize("failure", [RuntimeError("the run failed"), KeyboardInterrupt(),
                                     OSError(errno.ENOSPC, "No space left on device")])
def test_a_failed_forced_run_puts_back_the_files_it_replaced(tmp_path, failure):
    out = tmp_path / "out"
    before = _users_folder(out)
    with pytest.raises(type(failure)):
        with prepare_output_folder(out, overwrite=True) as folder:
            _forced_run(folder)
            held = out / PREVIOUS_NAME / "submission.csv"
            assert held.is_file() and held.read_bytes() == before["submission.csv"][0]
            raise failure
    after = _snapshot(out)
    assert after.pop("only-new.txt")[0] == b"the run's own"  # a failed forced run leaves its own files
    assert after == before  # bytes, mtime and mode of every replaced file
    assert (out / "empty").is_dir() and _leftovers(out) == []
    with pytest.raises(OutputError, match="not empty"):  # put back, the files are still someone's
        check_output_folder(out)


def test_a_forced_run_that_succeeds_replaces_them(tmp_path):
    out = tmp_path / "out"
    before = _users_folder(out)
    with prepare_output_folder(out, overwrite=True) as folder:
        _forced_run(folder)
    after = _snapshot(out)
    assert after["submission.csv"][0] == b"ImageId,EncodedPixels\nnewer,-1\n"
    assert after["deep/b.txt"][0] == b"the run's b"
    assert after["notes.txt"] == before["notes.txt"]  # not replaced: untouched
    assert (out / "empty").is_dir() and _leftovers(out) == []


def test_the_manifest_of_another_command_replaced_by_a_forced_run_comes_back(tmp_path):
    """Forced into a training run, predict wrote its own manifest over the run's: failed, the training
    run was left without one, its files all someone's."""
    out = tmp_path / "run"
    with prepare_output_folder(out, what=OutputKind.TRAINING_RUN) as run:
        run.write_bytes("last.pt", data="a checkpoint")
    manifest = (out / MANIFEST_NAME).read_bytes()
    with pytest.raises(RuntimeError):
        with prepare_output_folder(out, what=OutputKind.PREDICTION, overwrite=True) as folder:
            folder.write_bytes("submission.csv", data="forced")
            raise RuntimeError("the run failed")
    assert (out / MANIFEST_NAME).read_bytes() == manifest
    assert (out / "last.pt").read_text() == "a checkpoint"
    # the failed run's own file stays, as a failed first run's does, now listed nowhere
    with pytest.raises(OutputError, match=r"not empty \(submission\.csv\)"):
        check_output_folder(out, what=OutputKind.TRAINING_RUN)
    (out / "submission.csv").unlink()
    with prepare_output_folder(out, what=OutputKind.TRAINING_RUN) as run:  # the training run's own again
        run.write_bytes("last.pt", data="a new checkpoint")


def test_a_forced_rerun_beside_someones_file_puts_back_its_own_earlier_output_too(tmp_path):
    """Beside someone's file a forced rerun sets nothing aside at the start: the earlier run's file it
    replaced was lost when it failed, like someone's."""
    out = tmp_path / "out"
    with prepare_output_folder(out) as folder:
        folder.write_bytes("a.txt", data="earlier a")
        folder.write_bytes("b.txt", data="earlier b")
    (out / "notes.txt").write_text("someone's")
    before = _snapshot(out)
    with pytest.raises(RuntimeError):
        with prepare_output_folder(out, overwrite=True) as folder:
            folder.write_bytes("a.txt", data="new a")
            raise RuntimeError("the run failed")
    assert _snapshot(out) == before
    (out / "notes.txt").unlink()
    with prepare_output_folder(out) as folder:  # the earlier output is still pneumoseg's: no --force
        folder.write_bytes("a.txt", data="new a")


def test_a_folder_or_a_link_at_an_outputs_path_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "out"
    (out / "submission.csv").mkdir(parents=True)
    (out / "submission.csv" / "inside.txt").write_text("someone's")
    outside = tmp_path / "outside.csv"
    outside.write_text("outside the folder")
    (out / "scores.csv").symlink_to(outside)
    with prepare_output_folder(out, overwrite=True) as folder:
        with pytest.raises(OutputError, match="is a folder"):
            folder.write_bytes("submission.csv", data="forced")
        with pytest.raises(OutputError, match="symbolic link"):
            folder.write_bytes("scores.csv", data="forced")
    assert (out / "submission.csv" / "inside.txt").read_text() == "someone's"
    assert (out / "scores.csv").is_symlink() and outside.read_text() == "outside the folder"
    assert _leftovers(out) == []


def test_someones_folder_in_the_holding_folders_place_refuses_the_replacement(tmp_path):
    out = tmp_path / "out"
    before = _users_folder(out)
    (out / PREVIOUS_NAME).mkdir()
    (out / PREVIOUS_NAME / "mine.txt").write_text("someone's")
    with pytest.raises(OutputError, match="in the way"):
        with prepare_output_folder(out, overwrite=True) as folder:
            folder.write_bytes("only-new.txt", data="nothing replaced: fine")
            folder.write_bytes("submission.csv", data="forced")
    assert _snapshot(out).items() >= before.items()  # someone's file is not replaced
    assert (out / PREVIOUS_NAME / "mine.txt").read_text() == "someone's"


# ---------------------------------------------------------------------------------------------------
# After a SIGKILL the next run of the same command puts the replaced files back first


_KILLED_FORCED_RUN = '''
import signal
from pneumoseg._fs import prepare_output_folder
folder = prepare_output_folder(OUT, what=WHAT, overwrite=True)
folder.write_bytes("submission.csv", data="killed run's")
folder.write_bytes("deep", "b.txt", data="killed run's b")
os.kill(os.getpid(), signal.SIGKILL)
'''


def _killed_forced_run(out: Path, what: str) -> None:
    result = run_isolated(f"OUT = {str(out)!r}\nWHAT = {what!r}\n" + _KILLED_FORCED_RUN, timeout=60)
    assert result.returncode == -9, result.describe()
    assert (out / "submission.csv").read_text() == "killed run's"


def test_a_sigkilled_forced_run_is_undone_by_the_next_run_of_the_command(tmp_path):
    out = tmp_path / "out"
    what = OutputKind.PREDICTION
    before = _users_folder(out)
    _killed_forced_run(out, what)
    with pytest.raises(OutputError, match=r"submission\.csv already exists"):
        check_output_folder(out, what=what, never_replace=["submission.csv"])  # held: it comes back
    with pytest.raises(OutputError, match="forced into it has not ended"):  # another command does not undo it
        prepare_output_folder(out, what=OutputKind.EVALUATION, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        with prepare_output_folder(out, what=what, overwrite=True) as folder:
            assert _snapshot(out).items() >= before.items()  # put back first
            folder.write_bytes("submission.csv", data="third run's")
            raise KeyboardInterrupt
    assert _snapshot(out) == before and _leftovers(out) == []
    _killed_forced_run(out, what)
    with prepare_output_folder(out, what=what, overwrite=True) as folder:
        folder.write_bytes("submission.csv", data="done")
    after = _snapshot(out)
    assert after["submission.csv"][0] == b"done" and after["deep/b.txt"] == before["deep/b.txt"]
    assert after["notes.txt"] == before["notes.txt"] and _leftovers(out) == []


def _training_run(out: Path) -> bytes:
    with prepare_output_folder(out, what=OutputKind.TRAINING_RUN) as run:
        run.write_bytes("last.pt", data="a checkpoint")
    return (out / MANIFEST_NAME).read_bytes()


def test_a_forced_run_killed_as_it_made_its_holding_folder_is_undone_by_its_command(tmp_path):
    """Killed between making the holding folder and its mark (or as it removed the emptied one), a forced
    predict left an empty holding beside the training run's manifest it was about to replace: the next
    predict was refused as if the training run had not ended. Holding nothing, it is anyone's to remove."""
    out = tmp_path / "run"
    manifest = _training_run(out)
    (out / PREVIOUS_NAME).mkdir()
    with pytest.raises(RuntimeError):
        with prepare_output_folder(out, what=OutputKind.PREDICTION, overwrite=True) as folder:
            folder.write_bytes("submission.csv", data="forced")
            raise RuntimeError("the run failed")
    assert (out / MANIFEST_NAME).read_bytes() == manifest and _leftovers(out) == []


def test_the_holding_folder_of_a_killed_forced_run_names_its_command(tmp_path):
    """Killed once the training run's manifest was back in place, but not its holding folder gone, a forced
    predict left the folder looking like a training run whose run had not ended: predict itself was
    refused. The mark names the command whose run it is: that command finishes it, no other."""
    out = tmp_path / "run"
    manifest = _training_run(out)
    (out / PREVIOUS_NAME).mkdir()
    (out / PREVIOUS_NAME / ".pneumoseg-replaced").write_text(OutputKind.PREDICTION + "\n")
    with pytest.raises(OutputError, match=r"a prediction output folder\) forced into it has not ended"):
        check_output_folder(out, what=OutputKind.TRAINING_RUN)
    with pytest.raises(RuntimeError):
        with prepare_output_folder(out, what=OutputKind.PREDICTION, overwrite=True):
            raise RuntimeError("the run failed")
    assert (out / MANIFEST_NAME).read_bytes() == manifest and _leftovers(out) == []
    check_output_folder(out, what=OutputKind.TRAINING_RUN)


# ---------------------------------------------------------------------------------------------------
# The commands


@pytest.fixture(scope="module")
def study_set(tmp_path_factory):
    from pneumoseg.data import make_synthetic_siim

    root = tmp_path_factory.mktemp("siim")
    make_synthetic_siim(root, n_images=4, size=64, positive_fraction=0.5, seed=5, progress=False)
    return root


@pytest.mark.parametrize("failure, code", [(OSError(errno.ENOSPC, "No space left on device"), 2),
                                           (KeyboardInterrupt(), 130)])
def test_predict_forced_over_someones_submission_that_fails_puts_it_back(study_set, tmp_path, monkeypatch,
                                                                         capsys, failure, code):
    pytest.importorskip("torch")
    import pneumoseg.cli.predict as predict

    from infer_helpers import model_dir

    out = tmp_path / "pred"
    before = _users_folder(out)
    real = predict.write_predictions

    def write_then_fail(folder, *a, **kw):
        real(folder, *a, **kw)  # the new submission is in place, under the same name
        raise failure

    monkeypatch.setattr(predict, "write_predictions", write_then_fail)
    args = ["predict", str(study_set), "--model", str(model_dir("plain")), "--out", str(out), "--workers", "1",
            "--no-progress", "--force"]
    assert main(args) == code
    capsys.readouterr()
    after = _snapshot(out)
    assert {rel: v for rel, v in after.items() if rel in before} == before
    assert _leftovers(out) == []
    monkeypatch.undo()
    assert main(args) == 0
    assert b"mine" not in (out / "submission.csv").read_bytes()  # forced and finished: replaced
    assert (out / "notes.txt").read_text() == "not an output's name" and _leftovers(out) == []


def test_a_forced_save_over_someones_model_description_that_fails_puts_it_back(tmp_path, monkeypatch):
    """save_model_dir writes its weights and pneumoseg.json by other means than the folder's own writes:
    forced over someone's files of those names and failing after both were written, it lost them."""
    pytest.importorskip("torch")
    from pneumoseg.models import create_segmenter
    from pneumoseg.models.model_dir import ModelDir, load_model_dir, save_model_dir

    seg = create_segmenter(encoder="resnet_tiny", decoder_channels=(16, 16, 8, 8, 8))
    out = tmp_path / "model"
    out.mkdir()
    (out / "pneumoseg.json").write_text('{"edited": "by hand"}\n')
    (out / "segmenter.safetensors").write_bytes(b"someone's weights")
    before = _snapshot(out)
    real = ModelDir.save

    def save_then_fail(self, *args):
        real(self, *args)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ModelDir, "save", save_then_fail)
    with pytest.raises(OSError, match="No space"):
        save_model_dir(out, {"segmenter": seg}, input_sizes={"segmenter": 64}, overwrite=True)
    assert {rel: v for rel, v in _snapshot(out).items() if rel in before} == before and _leftovers(out) == []
    monkeypatch.undo()
    save_model_dir(out, {"segmenter": seg}, input_sizes={"segmenter": 64}, overwrite=True)
    assert load_model_dir(out).thresholds is not None and _leftovers(out) == []


_TERMINATE_AFTER_SECOND_MASK = '''
import signal, time
import pneumoseg._fs as fs
from pneumoseg.cli import main

real_replace, renames = os.replace, [0]

def replace_then_terminate(src, dst):
    real_replace(src, dst)
    renames[0] += str(dst).endswith(".png") and ".pneumoseg-" not in str(dst)
    if renames[0] == 2:  # two of someone's masks are replaced by the run's
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)

fs.os.replace = replace_then_terminate
sys.exit(main(ARGS))
'''


def test_data_masks_forced_over_someones_masks_and_terminated_puts_them_back(study_set, tmp_path):
    from pneumoseg.data.siim import read_rle_csv

    out = tmp_path / "masks"
    out.mkdir()
    ids = sorted(read_rle_csv(study_set / "train-rle.csv"))
    for i, image_id in enumerate(ids):  # someone's own masks, under the names the command writes
        (out / f"{image_id}.png").write_bytes(f"someone's mask {i}".encode())
    (out / "notes.txt").write_text("someone's")
    before = _snapshot(out)
    args = ["data", "masks", "--csv", str(study_set / "train-rle.csv"), "--shape", "64", "64", "--out", str(out),
            "--force", "--no-progress"]
    result = run_isolated(f"ARGS = {args!r}\n" + _TERMINATE_AFTER_SECOND_MASK, timeout=120)
    assert result.returncode == 143, result.describe()
    assert "pneumoseg: terminated" in result.stderr and "Traceback" not in result.stderr, result.describe()
    assert _snapshot(out) == before and _leftovers(out) == []
    assert main(args) == 0
    assert all(not (out / f"{image_id}.png").read_bytes().startswith(b"someone's") for image_id in ids)
    assert (out / "notes.txt").read_text() == "someone's" and _leftovers(out) == []


def test_a_training_run_forced_over_someones_model_description_that_fails_puts_it_back(study_set, tmp_path,
                                                                                      monkeypatch):
    """The training run writes its weights and pneumoseg.json through save_model_dir, not the folder's
    own writes: they are set aside first too (OutputFolder.replacing)."""
    pytest.importorskip("torch")
    from factories import TINY_TRAINING, training_config

    from pneumoseg.train import engine

    out = tmp_path / "run"
    out.mkdir()
    (out / "pneumoseg.json").write_text('{"mine": true}\n')
    (out / "notes.txt").write_text("someone's")
    before = _snapshot(out)

    def fail_late(*a, **kw):
        assert "pneumoseg-model" in (out / "pneumoseg.json").read_text()  # the run's is in place
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "_artefacts_note", fail_late)
    config = training_config(TINY_TRAINING, study_set, data__preload=False)
    with pytest.raises(KeyboardInterrupt):
        engine.train(config, out, overwrite=True, progress=False)
    # stopped after its checkpoint, the run stays for --resume, someone's file held until it ends
    assert (out / "checkpoints").is_dir() and (out / "notes.txt").read_text() == "someone's"
    assert _snapshot(out / PREVIOUS_NAME)["pneumoseg.json"] == before["pneumoseg.json"]
    with pytest.raises(RuntimeError):
        with prepare_output_folder(out, what=OutputKind.TRAINING_RUN, overwrite=True):  # a fresh run
            assert _snapshot(out)["pneumoseg.json"] == before["pneumoseg.json"]  # puts it back first
            raise RuntimeError("and fails at once")
    assert {rel: v for rel, v in _snapshot(out).items() if rel in before} == before and _leftovers(out) == []


# ---------------------------------------------------------------------------------------------------
# Found by SIGKILL at each file-system call of a forced run (adversarial review)


_KILLED_WHILE_FILLING = '''
import signal
from pneumoseg._fs import prepare_output_folder
folder = prepare_output_folder(OUT, what="cache folder", overwrite=FORCED)
with folder.filled_in_place("images.npy") as path:
    with open(path, "wb") as f:
        f.write(b"half filled")
    os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.mark.parametrize("forced", [True, False], ids=["forced", "rerun"])
def test_a_run_killed_while_filling_a_file_in_place_is_undone_by_the_next_run(tmp_path, forced):
    """`data cache` fills its arrays in place (memory maps), which took minutes under the output's own
    name: killed meanwhile (the OOM killer), the run left an unlisted file where the earlier one (held)
    goes back, and the next run was refused until someone moved one of the two. It fills a temporary
    file now, renamed into place once listed."""
    out = tmp_path / "cache"
    with prepare_output_folder(out, what=OutputKind.CACHE) as folder:
        folder.write_bytes("images.npy", data="earlier images")
        folder.write_bytes("index.json", data="earlier index")
    if forced:
        (out / "notes.txt").write_text("someone's")
    before = _snapshot(out)
    result = run_isolated(f"OUT = {str(out)!r}\nFORCED = {forced}\n" + _KILLED_WHILE_FILLING, timeout=60)
    assert result.returncode == -9, result.describe()
    assert [p.read_bytes() for p in out.glob("images.npy")] in ([b"earlier images"], [])  # never half filled
    with pytest.raises(RuntimeError):
        with prepare_output_folder(out, what=OutputKind.CACHE, overwrite=forced):
            raise RuntimeError("the next run fails")
    assert {rel: v for rel, v in _snapshot(out).items() if ".pneumoseg-" not in rel} == before
    assert _leftovers(out) == []
    with prepare_output_folder(out, what=OutputKind.CACHE, overwrite=forced) as folder:
        with folder.filled_in_place("images.npy") as path:
            path.write_bytes(b"new images")
    assert (out / "images.npy").read_bytes() == b"new images"
    if not forced:  # its own output again: no --force, and the killed run's temporary file is gone
        check_output_folder(out, what=OutputKind.CACHE)
        assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "images.npy"]


def test_a_file_filled_in_place_by_a_failed_forced_run_leaves_someones_file(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    (out / "images.npy").write_bytes(b"someone's images")
    before = _snapshot(out)
    with pytest.raises(OSError, match="No space"):
        with prepare_output_folder(out, what=OutputKind.CACHE, overwrite=True) as folder:
            with folder.filled_in_place("images.npy") as path:
                path.write_bytes(b"half")
                raise OSError(errno.ENOSPC, "No space left on device")
    assert _snapshot(out) == before and _leftovers(out) == []


_KILLED_AFTER_DROPPING_AN_ARTEFACT = '''
import signal, torch
from pneumoseg.models import create_segmenter
from pneumoseg.models import model_dir as md

real = md._remove_artefact_file

def remove_then_die(*a, **kw):
    real(*a, **kw)
    os.kill(os.getpid(), signal.SIGKILL)

md._remove_artefact_file = remove_then_die
torch.manual_seed(1)
seg = create_segmenter(encoder="resnet_tiny", decoder_channels=(16, 16, 8, 8, 8))
md.save_model_dir(OUT, {"segmenter": seg}, input_sizes={"segmenter": 64}, overwrite=True)
'''


def _copied_model_dir_with_an_onnx_file(out: Path) -> None:
    """A model directory with an exported ONNX file, copied (every file changed since pneumoseg listed
    it, so nothing in it is pneumoseg's)."""
    import torch

    from pneumoseg.models import create_segmenter
    from pneumoseg.models.model_dir import load_model_dir, save_model_dir

    torch.manual_seed(0)
    save_model_dir(out, {"segmenter": create_segmenter(encoder="resnet_tiny", decoder_channels=(16, 16, 8, 8, 8))},
                   input_sizes={"segmenter": 64})
    load_model_dir(out).add_artefact("segmenter-onnx", "onnx/segmenter.onnx", b"graph", format="onnx",
                                     network="segmenter", precision="fp32")
    for p in out.rglob("*"):
        if p.is_file():
            os.utime(p, ns=(10**18, 10**18))


def test_a_forced_save_killed_after_dropping_a_stale_artefact_puts_it_back(tmp_path):
    """Saved with overwrite=True over someone's model directory (copied: nothing in it is pneumoseg's),
    new weights make its exported ONNX stale, and the save removed that file: killed before it ended,
    the next run put the description and weights back, and the description listed a file that was gone.
    The artefact is set aside like the files it goes with."""
    pytest.importorskip("torch")
    from pneumoseg.models.model_dir import load_model_dir

    out = tmp_path / "model"
    _copied_model_dir_with_an_onnx_file(out)
    before = _snapshot(out)
    result = run_isolated(f"OUT = {str(out)!r}\n" + _KILLED_AFTER_DROPPING_AN_ARTEFACT, timeout=120)
    assert result.returncode == -9, result.describe()
    with pytest.raises(RuntimeError):
        with prepare_output_folder(out, what=OutputKind.MODEL_DIR, overwrite=True):
            raise RuntimeError("the next save fails")
    assert _snapshot(out) == before and _leftovers(out) == []
    assert load_model_dir(out).artefacts["segmenter-onnx"].path == "onnx/segmenter.onnx"


_KILLED_WHILE_WRITING_THE_MODEL_DESCRIPTION = '''
import signal
sys.path.insert(0, TESTS)
from factories import TINY_TRAINING, training_config
from pneumoseg.models.model_dir import ModelDir
from pneumoseg.train import engine

def die(self, *args):  # the weights are in place; pneumoseg.json is next
    os.kill(os.getpid(), signal.SIGKILL)

ModelDir.save = die
engine.train(training_config(TINY_TRAINING, STUDY, data__preload=False), OUT, overwrite=FORCED, progress=False)
'''


@pytest.mark.parametrize("forced", [True, False], ids=["forced", "rerun"])
def test_a_training_run_killed_while_saving_its_model_is_undone_by_the_next_run(study_set, tmp_path, forced):
    """The training run wrote its weights and pneumoseg.json through save_model_dir and listed them
    afterwards: killed in between (while pneumoseg.json was written), its weights were in place and
    unlisted where someone's (forced) or the earlier run's (rerun), held, go back, and the next run was
    refused until someone moved one of the two. They are written through the run's folder now, each
    listed just before it is in place."""
    pytest.importorskip("torch")
    out = tmp_path / "run"
    with prepare_output_folder(out, what=OutputKind.TRAINING_RUN) as run:
        run.write_bytes("segmenter.safetensors", data="earlier weights")
    if forced:
        (out / "notes.txt").write_text("someone's")
    before = _snapshot(out)
    code = (f"OUT = {str(out)!r}\nSTUDY = {str(study_set)!r}\nFORCED = {forced}\n"
            f"TESTS = {str(Path(__file__).parent)!r}\n" + _KILLED_WHILE_WRITING_THE_MODEL_DESCRIPTION)
    result = run_isolated(code, timeout=300)
    assert result.returncode == -9, result.describe()
    assert (out / "segmenter.safetensors").read_bytes() != b"earlier weights"  # killed after the weights
    with pytest.raises(RuntimeError):
        with prepare_output_folder(out, what=OutputKind.TRAINING_RUN, overwrite=forced):
            raise RuntimeError("the next run fails")
    assert {rel: v for rel, v in _snapshot(out).items() if rel in before} == before
    assert _leftovers(out) == []


@pytest.mark.parametrize("to", ["file", "folder"])
def test_a_link_in_the_manifests_place_is_held_and_put_back(tmp_path, to):
    """A forced run replaces (never writes through) a symbolic link in the manifest's place: it was
    removed, and a failed run left it gone (a folder of links, `cp -rs`, has one there)."""
    target = tmp_path / "elsewhere"
    if to == "file":
        target.write_text("someone's manifest")
    else:
        target.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST_NAME).symlink_to(target)
    (out / "notes.txt").write_text("someone's")
    with pytest.raises(RuntimeError):
        with prepare_output_folder(out, overwrite=True) as folder:
            assert not (out / MANIFEST_NAME).is_symlink()
            folder.write_bytes("notes.txt", data="forced")
            raise RuntimeError("the run failed")
    assert os.readlink(out / MANIFEST_NAME) == str(target) and (out / "notes.txt").read_text() == "someone's"
    assert _leftovers(out) == [] and target.exists()
    with prepare_output_folder(out, overwrite=True) as folder:  # succeeds: replaced, never followed
        folder.write_bytes("notes.txt", data="forced")
    assert not (out / MANIFEST_NAME).is_symlink() and target.exists() and _leftovers(out) == []


def test_a_training_run_forced_over_someones_model_directory_drops_its_stale_artefacts(study_set, tmp_path):
    """Forced over a copied model directory, the training run reads the earlier pneumoseg.json, as any
    save over an earlier model directory does (docs/model-directory.md, "Writing over an earlier
    model directory"): the exported ONNX made from other weights is removed and named in the run's note. Setting
    the description aside before the save hid it, and the stale file stayed, unlisted and unnamed."""
    pytest.importorskip("torch")
    from factories import TINY_TRAINING, training_config

    from pneumoseg.models.model_dir import load_model_dir
    from pneumoseg.train import engine

    out = tmp_path / "run"
    _copied_model_dir_with_an_onnx_file(out)
    result = engine.train(training_config(TINY_TRAINING, study_set, data__preload=False), out, overwrite=True,
                          progress=False)
    assert not (out / "onnx" / "segmenter.onnx").exists() and _leftovers(out) == []
    assert load_model_dir(out).artefacts == {}
    assert any("segmenter-onnx" in note for note in result.notes), result.notes


def test_a_forced_run_resumed_before_it_replaced_anything_sets_someones_file_aside(tmp_path):
    """A forced training run stopped (kept for --resume) before it replaced a file left no holding
    folder, so its resumed run took the folder for all its own and wrote over someone's pneumoseg.json
    in place: failing afterwards, that file was gone. The resumed run finds someone's files again."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "pneumoseg.json").write_text("someone's")
    (out / "notes.txt").write_text("someone's")
    before = _snapshot(out)
    first = prepare_output_folder(out, overwrite=True, what=OutputKind.TRAINING_RUN)
    first.write_bytes("checkpoints", "last.pt", data="epoch 1")
    first.close(failed=True, keep=True)
    assert not (out / PREVIOUS_NAME).exists()  # nothing replaced yet
    resumed = prepare_output_folder(out, resume=True, what=OutputKind.TRAINING_RUN)
    resumed.write_bytes("checkpoints", "last.pt", data="epoch 2")  # its own: rewritten, not held
    resumed.write_bytes("pneumoseg.json", data="the run's")
    assert sorted(_snapshot(out / PREVIOUS_NAME)) == [".pneumoseg-replaced", "pneumoseg.json"]
    resumed.close(failed=True)
    with pytest.raises(RuntimeError):
        with prepare_output_folder(out, what=OutputKind.TRAINING_RUN, overwrite=True):  # a fresh run
            raise RuntimeError("and fails at once")
    assert {rel: v for rel, v in _snapshot(out).items() if rel in before} == before and _leftovers(out) == []
