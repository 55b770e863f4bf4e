"""Failures during work, not in the inputs: a command stopped by a signal, a write that hits a file-size
limit or a full disk, an output folder that cannot be cleaned, two processes writing the same model
directory. Each must end in one clear message, leave no half-written file under a final name, and
leave the output folder in a state the same command accepts again."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from pneumoseg.data import make_synthetic_siim  # noqa: E402

from isolated import run_isolated  # noqa: E402


@pytest.fixture(scope="module")
def study_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("siim")
    make_synthetic_siim(root, n_images=6, size=64, positive_fraction=0.5, seed=5)
    return root


def _files(folder: Path) -> list[str]:
    """The files under ``folder``, less a manifest that lists nothing: written when the folder was
    prepared, it names the command's kind only and needs no --force from anyone."""
    from pneumoseg._fs import MANIFEST_NAME

    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    if MANIFEST_NAME in files and len((folder / MANIFEST_NAME).read_text().splitlines()) == 2:
        files.remove(MANIFEST_NAME)
    return files


def _messages(text: str) -> list[str]:
    """pneumoseg's own lines of stderr (a progress bar may share the terminal line, ended by a \r)."""
    return [part for line in text.splitlines() for part in line.split("\r")[-1:] if part.startswith("pneumoseg:")]


# ---------------------------------------------------------------------------------------------------
# SIGTERM unwinds like Ctrl-C

_TERMINATE_IN_CACHE = '''
import signal, time
import pneumoseg.data.cache as cache
from pneumoseg.cli import main

real = cache.decode_to_arrays

def decode_then_terminate(*args, **kwargs):
    result = real(*args, **kwargs)  # the memory-mapped arrays are filled, index.json not yet written
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)
    return result

cache.decode_to_arrays = decode_then_terminate
sys.exit(main(sys.argv[1:]))
'''


def _cache_args(study_set, out):
    return ["data", "cache", "--root", str(study_set), "--csv", str(study_set / "train-rle.csv"), "--size", "32",
            "--out", str(out)]


def test_sigterm_during_data_cache_removes_the_arrays(study_set, tmp_path):
    """SIGTERM's default action ended the process on the spot: images.npy and masks.npy stayed under
    their final names, half filled, and the rerun refused the folder as someone else's files."""
    out = tmp_path / "cache"
    code = "sys.argv[1:] = " + repr(_cache_args(study_set, out)) + "\n" + _TERMINATE_IN_CACHE
    result = run_isolated(code, timeout=120)
    assert result.returncode == 143, result.describe()
    assert _messages(result.stderr) == ["pneumoseg: terminated"], result.describe()
    assert "Traceback" not in result.stderr
    assert _files(out) == [], result.describe()  # nothing half-filled left under a final name
    again = run_isolated(f"from pneumoseg.cli import main\nsys.exit(main({_cache_args(study_set, out)!r}))",
                         timeout=120)
    assert again.returncode == 0, again.describe()
    assert "index.json" in _files(out)


_TERMINATE_IN_PREDICT = '''
import signal
import pneumoseg._fs as fs
from pneumoseg.cli import main

real_fsync = os.fsync
calls = [0]

def fsync_then_terminate(fd):
    calls[0] += 1
    if calls[0] == 2:  # inside atomic_open: the second overlay's temporary file exists
        os.kill(os.getpid(), signal.SIGTERM)
    return real_fsync(fd)

fs.os.fsync = fsync_then_terminate
sys.exit(main(sys.argv[1:]))
'''


def test_sigterm_while_writing_removes_the_temporary_file(study_set, tmp_path):
    from infer_helpers import model_dir

    out = tmp_path / "pred"
    args = ["predict", str(study_set), "--model", str(model_dir("plain")), "--out", str(out), "--workers", "1"]
    result = run_isolated("sys.argv[1:] = " + repr(args) + "\n" + _TERMINATE_IN_PREDICT, timeout=120)
    assert result.returncode == 143, result.describe()
    assert _messages(result.stderr) == ["pneumoseg: terminated"], result.describe()
    assert "Traceback" not in result.stderr
    assert not [f for f in _files(out) if f.endswith(".tmp")], _files(out)
    assert "submission.csv" not in _files(out)
    again = run_isolated(f"from pneumoseg.cli import main\nsys.exit(main({args!r}))", timeout=120)
    assert again.returncode == 0, again.describe()


