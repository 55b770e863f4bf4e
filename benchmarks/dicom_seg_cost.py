"""What `pneumoseg predict --dicom-seg` and `--dicom-overlay` add per positive image: writing its DICOM
SEG (header read, highdicom build, atomic write into the output folder) and its DICOM Secondary Capture
overlay (the file read again, windowed, drawn, captioned, highdicom build, atomic write) against the PNG
overlay the command already writes for it (the file read again, windowed, drawn and PNG-encoded), all
through the command's own functions, interleaved, median of ``--repeats`` each.

    python benchmarks/dicom_seg_cost.py [--repeats 20] [--dicom FILE]

The default source is the real SIIM file with the largest annotation (../shared/data/siim-sample,
1024x1024 JPEG baseline) and its train-rle.csv mask; without it, a synthetic 1024x1024 study."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pneumoseg import rle  # noqa: E402
from pneumoseg._fs import prepare_output_folder  # noqa: E402
from pneumoseg.cli.predict import write_dicom_overlay, write_overlay, write_segmentation  # noqa: E402
from pneumoseg.data import make_synthetic_siim, read_dicom_shape, read_rle_csv  # noqa: E402
from pneumoseg.data.dicom import read_sop_instance_uid  # noqa: E402
from pneumoseg.infer.predictor import Prediction  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "siim-sample"


def source_and_mask(dicom: Path | None, scratch: Path) -> tuple[Path, np.ndarray]:
    if dicom is not None:
        shape = read_dicom_shape(dicom)
        mask = np.zeros(shape, dtype=np.uint8)
        mask[shape[0] // 4: shape[0] // 2, shape[1] // 5: shape[1] // 3] = 1
        return dicom, mask
    root = SAMPLE if (SAMPLE / "train-rle.csv").is_file() else None
    if root is None:
        root = scratch / "siim"
        make_synthetic_siim(root, n_images=4, size=1024, positive_fraction=1.0, seed=0)
    rows = read_rle_csv(next(root.rglob("*.csv")))
    files = {p.stem: p for p in root.rglob("*.dcm")}
    masks = {uid: rle.decode_union(r, read_dicom_shape(files[uid])) for uid, r in rows.items() if r != ["-1"]}
    uid = max(masks, key=lambda u: int(masks[u].sum()))
    return files[uid], masks[uid]


class _Predictor:  # what write_segmentation reads of a Predictor
    class backend:
        name, precision = "torch", "fp32"

    class model_dir:
        path = Path("model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dicom", type=Path, default=None, help="a DICOM file to use as the source")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        path, mask = source_and_mask(args.dicom, Path(scratch))
        pred = Prediction(image_id=path.stem, score=0.9, rle=rle.encode(mask), n_components=1,
                          shape=tuple(mask.shape), segmented=True, path=str(path), mask=mask,
                          source_uid=read_sop_instance_uid(path))  # as the Predictor records it
        writers = {  # each writes one file per call, as the command does per positive image
            "overlay": lambda folder, name: write_overlay(folder, f"{name}.png", pred),
            "seg": lambda folder, name: write_segmentation(folder, f"{name}.dcm", pred, _Predictor) is None,
            "dicom-overlay": lambda folder, name: write_dicom_overlay(folder, f"{name}.dcm", pred) is None,
        }
        files = {"overlay": "overlays/0.png", "seg": "seg/0.dcm", "dicom-overlay": "dicom-overlay/0.dcm"}
        times: dict[str, list[float]] = {k: [] for k in writers}
        with prepare_output_folder(Path(scratch) / "out") as folder:
            for write in writers.values():  # imports and first-call costs out of the figures
                assert write(folder, "warm")
            names = list(writers)
            for i in range(args.repeats):
                for what in names[i % len(names):] + names[:i % len(names)]:  # each first in turn
                    start = time.perf_counter()
                    assert writers[what](folder, str(i))
                    times[what].append((time.perf_counter() - start) * 1e3)
            sizes = {k: (folder.path / f).stat().st_size for k, f in files.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"source {path.name} {mask.shape[0]}x{mask.shape[1]}, mask {int(mask.sum())} px, {args.repeats} repeats each, "
          "interleaved")
    for k in writers:
        print(f"  {k:13s} median {med[k]:7.2f} ms  (min {min(times[k]):.2f}, max {max(times[k]):.2f})  "
              f"file {sizes[k] / 1024:.0f} KiB")
    print(f"  SEG / PNG overlay: {med['seg'] / med['overlay']:.2f}x; DICOM overlay / PNG overlay: "
          f"{med['dicom-overlay'] / med['overlay']:.2f}x")


if __name__ == "__main__":
    main()
