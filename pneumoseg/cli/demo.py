"""``pneumoseg demo``: the built-in pipeline on the built-in synthetic data."""

from __future__ import annotations

import argparse
import time

import numpy as np

from .types import image_side, int_in, path


def add_parser(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="run the built-in pipeline on the built-in synthetic data")
    demo.add_argument("--n", type=int_in(1, 10_000), default=16, help="number of synthetic studies (default 16)")
    demo.add_argument("--size", type=image_side(minimum=32), default=512, help="image size (default 512)")
    demo.add_argument("--seed", type=int_in(0), default=0)
    demo.add_argument("--out", type=path, default="pneumoseg-demo", help="output folder (default pneumoseg-demo)")
    demo.add_argument("--force", action="store_true",
                      help="write into --out even if it holds files pneumoseg did not write")
    demo.set_defaults(run=run)


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    for axis in (0, 1):
        for shift in (1, -1):
            inner &= np.roll(mask, shift, axis)
    return mask & ~inner


def run(args: argparse.Namespace) -> int:
    """The built-in pipeline on the built-in data: a synthetic SIIM-ACR study set is written in the
    Kaggle layout, read back through the DICOM and CSV readers, and every annotation goes through the
    native RLE codec and post-processing; a picture shows some studies with their masks."""
    from .. import cuda_available, postprocess, rle
    from .._fs import prepare_output_folder
    from ..data import find_dicoms, make_synthetic_siim, read_dicom, read_rle_csv

    folder = prepare_output_folder(args.out, overwrite=args.force, what="demo output folder")
    data_dir = folder.path / "siim-synthetic"
    t0 = time.perf_counter()
    csv_path = make_synthetic_siim(data_dir, n_images=args.n, size=args.size, seed=args.seed, progress=True,
                                   overwrite=args.force)
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
    picture = folder.write_png("demo-studies.png", image=np.concatenate(tiles, axis=1))
    print(f"wrote {picture} (red: annotated pneumothorax; the last study is negative)")
    return 0 if exact else 1
