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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumoseg", description="Pneumothorax classification and segmentation")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the built-in demo on the built-in sample data")
    demo.add_argument("--size", type=int, default=1024, help="sample image size (default 1024)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="pneumoseg-demo", help="folder for the outputs ('' for none)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
