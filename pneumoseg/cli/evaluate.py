"""``pneumoseg evaluate``: a submission scored against the truth, with pictures."""

from __future__ import annotations

import argparse
import json
from typing import Optional

from .types import path, probability


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score a submission against train-rle.csv (Kaggle Dice, AUC, curves, confusion matrix)",
        description="Kaggle Dice (per-image Dice, 1 for an image whose masks are both empty, averaged), the "
                    "per-image Dice histogram, and the classifier's view (AUC, average precision, sensitivity, "
                    "specificity, confusion matrix) with PNG pictures of the ROC and PR curves.")
    p.add_argument("--pred", type=path, required=True, help="submission.csv (ImageId,EncodedPixels)")
    p.add_argument("--truth", type=path, required=True, help="train-rle.csv or stage_2_train.csv")
    p.add_argument("--scores", type=path, default=None,
                   help="scores.csv (ImageId,Score) from `pneumoseg predict`; default: the masks (empty or not)")
    p.add_argument("--threshold", type=probability, default=0.5, help="score threshold for the confusion matrix (default 0.5)")
    p.add_argument("--out", type=path, default="pneumoseg-evaluation", help="folder for metrics.json, per_image.csv and pictures (default pneumoseg-evaluation)")
    p.add_argument("--force", action="store_true", help="write into --out even if it holds other files")
    p.set_defaults(run=run)


def write_evaluation(ev, folder, extra: Optional[dict] = None) -> tuple[dict, list[str]]:
    """An evaluation's files in ``folder`` (an OutputFolder): the pictures, ``metrics.json`` (with
    ``extra`` entries) and ``per_image.csv``; returns the report and the pictures' names. Shared by
    ``pneumoseg evaluate`` and ``pneumoseg demo``, so both write the same files."""
    from ..infer.evaluation import write_evaluation_plots

    pictures = write_evaluation_plots(ev, folder)
    report = ev.to_dict()
    report["pictures"] = pictures or "none: matplotlib is not installed (pip install matplotlib)"
    report.update(extra or {})
    with folder.open("metrics.json", mode="w") as f:
        json.dump(report, f, indent=2, allow_nan=False)
        f.write("\n")
    with folder.open("per_image.csv", mode="w") as f:
        f.write("ImageId,Dice,TruthPositive,PredPositive,Score\n")
        for i, image_id in enumerate(ev.image_ids):
            f.write(f"{image_id},{ev.dice[i]:.6f},{int(ev.truth_positive[i])},{int(ev.pred_positive[i])},"
                    f"{ev.scores[i]:.6f}\n")
    return report, pictures


def run(args: argparse.Namespace) -> int:
    from .._fs import OutputKind, prepare_output_folder
    from ..data.siim import read_rle_csv
    from ..infer.evaluation import evaluate, read_scores_csv

    pred = read_rle_csv(args.pred)
    truth = read_rle_csv(args.truth)
    scores = read_scores_csv(args.scores) if args.scores is not None else None
    ev = evaluate(pred, truth, scores=scores, threshold=args.threshold)
    # a failure inside the block puts the folder's earlier output back (see pneumoseg._fs)
    with prepare_output_folder(args.out, overwrite=args.force, what=OutputKind.EVALUATION,
                               inputs=(args.pred, args.truth, args.scores)) as folder:
        report, pictures = write_evaluation(ev, folder)
    cls = report["classification"]
    cm = cls["confusion_matrix"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"Kaggle Dice {ev.kaggle_dice:.4f} on {report['images']} images ({report['positives']} with pneumothorax; "
          f"an all-empty submission scores {ev.empty_submission_dice:.4f})")
    print(f"classification ({cls['scores']}): AUC {fmt(cls['auc'])}, AP {fmt(cls['average_precision'])}, "
          f"sensitivity {fmt(cls['sensitivity'])}, specificity {fmt(cls['specificity'])}; "
          f"TN {cm['tn']} FP {cm['fp']} FN {cm['fn']} TP {cm['tp']}")
    if ev.not_predicted:
        print(f"note: {len(ev.not_predicted)} image(s) of the truth are not in the submission and were left out")
    if not pictures:
        print("note: no pictures (matplotlib is not installed)")
    print(f"wrote {folder.path / 'metrics.json'}, per_image.csv" + (f", {', '.join(pictures)}" if pictures else ""))
    return 0
