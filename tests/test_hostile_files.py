"""Hostile and careless files and folders: names taken from the data never write outside the output
folder, nobody's files are overwritten without overwrite=True, writes are atomic, DICOM headers are
checked against the limits before decoding, the CSV reader accepts exactly what the decoder accepts,
and find_dicoms says what it skipped."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

import pneumoseg
from pneumoseg import limits, rle
from pneumoseg._fs import MANIFEST_NAME, atomic_open, atomic_write, prepare_output_folder, safe_file_name, safe_file_names
from pneumoseg.data import find_dicoms, make_synthetic_siim, read_dicom, read_dicom_shape, read_rle_csv, write_rle_csv

from factories import write_dicom
from isolated import run_isolated

pydicom = pytest.importorskip("pydicom")


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under folder (relative path -> bytes), to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- class 2: names from the data never lead outside the output folder ------------------------------------

HOSTILE_IDS = [
    "../victim/precious", "/abs/path/precious", "..", ".", "a/b", "a\\b", "C:evil", "a\x00b", "a\nb", "tab\there",
    "CON", "nul", "com1.txt", "LPT9", "x" * 300, "", " lead", "trail ", "dot.", "a*b", 'q"uote', "a<b>", "pi|pe",
    "a\u202eb",  # right-to-left override: hides the real suffix
]


@pytest.mark.parametrize("image_id", HOSTILE_IDS)
def test_unsafe_ids_are_refused_as_file_names(image_id):
    with pytest.raises(pneumoseg.OutputError, match="cannot be used as a file name"):
        safe_file_name(image_id, ".png")


@pytest.mark.parametrize("image_id", ["1.2.276.0.7230010.3.1.4.8323329.5597.1517875188.959090", "img_01-a", "größe",
                                      "a b", "ID(3)"])
def test_ordinary_ids_are_kept(image_id):
    assert safe_file_name(image_id, ".png") == image_id + ".png"


def test_ids_differing_only_in_case_are_refused():
    with pytest.raises(pneumoseg.OutputError, match="same file"):
        safe_file_names(["Study", "study"], ".png")


@pytest.mark.parametrize("image_id", ["../victim/precious", "/ABS/precious", "sub/../../x"])
def test_masks_command_never_writes_outside_out(tmp_path, capsys, image_id):
    from pneumoseg.cli import main

    image_id = image_id.replace("/ABS", str(tmp_path / "abs"))
    csv = tmp_path / "in" / "rles.csv"
    csv.parent.mkdir()
    csv.write_text(f"ImageId,EncodedPixels\nfine,1 2\n{image_id},1 2\n")
    before = tree(tmp_path)
    assert main(["data", "masks", "--csv", str(csv), "--out", str(tmp_path / "out"), "--shape", "4", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pneumoseg: error: ImageId") and err.count("\n") == 1
    assert tree(tmp_path) == before and not (tmp_path / "out").exists()  # refused before writing anything


@pytest.mark.parametrize("names, match", [
    (["a,b.dcm"], "its ImageId 'a,b' cannot be written to a CSV file: it contains a comma"),  # would add a column
    (['q"x.dcm'], "cannot be written to a CSV file"),
    (["a\nb.dcm"], "control character"),              # would start a new row
    (["..dcm"], "relative folder reference"),        # ImageId "." names the overlays folder itself
    (["CON.dcm"], "Windows reserves"),
    (["Study.dcm", "study.dcm"], "same file on a case-insensitive file system"),
])
def test_predict_refuses_ids_that_cannot_be_csv_rows_or_file_names(tmp_path, capsys, names, match):
    # ImageIds come from file names: they become rows of submission.csv and names of overlay PNGs.
    pytest.importorskip("torch")
    from infer_helpers import model_dir

    from pneumoseg.cli import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, name in enumerate(names):
        write_dicom(inputs / name, np.full((8, 8), i, np.uint16))
    before = tree(tmp_path)
    out = tmp_path / "out"
    assert main(["predict", str(inputs), "--model", str(model_dir("plain")), "--out", str(out)]) == 2
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert err[-1].startswith("pneumoseg: error: ") and re.search(match, err[-1]), err
    assert tree(tmp_path) == before and not out.exists()  # refused before anything was written


def test_output_folder_never_writes_through_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(outside, target_is_directory=True)
    folder = prepare_output_folder(out, overwrite=True)
    with pytest.raises(pneumoseg.OutputError, match="symbolic link"):
        folder.write_bytes("link", "x.txt", data="x")
    (out / "file-link").symlink_to(outside / "target.txt")
    with pytest.raises(pneumoseg.OutputError, match="symbolic link"):
        folder.write_bytes("file-link", data="x")
    assert list(outside.iterdir()) == []
    with pytest.raises(pneumoseg.OutputError, match="file name"):
        folder.write_bytes("..", "escape.txt", data="x")


# --- class 3: nobody's files are overwritten without overwrite=True --------------------------------------


@pytest.fixture
def users_folder(tmp_path):
    """A folder holding someone's only copy of their labels and images."""
    folder = tmp_path / "mine"
    (folder / "dicom-images-train").mkdir(parents=True)
    (folder / "train-rle.csv").write_text("ImageId, EncodedPixels\nreal-patient, 1 2\n")
    write_dicom(folder / "dicom-images-train" / "real-patient.dcm")
    return folder


