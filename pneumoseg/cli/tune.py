"""``pneumoseg tune``: the classifier gate set on a site's own labelled images, at a target sensitivity
or specificity, with what it costs and an honest interval; ``--write`` puts it into the model directory.

The gate threshold a model directory ships was chosen on its training run's validation split; another
hospital (other scanners, another prevalence) sets its operating point on its own images. Only the
gate's scores are needed: the Predictor runs with the gate at 1.0 in its gated mode, so stage 2 (the
segmenter or its decoder) runs only for an image scoring exactly 1.0 and the masks are ignored; the
score of an image does not depend on the gate.

Which images count (the documented rule): an image is positive when the truth CSV gives it any RLE
other than -1. Truth rows without an image are left out (a train-rle.csv usually covers more images
than a local set) and counted. Images without a truth row are refused, named, before anything is
predicted (most often the images are named otherwise than the CSV: ``--name-by uid``), unless
``--skip-unlabelled``, which leaves them out and lists them in tune.json. Unreadable files are
skipped and reported, as ``pneumoseg predict`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .types import add_backend_options, add_no_progress, int_in, path, probability

TUNE_JSON = "tune.json"
ROC_PNG = "roc.png"
BOOTSTRAP = 1000
LEVEL = 0.95
_NAMED = 5  # ImageIds named in a message before "and N more"


def target_rate(text: str) -> float:
    """A target sensitivity or specificity in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:  # also refuses NaN: 0 is reached by flagging nothing (or everything)
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def add_parser(subparsers) -> None:
    from ..metrics.intervals import MAX_RESAMPLES

    p = subparsers.add_parser(
        "tune", help="set the classifier gate on your own labelled images (target sensitivity or specificity)",
        description="Score labelled DICOMs with the model's gate (the classifier, or the segmenter's classification "
                    "head), choose the gate threshold reaching --sensitivity or --specificity (as `pneumoseg "
                    "evaluate` chooses its operating points), or take --gate, and report sensitivity, specificity, "
                    "PPV and NPV there with counts, a bootstrap interval that chooses the gate again in every "
                    "resample, and the same rates at the model's current gate (Wilson intervals). Writes tune.json "
                    "and roc.png into --out. The model directory is changed only with --write. An image is positive "
                    "when the truth gives it any RLE; truth rows without an image are left out; images without a "
                    "truth row are refused unless --skip-unlabelled.")
    p.add_argument("model", type=path, metavar="MODEL_DIR", help="model directory (from `pneumoseg train`)")
    p.add_argument("--images", type=path, nargs="+", required=True, metavar="INPUT",
                   help="labelled DICOM files or folders (listed and named as `pneumoseg predict` does)")
    p.add_argument("--truth", type=path, required=True, help="train-rle.csv (ImageId,EncodedPixels) of those images")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sensitivity", type=target_rate, metavar="S",
                        help="the highest gate whose sensitivity reaches S, in (0, 1] (triage: e.g. 0.95)")
    target.add_argument("--specificity", type=target_rate, metavar="S",
                        help="the lowest gate whose specificity still reaches S, in (0, 1]")
    target.add_argument("--gate", type=probability, metavar="T", help="a gate of your choice in [0, 1], to see what it gives")
    add_backend_options(p, batch_size_help="images per network call (default 8)")
    p.add_argument("--name-by", choices=("file", "uid"), default="file",
                   help="each image's ImageId: its file name without .dcm (default) or its SOPInstanceUID")
    p.add_argument("--workers", type=int_in(1, 64), default=2, help="threads reading DICOMs (default 2)")
    p.add_argument("--skip-unlabelled", action="store_true",
                   help="leave out images without a truth row (default: refuse them, naming them)")
    p.add_argument("--bootstrap", type=int_in(0, MAX_RESAMPLES), default=BOOTSTRAP, metavar="N",
                   help=f"resamples of the operating point's 95%% interval (default {BOOTSTRAP}; 0: none)")
    p.add_argument("--seed", type=int_in(0), default=0, help="seed of the bootstrap resamples (default 0)")
    p.add_argument("--write", action="store_true",
                   help="set the chosen gate in MODEL_DIR/pneumoseg.json (atomically, with its provenance as "
                        "\"gate_tuned\"); without it MODEL_DIR is not changed")
    p.add_argument("--out", type=path, default="pneumoseg-tuning",
                   help="folder for tune.json and roc.png (default pneumoseg-tuning)")
    p.add_argument("--force", action="store_true", help="write into --out even if it holds other files")
    add_no_progress(p)
    p.set_defaults(run=run)


