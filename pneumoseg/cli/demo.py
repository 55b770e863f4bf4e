"""``pneumoseg demo``: the whole job on the built-in synthetic data, in one to two minutes on two CPU cores.

Synthesise a SIIM-ACR study set (Kaggle layout) and a held-out one, train the classifier and the
segmenter briefly (the ``demo`` recipe), export ONNX, run the two-stage inference on the held-out
studies with torch and with onnxruntime, and write what a user hands in and looks at: the submission,
overlays, the metrics (Kaggle Dice, AUC, pictures) and a latency table per stage and backend. The demo
fails (exit code 1) unless its Kaggle Dice beats the all-empty submission's by a clear margin.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from .types import add_no_progress, image_side, int_in, path

#: how far above the all-empty submission's Kaggle Dice the demo's must be
MARGIN = 0.05
#: share of synthetic studies with a pneumothorax
POSITIVE_FRACTION = 0.3
BACKENDS = ("torch", "onnxruntime")


def add_parser(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo", help="train, export and predict on built-in synthetic data (README's main job, 1-2 minutes)",
        description="Synthesise a study set, train the classifier and segmenter briefly (the demo recipe), export "
                    "ONNX, predict held-out studies with torch and onnxruntime, and write submission.csv, overlays, "
                    "metrics and a latency table under --out. Prints the Kaggle Dice.")
    demo.add_argument("--n", type=int_in(8, 10_000), default=96, help="training studies (default 96)")
    demo.add_argument("--held-out", type=int_in(4, 10_000), default=32, help="held-out studies (default 32)")
    demo.add_argument("--size", type=image_side(minimum=64), default=256, help="radiograph size (default 256)")
    demo.add_argument("--seed", type=int_in(0), default=0)
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a field of the demo training recipe (repeatable), e.g. --set epochs=4")
    demo.add_argument("--out", type=path, default="pneumoseg-demo", help="output folder (default pneumoseg-demo)")
    demo.add_argument("--force", action="store_true",
                      help="write into --out even if it holds files pneumoseg did not write")
    add_no_progress(demo)
    demo.set_defaults(run=run)


def _latency_table(rows: dict[str, dict]) -> str:
    stages = ("load", "preprocess", "classify", "segment", "postprocess", "rle", "total")
    lines = [f"{'ms per image, p50/p95':<24}" + "".join(f"{s:>14}" for s in stages) + f"{'images/s':>11}"]
    for name, row in rows.items():
        cells = []
        for s in stages:
            t = row["timings"].get(s)
            cells.append(f"{t['p50_ms_per_image']:>7.1f}/{t['p95_ms_per_image']:<6.1f}" if t else f"{'-':>14}")
        lines.append(f"{name:<24}" + "".join(cells) + f"{row['images_per_second']:>11.1f}")
    return "\n".join(lines)


def _studies_picture(predictions, truth: dict, images: dict) -> np.ndarray:
    from .. import rle
    from ..infer.overlay import display_pixels, overlay

    positives = [p for p in predictions if any(s != "-1" for s in truth[p.image_id])][:3]
    negatives = [p for p in predictions if all(s == "-1" for s in truth[p.image_id])][:1]
    tiles = []
    for p in positives + negatives:
        img = images[p.image_id]
        tiles.append(overlay(display_pixels(img), rle.decode(p.rle, p.shape), rle.decode_union(truth[p.image_id], p.shape)))
    height = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, height - t.shape[0]), (0, 4), (0, 0))) for t in tiles]
    return np.concatenate(tiles, axis=1)


def _split(n: int) -> tuple[int, int]:
    positives = int(round(n * POSITIVE_FRACTION))  # as make_synthetic_siim counts them
    return positives, n - positives


def _check_study_count(n: int, config) -> None:
    """Refuse, before anything is written, a study count whose positives or negatives cannot fill
    every fold of the recipe (and its classifier's): training stopped after the study sets were
    written, with an error about 'the CSV' and data.folds, which the user never wrote."""
    from ..errors import InvalidInputError

    cls = config.classifier_config()
    folds = max(config.data.folds, cls.data.folds if cls is not None else 0)
    if min(_split(n)) >= folds:
        return
    enough = next(m for m in range(n, n + 100 * folds) if min(_split(m)) >= folds)
    positives, negatives = _split(n)
    raise InvalidInputError(f"--n {n} gives {positives} studies with pneumothorax and {negatives} without; training's "
                            f"{folds} folds (data.folds) need at least one of each in every fold: use --n {enough} or more")


def run(args: argparse.Namespace) -> int:
    """The built-in pipeline on the built-in data (see the module documentation)."""
    from .. import cuda_available
    from .._fs import OutputKind, prepare_output_folder, safe_file_names
    from ..data import find_dicoms, make_synthetic_siim, read_dicom, read_rle_csv
    from ..export.onnx import _require_onnx, export_onnx
    from ..infer import Predictor
    from ..infer.evaluation import evaluate
    from ..infer.predictor import summarise_timings
    from ..train import load_recipe, train
    from .evaluate import write_evaluation
    from .predict import OVERLAYS, write_overlay, write_predictions

    # step 3 exports ONNX and step 4 runs onnxruntime: without the onnx extra (a plain `pip install
    # pneumoseg`) the demo otherwise failed only after writing the studies and training for a minute
    _require_onnx()
    start = time.perf_counter()
    config = load_recipe("demo", [f"seed={args.seed}", *args.overrides])  # a bad --set fails before any work
    _check_study_count(args.n, config)
    # The with block is the run: a failed or stopped demo puts the folder's earlier demo back (see pneumoseg._fs)
    with prepare_output_folder(args.out, overwrite=args.force, what=OutputKind.DEMO) as folder:
        train_dir = folder.path / "siim-synthetic"
        test_dir = folder.path / "held-out"
        print(f"[1/5] synthesising {args.n} training and {args.held_out} held-out studies ({args.size}x{args.size})")
        make_synthetic_siim(train_dir, n_images=args.n, size=args.size, positive_fraction=POSITIVE_FRACTION, seed=args.seed,
                            progress=not args.no_progress, overwrite=args.force)
        truth_csv = make_synthetic_siim(test_dir, n_images=args.held_out, size=args.size, positive_fraction=POSITIVE_FRACTION,
                                        seed=args.seed + 1, progress=not args.no_progress, overwrite=args.force)
        t_data = time.perf_counter()

        print("[2/5] training the classifier and the segmenter (the demo recipe)")
        config = load_recipe("demo", [f"seed={args.seed}", *args.overrides], data={"root": train_dir})
        model_dir = train(config, folder.path / "model", overwrite=args.force, progress=not args.no_progress).out
        t_train = time.perf_counter()

        print("[3/5] exporting ONNX (checked against torch)")
        export_onnx(model_dir, "fp32")
        t_export = time.perf_counter()

        print(f"[4/5] two-stage inference on the {args.held_out} held-out studies: " + ", ".join(BACKENDS))
        truth = read_rle_csv(truth_csv)
        latency: dict[str, dict] = {}
        results = {}
        for backend in BACKENDS:
            predictor = Predictor.from_dir(model_dir, backend=backend)
            predictor.warmup(batch_size=8)  # kernel choices for the batch shape are not the demo's latency
            begin = time.perf_counter()
            preds = predictor.predict(test_dir, return_masks=backend == BACKENDS[0], batch_size=8)
            seconds = time.perf_counter() - begin
            latency[backend] = {"timings": summarise_timings(preds), "images_per_second": len(preds) / seconds,
                                "seconds": seconds, "predictor": predictor.describe()}
            results[backend] = (predictor, preds, seconds)
        same = sum(a.rle == b.rle for a, b in zip(results["torch"][1], results["onnxruntime"][1]))
        t_predict = time.perf_counter()

        print("[5/5] writing the submission, overlays, metrics and pictures")
        predictor, preds, seconds = results["torch"]
        out = folder.subfolder("predictions")
        names = safe_file_names([p.image_id for p in preds], ".png")
        overlays = 0
        for p in preds:
            if p.positive:
                write_overlay(out, names[p.image_id], p)
                overlays += 1
        write_predictions(out, preds, [], predictor, seconds, overlays)
        ev = evaluate({p.image_id: [p.rle] for p in preds}, truth, scores={p.image_id: p.score for p in preds})
        evaluation = folder.subfolder("evaluation")
        report, pictures = write_evaluation(ev, evaluation, {"torch_onnxruntime_same_rle": f"{same}/{len(preds)}"})
        table = _latency_table(latency)
        folder.write_bytes("latency.txt", data=table + "\n")
        folder.write_bytes("latency.json", data=json.dumps(latency, indent=2) + "\n")
        files = find_dicoms(test_dir)
        images = {p.image_id: read_dicom(files[p.image_id]).pixels for p in preds}
        picture = folder.write_png("demo-studies.png", image=_studies_picture(preds, truth, images))
        t_end = time.perf_counter()

    cls = report["classification"]
    auc = "n/a" if cls["auc"] is None else f"{cls['auc']:.4f}"
    beaten = ev.kaggle_dice >= ev.empty_submission_dice + MARGIN
    print()
    print(f"Kaggle Dice {ev.kaggle_dice:.4f} on {len(preds)} held-out studies ({report['positives']} with "
          f"pneumothorax); an all-empty submission scores {ev.empty_submission_dice:.4f}")
    print(f"classifier AUC {auc}; torch and onnxruntime give the same RLE for {same}/{len(preds)} images")
    print("latency per stage and backend on this machine (this CPU; CUDA kernels available: "
          f"{cuda_available()}):")
    print(table)
    print(f"time: data {t_data - start:.0f} s, training {t_train - t_data:.0f} s, export {t_export - t_train:.0f} s, "
          f"inference {t_predict - t_export:.0f} s, outputs {t_end - t_predict:.0f} s; total {t_end - start:.0f} s")
    print(f"wrote {out.path / 'submission.csv'}, {overlays} overlays in {out.path / OVERLAYS}, "
          f"{evaluation.path / 'metrics.json'} (+ {len(pictures)} pictures), {folder.path / 'latency.txt'}, {picture}")
    if not beaten:
        print(f"demo FAILED: the Kaggle Dice does not beat the all-empty submission by {MARGIN}")
        return 1
    return 0