def test_synthetic_set_refuses_a_folder_with_someone_elses_files(users_folder):
    before = tree(users_folder)
    with pytest.raises(pneumoseg.OutputError, match=r"not empty \(dicom-images-train/real-patient.dcm, train-rle.csv\)"):
        make_synthetic_siim(users_folder, n_images=2, size=32)
    assert tree(users_folder) == before


def test_synthetic_set_with_overwrite_writes_but_keeps_other_files(users_folder):
    make_synthetic_siim(users_folder, n_images=2, size=32, overwrite=True)
    assert (users_folder / "dicom-images-train" / "real-patient.dcm").is_file()
    assert "real-patient" not in read_rle_csv(users_folder / "train-rle.csv")  # the CSV was asked to be replaced


def test_rerunning_over_own_output_replaces_it_and_a_changed_file_is_kept(tmp_path):
    out = tmp_path / "synthetic"
    make_synthetic_siim(out, n_images=3, size=32, seed=1)
    make_synthetic_siim(out, n_images=2, size=32, seed=2)
    assert len(find_dicoms(out)) == 2 and len(read_rle_csv(out / "train-rle.csv")) == 2
    (out / "train-rle.csv").write_text("ImageId, EncodedPixels\nmy-fix, 1 2\n")  # someone edited our output
    with pytest.raises(pneumoseg.OutputError, match="train-rle.csv"):
        make_synthetic_siim(out, n_images=2, size=32)
    assert "my-fix" in read_rle_csv(out / "train-rle.csv")