def _named(ids: list[str]) -> str:
    shown = ", ".join(ids[:_NAMED])
    return shown + (f" and {len(ids) - _NAMED} more" if len(ids) > _NAMED else "")


def _naming_hint(unlabelled: list[str], truth: dict[str, bool]) -> str:
    """Why images find no truth row: the truth's ImageIds carry the file suffix, or the usual advice."""
    suffixed = {i[:-4] for i in truth if i.lower().endswith(".dcm")}
    if suffixed & set(unlabelled):
        return ("the truth's ImageIds end in .dcm, an image's ImageId is its file name without it: remove .dcm "
                "from the CSV's ImageId column")
    return ("are they named otherwise? ImageIds are the file names without .dcm; --name-by uid names them by their "
            "SOPInstanceUID")


def _labels(truth: dict[str, list[str]]) -> dict[str, bool]:
    """ImageId -> positive: any RLE other than -1 (read_rle_csv reads an empty one as -1)."""
    return {image_id: any(r != "-1" for r in rles) for image_id, rles in truth.items()}


def _refuse_without_gate(md) -> None:
    from ..errors import InvalidInputError

    if md.gate_source is None:
        raise InvalidInputError(f"{md.path}: the model has no gate to tune: no classifier network, and its segmenter "
                                "has no classification head (every image is segmented; its score is the largest "
                                "pixel probability, which no gate threshold acts on)")


def _refuse_unwritable(md) -> None:
    """--write is refused before any prediction when pneumoseg.json could not be replaced."""
    from ..errors import OutputError
    from ..models.model_dir import CONFIG_NAME

    md.check_writable()  # a pneumoseg.json reached through a link out of the directory
    if not os.access(md.path, os.W_OK | os.X_OK):
        raise OutputError(f"{md.path}: the model directory is not writable, so --write cannot replace its "
                          f"{CONFIG_NAME}; copy the directory somewhere writable or run without --write")


