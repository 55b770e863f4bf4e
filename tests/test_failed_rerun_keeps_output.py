"""A rerun into a command's own earlier output that fails must not lose that output. The earlier
output was removed when the folder was prepared, so a rerun that then failed (a full disk, Ctrl-C,
SIGTERM, a user error found late) left neither run's: an earlier submission.csv was gone. It is now
set aside in the folder's holding folder, put back byte for byte when the run fails, removed when it
succeeds, and put back by the next run after a SIGKILL."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from pneumoseg import rle
from pneumoseg._fs import (MANIFEST_NAME, PREVIOUS_NAME, OutputKind, check_output_folder, prepare_output_folder)
from pneumoseg.cli import main
from pneumoseg.errors import OutputError

from isolated import run_isolated


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (the manifest and anything set aside included): its bytes and mtime."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".pneumoseg-") and p.name != MANIFEST_NAME)


# ---------------------------------------------------------------------------------------------------
# The commands: a failure after the folder is prepared puts the earlier output back


@pytest.fixture(scope="module")
def study_set(tmp_path_factory):
    from pneumoseg.data import make_synthetic_siim

    root = tmp_path_factory.mktemp("siim")
    make_synthetic_siim(root, n_images=6, size=64, positive_fraction=0.5, seed=5, progress=False)
    return root


@pytest.mark.parametrize("failure, code", [(OSError(errno.ENOSPC, "No space left on device"), 2),
                                           (KeyboardInterrupt(), 130)])
def test_a_failed_predict_rerun_puts_the_earlier_submission_back(study_set, tmp_path, monkeypatch, capsys,
                                                                 failure, code):
    pytest.importorskip("torch")
    import pneumoseg.cli.predict as predict

    from infer_helpers import model_dir

    out = tmp_path / "pred"
    args = ["predict", str(study_set), "--model", str(model_dir("plain")), "--out", str(out), "--workers", "1",
            "--no-progress"]
    assert main(args) == 0
    before = _snapshot(out)
    assert {"submission.csv", "scores.csv", "summary.json", MANIFEST_NAME} <= set(before)
    real = predict.write_predictions

    def write_then_fail(folder, *a, **kw):
        real(folder, *a, **kw)  # the new submission is in place, under the same name
        folder.write_bytes("extra.txt", data="only the failed run wrote this")
        (folder.path / "notes.txt").write_text("someone's, written while the run lasted")
        raise failure

    monkeypatch.setattr(predict, "write_predictions", write_then_fail)
    assert main([*args, "--force"]) == code  # --force: an earlier submission is never replaced without it
    capsys.readouterr()
    after = _snapshot(out)
    assert after.pop("notes.txt")[0].startswith(b"someone's")  # not pneumoseg's: never removed
    assert after == before  # every earlier file back, bytes, times and manifest
    assert _leftovers(out) == []
    monkeypatch.undo()
    assert main([*args, "--force"]) == 0  # still pneumoseg's own output (beside notes.txt: --force)


def _write_csv(path: Path, rows) -> Path:
    path.write_text("ImageId,EncodedPixels\n" + "".join(f"{i},{s}\n" for i, s in rows))
    return path


def test_a_user_error_found_after_preparing_puts_the_earlier_evaluation_back(tmp_path, monkeypatch, capsys):
    import sys

    import pneumoseg.cli.evaluate as evaluate_cli

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no pictures: seconds saved, and not the point
    mask = np.zeros((16, 16), np.uint8)
    mask[4:9, 5:11] = 1
    truth = _write_csv(tmp_path / "truth.csv", [("a", rle.encode(mask)), ("b", "-1")])
    out = tmp_path / "ev"
    args = ["evaluate", "--pred", str(truth), "--truth", str(truth), "--out", str(out)]
    assert main(args) == 0
    before = _snapshot(out)
    assert "metrics.json" in before

    def fail_late(ev, folder, extra=None):
        folder.write_bytes("metrics.json", data='{"new": true}\n')
        raise OutputError("found only now")

    monkeypatch.setattr(evaluate_cli, "write_evaluation", fail_late)
    assert main(args) == 2
    assert "found only now" in capsys.readouterr().err
    assert _snapshot(out) == before and _leftovers(out) == []


# ---------------------------------------------------------------------------------------------------
# The rule itself, on prepare_output_folder


def _earlier_output(out: Path, what: str = "output folder") -> dict[str, tuple[bytes, int]]:
    with prepare_output_folder(out, what=what) as folder:
        folder.write_bytes("a.txt", data="earlier a")
        folder.write_bytes("deep", "b.txt", data="earlier b")
    return _snapshot(out)


def test_a_successful_rerun_replaces_the_earlier_output_and_leaves_no_holding_folder(tmp_path):
    out = tmp_path / "out"
    _earlier_output(out)
    with prepare_output_folder(out) as folder:
        assert not (out / "a.txt").exists() and not (out / "deep").exists()  # a clean folder to write into
        assert (out / PREVIOUS_NAME / "deep" / "b.txt").read_text() == "earlier b"
        check_output_folder(out)  # the holding folder is nobody's files: no --force asked for
        folder.write_bytes("a.txt", data="new a")
    assert sorted(_snapshot(out)) == [MANIFEST_NAME, "a.txt"] and (out / "a.txt").read_text() == "new a"
    assert _leftovers(out) == []


def test_an_exception_in_the_block_puts_the_earlier_output_back(tmp_path):
    out = tmp_path / "out"
    before = _earlier_output(out)
    with pytest.raises(RuntimeError):
        with prepare_output_folder(out) as folder:
            folder.write_bytes("a.txt", data="new a")
            folder.write_bytes("deep", "c.txt", data="new c")
            folder.write_bytes("deep", "b.txt", "inner.txt", data="a folder where a file was")
            raise RuntimeError("the run failed")
    assert _snapshot(out) == before and _leftovers(out) == []


_KILLED_RERUN = '''
import signal
from pneumoseg._fs import prepare_output_folder
folder = prepare_output_folder(OUT, what=WHAT)
folder.write_bytes("a.txt", data="killed run's a")
folder.write_bytes("new.txt", data="killed run's own")
os.kill(os.getpid(), signal.SIGKILL)
'''


def _killed_rerun(out: Path, what: str) -> None:
    result = run_isolated(f"OUT = {str(out)!r}\nWHAT = {what!r}\n" + _KILLED_RERUN, timeout=60)
    assert result.returncode == -9, result.describe()
    assert (out / PREVIOUS_NAME / "a.txt").read_text() == "earlier a" and (out / "new.txt").is_file()


def test_a_sigkilled_rerun_is_undone_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    what = OutputKind.PREDICTION
    before = _earlier_output(out, what)
    _killed_rerun(out, what)
    check_output_folder(out, what=what)  # neither the held output nor the killed run's is someone else's
    with pytest.raises(OutputError):  # another command does not undo this one's run
        prepare_output_folder(out, what=OutputKind.EVALUATION)
    assert (out / PREVIOUS_NAME / "a.txt").is_file()
    # The next run undoes the killed one before setting the earlier output aside again: failing, it
    # leaves the folder as it was before the killed run.
    with pytest.raises(KeyboardInterrupt):
        with prepare_output_folder(out, what=what) as folder:
            folder.write_bytes("a.txt", data="third run's a")
            raise KeyboardInterrupt
    assert _snapshot(out) == before and _leftovers(out) == []
    _killed_rerun(out, what)
    with prepare_output_folder(out, what=what) as folder:  # succeeding, it replaces the earlier output
        assert not (out / "new.txt").exists()
        folder.write_bytes("z.txt", data="done")
    assert sorted(_snapshot(out)) == [MANIFEST_NAME, "z.txt"] and _leftovers(out) == []


def test_a_held_file_whose_place_is_taken_is_never_lost(tmp_path):
    out = tmp_path / "out"
    _earlier_output(out)
    _killed_rerun(out, "output folder")
    (out / "deep").mkdir()
    (out / "deep" / "b.txt").write_text("someone's b")  # where the held deep/b.txt goes back
    with pytest.raises(OutputError, match=r"deep/b\.txt.* is now where it goes back"):
        prepare_output_folder(out)
    assert (out / "deep" / "b.txt").read_text() == "someone's b"
    assert (out / PREVIOUS_NAME / "deep" / "b.txt").read_text() == "earlier b"
    assert (out / "a.txt").read_text() == "earlier a"  # what could go back went back
    os.unlink(out / "deep" / "b.txt")
    with prepare_output_folder(out):  # once the way is clear the rest goes back, and is replaced
        pass
    assert sorted(_snapshot(out)) == [MANIFEST_NAME] and _leftovers(out) == []


def test_a_failed_run_that_can_resume_keeps_its_files_and_the_earlier_output(tmp_path):
    """A training run stopped after a checkpoint is kept for --resume (close(keep=True)); the earlier
    run stays set aside until the resumed run succeeds."""
    out = tmp_path / "run"
    what = OutputKind.TRAINING_RUN
    _earlier_output(out, what)
    folder = prepare_output_folder(out, what=what)
    folder.write_bytes("checkpoints", "last.pt", data="epoch 1")
    folder.close(failed=True, keep=True)
    assert (out / "checkpoints" / "last.pt").is_file() and (out / PREVIOUS_NAME / "a.txt").is_file()
    with pytest.raises(KeyboardInterrupt):
        with prepare_output_folder(out, what=what, resume=True) as folder:  # a resumed run removes nothing
            folder.write_bytes("checkpoints", "last.pt", data="epoch 2")
            raise KeyboardInterrupt
    assert (out / "checkpoints" / "last.pt").read_text() == "epoch 2" and (out / PREVIOUS_NAME / "a.txt").is_file()
    with prepare_output_folder(out, what=what, resume=True) as folder:
        folder.write_bytes("checkpoints", "last.pt", data="epoch 3")
    assert sorted(_snapshot(out)) == [MANIFEST_NAME, "checkpoints/last.pt"] and _leftovers(out) == []


def test_a_subfolder_run_ends_with_its_folder(tmp_path):
    """The demo's predictions/ and evaluation/ are sub-folders prepared on their own: under --force beside
    someone's files (nothing set aside above them), their earlier output goes back with the demo's run."""
    out = tmp_path / "demo"
    with prepare_output_folder(out) as folder:
        folder.subfolder("predictions").write_bytes("submission.csv", data="earlier")
    (out / "notes.txt").write_text("someone's")
    before = _snapshot(out)
    with pytest.raises(RuntimeError):
        with prepare_output_folder(out, overwrite=True) as folder:
            folder.subfolder("predictions").write_bytes("submission.csv", data="new")
            raise RuntimeError("a later step failed")
    assert _snapshot(out) == before and _leftovers(out / "predictions") == []


def test_no_file_may_be_written_in_the_holding_folders_place(tmp_path):
    with prepare_output_folder(tmp_path / "out") as folder:
        with pytest.raises(OutputError, match="earlier output"):
            folder.file(PREVIOUS_NAME, "x.txt")


def test_a_folder_of_that_name_pneumoseg_did_not_make_is_someone_elses(tmp_path):
    out = tmp_path / "out"
    _earlier_output(out)
    (out / PREVIOUS_NAME).mkdir()
    (out / PREVIOUS_NAME / "mine.txt").write_text("someone's")  # no manifest: not a holding folder
    with pytest.raises(OutputError, match="not empty"):
        prepare_output_folder(out)
    with prepare_output_folder(out, overwrite=True):  # beside someone's files nothing is set aside
        pass
    assert (out / PREVIOUS_NAME / "mine.txt").read_text() == "someone's" and (out / "a.txt").read_text() == "earlier a"


@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_failed_training_rerun_keeps_the_earlier_run(study_set, tmp_path, monkeypatch, checkpointed):
    """`pneumoseg train` into an earlier run, stopped: before its first checkpoint the earlier run is put
    back; after it, the new run stays (for --resume) and the earlier one stays set aside."""
    pytest.importorskip("torch")
    from factories import TINY_TRAINING, training_config

    from pneumoseg.train import engine

    out = tmp_path / "run"
    before = _earlier_output(out, OutputKind.TRAINING_RUN)

    def stopped(self, folder):
        if checkpointed:
            folder.write_bytes("checkpoints", "last.pt", data="a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.Trainer, "fit", stopped)
    with pytest.raises(KeyboardInterrupt):
        engine.train(training_config(TINY_TRAINING, study_set, data__preload=False), out, progress=False)
    if checkpointed:
        assert (out / "checkpoints" / "last.pt").is_file() and _leftovers(out) == [PREVIOUS_NAME]
        assert {f"{PREVIOUS_NAME}/{rel}": v for rel, v in before.items()} == {
            rel: v for rel, v in _snapshot(out).items() if rel.startswith(PREVIOUS_NAME)}
    else:
        assert _snapshot(out) == before and _leftovers(out) == []


# ---------------------------------------------------------------------------------------------------
# save_model_dir: its files are listed, so saving again needs no overwrite and a failed save undoes itself


def _tiny_segmenter():
    from pneumoseg.models import create_segmenter

    return create_segmenter(encoder="resnet_tiny", decoder_channels=(16, 16, 8, 8, 8))


def test_saving_a_model_directory_again_replaces_its_own_files(tmp_path):
    """save_model_dir wrote its weights and pneumoseg.json without listing them, so saving again into
    the same folder said 'pneumoseg did not write it' and wanted overwrite=True."""
    pytest.importorskip("torch")
    from pneumoseg.models.model_dir import load_model_dir, save_model_dir

    out = tmp_path / "model"
    save_model_dir(out, {"segmenter": _tiny_segmenter()}, input_sizes={"segmenter": 64})
    listed = (out / MANIFEST_NAME).read_text()
    assert "pneumoseg.json" in listed and "segmenter.safetensors" in listed
    save_model_dir(out, {"segmenter": _tiny_segmenter()}, input_sizes={"segmenter": 64}, thresholds={"top": 0.7})
    assert load_model_dir(out).thresholds.top == 0.7
    assert _leftovers(out) == []


def test_a_save_that_fails_after_writing_weights_puts_the_earlier_directory_back(tmp_path):
    """The weights are written before the metrics are checked: the new weights must go, the earlier
    directory come back byte for byte, and the next save work without overwrite."""
    pytest.importorskip("torch")
    from pneumoseg.errors import InvalidInputError
    from pneumoseg.models.model_dir import save_model_dir

    out = tmp_path / "model"
    save_model_dir(out, {"segmenter": _tiny_segmenter()}, input_sizes={"segmenter": 64})
    before = _snapshot(out)
    with pytest.raises(InvalidInputError, match="metrics"):
        save_model_dir(out, {"segmenter": _tiny_segmenter()}, input_sizes={"segmenter": 64},
                       metrics={"dice": object()})
    assert _snapshot(out) == before
    assert _leftovers(out) == []
    save_model_dir(out, {"segmenter": _tiny_segmenter()}, input_sizes={"segmenter": 64})


def test_a_failed_forced_save_keeps_someones_file_it_had_not_replaced(tmp_path):
    """Under overwrite=True beside someone's files nothing is set aside (as for every command): a failed
    save leaves someone's files as they were and what it wrote listed as pneumoseg's, not unlisted."""
    pytest.importorskip("torch")
    from pneumoseg.errors import InvalidInputError
    from pneumoseg.models.model_dir import save_model_dir

    out = tmp_path / "model"
    out.mkdir()
    (out / "pneumoseg.json").write_text("someone's notes")
    (out / "notes.txt").write_text("keep")
    with pytest.raises(InvalidInputError, match="metrics"):
        save_model_dir(out, {"segmenter": _tiny_segmenter()}, input_sizes={"segmenter": 64},
                       metrics={"dice": object()}, overwrite=True)
    assert (out / "pneumoseg.json").read_text() == "someone's notes"
    assert (out / "notes.txt").read_text() == "keep"
    assert "segmenter.safetensors" in (out / MANIFEST_NAME).read_text()


# ---------------------------------------------------------------------------------------------------
# A put-back stopped part way (Ctrl-C, SIGKILL) is finished by the next run, losing nothing


def _demo_with_a_nested_run(out: Path) -> dict[str, tuple[bytes, int]]:
    """A demo folder holding a training run with its own manifest, as `pneumoseg demo` leaves it."""
    with prepare_output_folder(out, what=OutputKind.DEMO) as folder:
        folder.write_bytes("a.txt", data="earlier a")
        with prepare_output_folder(out / "run", what=OutputKind.TRAINING_RUN) as run:
            run.write_bytes("sub", "c.txt", data="earlier c")
            run.write_bytes("w.bin", data="earlier w")
    return _snapshot(out)


def _stop_a_failed_rerun_at_a_move(out: Path, monkeypatch, last_move_back: str) -> None:
    """A failed demo rerun whose put-back is stopped (Ctrl-C) as it moves ``last_move_back`` back."""
    import pneumoseg._fs as fs

    real = os.rename

    def rename(src, dst):
        if Path(dst) == out / last_move_back and PREVIOUS_NAME in Path(src).parts:
            raise KeyboardInterrupt
        real(src, dst)

    with pytest.raises(KeyboardInterrupt):
        with prepare_output_folder(out, what=OutputKind.DEMO) as folder:
            folder.write_bytes("a.txt", data="new a")
            with prepare_output_folder(out / "run", what=OutputKind.TRAINING_RUN) as run:
                run.write_bytes("w.bin", data="new w")
            monkeypatch.setattr(fs.os, "rename", rename)
            raise RuntimeError("the rerun failed")
    monkeypatch.setattr(fs.os, "rename", real)


def test_a_put_back_stopped_after_a_nested_manifest_went_back_loses_none_of_its_files(tmp_path, monkeypatch):
    """The nested run's earlier manifest went back before its files (it sorts first); the next run's
    put-back took that manifest for the stopped run's and removed the earlier files already back."""
    out = tmp_path / "demo"
    before = _demo_with_a_nested_run(out)
    _stop_a_failed_rerun_at_a_move(out, monkeypatch, "run/w.bin")
    assert (out / "run" / "sub" / "c.txt").read_text() == "earlier c"  # back before the stop
    with pytest.raises(RuntimeError):
        with prepare_output_folder(out, what=OutputKind.DEMO):
            raise RuntimeError("and so did the next")
    assert _snapshot(out) == before and _leftovers(out) == []


