"""The file system and special files as hostile input: named pipes nobody writes to, huge sparse
files where a small one belongs, and writes the kernel refuses. Each is a clear error naming the file,
never a wait forever, a MemoryError or a message without its reason. Every test that could hang if
its fix regressed runs the reader in a subprocess or a thread with a time limit."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import pneumoseg
from pneumoseg import _fs
from pneumoseg.data import read_rle_csv

from isolated import call_with_fifo_limit, run_isolated

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes (os.mkfifo)")

CSV = "ImageId,EncodedPixels\nimg1,-1\nimg2,1 5\n"


def _fifo(folder: Path, name: str = "pipe.csv") -> Path:
    path = folder / name
    os.mkfifo(path)
    return path


# --- named pipes ------------------------------------------------------------------------------------------

@needs_fifo
@pytest.mark.parametrize("reader", ["rle", "scores"])
def test_a_named_pipe_nobody_writes_to_is_an_error_not_a_hang(tmp_path, monkeypatch, reader):
    """`pneumoseg evaluate --truth a-fifo` (and --pred, --scores, `data masks --csv`, `data cache
    --csv`) waited in open() for a writer forever."""
    from pneumoseg.infer.evaluation import read_scores_csv

    monkeypatch.setattr(_fs, "_PIPE_WRITER_WAIT_S", 0.2)
    fifo = _fifo(tmp_path)
    read = read_rle_csv if reader == "rle" else read_scores_csv
    started = time.monotonic()
    value, error = call_with_fifo_limit(lambda: read(fifo), fifo)
    assert isinstance(error, pneumoseg.DataFormatError), (value, error)
    assert str(error).startswith(f"{fifo}: a named pipe (FIFO) that no program writes to")
    assert time.monotonic() - started < 10


@needs_fifo
@pytest.mark.parametrize("writer", [
    "already waiting",  # `zcat x > fifo &` started first: its open waits for the reader
    "starts after the reader",  # `pneumoseg evaluate --truth fifo & zcat x > fifo`
    "connected, writes after the wait",  # a slow program: its data comes later than the writer wait
])
def test_a_named_pipe_with_a_writer_is_read_whatever_the_order(tmp_path, monkeypatch, writer):
    monkeypatch.setattr(_fs, "_PIPE_WRITER_WAIT_S", 0.3)
    fifo = _fifo(tmp_path)
    delay_open, delay_write = {"already waiting": (0.0, 0.0), "starts after the reader": (0.15, 0.0),
                               "connected, writes after the wait": (0.0, 0.8)}[writer]

    def write() -> None:
        time.sleep(delay_open)
        with open(fifo, "w") as f:  # waits for the reader
            time.sleep(delay_write)
            f.write(CSV)

    feeder = threading.Thread(target=write, daemon=True)
    feeder.start()
    if writer == "already waiting":
        time.sleep(0.2)
    value, error = call_with_fifo_limit(lambda: read_rle_csv(fifo), fifo)
    feeder.join(5)
    assert error is None, error
    assert value == {"img1": ["-1"], "img2": ["1 5"]}


@needs_fifo
def test_a_named_pipe_whose_writer_writes_nothing_reads_as_empty(tmp_path, monkeypatch):
    monkeypatch.setattr(_fs, "_PIPE_WRITER_WAIT_S", 5.0)
    fifo = _fifo(tmp_path)

    def write_nothing() -> None:
        time.sleep(0.1)
        open(fifo, "w").close()

    feeder = threading.Thread(target=write_nothing, daemon=True)
    feeder.start()
    started = time.monotonic()
    value, error = call_with_fifo_limit(lambda: read_rle_csv(fifo), fifo)
    feeder.join(5)
    assert (value, error) == ({}, None)
    assert time.monotonic() - started < 4  # the writer's hang-up ends the wait, not the wait's end


def test_an_anonymous_pipe_is_still_read(tmp_path):
    """`--truth <(unzip -p siim.zip train-rle.csv)` gives /dev/fd/N, a pipe with its writer."""
    if not os.path.isdir("/dev/fd"):
        pytest.skip("no /dev/fd")
    read_end, write_end = os.pipe()
    try:
        feeder = threading.Thread(target=lambda: (os.write(write_end, CSV.encode()), os.close(write_end)), daemon=True)
        feeder.start()
        assert read_rle_csv(f"/dev/fd/{read_end}") == {"img1": ["-1"], "img2": ["1 5"]}
        feeder.join(5)
    finally:
        os.close(read_end)


def _cli(args: list[str], *, wait: float = 0.3, timeout: float = 60) -> subprocess.CompletedProcess:
    """pneumoseg's main(args) in a subprocess with a short writer wait; killed, and the test failed,
    if it runs past ``timeout``."""
    code = ("import sys, pneumoseg._fs as fs; fs._PIPE_WRITER_WAIT_S = float(sys.argv[1]); "
            "from pneumoseg.cli import main; sys.exit(main(sys.argv[2:]))")
    try:
        return subprocess.run([sys.executable, "-c", code, str(wait), *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"pneumoseg {' '.join(map(str, args))} still ran after {timeout:g} s")


@needs_fifo
@pytest.mark.parametrize("role", ["--truth", "--pred", "--scores", "masks --csv"])
def test_cli_given_a_named_pipe_nobody_writes_to_says_so_in_one_line(tmp_path, role):
    fifo = _fifo(tmp_path)
    csv = tmp_path / "rle.csv"
    csv.write_text(CSV)
    if role == "masks --csv":
        args = ["data", "masks", "--csv", fifo, "--out", tmp_path / "masks", "--no-progress"]
    else:
        files = {"--pred": csv, "--truth": csv, role: fifo}
        args = ["evaluate", *(x for item in files.items() for x in item), "--out", tmp_path / "evaluation"]
    result = _cli(args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"pneumoseg: error: {fifo}: a named pipe (FIFO) that no program writes "
                                          "to (waited 0.3 s); start the program that writes to it, or give a file"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.csv", "rle.csv"]  # no output folder made


# --- huge files where a small one belongs -----------------------------------------------------------------

def test_a_huge_manifest_is_not_read_into_memory(tmp_path):
    """A (sparse) 100 GiB .pneumoseg-manifest in an output folder, or in a folder inside it, was read
    whole: a MemoryError traceback from `pneumoseg data synth --out`. It now counts as an unreadable
    manifest: the folder is someone else's, refused without --force and written into with it."""
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    code = f'''
import sys
from pathlib import Path
from pneumoseg import OutputError
from pneumoseg._fs import MANIFEST_NAME, prepare_output_folder
out = Path({str(out)!r})
for manifest in (out / MANIFEST_NAME, out / "sub" / MANIFEST_NAME):
    with open(manifest, "wb") as f:
        try:
            f.truncate(100 * 2**30)
        except OSError:
            print("NO SPARSE FILES"); sys.exit(0)
limit_memory(200)  # reading either file would need 100 GiB
try:
    prepare_output_folder(out, what="synthetic data folder")
except OutputError as exc:
    print("REFUSED", exc)
with prepare_output_folder(out, what="synthetic data folder", overwrite=True) as folder:
    folder.write_bytes("a.txt", data="ok")
print("WRITTEN", (out / "a.txt").read_text())
'''
    result = run_isolated(code, timeout=120)
    assert result.returncode == 0, result.describe()
    if "NO SPARSE FILES" in result.stdout:
        pytest.skip("this file system makes no sparse files")
    assert f"REFUSED synthetic data folder {out} is not empty" in result.stdout, result.describe()
    assert "WRITTEN ok" in result.stdout, result.describe()


