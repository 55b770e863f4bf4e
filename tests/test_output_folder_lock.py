"""One writer per output folder: a second process preparing a folder another pneumoseg process is
writing into is refused at once (an OutputError naming the folder; one line and exit code 2 on the
command line); one process may prepare a folder it holds again; the hold ends with the process,
however it ends, and does not outlive it in the workers it forked; an export into a model directory
this process holds works, one from another process is refused after a short wait."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pneumoseg import OutputError
from pneumoseg._fs import MANIFEST_NAME, check_output_folder, folder_lock, prepare_output_folder

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="folders are locked with flock (POSIX only)")

IN_USE = "another pneumoseg process is writing into it"

# A second pneumoseg process: prepares the folder, writes a file, optionally forks a worker that
# outlives it, says "held", and holds the folder until its stdin is closed.
HOLDER = r"""
import os, sys, time
from pneumoseg._fs import prepare_output_folder
folder = prepare_output_folder(sys.argv[1], overwrite=True)
folder.write_bytes("first.txt", data="the first process's output\n")
if sys.argv[2:] == ["fork"]:
    pid = os.fork()
    if pid == 0:  # a DataLoader worker, say: it lives on for a while after its parent is killed
        time.sleep(60)
        os._exit(0)
    print(pid, flush=True)
print("held", flush=True)
sys.stdin.read()
"""

# Prepares the folder in a fresh process; exit code 0 when allowed, 3 when refused as in use.
PREPARE = r"""
import sys
from pneumoseg import OutputError
from pneumoseg._fs import prepare_output_folder
try:
    prepare_output_folder(sys.argv[1], overwrite=True)
