"""The ``pneumoseg`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    for axis in (0, 1):
        for shift in (1, -1):
            inner &= np.roll(mask, shift, axis)
    return mask & ~inner


def _demo(args: argparse.Namespace) -> int:
    """The built-in pipeline on the built-in data: a synthetic SIIM-ACR study set is written in the
    Kaggle layout, read back through the DICOM and CSV readers, and every annotation goes through the
    native RLE codec and post-processing; a picture shows some studies with their masks."""
    from . import cuda_available, postprocess, rle
    from ._png import write_png
    from .data import find_dicoms, make_synthetic_siim, read_dicom, read_rle_csv

    out = Path(args.out)
    data_dir = out / "siim-synthetic"
    t0 = time.perf_counter()
    csv_path = make_synthetic_siim(data_dir, n_images=args.n, size=args.size, seed=args.seed, progress=True)
    t1 = time.perf_counter()
    rles, files = read_rle_csv(csv_path), find_dicoms(data_dir)
    images = {image_id: read_dicom(path).pixels for image_id, path in files.items()}
    t2 = time.perf_counter()
    ids = list(rles)
    masks = np.stack([rle.decode_union(rles[i], images[i].shape) for i in ids])
    # Post-processing as at inference (masks standing in for probabilities): must change nothing.
    strings = postprocess.postprocess(masks.astype(np.float32), top=0.75, min_area=1, bottom=0.5, to_rle=True)
    t3 = time.perf_counter()
    exact = all(np.array_equal(rle.decode(s, images[i].shape), m) for s, i, m in zip(strings, ids, masks))
    positives = int(sum(m.any() for m in masks))
    print(f"synthetic study set: {len(ids)} images {args.size}x{args.size} ({positives} with pneumothorax) in {data_dir}")
    print(f"write {t1 - t0:.2f} s, read {len(files)} JPEG-baseline DICOMs + CSV {t2 - t1:.2f} s, "
          f"decode + postprocess + encode {1e3 * (t3 - t2):.1f} ms")
    print(f"round trip exact: {exact}; CUDA kernels available: {cuda_available()}")
    shown = [i for i, m in zip(ids, masks) if m.any()][:3] + [i for i, m in zip(ids, masks) if not m.any()][:1]
    tiles = []
    for image_id in shown:
        img = images[image_id]
        rgb = np.repeat(img[..., None], 3, axis=2).astype(np.uint8)
        edge = _outline(rle.decode_union(rles[image_id], img.shape).astype(bool))
        rgb[edge] = (255, 40, 40)
        tiles.append(rgb)
    picture = out / "demo-studies.png"
    write_png(picture, np.concatenate(tiles, axis=1))
    print(f"wrote {picture} (red: annotated pneumothorax; the last study is negative)")
    return 0 if exact else 1


def _data_synth(args: argparse.Namespace) -> int:
    from .data.synthetic import make_synthetic_siim

    csv_path = make_synthetic_siim(args.out, n_images=args.n, size=args.size, positive_fraction=args.positive_fraction,
                                   seed=args.seed, progress=True)
    print(f"wrote {args.n} synthetic studies under {args.out} and {csv_path}")
    return 0


def _data_masks(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ._png import write_png
    from .data.siim import find_dicoms, read_rle_csv
    from .rle import decode_union

    rles = read_rle_csv(args.csv)
    shapes: dict[str, tuple[int, int]] = {}
    if args.dicoms:
        import pydicom

        for image_id, path in find_dicoms(args.dicoms).items():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            shapes[image_id] = (int(ds.Rows), int(ds.Columns))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    positives = 0
    for image_id, strings in tqdm(rles.items(), desc="masks", unit="image"):
        mask = decode_union(strings, shapes.get(image_id, tuple(args.shape)))
        positives += bool(mask.any())
        write_png(out / f"{image_id}.png", mask * 255)
    print(f"wrote {len(rles)} masks ({positives} with pneumothorax) to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumoseg", description="Pneumothorax classification and segmentation")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the built-in pipeline on the built-in synthetic data")
    demo.add_argument("--n", type=int, default=16, help="number of synthetic studies (default 16)")
    demo.add_argument("--size", type=int, default=512, help="image size (default 512)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="pneumoseg-demo", help="output folder (default pneumoseg-demo)")
    demo.set_defaults(func=_demo)

    data = sub.add_parser("data", help="data utilities").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write a synthetic study set in the SIIM-ACR Kaggle layout")
    synth.add_argument("--out", required=True, help="folder to write (dicom-images-train/ and train-rle.csv)")
    synth.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    synth.add_argument("--size", type=int, default=1024, help="image size (default 1024)")
    synth.add_argument("--positive-fraction", type=float, default=0.3)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_data_synth)
    masks = data.add_parser("masks", help="write one PNG mask per image of an RLE CSV (union of annotations)")
    masks.add_argument("--csv", required=True, help="train-rle.csv or stage_2_train.csv")
    masks.add_argument("--out", required=True, help="folder for <ImageId>.png")
    masks.add_argument("--shape", type=int, nargs=2, default=(1024, 1024), metavar=("H", "W"),
                       help="mask size when --dicoms is not given (default 1024 1024)")
    masks.add_argument("--dicoms", help="a DICOM folder to take each image's size from")
    masks.set_defaults(func=_data_masks)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import PneumosegError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PneumosegError as exc:  # bad input files: a clear message, not a traceback
        print(f"pneumoseg: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