def test_an_output_folder_never_removes_the_commands_own_inputs(tmp_path, capsys):
    # A study set written by pneumoseg is "its own earlier output": --out pointed at it removed the
    # DICOMs and the CSV the command was reading (data masks, data cache, evaluate, predict, train;
    # data cache is in test_cache.py, where torch is already imported). Another command's output is
    # refused first (test_one_commands_output_is_not_anothers_to_replace); the inputs rule still
    # guards a command rerun over its own kind of folder.
    pytest.importorskip("torch")
    from pneumoseg.cli import main

    studies = tmp_path / "studies"
    make_synthetic_siim(studies, n_images=2, size=32, seed=1)
    before = tree(studies)
    csv = str(studies / "train-rle.csv")
    for argv in (["data", "masks", "--csv", csv, "--out", str(studies), "--shape", "32", "32"],
                 ["evaluate", "--pred", csv, "--truth", csv, "--out", str(studies)],
                 ["predict", str(studies), "--model", str(tmp_path / "no-model"), "--out", str(studies)]):
        assert main(argv) == 2
        assert "another pneumoseg command wrote it (it is a synthetic data folder)" in capsys.readouterr().err
        assert tree(studies) == before
    # --force does not make a folder holding the command's own input its output (06a663a): refused, with
    # nothing written or relabelled (it wrote beside the inputs and took over the folder's manifest before)
    assert main(["data", "masks", "--csv", csv, "--out", str(studies), "--shape", "32", "32", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds" in err and "an input of this command" in err, err
    assert tree(studies) == before
    shutil.rmtree(studies)

    make_synthetic_siim(studies, n_images=2, size=32, seed=1)
    before = tree(studies)
    with pytest.raises(pneumoseg.OutputError, match="holds .*train-rle.csv, an input"):
        prepare_output_folder(studies, what="synthetic data folder",
                              inputs=[studies / "dicom-images-train" / ".." / "train-rle.csv"])
    assert tree(studies) == before
    # inputs elsewhere: the earlier output of the same kind is replaced as before
    prepare_output_folder(studies, what="synthetic data folder", inputs=[tmp_path / "elsewhere.csv"]).close()
    assert [p.name for p in studies.iterdir()] == [MANIFEST_NAME]  # written at once: the folder is this command's


def test_one_commands_output_is_not_anothers_to_replace(tmp_path, capsys):
    # Manifests listed files without saying which command wrote them, so `data synth --out` over a
    # predict folder deleted its submission, and `predict --out` over a study set deleted the DICOMs.
    from pneumoseg.cli import main

    studies = tmp_path / "studies"
    make_synthetic_siim(studies, n_images=2, size=32, seed=1)
    masks = tmp_path / "masks"
    assert main(["data", "masks", "--csv", str(studies / "train-rle.csv"), "--out", str(masks),
                 "--shape", "32", "32"]) == 0
    made = tree(masks)
    with pytest.raises(pneumoseg.OutputError, match="another pneumoseg command wrote it .*a mask folder"):
        make_synthetic_siim(masks, n_images=2, size=32)
    assert tree(masks) == made
    assert main(["data", "synth", "--out", str(masks), "--n", "2", "--size", "32"]) == 2
    assert "another pneumoseg command wrote it" in capsys.readouterr().err
    assert tree(masks) == made
    # resuming is refused as well: nothing of this kind to continue
    with pytest.raises(pneumoseg.OutputError, match=r"another pneumoseg command's output \(a mask folder\)"):
        prepare_output_folder(masks, what="training run folder", resume=True)
    # the same command again replaces its own output, as before
    assert main(["data", "masks", "--csv", str(studies / "train-rle.csv"), "--out", str(masks),
                 "--shape", "32", "32"]) == 0
    assert tree(masks).keys() == made.keys()


def _output(folder, what, *names):
    with prepare_output_folder(folder, what=what) as out:
        for name in names:
            out.write_bytes(*name.split("/"), data=name)
    return tree(folder)


def test_pneumoseg_output_inside_a_folder_it_does_not_belong_to_is_not_replaced(tmp_path):
    # A nested folder with its own manifest was always judged by that manifest alone, so `--out runs`
    # of a `runs/exp1` training run (runs/ itself no output folder) removed the run's checkpoints, and
    # a training run put inside a prediction folder went with the prediction's rerun.
    runs = tmp_path / "runs"
    run = _output(runs / "exp1", "training run folder", "checkpoints/last.pt", "pneumoseg.json")
    with pytest.raises(pneumoseg.OutputError, match=r"not empty \(exp1/.pneumoseg-manifest, exp1/checkpoints/last.pt"):
        prepare_output_folder(runs, what="prediction output folder")
    with pytest.raises(pneumoseg.OutputError, match="not empty"):
        prepare_output_folder(runs, what="training run folder")  # the same kind too: runs/ is nobody's output
    assert tree(runs / "exp1") == run

    predictions = tmp_path / "predictions"
    _output(predictions, "prediction output folder", "submission.csv")
    run = _output(predictions / "exp2", "training run folder", "checkpoints/last.pt")
    with pytest.raises(pneumoseg.OutputError, match="exp2/"):
        prepare_output_folder(predictions, what="prediction output folder")
    assert tree(predictions / "exp2") == run
    with prepare_output_folder(predictions, what="prediction output folder", overwrite=True):
        pass  # --force: writes beside it, removes nothing of it
    assert tree(predictions / "exp2") == run


def test_the_kinds_a_folder_holds_are_still_replaced_with_it(tmp_path):
    # The demo's study sets and training run, a run's stage-1 classifier run and a folder's own
    # sub-folders are its output: a rerun replaces them without --force, as before.
    demo = tmp_path / "demo"
    with prepare_output_folder(demo, what="demo output folder") as folder:
        folder.write_bytes("latency.txt", data="x")
        folder.subfolder("predictions").write_bytes("submission.csv", data="x")
    _output(demo / "siim-synthetic", "synthetic data folder", "train-rle.csv")
    _output(demo / "model", "training run folder", "pneumoseg.json")
    _output(demo / "model" / "classifier", "classifier run folder", "pneumoseg.json")
    with prepare_output_folder(demo, what="demo output folder"):
        pass
    assert [p.name for p in demo.iterdir()] == [MANIFEST_NAME]
    # but a classifier run is the training run's, not a demo's to hold directly
    _output(demo, "demo output folder", "latency.txt")
    cls = _output(demo / "classifier", "classifier run folder", "pneumoseg.json")
    with pytest.raises(pneumoseg.OutputError, match="classifier/"):
        prepare_output_folder(demo, what="demo output folder")
    assert tree(demo / "classifier") == cls


def test_a_command_that_stopped_before_writing_leaves_its_folder_to_any_command(tmp_path):
    # The manifest is written when the folder is prepared; an empty one of another kind loses nothing.
    out = tmp_path / "out"
    prepare_output_folder(out, what="prediction output folder").close()
    with prepare_output_folder(out, what="synthetic data folder") as folder:
        folder.write_bytes("train-rle.csv", data="ImageId,EncodedPixels\n")
    assert (out / MANIFEST_NAME).read_text().splitlines()[1] == "# kind: synthetic data folder"


def test_a_link_in_the_manifests_place_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST_NAME).symlink_to(victim)
    with pytest.raises(pneumoseg.OutputError, match="not empty"):
        prepare_output_folder(out)
    with prepare_output_folder(out, overwrite=True) as folder:
        folder.write_bytes("x.txt", data="x")
    assert victim.read_text() == "precious"
    assert not (out / MANIFEST_NAME).is_symlink() and "x.txt" in (out / MANIFEST_NAME).read_text()


def _listed_by_hand(out, header, name, text):
    """A folder holding file ``name`` (``text``) and a manifest of ``header`` listing it."""
    out.mkdir()
    (out / name).write_text(text)
    st = (out / name).stat()
    (out / MANIFEST_NAME).write_text(f"{header}\n{st.st_size}\t{st.st_mtime_ns}\t{name}\n")
    return out


def test_a_version_1_manifest_without_a_kind_is_any_commands(tmp_path):
    # Folders written before manifests named their kind keep working without --force.
    out = _listed_by_hand(tmp_path / "old", "# pneumoseg output manifest v1: size<TAB>mtime_ns<TAB>relative path",
                          "old.txt", "from an earlier pneumoseg")
    with prepare_output_folder(out, what="prediction output folder") as folder:
        folder.write_bytes("new.txt", data="x")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "new.txt"]
    assert (out / MANIFEST_NAME).read_text().splitlines()[:2] == [
        "# pneumoseg output manifest v2: size<TAB>mtime_ns<TAB>relative path", "# kind: prediction output folder"]


def test_a_v2_manifest_without_its_kind_line_is_not_pneumosegs(tmp_path):
    out = _listed_by_hand(tmp_path / "out", "# pneumoseg output manifest v2: size<TAB>mtime_ns<TAB>relative path",
                          "x.txt", "x")
    with pytest.raises(pneumoseg.OutputError, match="pneumoseg did not write it"):
        prepare_output_folder(out)
    assert (out / "x.txt").read_text() == "x"


