"""The ``pneumoseg`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def _demo(args: argparse.Namespace) -> int:
    from . import cuda_available, rle
    from ._png import write_png
    from .samples import pneumothorax_mask

    mask = pneumothorax_mask(args.size, seed=args.seed)
    t0 = time.perf_counter()
    text = rle.encode(mask)
    t1 = time.perf_counter()
    back = rle.decode(text, mask.shape)
    t2 = time.perf_counter()
    ok = bool(np.array_equal(back, mask))
    runs = len(text.split()) // 2
    print(f"sample mask: {mask.shape[0]}x{mask.shape[1]}, {int(mask.sum())} foreground pixels, {runs} runs")
    print(f"SIIM RLE:    {text[:72]}{'...' if len(text) > 72 else ''}")
    print(f"encode {1e3 * (t1 - t0):.2f} ms, decode {1e3 * (t2 - t1):.2f} ms, round trip exact: {ok}")
    print(f"CUDA kernels available: {cuda_available()}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sample-rle.csv").write_text(f"ImageId,EncodedPixels\nsample,{text}\n")
        picture = np.stack([mask * 255, back * 255, np.zeros_like(mask)], axis=-1).astype(np.uint8)
        write_png(out / "sample-roundtrip.png", picture)
        print(f"wrote {out / 'sample-rle.csv'} and {out / 'sample-roundtrip.png'} (yellow: both agree)")
    return 0 if ok else 1


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
    demo = sub.add_parser("demo", help="run the built-in demo on the built-in sample data")
    demo.add_argument("--size", type=int, default=1024, help="sample image size (default 1024)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="pneumoseg-demo", help="folder for the outputs ('' for none)")
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