def _sha256_of_file(p: Path) -> Optional[str]:
    from ..models.model_dir import sha256_of

    return sha256_of(p) if p.is_file() else None  # a pipe was read once, by the truth reader


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from .. import __version__, metrics
    from .._fs import OutputKind, check_output_folder, prepare_output_folder
    from ..data.siim import read_rle_csv
    from ..errors import InvalidInputError
    from ..infer import Predictor
    from ..models.model_dir import load_model_dir

    truth = _labels(read_rle_csv(args.truth))  # a malformed CSV is refused before the model loads
    truth_sha256 = _sha256_of_file(Path(args.truth))
    md = load_model_dir(args.model)
    _refuse_without_gate(md)
    if args.write:
        _refuse_unwritable(md)
    if Path(args.out).resolve() == md.path.resolve():
        # its manifest would name it a tuning folder, and a save or export into it be refused after
        raise InvalidInputError(f"--out {args.out} is the model directory; tune.json and roc.png go into a folder of "
                                "their own (--write is what changes the model directory)")
    inputs = (*args.images, args.truth, args.model)
    check_output_folder(args.out, overwrite=args.force, what=OutputKind.TUNING, inputs=inputs)
    current_gate = md.thresholds.gate
    # Scores only: with the gate at 1.0 in gated mode, stage 2 runs for no image below 1.0 (the score
    # is the gate's output, which the gate's value does not change).
    predictor = Predictor.from_dir(md, backend=args.backend, device=args.device, precision=args.precision,
                                   segment="gated", thresholds={"gate": 1.0}, batch_size=args.batch_size)

    def stream_of(images):
        return predictor.predict_iter([str(p) for p in images], return_masks=False, on_error="skip",
                                      progress=not args.no_progress, workers=args.workers, name_by=args.name_by)

    stream = stream_of(args.images)
    unlabelled = [s.image_id for s in stream.sources if s.image_id not in truth]
    if unlabelled:
        stream.close()
        labelled = [s for s in stream.sources if s.image_id in truth]
        if not labelled:
            raise InvalidInputError(f"none of the {len(stream.sources)} images has a row in {args.truth} (e.g. "
                                    f"{_named(unlabelled)}); " + _naming_hint(unlabelled, truth))
        if not args.skip_unlabelled:
            raise InvalidInputError(f"{len(unlabelled)} of the {len(stream.sources)} images have no row in {args.truth}: "
                                    f"{_named(unlabelled)}; label them, or leave them out with --skip-unlabelled")
        listed_skipped = list(stream.skipped)
        stream = stream_of([s.path for s in labelled])
        stream.skipped[:0] = listed_skipped
    unmatched = len(set(truth) - {s.image_id for s in stream.sources})  # truth rows without an image

    start = time.perf_counter()
    scored: list[tuple[str, float]] = []
    with contextlib.closing(stream):
        for pred in stream:
            scored.append((pred.image_id, float(pred.score)))
    seconds = time.perf_counter() - start
    for where, reason in stream.skipped:
        print(f"pneumoseg: skipped {where}: {reason}", file=sys.stderr)
    if not scored:
        raise InvalidInputError("no labelled image could be read; nothing was scored (see the messages above)")
    ids = [i for i, _ in scored]
    y = np.array([truth[i] for i in ids], dtype=bool)
    s = np.array([v for _, v in scored], dtype=np.float64)
    n_pos = int(y.sum())
    if n_pos in (0, y.size):
        which = "positive (pneumothorax)" if n_pos else "negative (no pneumothorax)"
        raise InvalidInputError(f"all {y.size} labelled images are {which} in {args.truth}: there is no operating "
                                "point without images of both classes (sensitivity needs positives, specificity "
                                "negatives)")

    target = ("sensitivity" if args.sensitivity is not None else "specificity" if args.specificity is not None
              else "gate")
    target_value = {"sensitivity": args.sensitivity, "specificity": args.specificity, "gate": args.gate}[target]
    chosen = interval = None
    if target == "gate":
        new_gate = float(args.gate)
    else:
        chosen = metrics.operating_point(y, s, **{target: target_value})
        if math.isinf(chosen.threshold):
            raise InvalidInputError(f"no gate reaches specificity {target_value:g} on these images: the highest-"
                                    "scoring image is negative, so only flagging no image at all would; lower the "
                                    "target or add images")
        new_gate = gate_below(s, float(chosen.threshold))
        if args.bootstrap:
            interval = metrics.operating_point_ci(y, s, **{target: target_value}, level=LEVEL,
                                                  n_resamples=args.bootstrap, seed=args.seed)
    # Counted as the Predictor decides: its float32 scores against the gate cast to float32 (a --gate a
    # fraction of a float32 step above a score flags that image there, not in float64).
    at_new = metrics.rates_at_threshold(y, s, as_applied(new_gate), level=LEVEL, method="wilson")
    at_current = metrics.rates_at_threshold(y, s, as_applied(current_gate), level=LEVEL, method="wilson")

    from datetime import datetime, timezone

    provenance = {"value": new_gate, "previous": current_gate, "target": {"kind": target, "value": target_value},
                  "n_images": int(y.size), "n_positive": n_pos,
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "pneumoseg_version": __version__, "truth_sha256": truth_sha256}
    report: dict[str, Any] = {
        "pneumoseg_version": __version__,
        "model": str(md.path),
        "truth": str(args.truth), "truth_sha256": truth_sha256,
        "images": int(y.size), "positives": n_pos, "negatives": int(y.size - n_pos),
        "target": {"kind": target, "value": target_value},
        "gate": {"new": new_gate, "current": current_gate, "source": md.gate_source},
        "operating_point": None if chosen is None else chosen.to_dict(),
        "interval": None if interval is None else interval.to_dict(),
        "at_new_gate": at_new.to_dict(),
        "at_current_gate": at_current.to_dict(),
        "auc": metrics.roc_auc(y, s),
        "written": None,
        "unlabelled_left_out": unlabelled,
        "truth_rows_without_image": unmatched,
        "skipped": [{"path": where, "reason": reason} for where, reason in stream.skipped],
        # without its thresholds: the gate of 1.0 there only keeps stage 2 from running
        "predictor": {k: v for k, v in predictor.describe().items() if k != "thresholds"},
        "seconds": round(seconds, 3),
        "scores": [{"image_id": i, "score": v, "positive": bool(p)} for i, v, p in zip(ids, s.tolist(), y.tolist())],
    }
    with prepare_output_folder(args.out, overwrite=args.force, what=OutputKind.TUNING, inputs=inputs) as folder:
        picture = write_roc(folder, y, s, as_applied(current_gate), as_applied(new_gate), target)
        if args.write:  # before tune.json, so that a refused write leaves no report claiming it
            written = md.set_gate(new_gate, provenance)
            report["written"] = {"path": str(written), "gate_tuned": provenance}
        with folder.open(TUNE_JSON, mode="w") as f:
            json.dump(report, f, indent=2, allow_nan=False)
            f.write("\n")

    for line in summary_lines(report, seconds, predictor):
        print(line)
    if picture is None:
        print("note: no picture (matplotlib is not installed)")
    print(f"wrote {folder.path / TUNE_JSON}" + (f", {ROC_PNG}" if picture else ""))
    if args.write:
        print(f"updated {report['written']['path']}: gate {current_gate!r} -> {new_gate!r}")
    else:
        print(f"{md.path} unchanged (--write sets the gate there)")
    return 0