def test_output_folder_refuses_files_and_broken_manifests(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(pneumoseg.OutputError, match="is a file, not a folder"):
        prepare_output_folder(tmp_path / "a-file")
    with pytest.raises(pneumoseg.OutputError, match="a parent of it is a file"):
        prepare_output_folder(tmp_path / "a-file" / "below")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.png").write_text("not ours")
    (out / MANIFEST_NAME).write_text("# pneumoseg output manifest v1: size<TAB>mtime_ns<TAB>relative path\n1\t2\t../x\n")
    with pytest.raises(pneumoseg.OutputError, match="not empty"):
        prepare_output_folder(out)
    assert (out / "x.png").read_text() == "not ours"


def test_check_output_folder_refuses_like_prepare_and_touches_nothing(tmp_path, users_folder):
    from pneumoseg._fs import check_output_folder

    (tmp_path / "a-file").write_text("x")
    cases = [(tmp_path / "a-file", {}, "is a file, not a folder"),
             (tmp_path / "a-file" / "below", {}, "a parent of it is a file"),
             (users_folder, {}, r"not empty \(dicom-images-train/real-patient.dcm, train-rle.csv\)"),
             (tmp_path / "none", {"resume": True}, "nothing to continue"),
             (users_folder, {"resume": True}, "no pneumoseg output to continue")]
    before = tree(tmp_path)
    for path, kwargs, match in cases:
        with pytest.raises(pneumoseg.OutputError, match=match):
            check_output_folder(path, **kwargs)
        with pytest.raises(pneumoseg.OutputError, match=match):
            prepare_output_folder(path, **kwargs)
    assert check_output_folder(users_folder, overwrite=True) == users_folder
    assert check_output_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert tree(tmp_path) == before and not (tmp_path / "new").exists()


def test_a_failed_cache_build_leaves_nothing_that_needs_force(tmp_path, capsys):
    pytest.importorskip("torch")
    from pneumoseg.cli import main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "img.dcm").write_bytes(np.random.default_rng(0).bytes(3000))
    out = tmp_path / "cache"
    for _ in range(2):  # the second run fails the same way, not with "not empty ... --force"
        assert main(["data", "cache", "--root", str(tmp_path / "in"), "--out", str(out), "--size", "8"]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("pneumoseg: error: ") and "none of the 1 DICOMs could be read" in err
        assert "DataWarning" not in err and "--force" not in err
        # only the manifest, listing nothing: any command may use the folder without --force
        assert [p for p in out.rglob("*") if p.is_file()] == [out / MANIFEST_NAME]
        assert len((out / MANIFEST_NAME).read_text().splitlines()) == 2


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder this process cannot write into: read-only for ordinary users, immutable (chattr +i)
    for root, who may write anywhere else."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr: no folder is unwritable")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)


