"""onnxruntime int8 against fp32 on a CPU, per image, at several batch sizes and thread counts, the two
interleaved (fp32, int8, int8, fp32, ...) so that a shared machine's load falls on both alike.

    python benchmarks/ort_int8_batch.py                                # U-Net ResNet34 512 from 1024
    python benchmarks/ort_int8_batch.py --threads 1 --batches 1 16 --rounds 5
    python benchmarks/ort_int8_batch.py --profile --threads 1          # + onnxruntime's per-op times

For each thread count and batch it times the network parts alone (the onnxruntime sessions of the
encoder and decoder, as the backend runs them) and the whole Predictor (``segment="all"``, in-memory
1024x1024 phantoms), and prints ms per image (median and range over the rounds) with the fp32 / int8
ratio of each round's pair (median and range). The Predictor's stages show what is not the network:
preprocessing, post-processing and RLE cost the same in both. ``--profile`` adds onnxruntime's profile
per operator type of each part and precision, as ms per image and share of the part's kernel time.

The model is bench_pipeline.py's timing model: random weights with a classification head on the
encoder (the gate), exported to ONNX fp32 and int8 (calibrated on 8 phantoms), built in about a minute
into ``--model-dir`` (a temporary folder unless given; reused when it already holds the exports).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PARTS = ("encoder", "decoder")
PRECISIONS = ("fp32", "int8")


def phantoms(original: int, n: int) -> list:
    from pneumoseg.data import chest_phantom

    return [chest_phantom(original, np.random.default_rng([42, i]), bool(i % 3 == 0))[0] for i in range(n)]


def build_model(path: Path, encoder: str, size: int, original: int) -> Path:
    """bench_pipeline.timing_model's network and exports, unless ``path`` already holds them."""
    from pneumoseg.export.onnx import export_onnx
    from pneumoseg.models import create_segmenter
    from pneumoseg.models.model_dir import load_model_dir, save_model_dir

    if (path / "pneumoseg.json").exists():
        md = load_model_dir(path)
        if all(f"{part}-onnx-{p}" in md.artefacts for part in PARTS for p in PRECISIONS):
            return path
    torch.manual_seed(0)
    net = create_segmenter("unet", encoder, in_channels=1, aux_classifier=True).eval()
    thresholds = {"gate": 0.0, "top": None, "bottom": 0.5, "min_component_area": 0}
    save_model_dir(path, {"segmenter": net}, input_sizes={"segmenter": size}, thresholds=thresholds)
    calibration = phantoms(original, 8)
    export_onnx(path, "fp32", validation=calibration[:2])
    export_onnx(path, "int8", calibrate=calibration, min_dice=0.0)  # random weights: nothing to agree on
    return path


def sessions(md, precision: str, threads: int, **extra) -> dict:
    from pneumoseg._onnxruntime import import_onnxruntime
    from pneumoseg.export.sessions import session_options

    ort = import_onnxruntime()  # telemetry off, as in the package

    out = {}
    for part in PARTS:
        options = session_options(threads)
        for name, value in extra.items():
            setattr(options, name, value.format(part=part, precision=precision) if isinstance(value, str) else value)
        out[part] = ort.InferenceSession(str(md.artefact_path(f"{part}-onnx-{precision}")), sess_options=options,
                                         providers=["CPUExecutionProvider"])
    return out


def network_runner(parts: dict, x: np.ndarray):
    """The two parts as the backend runs them: the encoder's features go to the decoder as fp32."""
    names = [o.name for o in parts["encoder"].get_outputs()]

    def run() -> dict:
        t0 = time.perf_counter()
        features = {n: v for n, v in zip(names, parts["encoder"].run(None, {"image": x})) if n.startswith("f")}
        t1 = time.perf_counter()
        parts["decoder"].run(None, features)
        t2 = time.perf_counter()
        return {"encoder": t1 - t0, "decoder": t2 - t1, "total": t2 - t0}

    return run


def predictor_runner(model_dir: Path, precision: str, threads: int, images: list):
    from pneumoseg.infer import Predictor

    p = Predictor.from_dir(model_dir, backend="onnxruntime", precision=precision, segment="all", threads=threads)
    p.warmup(len(images))

    def run() -> dict:
        timings = p.predict(images, batch_size=len(images))[0].timings
        return {k: v / 1e3 for k, v in timings.items() if k != "load"}

    return run


