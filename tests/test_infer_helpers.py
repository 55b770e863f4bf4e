"""tests/infer_helpers.py builds its shared model directories whole or not at all: an export that
failed inside a builder left a half-built folder, and every later test then failed with
FileExistsError, hiding the first error."""

from __future__ import annotations

import pytest

from infer_helpers import build_in_place


def test_a_failed_build_leaves_nothing_and_the_retry_shows_the_same_error(tmp_path):
    target = tmp_path / "aux-onnx"

    def failing(folder):
        folder.mkdir()
        (folder / "pneumoseg.json").write_text("{}")  # half-built when it fails
        raise RuntimeError("export failed: the real cause")

    for _ in range(2):
        with pytest.raises(RuntimeError, match="the real cause"):
            build_in_place(target, failing)
        assert list(tmp_path.iterdir()) == []  # neither the target nor the staging folder


def test_a_build_appears_whole_under_its_name(tmp_path):
    target = tmp_path / "aux"

    def build(folder):
        assert not target.exists()  # built aside, not in place
        folder.mkdir()
        (folder / "weights").write_bytes(b"w")
        (folder / "sub").mkdir()
        (folder / "sub" / "graph.onnx").write_bytes(b"g")

    assert build_in_place(target, build) == target
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["sub", "sub/graph.onnx", "weights"]
    assert [p.name for p in tmp_path.iterdir()] == ["aux"]