except OutputError as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
"""


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], text=True, **kwargs)


@contextlib.contextmanager
def holder(folder: Path, *, fork: bool = False):
    """Another process holding ``folder``; yields (its Popen, the pid of its forked worker or None)."""
    proc = _python(HOLDER, folder, *(["fork"] if fork else []), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    worker = None
    try:
        line = proc.stdout.readline().strip()
        if fork:
            worker = int(line)
            line = proc.stdout.readline().strip()
        assert line == "held", f"the holder did not start (exit code {proc.poll()})"
        yield proc, worker
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


def _other_process_may_prepare(folder: Path) -> bool:
    proc = _python(PREPARE, folder, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 3), err
    if proc.returncode == 3:
        assert IN_USE in err and str(folder) in err
    return proc.returncode == 0


def test_a_second_process_is_refused_while_the_first_writes(tmp_path):
    out = tmp_path / "out"
    with holder(out) as (proc, _):
        with pytest.raises(OutputError, match=IN_USE) as refused:
            prepare_output_folder(out)
        assert str(out) in str(refused.value) and "\n" not in str(refused.value)
        with pytest.raises(OutputError, match=IN_USE):
            prepare_output_folder(out, overwrite=True)
        with pytest.raises(OutputError, match=IN_USE):  # a second `train --resume` of a running run
            prepare_output_folder(out, resume=True)
        with pytest.raises(OutputError, match=IN_USE):  # said before long work, too
            check_output_folder(out)
        # nothing of the first process's output was removed
        assert (out / "first.txt").read_text() == "the first process's output\n"
        assert "first.txt" in (out / MANIFEST_NAME).read_text()
        _release(proc)
        folder = prepare_output_folder(out)  # free once the first has finished
        assert not (out / "first.txt").exists()  # its own earlier output: replaced as always
        folder.close()


def test_the_command_line_refuses_a_held_folder_in_one_line(tmp_path, capsys):
    from pneumoseg.cli import main

    (tmp_path / "truth.csv").write_text("ImageId,EncodedPixels\n1.2.3,-1\n1.2.4,1 2\n")
    out = tmp_path / "ev"
    with holder(out):
        code = main(["evaluate", "--pred", str(tmp_path / "truth.csv"), "--truth", str(tmp_path / "truth.csv"),
                     "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2
        assert err.count("\n") == 1 and err.startswith(f"pneumoseg: error: evaluation folder {out} is in use")
        assert IN_USE in err and "Traceback" not in err
        assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "first.txt"]


def test_one_process_may_prepare_a_folder_it_holds_again(tmp_path):
    out = tmp_path / "out"
    first = prepare_output_folder(out)
    first.write_bytes("a.txt", data="a")
    second = prepare_output_folder(out)  # nested use within one process: shared, not refused
    second.write_bytes("b.txt", data="b")
    with folder_lock(out):  # and a short hold inside it (what an export takes) neither waits nor fails
        pass
    first.close()
    assert not _other_process_may_prepare(out)  # the second hold still counts
    second.close()
    assert _other_process_may_prepare(out)


def test_a_with_block_or_a_refused_preparation_lets_the_folder_go(tmp_path):
    out = tmp_path / "out"
    with prepare_output_folder(out) as folder:
        folder.write_bytes("a.txt", data="a")
        assert not _other_process_may_prepare(out)
    assert _other_process_may_prepare(out)
    (out / "someone-elses.txt").write_text("keep")
    with pytest.raises(OutputError, match="not empty") as refused:
        prepare_output_folder(out)
    # the traceback still references the half-made OutputFolder, but the folder is not held
    assert refused.value is not None and _other_process_may_prepare(out)


def test_the_lock_dies_with_a_killed_holder_not_with_its_forked_worker(tmp_path):
    out = tmp_path / "run"
    with holder(out, fork=True) as (proc, worker):
        with pytest.raises(OutputError, match=IN_USE):
            prepare_output_folder(out, resume=True)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        os.kill(worker, 0)  # the forked worker is still alive ...
        folder = prepare_output_folder(out, resume=True)  # ... and `--resume` continues the killed run
        assert (out / "first.txt").read_text() == "the first process's output\n"  # resume removes nothing
        folder.close()


def _model_dir_copy(tmp_path: Path) -> Path:
    import shutil

    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from infer_helpers import model_dir

    return Path(shutil.copytree(model_dir("plain"), tmp_path / "model"))


def _add_artefact(folder: Path, key: str) -> None:
    from pneumoseg.models.model_dir import load_model_dir

    load_model_dir(folder).add_artefact(key, f"onnx/{key}.bin", key.encode(), format="onnx", network="segmenter",
                                        precision="fp32")


def test_artefacts_go_into_a_model_directory_this_process_holds(tmp_path):
    """Training holds its run folder, which is the model directory: an export's lock of that folder
    within the same process must share the hold (two flocks of one folder conflict even within one
    process, so a lock of its own would refuse or, blocking, deadlock)."""
    pytest.importorskip("torch")
    from pneumoseg.models.model_dir import load_model_dir

    md = _model_dir_copy(tmp_path)
    with prepare_output_folder(md, overwrite=True):
        _add_artefact(md, "segmenter-test")
    assert set(load_model_dir(md).artefacts) == {"segmenter-test"}


def test_an_export_waits_briefly_then_refuses_a_model_directory_another_process_holds(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from pneumoseg.models import model_dir

    md = _model_dir_copy(tmp_path)
    monkeypatch.setattr(model_dir, "_LOCK_WAIT_S", 0.3)
    with holder(md) as (proc, _):
        with pytest.raises(OutputError, match=f"model directory .* is in use: {IN_USE}"):
            _add_artefact(md, "segmenter-test")
        assert model_dir.load_model_dir(md).artefacts == {}
        _release(proc)
        _add_artefact(md, "segmenter-test")
    assert set(model_dir.load_model_dir(md).artefacts) == {"segmenter-test"}


@pytest.mark.slow
def test_pneumoseg_export_into_a_model_directory_this_process_holds(tmp_path, capsys):
    pytest.importorskip("torch")  # export traces the model
    pytest.importorskip("onnxruntime")
    from pneumoseg.cli import main
    from pneumoseg.models.model_dir import load_model_dir

    md = _model_dir_copy(tmp_path)
    with prepare_output_folder(md, overwrite=True):
        assert main(["export", str(md), "--format", "onnx"]) == 0, capsys.readouterr().err
    assert {a.format for a in load_model_dir(md).artefacts.values()} == {"onnx"}


def test_a_moment_of_shared_lock_from_another_check_is_not_in_use(tmp_path):
    """Ranks of one torchrun run check_output_folder (a shared lock, taken and dropped) while rank 0
    prepares the folder: a check in flight in another process must not read as "in use"."""
    import fcntl
    import threading

    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)  # another open file description: conflicts like another process's
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        releaser = threading.Timer(0.05, lambda: fcntl.flock(fd, fcntl.LOCK_UN))
        releaser.start()
        with prepare_output_folder(out) as folder:  # refused at once on the first try before
            folder.write_bytes("ok.txt", data="ok\n")
        releaser.join()
        fcntl.flock(fd, fcntl.LOCK_SH)  # a hold that does not end is still refused
        with pytest.raises(OutputError, match=IN_USE):
            prepare_output_folder(out, overwrite=True)
    finally:
        os.close(fd)
