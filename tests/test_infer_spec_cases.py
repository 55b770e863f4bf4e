"""Cases of the Predictor's decisions and of ``collect_inputs`` worked out by hand from their
documented rules, each added by the mutation audit (round 2) where a planted bug passed the other
inference tests."""

from __future__ import annotations

import numpy as np
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


def _fixed_map_predictor(logit_map, **thresholds):
    """The tiny plain model directory's Predictor with its segmenter replaced by one that answers
    ``logit_map`` (64 x 64, the network size) for every image."""
    pred = Predictor.from_dir(model_dir("plain"), thresholds=thresholds)

    def run(part, *inputs):
        assert part == "segmenter"
        return (logit_map.expand(inputs[0].shape[0], 1, 64, 64).clone(),)

    pred.backend.run = run
    return pred


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def test_triplet_rule_counts_pixels_above_top_and_keeps_pixels_above_bottom():
    # 10 pixels at p = 0.9 (above top 0.8), 30 at p = 0.5 (between bottom 0.3 and top), the rest at
    # p = 0.1. With min_area 20 only 10 pixels pass top: no mask. With min_area 5 the image is
    # positive and its mask is every pixel above bottom: all 40.
    logits = torch.full((1, 1, 64, 64), _logit(0.1))
    logits[0, 0, 10, 10:20] = _logit(0.9)
    logits[0, 0, 30, 0:30] = _logit(0.5)
    common = {"bottom": 0.3, "top": 0.8, "min_component_area": 0}
    image = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    empty = _fixed_map_predictor(logits, min_area=20, **common).predict([image], return_masks=True)[0]
    assert empty.rle == "-1" and empty.mask.sum() == 0
    kept = _fixed_map_predictor(logits, min_area=5, **common).predict([image], return_masks=True)[0]
    want = np.zeros((64, 64), np.uint8)
    want[10, 10:20] = 1
    want[30, 0:30] = 1
    np.testing.assert_array_equal(kept.mask, want)


def test_a_small_colour_picture_with_its_channel_last_is_refused():
    # np.asarray(PIL image) of a 40 x 50 RGB picture is (40, 50, 3): not 40 images 3 pixels wide
    from pneumoseg.errors import InvalidInputError
    from pneumoseg.infer.inputs import collect_inputs

    with pytest.raises(InvalidInputError, match="colour"):
        collect_inputs(np.zeros((40, 50, 3), np.uint8))
    # the same numbers as 3 images of 40 x 50 (channel first) are three images
    sources, _ = collect_inputs(np.zeros((3, 40, 50), np.uint8))
    assert len(sources) == 3
