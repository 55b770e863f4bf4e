"""Cases of the Predictor's decisions and of ``collect_inputs`` worked out by hand from their
documented rules, each added by the mutation audit (round 2) where a planted bug passed the other
inference tests."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pneumoseg.infer import Predictor  # noqa: E402

from infer_helpers import model_dir, phantom_images  # noqa: E402


def test_a_score_equal_to_the_gate_passes_it():
    # postprocess.gate empties the masks of images whose score is *below* the threshold, so a score
    # exactly at the gate passes: the gated pipeline must segment that image and answer as
    # segment="all" (whose fused post-processing applies the same rule).
    images = phantom_images(4, seed=3)
    scores = [p.score for p in Predictor.from_dir(model_dir("classifier"), segment="all").predict(images)]
    at = scores[1]  # a float32 value, exactly representable: the comparison is exact
    gated = Predictor.from_dir(model_dir("classifier"), thresholds={"gate": at}).predict(images)
    every = Predictor.from_dir(model_dir("classifier"), thresholds={"gate": at}, segment="all").predict(images)
    assert gated[1].score == at
    assert gated[1].segmented
    assert [p.rle for p in gated] == [p.rle for p in every]
    assert [p.segmented for p in gated] == [s >= at for s in scores]


def test_one_file_reached_by_two_spellings_is_predicted_once(tmp_path):
    # "the same file given twice is predicted once": the folder, the file, the file through '..' and
    # through a symbolic link are one file, so one source (not two with one ImageId, an error).
    from factories import write_dicom
    from pneumoseg.infer.inputs import collect_inputs

    folder = tmp_path / "study"
    folder.mkdir()
    path = folder / "1.2.3.dcm"
    write_dicom(path)
    link = tmp_path / "link.dcm"
    link.symlink_to(path)
    sources, skipped = collect_inputs([folder, path, folder / ".." / "study" / "1.2.3.dcm", link])
    assert [s.image_id for s in sources] == ["1.2.3"]
    assert sources[0].path == path
    assert skipped == []
