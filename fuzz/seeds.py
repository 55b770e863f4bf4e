"""Writes the seed corpora under fuzz/corpus/ (python3 fuzz/seeds.py): a few readable cases per
harness, encoded as libFuzzer's FuzzedDataProvider reads them (integers taken from the end of the
input, most significant byte first; strings and the remaining bytes from the front)."""

from __future__ import annotations

import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "corpus"


class Seed:
    def __init__(self) -> None:
        self.front = b""
        self.tail: list[int] = []  # bytes in the order they are consumed from the end

    def byte(self, v: int) -> "Seed":
        self.tail.append(v & 0xFF)
        return self

    def in_range(self, lo: int, v: int) -> "Seed":  # ConsumeIntegralInRange over a range < 256
        return self.byte(v - lo)

    def u64(self, v: int) -> "Seed":
        for shift in range(56, -8, -8):
            self.byte(v >> shift)
        return self

    def i64(self, v: int) -> "Seed":  # ConsumeIntegral<int64_t>: INT64_MIN + the unsigned value
        return self.u64(v + 2**63)

    def text(self, s: bytes) -> "Seed":  # ConsumeRandomLengthString: ends at a backslash pair
        assert b"\\" not in s
        self.front += s + b"\\|"
        return self

    def rest(self, data: bytes) -> "Seed":  # ConsumeRemainingBytes
        self.front += data
        return self

    def bytes(self) -> bytes:
        return self.front + bytes(reversed(self.tail))


def rle_small(siim: bool, n: int, h: int, w: int, layout: int, texts: list[tuple[int, bytes]]) -> bytes:
    s = Seed().byte(0 if siim else 1).in_range(1, n).in_range(0, h).in_range(0, w).in_range(0, layout)
    s.in_range(0, 1).in_range(1, len(texts))
    for image, text in texts:
        s.in_range(0, image).text(text)
    return s.bytes()


def rle_huge(siim: bool, h: int, w: int, text: bytes) -> bytes:
    return Seed().byte(6 if siim else 7).i64(h).in_range(0, 0).i64(w).in_range(0, 0).text(text).bytes()


def encode_seed(absolute: bool, dtype: int, n: int, h: int, w: int, layout: int, data: bytes) -> bytes:
    s = Seed().byte(int(absolute)).in_range(0, dtype).in_range(0, n).in_range(0, h).in_range(0, w)
    return s.in_range(0, layout).in_range(0, 1).rest(data).bytes()


def components_seed(dtype: int, n: int, h: int, w: int, layout: int, connectivity: int, threshold: float | None,
                    triplet: tuple[float, int] | None, min_area: int, components: bool, data: bytes,
                    big: bool = False) -> bytes:
    s = Seed().byte(0xFF if big else 0).in_range(0, dtype)
    if not big:
        s.in_range(0, n).in_range(0, h).in_range(0, w)
    else:
        s.in_range(256, h).in_range(256, w)
    s.in_range(0, layout).in_range(0, 1).byte(0 if connectivity == 4 else 200)
    s.byte(int(threshold is not None)).byte(0xFF).u64(struct.unpack("<Q", struct.pack("<d", threshold or 0.0))[0])
    top, top_area = triplet or (0.75, 0)
    s.byte(int(triplet is not None)).byte(0xFF).u64(struct.unpack("<Q", struct.pack("<d", top))[0])
    s.byte(0).in_range(-1, top_area).byte(0).in_range(-1, min_area)
    s.byte(int(components)).byte(1)
    for _ in range(n):
        s.in_range(0, 1)
    return s.rest(data).bytes()


def loss_seed(logits: int, target: int, n: int, p: int, moderate: bool, clean: bool, data: bytes,
              focal: int = 0, per_image: bool = False) -> bytes:
    s = Seed().byte(logits).byte(target).byte(1).in_range(1, n).byte(1).in_range(1, p)
    s.byte(int(moderate)).byte(int(clean))
    for k in (1, 1, focal, 2, 1, 1):  # bce, dice, focal (x 0.5), gamma, smooth, pos_weight multiples
        s.byte(k)
    s.byte(int(per_image)).byte(0).byte(0).byte(1)
    return s.rest(data).bytes()


