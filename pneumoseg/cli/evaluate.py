"""``pneumoseg evaluate``: a submission scored against the truth, with pictures."""

from __future__ import annotations

import argparse
import json
from typing import Optional

from .types import int_in, path, probability

# The command's defaults, the library's (pneumoseg.infer.evaluation, which imports torch through
# pneumoseg.infer, so not read while the parser is built); a test holds them equal.
SENSITIVITIES = (0.90, 0.95)
SPECIFICITIES = (0.90, 0.95)
BOOTSTRAP = 1000
CI_METHODS = ("percentile", "bca")
CI_METHOD = "percentile"
PROPORTION_METHODS = ("wilson", "clopper-pearson")
PROPORTION_METHOD = "wilson"


def targets(text: str) -> tuple[float, ...]:
    """Comma-separated numbers in (0, 1], e.g. ``0.9,0.95``; ``none`` for no targets."""
    if text.strip().lower() == "none":
        return ()
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be numbers in (0, 1] separated by commas, or none; got {part.strip()!r}") from None
        if not 0.0 < value <= 1.0:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"each target must be in (0, 1], got {part.strip()!r}")
        values.append(value)
    return tuple(values)


def add_parser(subparsers) -> None:
    from ..metrics.intervals import MAX_RESAMPLES

    def show(values: tuple[float, ...]) -> str:
        return ",".join(f"{v:g}" for v in values)

    p = subparsers.add_parser(
        "evaluate", help="score a submission against train-rle.csv (Kaggle Dice, AUC, curves, confusion matrix)",
        description="Kaggle Dice (per-image Dice, 1 for an image whose masks are both empty, averaged), the "
                    "per-image Dice histogram, and the classifier's view (AUC, average precision, sensitivity, "
                    "specificity, confusion matrix) with PNG pictures of the ROC and PR curves; with --scores also "
                    "the operating points at target sensitivities and specificities and the calibration (Brier "
                    "score, ECE, reliability diagram). 95% intervals by a seeded bootstrap over images (percentile "
                    "or BCa) and, for AUC, DeLong's; Wilson (or Clopper-Pearson) intervals of sensitivity, "
                    "specificity, PPV and NPV at --threshold; for each operating point a bootstrap that chooses its "
                    "threshold again in every resample.")
    p.add_argument("--pred", type=path, required=True, help="submission.csv (ImageId,EncodedPixels)")
    p.add_argument("--truth", type=path, required=True, help="train-rle.csv or stage_2_train.csv")
    p.add_argument("--scores", type=path, default=None,
                   help="scores.csv (ImageId,Score) from `pneumoseg predict`; default: the masks (empty or not)")
    p.add_argument("--threshold", type=probability, default=0.5, help="score threshold for the confusion matrix (default 0.5)")
    p.add_argument("--sensitivity", type=targets, default=SENSITIVITIES, metavar="S[,S...]",
                   help="operating points: the threshold reaching each target sensitivity "
                        f"(default {show(SENSITIVITIES)}; none for none; needs --scores)")
    p.add_argument("--specificity", type=targets, default=SPECIFICITIES, metavar="S[,S...]",
                   help="operating points: the threshold reaching each target specificity "
                        f"(default {show(SPECIFICITIES)}; none for none; needs --scores)")
    p.add_argument("--bootstrap", type=int_in(0, MAX_RESAMPLES), default=BOOTSTRAP, metavar="N",
                   help=f"bootstrap resamples for the 95%% intervals (default {BOOTSTRAP}; 0: none but DeLong's for AUC)")
    p.add_argument("--seed", type=int_in(0), default=0, help="seed of the bootstrap resamples (default 0)")
    p.add_argument("--ci-method", choices=CI_METHODS, default=CI_METHOD,
                   help="the bootstrap intervals: percentile, or bca (bias-corrected and accelerated; adds a "
                        f"jackknife, about n^2 work; default {CI_METHOD}). Operating points stay percentile")
    p.add_argument("--proportion-ci", choices=PROPORTION_METHODS, default=PROPORTION_METHOD,
                   help="the intervals of sensitivity, specificity, PPV and NPV at --threshold: wilson, or "
                        f"clopper-pearson (exact, wider; default {PROPORTION_METHOD})")
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
    ev = evaluate(pred, truth, scores=scores, threshold=args.threshold, sensitivity=args.sensitivity,
                  specificity=args.specificity, bootstrap=args.bootstrap, seed=args.seed, ci_method=args.ci_method,
                  proportion_method=args.proportion_ci)
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
    for line in _summary(report):
        print(line)
    if ev.not_predicted:
        print(f"note: {len(ev.not_predicted)} image(s) of the truth are not in the submission and were left out")
    if not pictures:
        print("note: no pictures (matplotlib is not installed)")
    print(f"wrote {folder.path / 'metrics.json'}, per_image.csv" + (f", {', '.join(pictures)}" if pictures else ""))
    return 0