def test_unwritable_folder_is_refused(unwritable_folder, capsys):
    from pneumoseg.cli import main

    with pytest.raises(pneumoseg.OutputError, match="not writable"):
        prepare_output_folder(unwritable_folder)
    assert main(["data", "synth", "--out", str(unwritable_folder), "--n", "1", "--size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pneumoseg: error: synthetic data folder") and "not writable" in err and err.count("\n") == 1
    assert main(["data", "synth", "--out", str(unwritable_folder / "below"), "--n", "1", "--size", "32"]) == 2
    assert "cannot be created: permission denied" in capsys.readouterr().err
    assert list(unwritable_folder.iterdir()) == []


# --- atomic writes: complete or untouched, never a stray temporary file -------------------------------------


def test_a_failed_write_leaves_the_target_and_no_temporary_file(tmp_path):
    target = tmp_path / "labels.csv"
    target.write_text("precious")
    with pytest.raises(ZeroDivisionError):
        with atomic_open(target, "w") as f:
            f.write("half")
            1 / 0
    assert target.read_text() == "precious" and [p.name for p in tmp_path.iterdir()] == ["labels.csv"]
    atomic_write(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["labels.csv"]



def test_a_special_file_is_never_replaced_by_a_write(tmp_path):
    # The rename put a regular file where a FIFO (or, run as root, /dev/null itself) had been.
    import stat

    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    link = tmp_path / "link.csv"
    link.symlink_to(fifo)
    for target in (fifo, link):
        with pytest.raises(pneumoseg.OutputError, match="not a regular file"):
            write_rle_csv(target, {"a": ["-1"]})
        with pytest.raises(pneumoseg.OutputError, match="not a regular file"):
            atomic_write(target, b"x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.csv", "pipe.csv"]  # no temporary file left


def test_a_write_to_a_symbolic_link_goes_to_its_target_and_keeps_the_link(tmp_path):
    # The rename replaced the link itself with a regular file, leaving the file it pointed to stale.
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "labels.csv"
    real.write_text("old")
    link = tmp_path / "labels.csv"
    link.symlink_to(real)
    chain = tmp_path / "chain.csv"
    chain.symlink_to(link.name)  # relative, through the other link
    write_rle_csv(link, {"a": ["-1"]})
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert read_rle_csv(real) == {"a": ["-1"]}
    atomic_write(chain, "via the chain")
    assert chain.is_symlink() and link.is_symlink() and real.read_text() == "via the chain"
    with atomic_open(link, "w") as f:
        f.write("opened")
    assert link.is_symlink() and real.read_text() == "opened"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.csv", "labels.csv", "real"]
    assert [p.name for p in (tmp_path / "real").iterdir()] == ["labels.csv"]  # no temporary file left


def test_a_dangling_link_is_written_through_when_its_folder_exists(tmp_path):
    dangling = tmp_path / "out.csv"
    dangling.symlink_to(tmp_path / "later.csv")
    atomic_write(dangling, "new")
    assert dangling.is_symlink() and (tmp_path / "later.csv").read_text() == "new"
    nowhere = tmp_path / "nowhere.csv"
    nowhere.symlink_to(tmp_path / "missing" / "x.csv")
    with pytest.raises(pneumoseg.OutputError, match=r"nowhere\.csv: a symbolic link to .*missing.*x\.csv, whose folder .*missing does not exist"):
        atomic_write(nowhere, "new")
    loop = tmp_path / "loop.csv"
    loop.symlink_to(loop.name)
    with pytest.raises(pneumoseg.OutputError, match=r"loop\.csv: a loop of symbolic links"):
        write_rle_csv(loop, {"a": ["-1"]})
    assert nowhere.is_symlink() and loop.is_symlink() and not (tmp_path / "missing").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["later.csv", "loop.csv", "nowhere.csv", "out.csv"]


def test_a_link_to_a_folder_is_refused_as_a_folder(tmp_path):
    (tmp_path / "d").mkdir()
    link = tmp_path / "to_d"
    link.symlink_to(tmp_path / "d")
    with pytest.raises(pneumoseg.OutputError, match="is a folder"):
        atomic_write(link, "x")
    assert link.is_symlink() and list((tmp_path / "d").iterdir()) == []


def test_a_write_into_a_missing_folder_names_the_folder(tmp_path):
    # It raised FileNotFoundError naming a temporary file the user never asked for.
    with pytest.raises(pneumoseg.OutputError, match=r"folder .*nope.* does not exist"):
        write_rle_csv(tmp_path / "nope" / "x.csv", {"a": ["-1"]})
    assert not (tmp_path / "nope").exists()

def test_write_rle_csv_to_a_folder_or_with_bad_ids_writes_nothing(tmp_path):
    with pytest.raises(pneumoseg.OutputError, match="is a folder"):
        write_rle_csv(tmp_path, {"a": ["-1"]})
    target = tmp_path / "x.csv"
    target.write_text("precious")
    for rles, match in [({"a,b": ["-1"]}, "comma"), ({"a\nb, 1 2\nc": ["-1"]}, "control character"),
                        ({"a": ["1 2", "x"]}, "bad token"), ({"a": ["1 ١"]}, "bad token"), ({7: ["-1"]}, "must be a str"),
                        ({"a": [None]}, r"\[0\] must be a str"), ({"a": ["1 2 3"]}, "odd number")]:
        with pytest.raises(pneumoseg.InvalidInputError, match=match):
            write_rle_csv(target, rles)
    assert target.read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == ["x.csv"]


def test_write_rle_csv_takes_a_string_as_one_annotation_and_keeps_rows_on_one_line(tmp_path):
    path = write_rle_csv(tmp_path / "x.csv", {"a": "1 2 3 4", "b": ["1\n2", "-1"], "c": []})
    assert read_rle_csv(path) == {"a": ["1 2 3 4"], "b": ["1 2", "-1"], "c": ["-1"]}


# --- class 6/7/8: the CSV reader accepts exactly what the decoder accepts -----------------------------------


def test_a_megabyte_line_written_is_read_back(tmp_path):
    mask = np.zeros((1024, 1024), np.uint8)
    mask[::2] = 1  # ~1 M runs: a line of ~2.9 MB
    text = rle.encode(mask)
    assert len(text) > 2**20
    path = write_rle_csv(tmp_path / "big.csv", {"a": [text]})
    assert read_rle_csv(path) == {"a": [text]}


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"])
def test_any_line_ending(tmp_path, ending):
    (tmp_path / "x.csv").write_bytes(ending.join(["ImageId,EncodedPixels", "a,1 2", "b,-1", ""]).encode())
    assert read_rle_csv(tmp_path / "x.csv") == {"a": ["1 2"], "b": ["-1"]}


def test_quoted_cells(tmp_path):
    (tmp_path / "x.csv").write_text('"ImageId","EncodedPixels"\n"a","1 2"\n"b", "-1"\n')
    assert read_rle_csv(tmp_path / "x.csv") == {"a": ["1 2"], "b": ["-1"]}
    (tmp_path / "y.csv").write_text('ImageId,EncodedPixels\n"a,1 2\n')
    with pytest.raises(pneumoseg.DataFormatError, match="line 2: unterminated quoted field"):
        read_rle_csv(tmp_path / "y.csv")


@pytest.mark.parametrize("cell, match", [
    ("\u0661 2", "bad token"),            # Arabic-Indic digit one: str.isdigit() says yes, the decoder no
    ("\u00b9 2", "bad token"),            # superscript one
    ("\uff11 2", "bad token"),            # full-width one
    ("1\u00a02", r"non-ASCII space \(U\+00A0\)"),  # no-break space: str.split() splits on it, the decoder not
    ("1\u20032", r"non-ASCII space \(U\+2003\)"),  # em space
    ("1 2 -1 3", "-1 among other values"),
    ("+1 2", "bad token"),
])
def test_rle_cells_the_decoder_would_reject_are_reported_with_the_line(tmp_path, cell, match):
    (tmp_path / "x.csv").write_text(f"ImageId,EncodedPixels\nok,1 2\nbad,{cell}\n", encoding="utf-8")
    with pytest.raises(pneumoseg.DataFormatError, match=f"line 3: .*{match}"):
        read_rle_csv(tmp_path / "x.csv")


def test_ids_with_control_characters_are_reported(tmp_path):
    (tmp_path / "x.csv").write_bytes(b"ImageId,EncodedPixels\na\x00b,1 2\n")
    with pytest.raises(pneumoseg.DataFormatError, match="line 2: ImageId .* control character"):
        read_rle_csv(tmp_path / "x.csv")


def test_csv_from_a_folder_a_device_or_past_the_limit(tmp_path):
    with pytest.raises(pneumoseg.DataFormatError, match="is a folder"):
        read_rle_csv(tmp_path)
    with limits.override(max_csv_bytes=2**16):
        with pytest.raises(pneumoseg.DataFormatError, match="max_csv_bytes"):
            read_rle_csv("/dev/zero")  # no size to check: reading stops at the limit
        (tmp_path / "big.csv").write_text("a,-1\n" * 20000)
        with pytest.raises(pneumoseg.DataFormatError, match="max_csv_bytes"):
            read_rle_csv(tmp_path / "big.csv")
    with limits.override(max_rle_chars=10):
        (tmp_path / "long.csv").write_text("a,1 2 3 4 5 6\n")
        with pytest.raises(pneumoseg.DataFormatError, match="line 1: .*max_rle_chars"):
            read_rle_csv(tmp_path / "long.csv")


# --- class 4: DICOM sizes checked before decoding ----------------------------------------------------------


def test_a_deflate_bomb_is_refused_in_bounded_memory(tmp_path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    path = write_dicom(tmp_path / "bomb.dcm", np.zeros((4096, 4096), np.uint16), syntax=DeflatedExplicitVRLittleEndian)
    assert path.stat().st_size < 100_000  # 32 MiB of pixels in a few kilobytes
    result = run_isolated(f"""
        from pneumoseg import DicomError, limits
        from pneumoseg.data import read_dicom
        limits.set_limits(max_dicom_bytes=2**22)
        limit_memory(64)
        try:
            read_dicom({str(path)!r})
        except DicomError as exc:
            assert "inflates past max_dicom_bytes" in str(exc), exc
            print("OK")
    """)
    assert result.returncode == 0 and "OK" in result.stdout, result.describe()
    assert read_dicom(path).pixels.shape == (4096, 4096)  # within the default limits it reads


@pytest.mark.parametrize("attrs, match", [
    (dict(NumberOfFrames=60000), "max_dicom_bytes"),
    (dict(Rows=4000, Columns=4000), "max_image_pixels"),
    (dict(Rows=5000), "max_image_side"),
    (dict(NumberOfFrames=2), "holds 2 frames"),
    (dict(SamplesPerPixel=3), "samples per pixel"),
    (dict(Rows=None), "has no Rows"),
    (dict(Columns=0), "Columns must be at least 1"),
])
def test_declared_sizes_are_checked_before_decoding(tmp_path, attrs, match):
    path = write_dicom(tmp_path / "x.dcm", **attrs)
    with limits.override(max_dicom_bytes=2**20, max_image_side=4096, max_image_pixels=2**22):
        for read in (read_dicom, read_dicom_shape):
            with pytest.raises(pneumoseg.DicomError, match=match) as info:
                read(path)
            assert str(path) in str(info.value)


@pytest.mark.parametrize("attrs, match", [
    (dict(RescaleSlope="NaN", RescaleIntercept=0), "RescaleSlope is 'NaN'"),
    (dict(RescaleSlope=1, RescaleIntercept="inf"), "RescaleIntercept"),
    (dict(RescaleSlope=0, RescaleIntercept=0), "RescaleSlope is 0"),
    (dict(PixelSpacing=("LO", "abc\\1")), r"PixelSpacing .*is not a pair of numbers"),
    (dict(PixelSpacing=["0.1"]), "two positive numbers"),
    (dict(PixelSpacing=["-1", "0.1"]), "two positive numbers"),
])
def test_bad_header_values_name_the_file(tmp_path, attrs, match):
    path = write_dicom(tmp_path / "x.dcm", **attrs)
    with pytest.raises(pneumoseg.DicomError, match=match) as info:
        read_dicom(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("attrs, keyword", [
    (dict(PhotometricInterpretation=("LO", "X" * 5000)), "PhotometricInterpretation"),
    (dict(RescaleSlope=("LO", "9" * 5000 + "x"), RescaleIntercept=0), "RescaleSlope"),
    (dict(PixelSpacing=("LO", "a" * 5000 + "\\1")), "PixelSpacing"),
])
def test_a_refused_header_value_is_quoted_cut_short(tmp_path, attrs, keyword):
    # A refusal quotes the value it objects to, but a field holding kilobytes of text (or whatever a
    # misconfigured system put there) must not be copied whole into stderr and summary.json.
    path = write_dicom(tmp_path / "x.dcm", **attrs)
    with pytest.raises(pneumoseg.DicomError, match=keyword) as info:
        read_dicom(path)
    message = str(info.value)
    assert str(path) in message and "characters)" in message
    assert len(message) < len(str(path)) + 250, message


@pytest.mark.parametrize("reader, find, replace", [
    # Columns' two bytes said to be three: pydicom's BytesLengthException from read_dicom_shape
    ("read_dicom_shape", b"\x28\x00\x11\x00US\x02\x00", b"\x28\x00\x11\x00US\x03\x00"),
    # a TransferSyntaxUID that is a UID but no transfer syntax: ValueError from read_dicom
    ("read_dicom", b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.9\x00"),
    # MediaStorageSOPClassUID with an unknown VR: NotImplementedError from read_sop_instance_uid
    ("read_sop_instance_uid", b"\x02\x00\x02\x00UI", b"\x02\x00\x02\x00Uz"),
], ids=["columns-length", "not-a-transfer-syntax", "unknown-vr"])
def test_a_header_element_damaged_past_dcmread_is_a_dicom_error(tmp_path, reader, find, replace):
    # pydicom converts an element when it is first read, after dcmread returned: found by flipping
    # bytes of a SIIM file's header, each of these escaped as pydicom's own exception type, so one
    # damaged file stopped `pneumoseg predict` instead of being skipped.
    from pneumoseg.data import dicom

    data = write_dicom(tmp_path / "x.dcm").read_bytes()
    assert data.count(find) == 1
    path = tmp_path / "damaged.dcm"
    path.write_bytes(data.replace(find, replace))
    with pytest.raises(pneumoseg.DicomError, match="unreadable DICOM header") as info:
        getattr(dicom, reader)(path)
    assert str(path) in str(info.value)


def _voi_lut(descriptor, data):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.add_new(0x00283002, "US", descriptor)  # LUTDescriptor: entries, first mapped value, bits
    item.add_new(0x00283006, "OW", np.asarray(data, np.uint16).tobytes())  # LUTData
    return Sequence([item])


@pytest.mark.parametrize("attrs, match", [
    (dict(WindowCenter=5, WindowWidth=0), "Window Width"),
    (dict(WindowCenter=5, WindowWidth=-3), "Window Width"),
    (dict(WindowCenter=("DS", "NaN"), WindowWidth=100), "not finite"),
    (dict(VOILUTSequence=_voi_lut([4096, 0, 16], [1, 2, 3])), "unpack"),
    (dict(VOILUTSequence=_voi_lut([4096, 0], [1, 2])), "IndexError"),
    (dict(VOILUTSequence=_voi_lut([4, 0, 40], [1, 2, 3, 4])), "bits per LUT entry"),
])
def test_a_broken_window_or_voi_lut_in_the_file_names_the_file(tmp_path, attrs, match):
    # The pixels read fine; only the display transform is broken. window() raised pydicom's ValueError,
    # struct.error, IndexError or NotImplementedError, or returned NaN, and `pneumoseg predict` died
    # with a traceback while drawing an overlay.
    path = write_dicom(tmp_path / "x.dcm", **attrs)
    image = read_dicom(path)
    with pytest.raises(pneumoseg.DicomError, match=match) as info:
        image.window()
    assert str(path) in str(info.value) and "window" in str(info.value)
    manual = image.window(center=5, width=10)  # an explicit window needs nothing from the file
    assert np.isfinite(manual).all()


@pytest.mark.parametrize("slope", ["1e39", "3e38"])
def test_a_rescale_slope_past_float32_is_a_dicom_error_under_strict_warnings(tmp_path, slope):
    path = write_dicom(tmp_path / "x.dcm", RescaleSlope=("DS", slope))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy's "overflow encountered in cast / multiply" escaped here
        with pytest.raises(pneumoseg.DicomError, match="overflow float32") as info:
            read_dicom(path)
    assert str(path) in str(info.value)

def test_pixel_data_holding_many_images_is_refused_before_decoding(tmp_path):
    # 64 images of 256x256 where the header declares one: a few kilobytes deflated. pydicom would
    # decode all 64 frames before the single-image check; the byte count refuses them up front.
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    path = write_dicom(tmp_path / "frames.dcm", np.zeros((64, 256, 256), np.uint16), syntax=DeflatedExplicitVRLittleEndian)
    assert path.stat().st_size < 100_000
    with pytest.raises(pneumoseg.DicomError, match="expected a single 2-D image, the pixel data holds 8,388,608 bytes, "
                                                  "64 images of the declared 256x256"):
        read_dicom(path)
    cut = write_dicom(tmp_path / "cut.dcm", np.zeros((1, 8, 9), np.uint16))
    data = cut.read_bytes()
    marker = data.rindex(b"\xe0\x7f\x10\x00")  # the Pixel Data element: keep 100 of its 144 bytes
    cut.write_bytes(data[:marker + 12 + 100])
    with pytest.raises(pneumoseg.DicomError, match="truncated: its pixel data has 100 of 144 bytes"):
        read_dicom(cut)


def test_read_dicom_on_a_folder(tmp_path):
    with pytest.raises(pneumoseg.DicomError, match="is a folder"):
        read_dicom(tmp_path)


# --- class 9: find_dicoms finds what is there and says what it skipped ------------------------------------


def test_find_dicoms_any_case_links_followed_once_and_skips_reported(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    write_dicom(root / "a" / "upper.DCM")
    write_dicom(root / "a" / "mixed.Dcm")
    other = tmp_path / "elsewhere"
    other.mkdir()
    write_dicom(other / "linked.dcm")
    (root / "link").symlink_to(other, target_is_directory=True)
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    (root / "again").symlink_to(other, target_is_directory=True)
    (root / "broken").symlink_to(tmp_path / "nowhere")
    write_dicom(root / "IM000001")  # a DICOM file without the suffix
    (root / "notes.txt").write_text("not an image")
    found = find_dicoms(root)
    assert sorted(found) == ["linked", "mixed", "upper"]
    reasons = {p.name: why for p, why in found.skipped}
    assert "scanned once" in reasons["loop"] and "scanned once" in reasons["link"]  # "again" came first
    assert "broken" in reasons["broken"] and ".dcm suffix" in reasons["IM000001"]
    assert "notes.txt" not in reasons


def test_dataset_warns_about_skipped_files(tmp_path):
    pytest.importorskip("torch")
    from pneumoseg.data import SIIMDataset

    write_dicom(tmp_path / "a.dcm")
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    with pytest.warns(pneumoseg.DataWarning, match="skipped"):
        ds = SIIMDataset(tmp_path, image_size=8)
    assert len(ds) == 1 and ds.skipped[0][0].name == "broken"


# --- reading DICOMs from threads never touches the process-wide warning state -----------------------------


def test_reading_dicoms_in_threads_loses_and_leaks_no_other_warnings(tmp_path):
    # warnings.catch_warnings swaps process-wide state: a reader thread inside it would swallow
    # another thread's warnings (record=True) or drop them ("ignore"), and threads leaving it out of
    # order would leave its filters installed for good. read_dicom must touch none of it.
    import threading
    import time

    rng = np.random.default_rng(0)
    raws = [rng.integers(0, 4096, (5 + i, 7), dtype=np.uint16) for i in range(6)]
    good = [write_dicom(tmp_path / f"good{i}.dcm", raw) for i, raw in enumerate(raws)]
    refused = [write_dicom(tmp_path / "nan-slope.dcm", RescaleSlope="NaN", RescaleIntercept=0),
               write_dicom(tmp_path / "rowless.dcm", Rows=None)]
    (tmp_path / "random.dcm").write_bytes(rng.bytes(3000))
    refused.append(tmp_path / "random.dcm")
    readers, rounds, problems = 8, 12, []
    start = threading.Barrier(readers + 1)
    done = threading.Event()
    issued = []

    def read_all() -> None:
        start.wait()
        for _ in range(rounds):
            for path, raw in zip(good, raws):
                if not np.array_equal(read_dicom(path, with_dataset=False).pixels, raw):
                    problems.append(f"{path}: wrong pixels")
                if read_dicom_shape(path) != raw.shape:
                    problems.append(f"{path}: wrong shape")
            for path in refused:
                try:
                    read_dicom(path)
                    problems.append(f"{path}: read")
                except pneumoseg.DicomError:
                    pass

    def warn_meanwhile() -> None:
        start.wait()
        while not done.is_set() or len(issued) < 200:
            message = f"the caller's own warning {len(issued)}"
            warnings.warn(message, pneumoseg.DataWarning)
            issued.append(message)
            time.sleep(0.0002)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters, show = list(warnings.filters), warnings.showwarning
        threads = [threading.Thread(target=read_all) for _ in range(readers)]
        warner = threading.Thread(target=warn_meanwhile)
        for t in threads + [warner]:
            t.start()
        for t in threads:
            t.join()
        done.set()
        warner.join()
        assert warnings.filters == filters and warnings.showwarning is show  # nothing left installed
    assert problems == []
    assert [str(w.message) for w in caught] == issued  # every one of the caller's warnings, nothing else


# --- folders nested deeper than Python's recursion limit ---------------------------------------------------


def _nest(root: Path, depth: int) -> int:
    """Make root/a/a/.../a (depth levels) with directory descriptors (no path gets near PATH_MAX
    while making it); returns a descriptor of the deepest folder (the caller closes it)."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir("a", dir_fd=fd)
        deeper = os.open("a", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = deeper
    return fd


def _remove_nested(root: Path) -> None:
    """Remove a tree however deep (shutil.rmtree recurses: pytest could not clean these up): move
    every folder up to the top, then remove a tree two levels deep."""
    pending, count = [root], 0
    while pending:
        with os.scandir(pending.pop()) as entries:
            folders = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
        for folder in folders:
            flat = root / f"flat-{count}"
            count += 1
            os.rename(folder, flat)
            pending.append(flat)
    shutil.rmtree(root)


@pytest.fixture
def deep_tmp(tmp_path):
    yield tmp_path
    for child in tmp_path.iterdir():
        if child.is_dir() and not child.is_symlink():
            _remove_nested(child)


def test_deep_folders_are_walked_without_recursion(deep_tmp):
    # 1,500 levels of "a/" is a 3,000-character path: legal, and past the interpreter's recursion limit.
    tmp_path = deep_tmp
    fd = _nest(tmp_path / "data", 1500)
    try:
        with open(os.open("deep.dcm", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(write_dicom(tmp_path / "one.dcm").read_bytes())
    finally:
        os.close(fd)
    os.mkfifo(tmp_path / "data" / "pipe.dcm")  # listed as skipped, never opened (it would block)
    found = find_dicoms(tmp_path / "data")
    assert list(found) == ["deep"] and len(found["deep"].parts) > 1500
    assert [(p.name, why) for p, why in found.skipped] == [("pipe.dcm", "not a regular file (a pipe, socket or device)")]
    with pytest.raises(pneumoseg.OutputError, match=r"not empty \(a/a/a/.*/deep.dcm, pipe.dcm\)"):
        prepare_output_folder(tmp_path / "data")

    # only folders: nobody's files, so it is prepared; the empty folders are someone's and stay
    os.close(_nest(tmp_path / "empty", 1500))
    prepare_output_folder(tmp_path / "empty").write_bytes("x.txt", data="x")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [MANIFEST_NAME, "a", "x.txt"]