def test_sigterm_handler_is_restored_after_main(study_set, tmp_path):
    from pneumoseg.cli import main

    before = signal.getsignal(signal.SIGTERM)
    assert main(["data", "masks", "--csv", str(study_set / "train-rle.csv"), "--shape", "64", "64",
                 "--out", str(tmp_path / "m")]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------------------------------------
# A write that fails: the error names the file, nothing is left half-written

_FILE_SIZE_LIMIT = '''
import resource
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
'''


def test_atomic_write_past_a_file_size_limit_names_the_file(tmp_path):
    """A failed write or fsync raised OSError 'File too large' naming no file (or the temporary one):
    pneumoseg's one-line CLI error then said only 'File too large'."""
    target = tmp_path / "big.bin"
    code = _FILE_SIZE_LIMIT.format(limit=4096) + f'''
import errno
from pneumoseg._fs import atomic_write
try:
    atomic_write({str(target)!r}, b"x" * 100_000)
except OSError as exc:
    assert exc.errno == errno.EFBIG, exc
    print("NAMED", exc.filename)
'''
    result = run_isolated(code, timeout=60)
    assert result.returncode == 0, result.describe()
    assert f"NAMED {target}" in result.stdout, result.describe()
    assert _files(tmp_path) == []  # the temporary file is removed, no target made


def test_data_cache_past_a_file_size_limit_names_the_array(study_set, tmp_path):
    out = tmp_path / "cache"
    code = _FILE_SIZE_LIMIT.format(limit=20_000) + f'''
from pneumoseg.cli import main
sys.exit(main({_cache_args(study_set, out)[:-3] + ["64", "--out", str(out)]!r}))
'''
    result = run_isolated(code, timeout=120)
    assert result.returncode == 2, result.describe()
    assert _messages(result.stderr) == [f"pneumoseg: error: {out / 'images.npy'}: File too large"], result.describe()
    assert _files(out) == []


def _can_mount_tmpfs() -> bool:
    import shutil
    import subprocess

    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root and `unshare -m` to mount a small tmpfs privately")
def test_data_cache_on_a_full_disk_is_an_error_not_a_bus_error(study_set, tmp_path):
    """The cache's arrays were sparse memory maps: with no room left on the disk the first write to a
    page killed the process with SIGBUS ('Bus error', no message), leaving images.npy behind."""
    import subprocess
    import sys

    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "cache"
    args = _cache_args(study_set, out)[:-3] + ["128", "--out", str(out)]  # 6 x 128 x 128 bytes: more than 64 KiB
    program = f"import sys; from pneumoseg.cli import main; sys.exit(main({args!r}))"
    # a tmpfs of 64 KiB in a mount namespace of its own: gone when the process ends, invisible outside
    script = (f'mount -t tmpfs -o size=64k tmpfs "{disk}" && {sys.executable} -c "$PROGRAM"; echo "rc=$?"; '
              f'ls -A "{out}"; tail -n +2 "{out}/.pneumoseg-manifest"')
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PROGRAM=program, OMP_NUM_THREADS="1"))
    lines = result.stdout.splitlines()
    assert "rc=2" in lines, result.stdout + result.stderr
    # nothing left in the cache folder but its manifest, which lists nothing
    assert lines[lines.index("rc=2") + 1:] == [".pneumoseg-manifest", "# kind: cache folder"], result.stdout
    assert [m for m in _messages(result.stderr) if "No space left on device" in m and "images.npy" in m], result.stderr


