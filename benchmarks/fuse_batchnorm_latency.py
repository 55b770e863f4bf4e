"""Batch-1 latency of the torch backend with BatchNorm folded into the convolutions (the default) and
without (``fuse_batchnorm=False``): each network part alone and the whole ``predict``, the two
settings interleaved call by call so that load on a shared machine hits both alike. Reports the
medians and the ratio off / on.

    python benchmarks/fuse_batchnorm_latency.py                       # CPU: U-Net ResNet34 at 256 px,
                                                                      # EfficientNet-B4 classifier at 128
    python benchmarks/fuse_batchnorm_latency.py --threads 1 2
    python benchmarks/fuse_batchnorm_latency.py --device cuda --size 1024 --classifier-size 512   # issue 10's case
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pneumoseg.data import chest_phantom
from pneumoseg.infer import Predictor
from pneumoseg.models import create_classifier, create_segmenter
from pneumoseg.models.model_dir import save_model_dir


def build_dirs(root: Path, size: int, classifier_size: int, encoder: str, classifier: str) -> dict[str, Path]:
    torch.manual_seed(0)
    seg = create_segmenter("unet", encoder, in_channels=1)
    aux = create_segmenter("unet", encoder, in_channels=1, aux_classifier=True)
    cls = create_classifier(classifier, num_classes=1, in_channels=1)
    return {
        f"{classifier} classifier + U-Net {encoder}": save_model_dir(
            root / "two", {"segmenter": seg, "classifier": cls},
            input_sizes={"segmenter": size, "classifier": classifier_size}).path,
        f"U-Net {encoder} with its own gate": save_model_dir(root / "aux", {"segmenter": aux},
                                                              input_sizes={"segmenter": size}).path,
    }


def timed(fn, cuda: bool) -> tuple[float, float]:
    """(wall ms, this process's CPU ms). On a shared CPU the CPU time leaves out the time other
    processes held the cores; with several threads it is their sum, the work rather than the latency."""
    if cuda:
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3, (time.process_time() - cpu) * 1e3


def measure(path: Path, device: str, image: np.ndarray, reps: int) -> dict[str, dict[bool, np.ndarray]]:
    """name -> {folded: (reps, 2) array of (wall ms, CPU ms)}; folded and not folded alternate call
    by call, so that a shared machine's load falls on both alike."""
    cuda = device == "cuda"
    predictors = {fuse: Predictor.from_dir(path, device=device, segment="all", fuse_batchnorm=fuse)
                  for fuse in (True, False)}
    jobs: dict[str, dict[bool, object]] = {}
    for fuse, pred in predictors.items():
        pred.warmup(1)
        for part, size in pred.backend.input_sizes.items():
            x = torch.randn(1, 1, *size, device=device)
            inputs = (x,) if part != "decoder" else pred.backend.run("encoder", x)[1:]
            jobs.setdefault(f"part {part} alone", {})[fuse] = \
                lambda _b=pred.backend, _p=part, _i=inputs: _b.run(_p, *_i)
        jobs.setdefault("predict (end to end)", {})[fuse] = lambda _p=pred: _p.predict(image, batch_size=1)
    out = {}
    for name, pair in jobs.items():
        for fn in pair.values():
            fn()  # warm
        samples: dict[bool, list] = {True: [], False: []}
        for i in range(reps):
            for fuse in ((True, False) if i % 2 == 0 else (False, True)):
                samples[fuse].append(timed(pair[fuse], cuda))
        out[name] = {fuse: np.array(v) for fuse, v in samples.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=256, help="segmenter input size")
    ap.add_argument("--classifier-size", type=int, default=128)
    ap.add_argument("--encoder", default="resnet34")
    ap.add_argument("--classifier", default="efficientnet_b4")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op threads (CPU)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()

    image, _ = chest_phantom(args.size, np.random.default_rng(0), True)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = build_dirs(Path(tmp), args.size, args.classifier_size, args.encoder, args.classifier)
        for threads in (args.threads if args.device == "cpu" else [torch.get_num_threads()]):
            torch.set_num_threads(threads)
            print(f"\n{args.device}, {threads} thread(s), torch {torch.__version__}, batch 1, median of {args.reps}, "
                  f"segmenter {args.size} px, classifier {args.classifier_size} px")
            print(f"{'':54s} {'wall min':>19s} {'wall median':>19s} {'CPU median':>19s}")
            print(f"{'':54s}" + f" {'folded':>9s} {'not':>9s}" * 3 + "  (ms; not/folded)")
            for label, path in dirs.items():
                for name, runs in measure(path, args.device, image, args.reps).items():
                    on, off = runs[True], runs[False]
                    cols = [(on[:, 0].min(), off[:, 0].min()), (np.median(on[:, 0]), np.median(off[:, 0])),
                            (np.median(on[:, 1]), np.median(off[:, 1]))]
                    print(f"  {label[:30]:30s} {name:22s}" + "".join(f" {a:9.2f} {b:9.2f}" for a, b in cols)
                          + "   " + " ".join(f"{b / a:5.2f}x" for a, b in cols))

if __name__ == "__main__":
    main()
