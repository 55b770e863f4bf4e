"""Command-line user errors, for every command: one line ``pneumoseg: error: ...`` on stderr, exit code
2, no traceback, and nothing written. One case runs the real console entry point in a child process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pneumoseg.cli import COMMANDS, build_parser, main

pytest.importorskip("pydicom")


@pytest.fixture
def place(tmp_path):
    """A work folder with a file, a good CSV, a corrupt DICOM folder and a Rows-less DICOM folder."""
    from test_hostile_files import write_dicom

    (tmp_path / "a-file").write_text("x")
    (tmp_path / "good.csv").write_text("ImageId,EncodedPixels\nimg,1 2\n")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "img.dcm").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "rowless").mkdir()
    write_dicom(tmp_path / "rowless" / "img.dcm", Rows=None)
    (tmp_path / "someones").mkdir()
    (tmp_path / "someones" / "labels.csv").write_text("precious")
    return tmp_path


SYNTH = ["data", "synth", "--out", "{t}/new"]
MASKS = ["data", "masks", "--csv", "{t}/good.csv", "--out", "{t}/new"]

CASES = {
    "synth --n 0": (SYNTH + ["--n", "0"], "argument --n: the value must be at least 1"),
    "synth --n abc": (SYNTH + ["--n", "abc"], "argument --n: must be an integer, got 'abc'"),
    "synth --n 1.5": (SYNTH + ["--n", "1.5"], "argument --n: must be an integer"),
    "synth --size 8": (SYNTH + ["--size", "8"], "argument --size: the size must be at least 32"),
    "synth --size huge": (SYNTH + ["--size", "100000"], "argument --size: the size must be at most 65536"),
    "synth --positive-fraction 2": (SYNTH + ["--positive-fraction", "2"], r"argument --positive-fraction: the value must be in \[0, 1\]"),
    "synth --positive-fraction nan": (SYNTH + ["--positive-fraction", "nan"], "must be a finite number"),
    "synth --seed -1": (SYNTH + ["--seed", "-1"], "argument --seed: the value must be at least 0"),
    "synth --out a file": (["data", "synth", "--out", "{t}/a-file"], "a-file is a file, not a folder"),
    "synth --out below a file": (["data", "synth", "--out", "{t}/a-file/x"], "a parent of it is a file"),
    "synth --out someone's folder": (["data", "synth", "--out", "{t}/someones"], r"not empty \(labels.csv\).*--force"),
    "synth --out empty": (["data", "synth", "--out", ""], "argument --out: the path must not be empty"),
    "synth without --out": (["data", "synth"], "the following arguments are required: --out"),
    "masks --csv a folder": (MASKS[:3] + ["{t}/corrupt"] + MASKS[4:], "corrupt: is a folder, not a CSV file"),
    "masks --csv missing": (MASKS[:3] + ["{t}/none.csv"] + MASKS[4:], "none.csv: no such file"),
    "masks --csv not a CSV": (MASKS[:3] + ["{t}/corrupt/img.dcm"] + MASKS[4:], "img.dcm: not UTF-8 text|img.dcm, line"),
    "masks --dicoms corrupt": (MASKS + ["--dicoms", "{t}/corrupt"], "img.dcm: (not a DICOM file|unreadable)"),
    "masks --dicoms Rows-less": (MASKS + ["--dicoms", "{t}/rowless"], "img.dcm: the file has no Rows"),
    "masks --dicoms a file": (MASKS + ["--dicoms", "{t}/a-file"], "a-file: not a folder"),
    "masks --shape huge": (MASKS + ["--shape", "100000", "100000"], "argument --shape: the size must be at most 65536"),
    "masks --shape too many pixels": (MASKS + ["--shape", "60000", "60000"], "max_image_pixels"),
    "masks --shape negative": (MASKS + ["--shape", "-1", "5"], "argument --shape: the size must be at least 1"),
    "masks --shape one value": (MASKS + ["--shape", "5"], "argument --shape: expected 2 arguments"),
    "masks --out a file": (MASKS[:5] + ["{t}/a-file"], "a-file is a file, not a folder"),
    "masks --out someone's folder": (MASKS[:5] + ["{t}/someones"], "not empty"),
    "demo --n 0": (["demo", "--n", "0", "--out", "{t}/new"], r"argument --n: the value must be at least \d+, got 0"),
    "demo --size 8": (["demo", "--size", "8", "--out", "{t}/new"], r"argument --size: the size must be at least \d+, got 8"),
    "demo --out a file": (["demo", "--out", "{t}/a-file"], "a-file is a file, not a folder"),
    "demo --out someone's folder": (["demo", "--out", "{t}/someones"], "not empty"),
    # the newer commands: the same rules (checked before a model loads or a data set is read)
    "train --out a file": (["train", "--recipe", "demo", "--data", "{t}", "--out", "{t}/a-file"], "a-file is a file, not a folder"),
    "train --out someone's folder": (["train", "--recipe", "demo", "--data", "{t}", "--out", "{t}/someones"], r"not empty \(labels.csv\).*--force"),
    "train --out below a file": (["train", "--recipe", "demo", "--data", "{t}", "--out", "{t}/a-file/run"], "a parent of it is a file"),
    "train --resume a foreign folder": (["train", "--recipe", "demo", "--data", "{t}", "--out", "{t}/someones", "--resume"], "no pneumoseg output to continue"),
    "train --resume nothing": (["train", "--recipe", "demo", "--data", "{t}", "--out", "{t}/none", "--resume"], "nothing to continue"),
    "train bad --set": (["train", "--recipe", "demo", "--set", "epochs=abc", "--out", "{t}/new"], "config field epochs: must be an integer"),
    "train NaN --set": (["train", "--recipe", "demo", "--set", "optimizer.lr=nan", "--out", "{t}/new"], "optimizer.lr: must be a finite number"),
    "train unknown recipe": (["train", "--recipe", "nope", "--out", "{t}/new"], "unknown recipe 'nope'"),
    "train config a folder": (["train", "{t}/corrupt", "--out", "{t}/new"], "corrupt: is a folder"),
    "train config not a mapping": (["train", "{t}/good.csv", "--out", "{t}/new"], "must be a mapping"),
    "train without --out": (["train", "--recipe", "demo"], "--out RUN is required"),
    "predict --out a file": (["predict", "{t}/corrupt", "--model", "{t}/corrupt", "--out", "{t}/a-file"], "a-file is a file, not a folder"),
    "predict --out someone's folder": (["predict", "{t}/corrupt", "--model", "{t}/corrupt", "--out", "{t}/someones"], r"not empty \(labels.csv\)"),
    "predict --model missing": (["predict", "{t}/corrupt", "--model", "{t}/none", "--out", "{t}/new"], "no such model directory"),
    "predict --model not one": (["predict", "{t}/corrupt", "--model", "{t}/corrupt", "--out", "{t}/new"], "not a model directory"),
    "predict --batch-size 0": (["predict", "{t}/corrupt", "--model", "{t}/corrupt", "--out", "{t}/new", "--batch-size", "0"], "argument --batch-size: the value must be at least 1"),
    "predict --workers 0": (["predict", "{t}/corrupt", "--model", "{t}/corrupt", "--out", "{t}/new", "--workers", "0"], "argument --workers"),
    "predict bad --backend": (["predict", "{t}/corrupt", "--model", "{t}/corrupt", "--out", "{t}/new", "--backend", "x"], "argument --backend: invalid choice"),
    "export missing model": (["export", "{t}/none"], "no such model directory"),
    "export not a model": (["export", "{t}/corrupt"], "not a model directory"),
    "export bad --max-calibration-images": (["export", "{t}/corrupt", "--max-calibration-images", "0"], "argument --max-calibration-images"),
    "evaluate --pred missing": (["evaluate", "--pred", "{t}/none.csv", "--truth", "{t}/good.csv", "--out", "{t}/new"], "none.csv: no such file"),
    "evaluate --truth a folder": (["evaluate", "--pred", "{t}/good.csv", "--truth", "{t}/corrupt", "--out", "{t}/new"], "corrupt: is a folder"),
    "evaluate --threshold 2": (["evaluate", "--pred", "{t}/good.csv", "--truth", "{t}/good.csv", "--threshold", "2", "--out", "{t}/new"], r"argument --threshold: the value must be in \[0, 1\]"),
    "evaluate --scores not text": (["evaluate", "--pred", "{t}/good.csv", "--truth", "{t}/good.csv", "--scores", "{t}/corrupt/img.dcm", "--out", "{t}/new"], "img.dcm: .*UTF-8"),
    "evaluate --out someone's folder": (["evaluate", "--pred", "{t}/good.csv", "--truth", "{t}/good.csv", "--out", "{t}/someones"], "not empty"),
    "evaluate --out a file": (["evaluate", "--pred", "{t}/good.csv", "--truth", "{t}/good.csv", "--out", "{t}/a-file"], "a-file is a file"),
    "cache --root missing": (["data", "cache", "--root", "{t}/none", "--out", "{t}/new"], "none: no such data folder"),
    "cache --root without DICOMs": (["data", "cache", "--root", "{t}/someones", "--out", "{t}/new"], r"no \*.dcm files found"),
    "cache --csv a folder": (["data", "cache", "--root", "{t}/rowless", "--csv", "{t}/corrupt", "--out", "{t}/new"], "corrupt: is a folder"),
    "cache --size 2": (["data", "cache", "--root", "{t}/rowless", "--out", "{t}/new", "--size", "2"], "argument --size: the size must be at least 8"),
    "cache --out a file": (["data", "cache", "--root", "{t}/rowless", "--out", "{t}/a-file"], "a-file is a file"),
    "cache --out someone's folder": (["data", "cache", "--root", "{t}/rowless", "--out", "{t}/someones"], "not empty"),
    "demo bad --set": (["demo", "--out", "{t}/new", "--set", "nope=1"], "config field nope: unknown field"),
    "no command": ([], "the following arguments are required: COMMAND"),
    "unknown command": (["train-everything"], "argument COMMAND: invalid choice"),
    "unknown option": (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    "data without subcommand": (["data"], "the following arguments are required: SUBCOMMAND"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_user_errors_are_one_line_and_exit_2(name, place, capsys):
    argv, match = CASES[name]
    argv = [a.format(t=place) for a in argv]
    before = sorted(p.relative_to(place) for p in place.rglob("*"))
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("pneumoseg: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and captured.out == ""
    assert sorted(p.relative_to(place) for p in place.rglob("*")) == before  # nothing written
    assert (place / "someones" / "labels.csv").read_text() == "precious"
    import importlib.util
    import re

    if importlib.util.find_spec("torch") is None and "needs torch" in err:
        # a torch command stops at its one-line torch message (checked above) before it reads its arguments
        pytest.skip("the command needs torch, which is not installed")
    assert re.search(match, err), err


def test_help_still_works(capsys):
    for argv in (["--help"], ["data", "synth", "--help"], ["demo", "-h"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        assert "usage: pneumoseg" in capsys.readouterr().out


def test_every_command_is_a_module_with_add_parser():
    import importlib

    for name in COMMANDS:
        assert callable(importlib.import_module(f"pneumoseg.cli.{name}").add_parser)
    parser = build_parser()
    assert set(parser._subparsers._group_actions[0].choices) == set(COMMANDS)
    # every leaf parser knows what to run
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        leaves = [sub] if sub._subparsers is None else list(sub._subparsers._group_actions[0].choices.values())
        for leaf in leaves:
            assert callable(leaf.get_default("run")), f"{leaf.prog} has no run"


def test_force_writes_into_someones_folder_and_keeps_their_files(place, capsys):
    assert main(["data", "synth", "--out", str(place / "someones"), "--n", "2", "--size", "32", "--force"]) == 0
    assert (place / "someones" / "labels.csv").read_text() == "precious"
    assert (place / "someones" / "train-rle.csv").is_file()


def test_the_console_entry_point_in_a_real_process(tmp_path):
    # The installed `pneumoseg` script calls pneumoseg.cli:main; `python -m pneumoseg` does the same.
    proc = subprocess.run([sys.executable, "-m", "pneumoseg", "data", "synth", "--out", str(tmp_path / "x"), "--n", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "pneumoseg: error: argument --n: the value must be at least 1, got 0 (see 'pneumoseg data synth --help')\n"
    assert not Path(tmp_path / "x").exists()