# ---------------------------------------------------------------------------------------------------
# Two processes exporting into one model directory


def _copy_of_model_dir(tmp_path):
    import shutil

    from infer_helpers import model_dir

    target = tmp_path / "model"
    shutil.copytree(model_dir("plain"), target)
    return target


def test_exports_from_two_loads_of_a_model_dir_keep_both_artefacts(tmp_path):
    """Two `pneumoseg export` runs at once (fp32 and fp16) each rewrote pneumoseg.json from what it
    had loaded: both said they exported, and the directory listed only the last one's graph."""
    from pneumoseg.models.model_dir import load_model_dir, sha256_of

    folder = _copy_of_model_dir(tmp_path)
    first, second = load_model_dir(folder), load_model_dir(folder)  # both loaded before either writes
    first.add_artefact("segmenter-onnx-fp32", "onnx/segmenter.fp32.onnx", b"fp32 graph", format="onnx",
                       network="segmenter", precision="fp32")
    second.add_artefact("segmenter-onnx-fp16", "onnx/segmenter.fp16.onnx", b"fp16 graph", format="onnx",
                        network="segmenter", precision="fp16")
    md = load_model_dir(folder)
    assert set(md.artefacts) == {"segmenter-onnx-fp32", "segmenter-onnx-fp16"}
    for key in md.artefacts:
        path = md.artefact_path(key)  # the fingerprint matches the bytes on disk
        assert sha256_of(path) == md.artefacts[key].sha256


