"""Every encoder against timm (the outside reference, ../shared/reference): the classifier's state-dict
names, shapes and order equal timm's, the parameter count too, and under the formula weights it gives
timm's float64 logits. Skipped where the reference file is absent."""

from __future__ import annotations

import pytest
import torch

from pneumoseg.models import ENCODERS, create_classifier
from timm_reference import formula_state_dict, load_reference, reference_input

TIMM_ENCODERS = sorted(name for name, spec in ENCODERS.items() if spec.timm_name is not None)


@pytest.fixture(scope="module")
def reference():
    ref = load_reference()
    if ref is None:
        pytest.skip("../shared/reference/timm_reference.json is not present")
    return ref


@pytest.mark.parametrize("name", TIMM_ENCODERS)
def test_classifier_equals_timm(reference, name):
    entry = reference.get(ENCODERS[name].timm_name)
    if entry is None:
        pytest.skip(f"the reference file has no entry for {ENCODERS[name].timm_name}")
    model = create_classifier(name, num_classes=1000, in_channels=3).double().eval()
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == [(e[0], e[1]) for e in entry["state_dict"]]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == entry["params"]
    model.load_state_dict(formula_state_dict(entry["state_dict"]), strict=True)
    with torch.no_grad():
        logits = model(reference_input(entry["input"]))
    expected = torch.tensor(entry["logits"], dtype=torch.float64)
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())
