"""The gate threshold chosen in segmenter training's validation (``Gate.scores`` on the validation
images) must hold at prediction: for the same images the Predictor's classifier gives the same
probabilities, with and without the chest crop, whether the classifier's input size is below or above
the segmenter's (both call ``pneumoseg.data.transforms.classifier_input``)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pneumoseg.data import chest_phantom, chest_crop, preprocess  # noqa: E402
from pneumoseg.data.transforms import classifier_input  # noqa: E402
from pneumoseg.infer import Predictor  # noqa: E402
from pneumoseg.models.model_dir import save_model_dir  # noqa: E402
from pneumoseg.train.engine import Gate  # noqa: E402

from infer_helpers import tiny_networks  # noqa: E402

SEGMENTER_SIZE = 96


def _phantoms(n: int = 6) -> np.ndarray:
    """Chest phantoms at the segmenter's size (so validation's images are the Predictor's inputs),
    shrunk inside a dark border so that the chest crop cuts something off."""
    out = np.zeros((n, SEGMENTER_SIZE, SEGMENTER_SIZE), np.uint8)
    for i in range(n):
        rng = np.random.default_rng([11, i])
        img, _ = chest_phantom(72, rng, bool(i % 2))
        r, c = 6 + 3 * i, 20 - 2 * i
        out[i, r:r + 72, c:c + 72] = img
    return out


@pytest.mark.parametrize("crop", [None, "chest"])
@pytest.mark.parametrize("gate_size", [64, 128])
def test_validation_gate_scores_equal_predictor_scores(tmp_path, crop, gate_size):
    images = _phantoms()
    if crop:  # the crop must be a real one, or the test proves nothing about it
        boxes = [chest_crop(img) for img in images]
        assert all(box != (0, SEGMENTER_SIZE, 0, SEGMENTER_SIZE) for box in boxes)
    networks = tiny_networks("classifier")
    md = save_model_dir(tmp_path / "md", networks, input_sizes={"segmenter": SEGMENTER_SIZE, "classifier": gate_size},
                        thresholds={"gate": 0.5}, crops={"classifier": crop} if crop else {})
    predicted = np.array([p.score for p in Predictor.from_dir(md.path, segment="all").predict(list(images), batch_size=4)])

    gate = Gate(networks["classifier"], gate_size, crop == "chest")
    validated = gate.scores(preprocess(images, SEGMENTER_SIZE)).numpy()

    assert predicted.std() > 0.01  # the scores spread, so equal ones are no accident of a flat network
    np.testing.assert_allclose(validated, predicted, rtol=0, atol=1e-5)
    if crop:  # cropping at the segmenter's size first (validation's old path) is what the tolerance catches
        from pneumoseg.data.transforms import crop_to_chest

        with torch.no_grad():
            old = torch.sigmoid(networks["classifier"](crop_to_chest(preprocess(images, SEGMENTER_SIZE), gate_size)))
        assert np.abs(old[:, 0].numpy() - predicted).max() > 1e-3


def test_chest_crop_happens_at_the_classifier_size():
    """The crop box is found and cut at the classifier's input size, as the classifier's training
    (``ChestCrop`` on its ``data.image_size`` images) and the Predictor make it."""
    x = preprocess(_phantoms(2), SEGMENTER_SIZE)
    small = torch.nn.functional.interpolate(x, size=64, mode="bilinear", align_corners=False, antialias=True)
    expected = []
    for image in small:
        r0, r1, c0, c1 = chest_crop(image[0])
        expected.append(torch.nn.functional.interpolate(image[None, :, r0:r1, c0:c1], size=64, mode="bilinear",
                                                        align_corners=False, antialias=True))
    torch.testing.assert_close(classifier_input(x, 64, "chest"), torch.cat(expected), rtol=0, atol=1e-6)
    torch.testing.assert_close(classifier_input(small, 64, None), small, rtol=0, atol=0)