def test_a_put_back_stopped_before_the_holding_folder_went_leaves_nothing_in_the_way(tmp_path, monkeypatch):
    """Stopped after the earlier manifest went back, the holding folder still had the emptied folders
    of deep files: no manifest and not empty, it was someone's, and every later run refused it."""
    import pneumoseg._fs as fs

    out = tmp_path / "demo"
    before = _demo_with_a_nested_run(out)
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        if Path(src) == out / PREVIOUS_NAME / MANIFEST_NAME:
            raise KeyboardInterrupt  # the earlier manifest is back, the holding folder not yet gone

    monkeypatch.setattr(fs.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with prepare_output_folder(out, what=OutputKind.DEMO) as folder:
            folder.write_bytes("a.txt", data="new a")
            raise RuntimeError("the rerun failed")
    monkeypatch.setattr(fs.os, "replace", real)
    with prepare_output_folder(out, what=OutputKind.DEMO) as folder:  # no "in the way"
        assert sorted(_snapshot(out / PREVIOUS_NAME)) == sorted(before)
        folder.write_bytes("a.txt", data="new a")
    assert sorted(_snapshot(out)) == [MANIFEST_NAME, "a.txt"] and _leftovers(out) == []


# ---------------------------------------------------------------------------------------------------
# What pneumoseg keeps aside is told from what someone else keeps under the same names


def test_someones_folder_named_like_a_discarded_one_is_never_removed(tmp_path):
    """Any folder called .pneumoseg-discarded counted as pneumoseg's leftovers: a rerun removed it and
    the files in it, asking nothing."""
    out = tmp_path / "out"
    _earlier_output(out)
    (out / ".pneumoseg-discarded").mkdir()
    (out / ".pneumoseg-discarded" / "mine.txt").write_text("someone's")
    with pytest.raises(OutputError, match=r"not empty \(\.pneumoseg-discarded/mine\.txt\)"):
        prepare_output_folder(out)
    with prepare_output_folder(out, overwrite=True) as folder:
        folder.write_bytes("a.txt", data="new a")
    assert (out / ".pneumoseg-discarded" / "mine.txt").read_text() == "someone's"


def test_a_discard_stopped_part_way_is_finished_by_the_next_run(tmp_path, monkeypatch):
    """The set-aside output of a run that succeeded is removed manifest last, so what a stop leaves is
    still known as pneumoseg's (removed by the next run), not someone's files wanting --force."""
    import pneumoseg._fs as fs

    out = tmp_path / "out"
    _earlier_output(out)
    real = os.unlink

    def unlink(path, *a, **kw):
        if Path(path).name == MANIFEST_NAME and Path(path).parent.name == ".pneumoseg-discarded":
            raise KeyboardInterrupt  # as a SIGKILL would, the earlier files gone, the manifest not yet
        real(path, *a, **kw)

    monkeypatch.setattr(fs.os, "unlink", unlink)
    with pytest.raises(KeyboardInterrupt):
        with prepare_output_folder(out) as folder:
            folder.write_bytes("a.txt", data="new a")
    monkeypatch.setattr(fs.os, "unlink", real)
    check_output_folder(out)
    with prepare_output_folder(out) as folder:
        folder.write_bytes("a.txt", data="third a")
    assert sorted(_snapshot(out)) == [MANIFEST_NAME, "a.txt"] and _leftovers(out) == []


def test_another_command_forced_into_a_run_that_has_not_ended_is_refused(tmp_path):
    """Forced into a training run kept for --resume, predict's manifest replaced the run's; predict's
    next run took the run's holding folder for its own, removed the forced predict's submission as the
    stopped run's files, and refused part way: the submission was lost."""
    out = tmp_path / "run"
    _earlier_output(out, OutputKind.TRAINING_RUN)
    run = prepare_output_folder(out, what=OutputKind.TRAINING_RUN)
    run.write_bytes("last.pt", data="a checkpoint")
    run.close(failed=True, keep=True)
    before = _snapshot(out)
    for check in (check_output_folder, prepare_output_folder):
        with pytest.raises(OutputError, match="training run folder whose run has not ended"):
            check(out, what=OutputKind.PREDICTION, overwrite=True)
    assert _snapshot(out) == before
    with prepare_output_folder(out, what=OutputKind.TRAINING_RUN, resume=True):
        pass  # the run ends; the folder is then training output like any other
    with prepare_output_folder(out, what=OutputKind.PREDICTION, overwrite=True) as folder:
        folder.write_bytes("submission.csv", data="forced")


def test_the_temporary_files_of_a_killed_run_do_not_make_the_next_run_need_force(tmp_path):
    """A run killed while writing (SIGKILL, or SIGTERM landing inside mkstemp) left its temporary file or
    its writability probe; unlisted, they were someone's files and the next run refused the folder."""
    import tempfile

    from pneumoseg._fs import _temporary_prefix

    out = tmp_path / "out"
    _earlier_output(out)
    left = [tempfile.mkstemp(dir=out / "deep", prefix=_temporary_prefix(out / "deep" / "b.txt"), suffix=".tmp"),
            tempfile.mkstemp(dir=out, prefix=".pneumoseg-probe-")]  # as atomic_open and the probe name them
    for fd, _ in left:
        os.close(fd)
    (out / ".a.txt.abcdefgh.tmp").write_text("someone's")  # not pneumoseg's mark: someone's, as ever
    with pytest.raises(OutputError, match=r"not empty \(\.a\.txt\.abcdefgh\.tmp\)"):
        prepare_output_folder(out)
    os.unlink(out / ".a.txt.abcdefgh.tmp")
    with prepare_output_folder(out) as folder:
        folder.write_bytes("a.txt", data="new a")
    assert sorted(_snapshot(out)) == [MANIFEST_NAME, "a.txt"] and _leftovers(out) == []


# ---------------------------------------------------------------------------------------------------
# Only the folders a run empties or makes go: a user's empty folders stay


def test_a_rerun_keeps_someones_empty_folders(tmp_path):
    """Every empty folder under the output folder was removed when it was prepared and when a failed
    run was undone, a user's own empty folders included (they are not files, so not someone's to
    refuse). Only folders pneumoseg empties or makes go now."""
    out = tmp_path / "out"
    before = _earlier_output(out)
    for folder in ("empty", "deep/empty2"):
        (out / folder).mkdir()
    with pytest.raises(RuntimeError):
        with prepare_output_folder(out) as folder:
            assert (out / "empty").is_dir() and (out / "deep" / "empty2").is_dir()
            folder.write_bytes("made", "c.txt", data="new c")
            with pytest.raises(OutputError):  # a write that fails in a folder the run made
                with folder.open("made2", "sub", "d.txt") as f:
                    f.write(b"x")
                    raise OutputError("the disk is full")
            raise RuntimeError("the run failed")
    assert _snapshot(out) == before and _leftovers(out) == []
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_dir()) == [
        "deep", "deep/empty2", "empty"]  # made/ and made2/sub/ went with the run
    with prepare_output_folder(out) as folder:
        assert not (out / "a.txt").exists() and (out / "deep" / "empty2").is_dir()
        folder.write_bytes("a.txt", data="new a")
    assert (out / "empty").is_dir() and (out / "deep" / "empty2").is_dir()
    assert sorted(_snapshot(out)) == [MANIFEST_NAME, "a.txt"] and _leftovers(out) == []