def _summary(report: dict) -> list[str]:
    """The intervals, operating points and calibration of ``metrics.json`` in a few lines, then its notes."""
    lines = []
    iv = report["intervals"]
    shown = [(name, iv[key]) for name, key in (("Kaggle Dice", "kaggle_dice"), ("AUC", "auc"), ("AUC DeLong", "auc_delong"),
                                               ("AP", "average_precision"), ("sensitivity", "sensitivity"),
                                               ("specificity", "specificity")) if iv[key] is not None]
    if shown:
        bca = iv.get("bootstrap_method") == "bca"
        how = (f"{'BCa bootstrap' if bca else 'bootstrap'}, {iv['bootstrap_resamples']} resamples over images, "
               f"seed {iv['seed']}" if iv["bootstrap_resamples"] else "DeLong")
        lines.append(f"{iv['level']:.0%} intervals ({how}): "
                     + ", ".join(f"{name} [{ci['low']:.4f}, {ci['high']:.4f}]" for name, ci in shown))
    fixed = iv.get("fixed_threshold")
    if fixed is not None:
        at = "of the masks" if fixed["threshold"] is None else f"at score >= {fixed['threshold']:g}"
        method = {"wilson": "Wilson", "clopper-pearson": "Clopper-Pearson"}[fixed["method"]]
        lines.append(f"{fixed['level']:.0%} {method} intervals {at} (the threshold taken as fixed): " + ", ".join(
            f"{name} " + ("n/a" if fixed[key] is None else f"[{fixed[key]['low']:.4f}, {fixed[key]['high']:.4f}]")
            for name, key in (("sensitivity", "sensitivity"), ("specificity", "specificity"), ("PPV", "ppv"),
                              ("NPV", "npv"))))
    points = report["classification"]["operating_points"]
    if points:
        def one(p: dict) -> str:
            at = "no image positive" if p["threshold"] is None else f"score >= {p['threshold']:.4g}"
            ppv = "n/a" if p["ppv"] is None else f"{p['ppv']:.3f}"
            npv = "n/a" if p["npv"] is None else f"{p['npv']:.3f}"
            return (f"{p['target']} {p['target_value']:g}: {at} (sens {p['sensitivity']:.3f}, spec "
                    f"{p['specificity']:.3f}, PPV {ppv}, NPV {npv})")
        lines.append("operating points: " + "; ".join(one(p) for p in points))
    chosen = iv.get("operating_points")
    if chosen:
        def ends(ci: dict) -> str:
            show = lambda v: "inf" if v is None else f"{v:.4g}"  # noqa: E731  (None: nothing positive)
            return f"[{show(ci['low'])}, {show(ci['high'])}]"

        lines.append(f"{chosen[0]['level']:.0%} operating point intervals (the threshold chosen again in each of "
                     f"{chosen[0]['n_resamples']} resamples, seed {chosen[0]['seed']}): " + "; ".join(
                         f"{p['target']} {p['target_value']:g}: threshold {ends(p['threshold'])}, {p['other_rate']} "
                         f"{ends(p[p['other_rate']])}" for p in chosen))
    cal = report["calibration"]
    if cal is not None:
        from ..infer.evaluation import CALIBRATION_BINS  # already imported by run (evaluate)

        lines.append(f"calibration: Brier {cal['brier_score']:.4f}, ECE {cal['expected_calibration_error']:.4f} "
                     f"({len(cal['curve']['images'])} non-empty of {CALIBRATION_BINS} equal-width bins)")
    lines.extend(f"note: {n}" for n in report["notes"])
    return lines