SEEDS = {
    "rle_decode": {
        "siim_4x4": rle_small(True, 1, 4, 4, 0, [(0, b"1 2 2 1")]),
        "absolute_5x3": rle_small(False, 1, 5, 3, 1, [(0, b"1 3 10 2")]),
        "empty_forms": rle_small(True, 2, 3, 3, 2, [(0, b"-1"), (1, b" \t\n")]),
        "zero_lengths": rle_small(True, 1, 6, 2, 3, [(0, b"0 0 3 2 0 0 1 1")]),
        "union_overlap": rle_small(False, 1, 4, 4, 4, [(0, b"2 5"), (0, b"4 6 16 1")]),
        "odd_count": rle_small(True, 1, 4, 4, 0, [(0, b"1 2 3")]),
        "negative_after": rle_small(True, 1, 4, 4, 0, [(0, b"-1 3")]),
        "huge_shape": rle_huge(True, 2**31, 2**31, b"0 1000000000000000000 5 7"),
        "huge_absolute": rle_huge(False, 2**40, 2**20, b"1152921504606846976 3"),
    },
    "rle_encode": {
        "uint8_checker": encode_seed(False, 2, 1, 5, 4, 0, bytes([1, 0, 0, 1, 1])),
        "float32_nan": encode_seed(True, 11, 2, 3, 3, 1, struct.pack("<4f", 0.0, float("nan"), -0.0, 1.0)),
        "bool_33_rows": encode_seed(False, 0, 1, 33, 2, 2, bytes([1] * 40 + [0] * 3)),
        "half_negzero": encode_seed(False, 9, 1, 4, 4, 3, bytes([0, 0x80, 1, 0, 0, 0x7C])),
        "empty": encode_seed(False, 2, 3, 0, 5, 0, b""),
        "broadcast_int64": encode_seed(True, 7, 2, 6, 3, 5, struct.pack("<3q", 0, 1, 2**62)),
    },
    "components": {
        "ring_8": components_seed(2, 1, 5, 5, 0, 8, None, None, 0, True,
                                  bytes([0, 1, 1, 1, 0, 1, 0, 0, 0, 1])),
        "float_threshold_4": components_seed(11, 2, 6, 7, 1, 4, 0.5, None, 2, False,
                                             struct.pack("<4f", 0.2, 0.9, 0.6, float("nan"))),
        "triplet_half": components_seed(9, 2, 8, 8, 2, 8, 0.4, (0.75, 3), 0, True,
                                        bytes([0x00, 0x3C, 0x00, 0x38, 0x00, 0x7C, 0x00, 0x00])),
        "nan_threshold": components_seed(12, 1, 4, 9, 3, 8, float("nan"), None, 1, True,
                                         struct.pack("<2d", 1.0, float("inf"))),
        "stripes_big": components_seed(2, 1, 260, 256, 0, 8, None, None, 5, True,
                                       bytes([1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 1]), big=True),
    },
    "loss": {
        "float32_moderate": loss_seed(2, 4, 2, 40, True, True, bytes(range(0, 250, 7))),
        "half_bool_focal": loss_seed(0, 0, 1, 257, True, True, bytes(range(3, 200, 3)), focal=1),
        "bf16_soft_per_image": loss_seed(1, 3, 3, 17, True, True, bytes(range(50)), per_image=True),
        "float64_raw": loss_seed(3, 5, 1, 9, False, False, struct.pack("<3d", float("nan"), 1e-310, -1e308)),
        "float32_bad_targets": loss_seed(2, 1, 1, 20, True, False, bytes([0, 1, 2, 255, 7])),
    },
}


if __name__ == "__main__":
    for harness, seeds in SEEDS.items():
        folder = ROOT / harness
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (folder / name).write_bytes(data)
    print(sum(len(s) for s in SEEDS.values()), "seeds under", ROOT)
