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
    ("a: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply"),  # RecursionError in PyYAML
])
def test_training_config_values_yaml_cannot_build_are_config_errors(tmp_path, capsys, text, expected):
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

def test_json_integers_of_thousands_of_digits_are_format_errors(tmp_path, capsys):
    """Python's int() refuses integers of over 4300 digits with a bare ValueError, which json.loads
    lets through: a pneumoseg.json or index.json holding one printed a traceback."""
    from pneumoseg.data.cache import CACHE_INDEX, load_cache_index
    from pneumoseg.models.model_dir import CONFIG_NAME, load_model_dir

    huge = '{"format": "pneumoseg-model", "format_version": ' + "9" * 5000 + "}"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / CONFIG_NAME).write_text(huge)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / CACHE_INDEX).write_text(huge)
    with pytest.raises(pneumoseg.DataFormatError, match="not valid JSON"):
        load_model_dir(tmp_path / "model")
    with pytest.raises(pneumoseg.DataFormatError, match="not valid JSON"):
        load_cache_index(tmp_path / "cache")
    _one_line_error(capsys, ["predict", tmp_path, "--model", tmp_path / "model", "--out", tmp_path / "out"],
                    "not valid JSON")
