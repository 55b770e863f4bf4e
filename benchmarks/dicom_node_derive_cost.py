"""What the DICOM node spends per positive image on its two outputs (``DicomNode(write_overlay=True)``:
the SEG and the Secondary Capture overlay, built and written atomically into its output folder), with
the received file read once for both (the node's way) against read by each builder (the SEG its header,
the overlay the whole file: the node before it read once), interleaved, median of ``--repeats`` each.

    python benchmarks/dicom_node_derive_cost.py [--repeats 30] [--dicom FILE]

The source is dicom_seg_cost.py's: the real SIIM file with the largest annotation (1024x1024 JPEG
baseline) and its mask, or a synthetic 1024x1024 study; ``--dicom`` gives another (a made-up mask)."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dicom_seg_cost import _Predictor, source_and_mask  # noqa: E402

from pneumoseg import rle  # noqa: E402
from pneumoseg.data.dicom import read_sop_instance_uid  # noqa: E402
from pneumoseg.infer.predictor import Prediction  # noqa: E402
from pneumoseg.serve.node import DicomNode, _Item, _now  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dicom", type=Path, default=None, help="a DICOM file to use as the source")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        path, mask = source_and_mask(args.dicom, Path(scratch))
        uid = read_sop_instance_uid(path)
        pred = Prediction(image_id=uid, score=0.9, rle=rle.encode(mask), n_components=1, shape=tuple(mask.shape),
                          segmented=True, path=str(path), mask=mask, source_uid=uid)
        item = _Item(uid, Path(path), "SCU", _now(), time.monotonic())  # the file stays where it is: _derive reads it
        with DicomNode(_Predictor, Path(scratch) / "out", port=0, write_overlay=True) as node:
            read_once = node._derive_sources

            def derive(once: bool) -> float:
                node._derive_sources = read_once if once else (lambda item: (item.path, item.path))  # type: ignore[method-assign]
                row = {"Error": "", "Seg": "", "Overlay": "", "Forwarded": ""}
                start = time.perf_counter()
                node._derive(item, pred, row)
                seconds = time.perf_counter() - start
                assert row["Seg"] and row["Overlay"] and not row["Error"], row
                return seconds * 1e3

            ways = {"read once": True, "read by each builder": False}
            for once in ways.values():  # imports and first-call costs out of the figures
                derive(once)
            times: dict[str, list[float]] = {k: [] for k in ways}
            for i in range(args.repeats):
                for name in (list(ways) if i % 2 == 0 else list(ways)[::-1]):  # each first in turn
                    times[name].append(derive(ways[name]))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"source {Path(path).name} {mask.shape[0]}x{mask.shape[1]}, SEG + DICOM overlay per positive image, "
          f"{args.repeats} repeats each, interleaved")
    for k in ways:
        print(f"  {k:21s} median {med[k]:7.2f} ms  (min {min(times[k]):.2f}, max {max(times[k]):.2f})")
    print(f"  saved by reading once: {med['read by each builder'] - med['read once']:.2f} ms "
          f"({1 - med['read once'] / med['read by each builder']:.0%})")


if __name__ == "__main__":
    main()