def as_applied(gate: float) -> float:
    """The gate as the Predictor compares it with its float32 scores: cast to float32 (by torch)."""
    import numpy as np

    return float(np.float32(gate))


def gate_below(scores: Any, threshold: float) -> float:
    """The gate written for an operating point whose threshold is ``threshold`` (one image's score): midway
    to the next lower score (rounded to float32, and above that score in float32), so the tuning images
    are split exactly as at ``threshold``, yet the image scoring ``threshold`` stays above the gate when
    its score moves by a few float32 steps (seen: up to 1.2e-7 between batch sizes on the CPU), which
    would drop a true positive at the gate itself."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    lower = scores[scores < threshold]
    if not lower.size:  # every image is flagged: any gate below the lowest score does
        return float(np.float32(threshold * (1 - 1e-4)))
    below = float(lower.max())
    # A float32 value: the Predictor compares its float32 scores with the gate in float32, where a
    # float64 midpoint between two adjacent float32 scores rounds to one of them (to the lower one
    # half the time, flagging an image the report counts below the gate).
    gate = float(np.float32((threshold + below) / 2))
    if gate <= below:
        gate = float(np.nextafter(np.float32(below), np.float32(np.inf)))
    return gate if below < gate <= threshold else float((threshold + below) / 2)


def _rate(name: str, r: Optional[dict]) -> str:
    if r is None:
        return f"{name} n/a"
    return f"{name} {r['estimate']:.3f} ({r['successes']}/{r['trials']}) [{r['low']:.3f}, {r['high']:.3f}]"


def _rates(at: dict) -> str:
    return ", ".join(_rate(name, at[key]) for name, key in (("sensitivity", "sensitivity"), ("specificity", "specificity"),
                                                           ("PPV", "ppv"), ("NPV", "npv")))


def summary_lines(report: dict, seconds: float, predictor) -> list[str]:
    """What ``pneumoseg tune`` prints: the images, the gate, its rates and intervals, the current gate's."""
    b = predictor.backend
    lines = [f"scored {report['images']} images ({report['positives']} with pneumothorax, {report['negatives']} without; "
             f"AUC {report['auc']:.4f}) in {seconds:.1f} s with {b.name} {b.precision} on {b.device}"]
    if report["unlabelled_left_out"]:
        lines.append(f"left out {len(report['unlabelled_left_out'])} image(s) without a truth row "
                     f"({_named(report['unlabelled_left_out'])})")
    if report["truth_rows_without_image"]:
        lines.append(f"note: {report['truth_rows_without_image']} truth row(s) have no image here and were left out")
    gate = report["gate"]
    t = report["target"]
    how = "chosen" if t["kind"] == "gate" else f"reaching {t['kind']} >= {t['value']:g}"
    op = report["operating_point"]
    if op is not None:
        how += f"; midway between the score {op['threshold']!r} that reaches it and the next lower score"
    # every digit: a rounded copy (--gate) could pass an image over
    lines.append(f"gate {gate['new']!r} ({how}; the model's is {gate['current']!r})")
    fixed = "95% Wilson intervals, the gate taken as fixed"
    lines.append(f"  at the new gate: {_rates(report['at_new_gate'])}"
                 + (f" ({fixed})" if t["kind"] == "gate" else " (Wilson intervals: optimistic for a gate chosen on "
                                                                "these images, see below)"))
    iv = report["interval"]
    if iv is not None:
        other = iv["other_rate"]

        def ends(ci: dict) -> str:
            show = lambda v: "inf" if v is None else f"{v:.4g}"  # noqa: E731  (None: nothing positive)
            return f"[{show(ci['low'])}, {show(ci['high'])}]"

        lines.append(f"  {iv['level']:.0%} interval, the gate chosen again in each of {iv['n_resamples']} resamples "
                     f"(seed {iv['seed']}): gate {ends(iv['threshold'])}, {other} {ends(iv[other])}")
    elif t["kind"] != "gate":
        lines.append("  no bootstrap interval (--bootstrap 0)")
    lines.append(f"  at the model's gate {gate['current']:.6g}: {_rates(report['at_current_gate'])} ({fixed})")
    return lines


