"""How training picks its thresholds, checked against brute force: a classifier's own gate (the
threshold that maximises sensitivity + specificity, Youden's J) and the final component-area filter
(the best of the Kaggle Dice it reports). Found by planting bugs in pneumoseg/train and seeing which
survived: the only check of the gate was that it lies in [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from factories import TINY_TRAINING, training_config  # noqa: E402
from pneumoseg.data import make_synthetic_siim  # noqa: E402
from pneumoseg.models.model_dir import load_model_dir  # noqa: E402
from pneumoseg.train import train  # noqa: E402
from pneumoseg.train.engine import _youden_threshold  # noqa: E402


def _youden_j(labels: np.ndarray, scores: np.ndarray, t: float) -> float:
    """Sensitivity + specificity - 1 of predicting ``score >= t``, counted image by image."""
    predicted = scores >= t
    positives = labels == 1
    return float((predicted & positives).sum() / positives.sum() + (~predicted & ~positives).sum() / (~positives).sum() - 1)


def test_youden_threshold_by_hand():
    # Thresholds .8 .7 .6 take 1, 2, 3 of the 4 positives and no negative: J = 1/4, 2/4, 3/4; .4 adds
    # a negative (J = 3/4 - 1/3), .3 the last positive (J = 1 - 1/3 = 2/3), lower ones only negatives.
    # The best, .75, is at .6 alone.
    labels = np.array([0, 0, 1, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8])
    assert _youden_threshold(labels, scores) == 0.6


@pytest.mark.parametrize("seed", range(6))
def test_youden_threshold_reaches_the_brute_force_best(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = np.clip(0.3 * labels + np.round(rng.random(n), 1) * 0.7, 0, 1)  # ties on purpose
    best = max(_youden_j(labels, scores, t) for t in np.unique(scores))
    chosen = _youden_threshold(labels, scores)
    assert chosen in set(scores.tolist())
    assert _youden_j(labels, scores, chosen) == pytest.approx(best, abs=1e-12)


def test_youden_threshold_of_a_single_class_is_the_default():
    assert _youden_threshold(np.zeros(4, np.int64), np.array([0.1, 0.2, 0.3, 0.4])) == 0.5
    assert _youden_threshold(np.ones(3, np.int64), np.array([0.1, 0.2, 0.3])) == 0.5


def test_the_chosen_component_area_is_the_best_reported_one(tmp_path, monkeypatch):
    # A tiny run's network predicts so little that every area filter scores alike, and any choice
    # passes; painting every pixel at area 8 makes that filter worse, so only the best choice passes.
    from pneumoseg import postprocess as pp

    real = pp.postprocess

    def worse_at_8(probs, scores=None, **kwargs):
        out = real(probs, scores, **kwargs)
        return torch.ones_like(out) if kwargs.get("min_component_area") == 8 else out

    monkeypatch.setattr(pp, "postprocess", worse_at_8)
    make_synthetic_siim(tmp_path / "data", n_images=12, size=64, positive_fraction=0.5, seed=5)
    train(training_config(TINY_TRAINING, tmp_path / "data", validation__min_component_areas=[8, 0]), tmp_path / "run",
          progress=False)
    md = load_model_dir(tmp_path / "run")
    by_area = md.metrics["kaggle_dice_by_min_component_area"]
    assert by_area["8"] < by_area["0"]
    assert md.thresholds.min_component_area == 0
    assert md.metrics["kaggle_dice"] == by_area["0"] == max(by_area.values())
