"""``pneumoseg data ...``: the synthetic study set and PNG masks from an RLE CSV."""

from __future__ import annotations

import argparse
import sys

from .types import add_no_progress, image_side, int_in, path, probability


def add_parser(subparsers) -> None:
    data = subparsers.add_parser("data", help="data utilities")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    synth = sub.add_parser("synth", help="write a synthetic study set in the SIIM-ACR Kaggle layout")
    synth.add_argument("--out", type=path, required=True,
                       help="folder to write (dicom-images-train/ and train-rle.csv); new, empty or pneumoseg's "
                       "own earlier output")
    synth.add_argument("--n", type=int_in(1, 10**7), default=64, help="number of images (default 64)")
    synth.add_argument("--size", type=image_side(minimum=32), default=1024, help="image size (default 1024)")
    synth.add_argument("--positive-fraction", type=probability, default=0.3,
                       help="share of images with a pneumothorax, in [0, 1] (default 0.3)")
    synth.add_argument("--seed", type=int_in(0), default=0)
    synth.add_argument("--force", action="store_true",
                       help="write into --out even if it holds files pneumoseg did not write")
    add_no_progress(synth)
    synth.set_defaults(run=run_synth)

    masks = sub.add_parser("masks", help="write one PNG mask per image of an RLE CSV (union of annotations)")
    masks.add_argument("--csv", type=path, required=True, help="train-rle.csv or stage_2_train.csv")
    masks.add_argument("--out", type=path, required=True,
                       help="folder for <ImageId>.png; new, empty or pneumoseg's own earlier output")
    masks.add_argument("--shape", type=image_side(), nargs=2, default=(1024, 1024), metavar=("H", "W"),
                       help="mask size when --dicoms is not given (default 1024 1024)")
    masks.add_argument("--dicoms", type=path, help="a DICOM folder to take each image's size from")
    masks.add_argument("--force", action="store_true",
                       help="write into --out even if it holds files pneumoseg did not write")
    add_no_progress(masks)
    masks.set_defaults(run=run_masks)

    cache = sub.add_parser("cache", help="decode every DICOM once into a memory-mapped uint8 cache for training")
    cache.add_argument("--root", type=path, required=True, help="the DICOM folder (any nesting of *.dcm)")
    cache.add_argument("--csv", type=path, help="the RLE CSV (then only its images, with their masks)")
    cache.add_argument("--size", type=image_side(minimum=8), default=1024, help="cached image size (default 1024)")
    cache.add_argument("--out", type=path, required=True,
                       help="cache folder to write; new, empty or pneumoseg's own earlier output")
    cache.add_argument("--workers", type=int_in(1, 256), help="decoding threads (default: up to 8)")
    cache.add_argument("--force", action="store_true",
                       help="write into --out even if it holds files pneumoseg did not write")
    add_no_progress(cache)
    cache.set_defaults(run=run_cache)


def run_synth(args: argparse.Namespace) -> int:
    from ..data.synthetic import make_synthetic_siim

    csv_path = make_synthetic_siim(args.out, n_images=args.n, size=args.size, positive_fraction=args.positive_fraction,
                                   seed=args.seed, progress=not args.no_progress, overwrite=args.force)
    print(f"wrote {args.n} synthetic studies under {args.out} and {csv_path}")
    return 0


def run_masks(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .. import limits
    from .._fs import OutputKind, prepare_output_folder, safe_file_names
    from ..data.dicom import read_dicom_shape
    from ..data.siim import find_dicoms, read_rle_csv
    from ..rle import decode_union

    # Every input is read and every file name checked before the output folder is touched.
    height, width = args.shape
    limits.check_image(height, width, f"--shape {height} {width}")
    rles = read_rle_csv(args.csv)
    names = safe_file_names(rles, ".png")
    shapes: dict[str, tuple[int, int]] = {}
    if args.dicoms:
        files = find_dicoms(args.dicoms)
        for p, reason in files.skipped:
            print(f"pneumoseg: skipped {p}: {reason}", file=sys.stderr)
        for image_id, dicom_path in files.items():
            if image_id in rles:
                shapes[image_id] = read_dicom_shape(dicom_path)
    # a failure inside the block puts the folder's earlier output back (see pneumoseg._fs)
    with prepare_output_folder(args.out, overwrite=args.force, what=OutputKind.MASKS,
                               inputs=(args.csv, args.dicoms)) as folder:
        positives = 0
        for image_id, strings in tqdm(rles.items(), desc="masks", unit="image", disable=args.no_progress):
            mask = decode_union(strings, shapes.get(image_id, (height, width)))
            positives += bool(mask.any())
            folder.write_png(names[image_id], image=mask * 255)
    print(f"wrote {len(rles)} masks ({positives} with pneumothorax) to {folder.path}")
    return 0


def run_cache(args: argparse.Namespace) -> int:
    from ..data.cache import build_cache

    index = build_cache(args.root, args.csv, size=args.size, out=args.out, workers=args.workers, overwrite=args.force,
                        progress=not args.no_progress)
    print(f"wrote the cache {args.out} ({index.name} lists its images); train with --cache {args.out} "
          "or data.cache in the config")
    return 0