def write_roc(folder, y, s, current_gate: float, new_gate: float, target: str) -> Optional[str]:
    """roc.png: the ROC curve with the model's gate and the new one marked; None without matplotlib."""
    from .._matplotlib import quiet_matplotlib

    with quiet_matplotlib():
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        import numpy as np

        from .. import metrics

        fpr, tpr, _ = metrics.roc_curve(y.astype(np.int64), s)
        fig, ax = plt.subplots(figsize=(4.8, 4.8))
        ax.plot(fpr, tpr, color="#1f77b4", label=f"ROC (AUC {metrics.roc_auc(y, s):.4f})")
        ax.plot([0, 1], [0, 1], color="#bbbbbb", linestyle="--")
        for gate, colour, marker, name in ((current_gate, "#7f7f7f", "s", "model's gate"),
                                           (new_gate, "#d62728", "o", "new gate" if target == "gate" else f"{target} target")):
            at = metrics.rates_at_threshold(y, s, gate)
            sens = at.sensitivity.estimate if at.sensitivity is not None else 0.0
            spec = at.specificity.estimate if at.specificity is not None else 1.0
            ax.plot([1 - spec], [sens], marker=marker, color=colour, linestyle="none", markersize=8,
                    label=f"{name} {gate:.4g}: sens {sens:.3f}, spec {spec:.3f}")
        ax.set_xlabel("1 - specificity (false positive rate)")
        ax.set_ylabel("sensitivity (true positive rate)")
        ax.set_title("gate operating points")
        ax.legend(loc="lower right", fontsize=7)
        with folder.open(ROC_PNG) as f:
            fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
    return ROC_PNG