def interleaved(runners: dict, rounds: int) -> dict:
    for run in runners.values():  # a session plans its memory on the first run and allocates it on the second
        run()
        run()
    samples: dict = {k: [] for k in runners}
    for r in range(rounds):
        for k in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
            samples[k].append(runners[k]())
    return samples


def summary(samples: dict, batch: int) -> str:
    def per_image(k, stage="total"):
        return np.array([s[stage] for s in samples[k]]) * 1e3 / batch

    fp32, int8 = per_image("fp32"), per_image("int8")
    ratio = fp32 / int8
    line = (f"fp32 {np.median(fp32):7.1f} [{fp32.min():.1f}-{fp32.max():.1f}]  int8 {np.median(int8):7.1f} "
            f"[{int8.min():.1f}-{int8.max():.1f}] ms/img  fp32/int8 {np.median(ratio):.2f} [{ratio.min():.2f}-{ratio.max():.2f}]")
    stages = [s for s in samples["fp32"][0] if s != "total"]
    for k in PRECISIONS:
        line += f"\n      {k}: " + "  ".join(f"{s} {np.median(per_image(k, s)):.1f}" for s in stages)
    return line


def profile(md, threads: int, batch: int, x: np.ndarray, runs: int) -> None:
    """onnxruntime's per-node profile of each part, summed per operator type over ``runs`` runs after
    two untimed ones."""
    for precision in PRECISIONS:
        folder = tempfile.mkdtemp(prefix="pneumoseg-ort-profile-")
        parts = sessions(md, precision, threads, enable_profiling=True,
                         profile_file_prefix=os.path.join(folder, "{part}"))
        run = network_runner(parts, x)
        run()
        run()
        starts = []
        for _ in range(runs):
            starts.append(time.perf_counter())
            run()
        for part, session in parts.items():
            trace = Path(session.end_profiling())
            events = json.loads(trace.read_text())
            trace.unlink()
            model_runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
            first_timed = model_runs[2]
            by_op: collections.Counter = collections.Counter()
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_timed:
                    by_op[e["args"].get("op_name")] += e["dur"]
            total = sum(by_op.values())
            print(f"    profile {part} {precision}, threads {threads}, batch {batch}: {total / 1e3 / runs / batch:.1f} ms/img of kernels")
            for op, us in by_op.most_common(8):
                print(f"      {op:24s} {us / 1e3 / runs / batch:7.2f} ms/img {100 * us / total:5.1f}%")
        os.rmdir(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=None, help="where the timing model is built or reused")
    ap.add_argument("--encoder", default="resnet34")
    ap.add_argument("--size", type=int, default=512, help="network input")
    ap.add_argument("--original", type=int, default=1024, help="radiograph size")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--network-only", action="store_true", help="skip the whole Predictor")
    ap.add_argument("--profile", action="store_true", help="onnxruntime's per-op times of each part")
    args = ap.parse_args()

    from pneumoseg.data import preprocess
    from pneumoseg.models.model_dir import load_model_dir

    path = args.model_dir or Path(tempfile.mkdtemp(prefix="pneumoseg-ort-int8-")) / "model"
    md = load_model_dir(build_model(path, args.encoder, args.size, args.original))
    pool = phantoms(args.original, max(args.batches))
    print(f"U-Net {args.encoder} {args.size} from {args.original}, {args.rounds} interleaved rounds, "
          f"onnxruntime {__import__('onnxruntime').__version__}, model {path}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            images = pool[:batch]
            x = preprocess(np.stack(images), args.size).numpy()
            samples = interleaved({p: network_runner(sessions(md, p, threads), x) for p in PRECISIONS}, args.rounds)
            print(f"threads {threads} batch {batch:2d} network   " + summary(samples, batch), flush=True)
            if not args.network_only:
                samples = interleaved({p: predictor_runner(path, p, threads, images) for p in PRECISIONS}, args.rounds)
                print(f"threads {threads} batch {batch:2d} Predictor " + summary(samples, batch), flush=True)
            if args.profile:
                profile(md, threads, batch, x, max(1, 16 // batch))


if __name__ == "__main__":
    main()
