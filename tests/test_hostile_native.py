"""Hostile input to the native core, each case in its own process: sizes that once crashed it (32-bit
index arithmetic) or made memory explode out of proportion to the input and the answer. Memory cases
run under an address-space limit set a little above what the process holds once its inputs exist,
so "memory scales with input and output" is checked, not assumed."""

from __future__ import annotations

import pytest

from isolated import run_isolated

BIG_LIMITS = {  # what a user would set to go past the default limits (see pneumoseg.limits)
    "PNEUMOSEG_MAX_IMAGE_SIDE": str(2**40),
    "PNEUMOSEG_MAX_IMAGE_PIXELS": str(2**40),
    "PNEUMOSEG_MAX_BATCH_BYTES": str(2**40),
}


def check(code: str, *, env=None, expect: str = "OK", timeout: float = 120) -> None:
    result = run_isolated(code, env=env, timeout=timeout)
    assert result.returncode == 0 and expect in result.stdout, result.describe()


# --- class 1: the crash (a column index held in 32 bits) --------------------------------------------------


def test_decode_past_2_to_31_columns_is_refused_by_default():
    check("""
        from pneumoseg import rle, RLEError, LimitError
        try:
            rle.decode("2147483649 3", (1, 2**31 + 8))
        except RLEError as exc:
            assert isinstance(exc, LimitError) and "max_image_side" in str(exc), exc
            print("OK")
    """)


def test_decode_past_2_to_31_columns_is_right_with_raised_limits():
    # The output is 2 GiB of zeros (untouched pages cost no memory); painting three pixels must
    # touch only them, with 64-bit index arithmetic all the way.
    check("""
        import numpy as np
        from pneumoseg import rle
        limit_memory(2048 + 256)
        out = rle.decode("2147483649 3", (1, 2**31 + 8))
        assert out.shape == (1, 2**31 + 8)
        np.testing.assert_array_equal(out[0, 2147483640:2147483656], [0] * 9 + [1, 1, 1] + [0] * 4)
        assert rss_bytes() < 2**30, rss_bytes()
        print("OK")
    """, env=BIG_LIMITS)


def test_postprocess_past_2_to_31_pixels_is_a_clear_error():
    # Labels are int32 by contract, so images of 2**31 pixels are refused by the native core (the
    # input here is a broadcast view: no memory behind it).
    check("""
        import numpy as np
        from pneumoseg import postprocess, InvalidInputError
        big = np.broadcast_to(np.zeros(1, np.uint8), (1, 2**16, 2**15 + 1))
        try:
            postprocess.remove_small_components(big, 4)
        except InvalidInputError as exc:
            assert "2^31" in str(exc), exc
            print("OK")
    """)


# --- class 4: memory out of proportion to the input and the answer ---------------------------------------


@pytest.mark.parametrize("call", [
    'rle.decode("-1", (0, 2**30))',
    'rle.decode("", (2**30, 0))',
    'rle.decode_batch([], (2**31, 0))',
    'rle.decode_batch(["-1", "-1"], (0, 2**31))',
    'rle.decode_union(["-1"] * 1000, (2**31, 0))',
])
def test_empty_answers_allocate_nothing(call):
    check(f"""
        from pneumoseg import rle
        limit_memory(64)
        out = {call}
        assert out.size == 0, out.shape
        print("OK")
    """, env=BIG_LIMITS)


@pytest.mark.parametrize("call", [
    'rle.decode("-1", (0, 2**30))',
    'rle.decode_batch([], (2**31, 0))',
    'rle.decode("1 1", (70000, 70000))',
    'rle.decode_batch(["-1"] * 3000, (1024, 1024))',
])
def test_default_limits_refuse_before_allocating(call, monkeypatch):
    check(f"""
        import pneumoseg
        from pneumoseg import rle
        limit_memory(64)
        try:
            {call}
        except pneumoseg.LimitError as exc:
            assert "pneumoseg.limits.set_limits" in str(exc) and "PNEUMOSEG_MAX_" in str(exc), exc
            print("OK")
    """, env={"PNEUMOSEG_MAX_BATCH_BYTES": str(2**31)})