def test_artefacts_added_from_threads_at_once_are_all_listed(tmp_path):
    import threading

    from pneumoseg.models.model_dir import load_model_dir

    folder = _copy_of_model_dir(tmp_path)
    dirs = [load_model_dir(folder) for _ in range(4)]
    start = threading.Barrier(len(dirs))

    def add(i, md):
        start.wait()
        for j in range(5):
            md.add_artefact(f"segmenter-test-{i}-{j}", f"onnx/t{i}-{j}.bin", bytes([i, j]) * 100, format="onnx",
                            network="segmenter", precision="fp32")

    threads = [threading.Thread(target=add, args=(i, md)) for i, md in enumerate(dirs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    md = load_model_dir(folder)
    assert set(md.artefacts) == {f"segmenter-test-{i}-{j}" for i in range(4) for j in range(5)}
    for key in md.artefacts:
        md.artefact_path(key)  # present, fingerprint checked


# ---------------------------------------------------------------------------------------------------
# An earlier output that cannot be fully removed


def test_a_failed_clean_up_keeps_the_manifest(tmp_path, monkeypatch):
    """The manifest sorts first and was removed first: when a later file could not be removed (a
    read-only sub-folder), the rest of the earlier output was left unlisted and the next run refused
    the folder as someone else's files. The earlier output is now moved aside, not removed: a file
    that cannot be moved puts back what was moved, manifest included."""
    from pneumoseg._fs import MANIFEST_NAME, PREVIOUS_NAME, prepare_output_folder

    out = tmp_path / "out"
    folder = prepare_output_folder(out)
    folder.write_bytes("a.txt", data="a")
    folder.write_png("overlays", "b.png", image=np.zeros((2, 2), np.uint8))
    stuck = out / "overlays" / "b.png"
    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
        if Path(src) == stuck:
            raise PermissionError(13, "Permission denied", str(src))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(PermissionError):
        prepare_output_folder(out)
    monkeypatch.undo()
    assert (out / MANIFEST_NAME).is_file()
    assert _files(out) == [MANIFEST_NAME, "a.txt", "overlays/b.png"] and not (out / PREVIOUS_NAME).exists()
    prepare_output_folder(out)  # still pneumoseg's own output: accepted without overwrite
    assert _files(out) == []


# ---------------------------------------------------------------------------------------------------
# Ctrl-C from a terminal reaches the DataLoader workers too

_INTERRUPT_TRAINING_GROUP = '''
import signal, time
os.setsid()  # its own process group, as a terminal's foreground job: the signal goes to every process in it
from pneumoseg.cli import main
from pneumoseg.train import engine

real, calls = engine.TaskLoss.__call__, []

def interrupting(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # the workers are running
        # The group's signal reaches the workers well before the main process, which meanwhile asks
        # them for more batches (the order a terminal leaves to chance).
        import multiprocessing
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGINT)
        time.sleep(1)
    if len(calls) == 8:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(3)
    return real(self, *args, **kwargs)

engine.TaskLoss.__call__ = interrupting
sys.exit(main(ARGS))
'''


def test_ctrl_c_to_the_process_group_during_training_with_workers(study_set, tmp_path):
    """A worker killed by the group's SIGINT made the main process fail with 'DataLoader worker ...
    exited unexpectedly' (a traceback, exit 1) whenever it asked for a batch before its own
    KeyboardInterrupt, instead of exit 130: the workers now leave the signal to the main process."""
    out = tmp_path / "run"
    args = ["train", "--recipe", "demo", "--data", str(study_set), "--out", str(out), "--no-progress",
            "--set", "classifier_dir=null", "--set", "classifier=null", "--set", "data.workers=1",
            "--set", "data.preload=false", "--set", "epochs=1", "--set", "samples_per_epoch=32", "--set", "batch_size=2",
            "--set", "data.image_size=64", "--set", "data.folds=2", "--set", "model.decoder_channels=[16,16,8,8,8]",
            "--set", "log.plots=false", "--set", "threads=1"]
    result = run_isolated(f"ARGS = {args!r}\n" + _INTERRUPT_TRAINING_GROUP, timeout=180)
    assert result.returncode == 130, result.describe()
    assert "Traceback" not in result.stderr and "exited unexpectedly" not in result.stderr, result.describe()


# ---------------------------------------------------------------------------------------------------
# A signal landing between a file's rename into place and its line in the manifest

_SIGNAL_AFTER_THIRD_RENAME = '''
import signal, time
import pneumoseg._fs as fs
from pneumoseg.cli import main

real_replace, renames = os.replace, [0]

def replace_then_signal(src, dst):
    real_replace(src, dst)
    renames[0] += str(dst).endswith(".png")  # the manifest, written when the folder is prepared, is renamed too
    if renames[0] == 3:  # the third mask is in place under its final name
        os.kill(os.getpid(), SIGNAL)
        time.sleep(60)

fs.os.replace = replace_then_signal
sys.exit(main(ARGS))
'''


@pytest.mark.parametrize("signame, code, line", [("SIGINT", 130, "pneumoseg: interrupted"),
                                                 ("SIGTERM", 143, "pneumoseg: terminated")])
def test_signal_right_after_a_rename_leaves_the_file_listed(study_set, tmp_path, signame, code, line):
    """A file was listed in the folder's manifest after its rename: Ctrl-C or SIGTERM landing between
    the two left a finished mask unlisted, and rerunning `pneumoseg data masks` refused the folder as
    files pneumoseg did not write (--force needed)."""
    out = tmp_path / "masks"
    args = ["data", "masks", "--csv", str(study_set / "train-rle.csv"), "--shape", "64", "64", "--out", str(out)]
    program = f"import signal\nARGS = {args!r}\nSIGNAL = signal.{signame}\n" + _SIGNAL_AFTER_THIRD_RENAME
    result = run_isolated(program, timeout=120)
    assert result.returncode == code, result.describe()
    assert _messages(result.stderr) == [line], result.describe()
    assert "Traceback" not in result.stderr
    assert len([f for f in _files(out) if f.endswith(".png")]) == 3, _files(out)
    assert not [f for f in _files(out) if f.endswith(".tmp")], _files(out)
    again = run_isolated(f"from pneumoseg.cli import main\nsys.exit(main({args!r}))", timeout=120)
    assert again.returncode == 0, again.describe()
    assert len([f for f in _files(out) if f.endswith(".png")]) == 6