def _tiny_model_dir(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from pneumoseg.models import create_segmenter
    from pneumoseg.models.model_dir import save_model_dir

    seg = create_segmenter("unet", "resnet_tiny", in_channels=1, decoder_channels=(32, 16, 16, 8, 8))
    return save_model_dir(tmp_path / "model", {"segmenter": seg.eval()}, input_sizes={"segmenter": 64})


def test_an_artefact_past_its_formats_size_is_refused_before_its_fingerprint(tmp_path, monkeypatch):
    """A 100 GiB (sparse) file in an ONNX artefact's place kept `pneumoseg predict --backend onnxruntime`
    hashing zeros for minutes before it said the fingerprint did not match."""
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from pneumoseg.models import model_dir
    from pneumoseg.models.model_dir import load_model_dir

    md = _tiny_model_dir(tmp_path)
    path = md.add_artefact("segmenter-onnx-fp32", "onnx/segmenter.fp32.onnx", b"graph", format="onnx",
                           network="segmenter", precision="fp32")
    try:
        os.truncate(path, 3 * 2**30)  # past protobuf's 2 GiB, the most an ONNX file can be
    except OSError:
        pytest.skip("this file system makes no sparse files")

    def no_hashing(data):
        raise AssertionError("the fingerprint was computed first")

    monkeypatch.setattr(model_dir, "sha256_of", no_hashing)
    with pytest.raises(pneumoseg.DataFormatError, match=r"segmenter\.fp32\.onnx: artefact 'segmenter-onnx-fp32' is a "
                                                        r"file of 3,221,225,472 bytes, larger than any onnx artefact"):
        load_model_dir(md.path).artefact_path("segmenter-onnx-fp32")


# --- writes the kernel refuses ----------------------------------------------------------------------------

def test_a_write_refused_inside_pydicom_keeps_its_reason(tmp_path):
    """pydicom re-raises an OSError from its writer without the errno, so a full disk (here: a
    file-size limit) under `pneumoseg data synth` read '[Errno None] None: <file>'."""
    out = tmp_path / "synth"
    code = f'''
import resource
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
from pneumoseg.cli import main
sys.exit(main(["data", "synth", "--n", "2", "--size", "256", "--no-progress", "--out", {str(out)!r}]))
'''
    result = run_isolated(code, timeout=120)
    assert result.returncode == 2, result.describe()
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pneumoseg: error: {out}/dicom-images-train/"), result.describe()
    assert lines[0].endswith(".dcm: File too large"), result.describe()
    assert not [p for p in out.rglob("*") if p.is_file() and p.name != _fs.MANIFEST_NAME]  # no partial DICOM


def test_a_sub_folder_that_cannot_be_searched_is_someone_elses_not_a_permission_error(tmp_path, monkeypatch):
    """Checking an --out folder looked for a manifest in each sub-folder with Path.is_file, whose
    PermissionError (a sub-folder without search permission; /proc/1/fdinfo even as root) came out of
    check_output_folder as a bare OSError: `predict --out /proc` said '/proc/1/fdinfo/.pneumoseg-manifest:
    Permission denied'."""
    import pathlib

    from pneumoseg._fs import MANIFEST_NAME, check_output_folder

    out = tmp_path / "out"
    (out / "locked").mkdir(parents=True)
    (out / "locked" / "theirs.txt").write_text("x")
    locked = out / "locked" / MANIFEST_NAME
    real_is_file = pathlib.Path.is_file

    def is_file(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(pathlib.Path, "is_file", is_file)
    with pytest.raises(pneumoseg.OutputError, match=r"is not empty \(locked/theirs\.txt\)"):
        check_output_folder(out, what="prediction output folder")


@pytest.mark.parametrize("kind", ["pipe", "folder", "link loop"])
def test_a_model_description_that_is_not_a_file_is_called_so(tmp_path, kind):
    """A pipe or folder in pneumoseg.json's place was reported as 'not a model directory (no
    pneumoseg.json)', sending the user looking for a file that is there."""
    pytest.importorskip("torch")
    from pneumoseg.models.model_dir import CONFIG_NAME, load_model_dir

    md = _tiny_model_dir(tmp_path)
    config = md.path / CONFIG_NAME
    config.unlink()
    if kind == "pipe":
        if not hasattr(os, "mkfifo"):
            pytest.skip("needs os.mkfifo")
        os.mkfifo(config)
    elif kind == "folder":
        config.mkdir()
    else:
        config.symlink_to(CONFIG_NAME)
    with pytest.raises(pneumoseg.DataFormatError, match=f"{CONFIG_NAME}: not a regular file"):
        load_model_dir(md.path)


def test_a_file_where_an_artefact_folder_goes_is_named(tmp_path):
    """`pneumoseg export` with a file named onnx in the model directory said only 'onnx: File exists'."""
    md = _tiny_model_dir(tmp_path)
    (md.path / "onnx").write_text("someone's notes")
    with pytest.raises(pneumoseg.OutputError, match="onnx: a file is where the model directory's onnx folder goes"):
        md.add_artefact("segmenter-onnx-fp32", "onnx/segmenter.fp32.onnx", b"graph", format="onnx",
                        network="segmenter", precision="fp32")
    assert (md.path / "onnx").read_text() == "someone's notes"


@pytest.mark.parametrize("huge", ["engine", "sidecar"])
def test_a_huge_cached_engine_or_sidecar_is_rebuilt_not_read(tmp_path, huge):
    """A TensorRT engine cache's <key>.engine (or its .json sidecar) grown to 100 GiB (sparse) was read
    whole before its fingerprint was checked: a MemoryError out of `pneumoseg predict --backend
    tensorrt`. The engine's size is checked against the sidecar's first, the sidecar's against a bound."""
    # the cache's lock is filelock's (the tensorrt extra); torch brings it too, but the dev extra does not
    pytest.importorskip("filelock")
    code = f'''
from pathlib import Path
from pneumoseg.export.tensorrt import EngineCache, engine_key

cache = EngineCache(Path({str(tmp_path)!r}))
fields = {{"onnx_sha256": "ab" * 32, "precision": "fp16"}}
made = []
def build():
    made.append(b"engine #%d" % len(made))
    return made[-1]
def deserialize(data):
    return ("engine", data) if data in made else None
cache.get(fields, build, deserialize)
engine, sidecar, _ = cache.paths(engine_key(fields))
try:
    os.truncate({{"engine": engine, "sidecar": sidecar}}[{huge!r}], 100 * 2**30)
except OSError:
    print("NO SPARSE FILES"); sys.exit(0)
limit_memory(200)
result = cache.get(fields, build, deserialize)
print("STATUS", result.status, "|", result.reason, "|", engine.read_bytes())
'''
    result = run_isolated(code, timeout=120)
    assert result.returncode == 0, result.describe()
    if "NO SPARSE FILES" in result.stdout:
        pytest.skip("this file system makes no sparse files")
    reason = {"engine": "damaged (its size is not the sidecar's)",
              "sidecar": "unreadable sidecar (larger than any pneumoseg writes)"}[huge]
    assert f"STATUS built | {reason} | b'engine #1'" in result.stdout, result.describe()