def test_union_of_many_overlapping_annotations_costs_the_union():
    # 2**19 copies of a full-image run: painting them one by one would need 2**19 * 1024 column
    # pieces (gigabytes); merged first, the answer is one run.
    check("""
        import numpy as np
        from pneumoseg import rle
        texts = ["0 1048576"] * 2**19 + ["5 3"] * 1000
        limit_memory(200)
        out = rle.decode_union(texts, (1024, 1024))
        assert out.all()
        print("OK")
    """, timeout=180)


def test_union_of_disjoint_annotations_is_exact():
    check("""
        import numpy as np
        from pneumoseg import rle
        rng = np.random.default_rng(0)
        h, w = 37, 53
        expected = np.zeros(h * w, np.uint8)
        texts = []
        for _ in range(3000):
            start = int(rng.integers(0, h * w)); length = int(rng.integers(0, 40))
            length = min(length, h * w - start)
            expected[start:start + length] = 1
            texts.append(f"{start + 1} {length}")
        out = rle.decode_union(texts, (h, w), style="absolute")
        np.testing.assert_array_equal(out, expected.reshape(w, h).T)
        print("OK")
    """)


@pytest.mark.slow
def test_encoding_a_dense_mask_stays_near_the_size_of_its_text():
    # Every other row set: every pixel is a transition, the text is "1 1 1 ..." (2 bytes a pixel).
    # The whole encode must fit in 3x the text (the text once in C++ and once in Python, plus the
    # bounded strip buffers); transition lists over the whole mask would need 10x.
    check("""
        import numpy as np
        from pneumoseg import rle
        h = w = 8192
        mask = np.zeros((h, w), np.uint8)
        mask[1::2] = 1
        text_bytes = 2 * h * w - 1
        limit_memory(3 * text_bytes // 2**20 + 64)
        text = rle.encode(mask)
        assert len(text) == text_bytes and text.count("1 ") == h * w - 1 and text.endswith("1")
        print("OK")
    """, timeout=180)


def test_large_masks_encode_like_small_ones():
    # A mask wide enough to be formatted in several strips gives exactly the text of the reference.
    check("""
        import numpy as np
        from pneumoseg import rle
        rng = np.random.default_rng(3)
        mask = (rng.random((1500, 1400)) < 0.3).astype(np.uint8)
        mask[:, 700:720] = 1  # runs crossing columns inside and across strips
        flat = np.concatenate([[0], mask.T.ravel(), [0]])
        t = np.flatnonzero(flat[1:] != flat[:-1])
        numbers = np.empty(t.size, np.int64)
        numbers[0::2] = t[0::2] - np.concatenate([[0], t[1::2][:-1]])
        numbers[1::2] = t[1::2] - t[0::2]
        assert rle.encode(mask) == " ".join(map(str, numbers.tolist()))
        assert rle.decode(rle.encode(mask), mask.shape).tolist() == mask.tolist()
        print("OK")
    """)


def test_postprocess_scratch_is_released_after_a_huge_image():
    # An 8192^2 image needs 256 MB of label scratch; it must not stay with the thread afterwards.
    check("""
        import numpy as np
        from pneumoseg import postprocess
        mask = np.zeros((8192, 8192), np.uint8)
        mask[100:200, 100:300] = 1
        mask[4000:4003, 5000:5003] = 1
        before = rss_bytes()
        out = postprocess.remove_small_components(mask, 100)
        grown = rss_bytes() - before
        assert out.sum() == 100 * 200, out.sum()
        assert grown < 100 * 2**20, f"{grown / 2**20:.0f} MiB still held"
        print("OK")
    """, timeout=180)
