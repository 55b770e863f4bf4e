"""Hostile and unlucky inputs to the features added last (ONNX source records, PACS-layout inputs,
the colour-picture refusal): each test is a reproducer of a bug found by attacking them."""

from __future__ import annotations

import numpy as np
import pytest

import pneumoseg
from pneumoseg.export.provenance import StaleArtefactError, check_source
from pneumoseg.infer.inputs import collect_inputs


class _Artefact:
    meta: dict = {}
    network = "segmenter"
    precision = "fp32"


class _ModelDir:
    path = "/models/m"
    artefacts = {"onnx.segmenter.fp32": _Artefact()}


@pytest.mark.parametrize("version", ["\u00b2", "\u0661", "1\u00b9"])  # str.isdigit() is True for all three
def test_source_record_format_of_non_ascii_digits_is_a_stale_artefact_error(version, tmp_path):
    # A crafted metadata value such as '²' passed str.isdigit() and then crashed int() with a bare
    # ValueError (a traceback on the command line) instead of the refusal naming the file.
    pytest.importorskip("torch")
    path = tmp_path / "segmenter.fp32.onnx"
    with pytest.raises(StaleArtefactError, match=r"source record pneumoseg\.provenance=.* is malformed"):
        check_source(_ModelDir(), "onnx.segmenter.fp32", "segmenter", path, {"pneumoseg.provenance": version})


def test_grey_and_alpha_picture_is_refused_not_read_as_narrow_images():
    # np.asarray of a Pillow 'LA' image (grey + alpha) is (H, W, 2): read as H images 2 pixels wide it
    # gave H predictions, as (H, W, 3|4) colour pictures did before they were refused.
    picture = np.zeros((32, 40, 2), dtype=np.uint8)
    with pytest.raises(pneumoseg.errors.InvalidInputError, match=r"\(32, 40, 2\).*pass the grey image"):
        collect_inputs(picture)
    # a batch of narrow images given as (N, 1, H, W) still goes through
    sources, _ = collect_inputs(picture.transpose(0, 2, 1)[:, None])
    assert len(sources) == 32 and sources[0].pixels.shape == (2, 40)
