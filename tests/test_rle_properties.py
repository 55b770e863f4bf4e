"""Property-based tests and fuzzing of the RLE codec (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import pneumoseg  # noqa: E402
from pneumoseg import rle  # noqa: E402
from reference import ref_decode, ref_encode  # noqa: E402
from test_rle import STYLES, units_twin  # noqa: E402

# --- properties --------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
               elements=st.integers(0, 1)),
    st.sampled_from(STYLES),
)
def test_round_trip_property(mask, style):
    text = rle.encode(mask, style=style)
    assert text == ref_encode(mask, style)
    np.testing.assert_array_equal(rle.decode(text, mask.shape, style=style), mask)
    assert units_twin(mask[None], style) == [text]


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789 -\t\nx.+")), max_size=40),
       st.integers(0, 9), st.integers(0, 9), st.sampled_from(STYLES))
def test_decoder_fuzz_never_writes_outside(text, h, w, style):
    """Any text either decodes to a 0/1 mask equal to the reference or raises RLEError."""
    try:
        out = rle.decode(text, (h, w), style=style)
    except pneumoseg.RLEError:
        return
    assert out.shape == (h, w) and set(np.unique(out).tolist()) <= {0, 1}
    np.testing.assert_array_equal(out, ref_decode(text, (h, w), style))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=12), st.integers(0, 6), st.integers(0, 6), st.sampled_from(STYLES))
def test_decoder_fuzz_numbers_near_the_border(numbers, h, w, style):
    text = " ".join(map(str, numbers))
    try:
        out = rle.decode(text, (h, w), style=style)
    except pneumoseg.RLEError as e:
        assert str(e)  # the message says what was wrong
        return
    np.testing.assert_array_equal(out, ref_decode(text, (h, w), style))
