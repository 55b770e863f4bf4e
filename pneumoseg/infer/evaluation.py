"""Scoring a submission against the truth, as the SIIM-ACR competition did, plus the classifier's view.

Per image the Dice of the predicted and true masks (1 when both are empty), computed from the RLE
strings themselves: a SIIM RLE numbers pixels in one fixed order, so the overlap of two strings does
not depend on the image's shape, and no image size needs to be known. The Kaggle score is their mean.
Classification: an image is positive when its true mask is not empty; its score is the predicted
probability (``scores.csv`` from ``pneumoseg predict``) or, without one, 1 for a non-empty predicted
mask and 0 otherwise. With real scores also the clinical operating points (the threshold reaching a
target sensitivity or specificity) and the calibration (Brier score, ECE, reliability curve); 0/1
scores from the masks make both degenerate, so they are left out and a note says so.

Intervals: a seeded percentile (or, with ``ci_method="bca"``, BCa) bootstrap over images
(``bootstrap`` resamples; AUC, average precision, sensitivity and specificity resampled within each
truth class, the Kaggle Dice over all images), and DeLong's interval for AUC. At the fixed
``threshold``, Wilson (or Clopper-Pearson) intervals of sensitivity, specificity, PPV and NPV. For each
operating point, whose threshold is chosen on these images, a bootstrap that chooses it again in
every resample: the intervals of its threshold and of the other rate there.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from .. import limits
from .._checks import check_choice, check_int, check_path, check_probability, check_real, show
from .._matplotlib import quiet_matplotlib
from ..errors import DataFormatError, InvalidInputError, RLEError, RLELimitError

__all__ = ["Evaluation", "evaluate", "read_scores_csv", "rle_dice", "write_evaluation_plots", "SCORES_HEADER"]

SCORES_HEADER = ("ImageId", "Score")
#: operating points reported unless told otherwise: triage runs at high sensitivity, rule-in at high specificity
DEFAULT_SENSITIVITIES = (0.90, 0.95)
DEFAULT_SPECIFICITIES = (0.90, 0.95)
#: bootstrap resamples for the intervals unless told otherwise (0: none); 3205 images take about 0.2 s
DEFAULT_BOOTSTRAP = 1000
#: the intervals' confidence level
LEVEL = 0.95
#: the bootstrap intervals' method unless told otherwise ("percentile" or "bca")
DEFAULT_CI_METHOD = "percentile"
#: the fixed threshold's rate intervals unless told otherwise ("wilson" or "clopper-pearson")
DEFAULT_PROPORTION_METHOD = "wilson"
#: equal-width bins on [0, 1] for the expected calibration error and the reliability curve
CALIBRATION_BINS = 10
# Column height used to lay out the flat pixel order; any height gives the same Dice.
_LAYOUT_HEIGHT = 1024


def _run_end(text: str) -> int:
    """One past the last pixel a SIIM RLE string paints (the sum of its numbers; 0 for "-1")."""
    tokens = text.split()
    if not tokens or tokens == ["-1"]:
        return 0
    return int(sum(int(t) for t in tokens))


def rle_dice(pred: Sequence[str], truth: Sequence[str]) -> float:
    """Dice of the union of ``pred`` strings and the union of ``truth`` strings (1.0 when both empty)."""
    from .. import rle

    end = max([_run_end(s) for s in (*pred, *truth)] + [0])
    if end == 0:
        return 1.0
    shape = (_LAYOUT_HEIGHT, -(-end // _LAYOUT_HEIGHT))
    most = _LAYOUT_HEIGHT * min(limits.current().max_image_side, limits.current().max_image_pixels // _LAYOUT_HEIGHT)
    if shape[0] * shape[1] > most:
        raise RLELimitError(f"the RLE paints pixel {end - 1:,}, past the {most:,} pixels a mask may have here (a "
                            "SIIM image has 1,048,576; pneumoseg.limits.set_limits(max_image_side=..., "
                            "max_image_pixels=...) raises it)")
    a = rle.decode_union(list(pred), shape)
    b = rle.decode_union(list(truth), shape)
    na, nb = int(a.sum()), int(b.sum())
    if na + nb == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / (na + nb)


def _image_dice(image_id: str, pred: Sequence[str], truth: Sequence[str]) -> float:
    try:
        return rle_dice(pred, truth)
    except RLEError as exc:
        raise DataFormatError(f"ImageId {show(image_id, 70)}: {exc}") from None


def read_scores_csv(path: Union[str, Path]) -> dict[str, float]:
    """ImageId -> score from ``ImageId,Score`` rows (a header line is optional); each score a finite number."""
    from ..data.siim import _read_text

    path = check_path(path, "scores CSV", error=DataFormatError)
    # read as the RLE CSVs are (max_csv_bytes): `--scores /dev/zero` was read until memory ran out
    text = _read_text(path)
    out: dict[str, float] = {}
    rows = csv.reader(io.StringIO(text))
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as exc:  # a cell past csv's 131,072-character field limit, a NUL byte
            raise DataFormatError(f"{path}, line {rows.line_num}: not a scores CSV row ({exc})") from None
        line_no = rows.line_num
        if not row or all(not c.strip() for c in row):
            continue
        cells = [c.strip() for c in row]
        if line_no == 1 and [c.lower() for c in cells] == [h.lower() for h in SCORES_HEADER]:
            continue
        if len(cells) != 2:
            raise DataFormatError(f"{path}, line {line_no}: expected 2 columns (ImageId, Score), got {len(cells)}")
        try:
            value = float(cells[1])
        except ValueError:
            raise DataFormatError(f"{path}, line {line_no}: score {show(cells[1])} is not a number") from None
        if not math.isfinite(value):
            raise DataFormatError(f"{path}, line {line_no}: score {show(cells[1])} is not finite")
        if cells[0] in out:
            raise DataFormatError(f"{path}, line {line_no}: ImageId {show(cells[0])} appears twice")
        out[cells[0]] = value
    return out


@dataclass
class Evaluation:
    """The figures of :func:`evaluate` (``to_dict`` for JSON)."""

    image_ids: list[str]
    dice: np.ndarray  # per image
    truth_positive: np.ndarray  # bool per image
    pred_positive: np.ndarray  # bool per image
    scores: np.ndarray  # per image (probabilities, or 0/1 from the masks)
    scores_source: str  # "scores" or "masks"
    threshold: float
    not_predicted: list[str] = field(default_factory=list)  # truth ids without a prediction
    sensitivity_targets: tuple[float, ...] = DEFAULT_SENSITIVITIES
    specificity_targets: tuple[float, ...] = DEFAULT_SPECIFICITIES
    bootstrap: int = DEFAULT_BOOTSTRAP  # resamples for the intervals; 0: DeLong's AUC interval only
    seed: int = 0
    ci_method: str = DEFAULT_CI_METHOD  # the bootstrap intervals: "percentile" or "bca"
    proportion_method: str = DEFAULT_PROPORTION_METHOD  # rates at the fixed threshold: "wilson" or "clopper-pearson"

    @property
    def kaggle_dice(self) -> float:
        return float(self.dice.mean())

    @property
    def empty_submission_dice(self) -> float:
        """What an all-empty submission would score on these images (the share of negatives)."""
        return float((~self.truth_positive).mean())

    @property
    def predicted(self) -> np.ndarray:
        """Each image's predicted class: its score at ``threshold``, or its mask without scores."""
        return self.scores >= self.threshold if self.scores_source == "scores" else self.pred_positive

    def _both_classes(self) -> bool:
        return 0 < int(self.truth_positive.sum()) < len(self.truth_positive)

    def _probabilities(self) -> bool:
        return self.scores_source == "scores" and bool(((self.scores >= 0) & (self.scores <= 1)).all())

    def notes(self) -> list[str]:
        """Why figures are missing (None in ``to_dict``)."""
        out = []
        if not self._both_classes():
            out.append("the truth has one class only: no AUC, average precision, operating points or their "
                       "intervals")
        if self.scores_source != "scores":
            out.append("the scores are the masks' 0/1 (no scores given): no operating points or calibration, which "
                       "need the classifier's probabilities (scores.csv from pneumoseg predict)")
        elif not self._probabilities():
            out.append("some scores are outside [0, 1], so they are not probabilities: no calibration")
        positives, negatives = int(self.truth_positive.sum()), int((~self.truth_positive).sum())
        if self._both_classes() and min(positives, negatives) < 2:
            out.append("DeLong's AUC interval needs at least 2 images of each class")
        if self.bootstrap == 0:
            out.append("bootstrap off (0 resamples): only DeLong's AUC interval and the binomial intervals at the "
                       "fixed threshold")
        return out

    def operating_points(self) -> Optional[list[Any]]:
        """:class:`pneumoseg.metrics.OperatingPoint` per target, or None (see :meth:`notes`)."""
        from .. import metrics

        if self.scores_source != "scores" or not self._both_classes():
            return None
        y = self.truth_positive
        return ([metrics.operating_point(y, self.scores, sensitivity=t) for t in self.sensitivity_targets]
                + [metrics.operating_point(y, self.scores, specificity=t) for t in self.specificity_targets])

    def intervals(self) -> dict[str, Any]:
        """Each figure's ``level`` interval as ``{estimate, low, high}``, or None where undefined.

        ``kaggle_dice``, ``auc``, ``average_precision``, ``sensitivity`` and ``specificity``: the
        bootstrap (``bootstrap_method``) at the fixed threshold; ``auc_delong``: DeLong's.
        ``fixed_threshold``: sensitivity, specificity, PPV and NPV at ``threshold`` (or of the masks)
        as binomial proportions (``proportion_method``), each with its counts; None where its
        denominator is empty. ``operating_points``: per operating point (the order of
        ``classification.operating_points``) the bootstrap that chooses its threshold again in every
        resample, with the intervals of the threshold and of the other rate. ``not_computed`` names
        the BCa intervals refused as undefined, with the reason (``to_dict`` adds them to the notes)."""
        from .. import metrics
        from ..errors import InvalidInputError

        y, predicted = self.truth_positive, self.predicted
        positives, negatives = int(y.sum()), int((~y).sum())
        resampled: dict[str, Any] = {"level": LEVEL, "n_resamples": self.bootstrap, "seed": self.seed}
        bca = self.ci_method == "bca"

        def figures(ci: Any) -> dict[str, float]:
            return {"estimate": ci.estimate, "low": ci.low, "high": ci.high}

        out: dict[str, Any] = {
            "level": LEVEL, "bootstrap_resamples": self.bootstrap, "seed": self.seed,
            "method": ("BCa" if bca else "percentile") + " bootstrap over images (AUC, average precision, sensitivity "
                      "and specificity resampled within each truth class); auc_delong: DeLong's normal interval",
            "bootstrap_method": self.ci_method, "proportion_method": self.proportion_method,
            "kaggle_dice": None, "auc_delong": None, "auc": None, "average_precision": None,
            "sensitivity": None, "specificity": None, "fixed_threshold": None, "operating_points": None,
            "not_computed": {},
        }

        def boot(name: str, interval: Any) -> None:
            # BCa is undefined on some samples (a leave-one-out value NaN, all resamples on one side):
            # that figure is left out with the reason, the others kept
            try:
                out[name] = figures(interval())
            except InvalidInputError as exc:
                if not bca:
                    raise
                out["not_computed"][name] = str(exc)

        if min(positives, negatives) >= 2:
            out["auc_delong"] = figures(metrics.roc_auc_ci(y, self.scores, level=LEVEL, method="delong"))
        # predicted is the 0/1 decision already (score >= threshold, or the mask): 0.5 splits it as it is
        rates = metrics.rates_at_threshold(y, predicted, 0.5, level=LEVEL, method=self.proportion_method).to_dict()
        rates["threshold"] = self.threshold if self.scores_source == "scores" else None  # else: the masks
        rates["predicted_positive"] = "score >= threshold" if self.scores_source == "scores" else "non-empty mask"
        out["fixed_threshold"] = rates
        if not self.bootstrap:
            return out
        boot("kaggle_dice", lambda: metrics.bootstrap_ci(lambda d: d.mean(axis=-1), self.dice, method=self.ci_method,
                                                         **resampled))
        if self._both_classes():
            boot("auc", lambda: metrics.roc_auc_ci(y, self.scores, method="bca" if bca else "bootstrap", **resampled))
            boot("average_precision", lambda: metrics.average_precision_ci(y, self.scores, method=self.ci_method,
                                                                           **resampled))
        # within-class resamples keep each class's count, so neither share divides by zero; BCa's
        # jackknife can leave out a class's only image, where 0 / 0 is NaN (undefined) by design
        if positives:
            boot("sensitivity", lambda: metrics.bootstrap_ci(
                lambda t, p: _share(t & p, t), y, predicted, strata=y, method=self.ci_method, **resampled))
        if negatives:
            boot("specificity", lambda: metrics.bootstrap_ci(
                lambda t, p: _share(~t & ~p, ~t), y, predicted, strata=y, method=self.ci_method, **resampled))
        if self.scores_source == "scores" and self._both_classes():
            out["operating_points"] = (
                [metrics.operating_point_ci(y, self.scores, sensitivity=t, **resampled).to_dict()
                 for t in self.sensitivity_targets]
                + [metrics.operating_point_ci(y, self.scores, specificity=t, **resampled).to_dict()
                   for t in self.specificity_targets])
        return out

    def calibration_bins(self) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The reliability curve's ``(positive share, mean score, images)`` per non-empty bin of
        ``CALIBRATION_BINS`` equal-width bins, or None without probability scores."""
        from .. import metrics

        if not self._probabilities():
            return None
        return metrics.calibration_curve(self.truth_positive, self.scores, n_bins=CALIBRATION_BINS,
                                         return_counts=True)

    def calibration(self) -> Optional[dict[str, Any]]:
        """Brier score, expected calibration error and reliability curve, or None (see :meth:`notes`)."""
        from .. import metrics

        curve = self.calibration_bins()
        if curve is None:
            return None
        y = self.truth_positive
        prob_true, prob_pred, count = curve
        return {
            "brier_score": metrics.brier_score(y, self.scores),
            "expected_calibration_error": metrics.expected_calibration_error(y, self.scores, n_bins=CALIBRATION_BINS),
            "bins": f"{CALIBRATION_BINS} equal-width bins on [0, 1] (a score on an inner edge counts in the bin "
                    "below); the curve lists the non-empty ones",
            "curve": {"mean_score": prob_pred.tolist(), "positive_fraction": prob_true.tolist(),
                      "images": count.tolist()},
        }

    def classification(self) -> dict[str, Any]:
        from .. import metrics

        y = self.truth_positive.astype(np.int64)
        (tn, fp), (fn, tp) = metrics.confusion_matrix(y, self.predicted.astype(np.int64)).tolist()
        out: dict[str, Any] = {"confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
                               "threshold": self.threshold if self.scores_source == "scores" else None,
                               "scores": self.scores_source}
        out["sensitivity"] = tp / (tp + fn) if tp + fn else None
        out["specificity"] = tn / (tn + fp) if tn + fp else None
        out["accuracy"] = (tp + tn) / len(y) if len(y) else None
        out["ppv"] = tp / (tp + fp) if tp + fp else None
        out["npv"] = tn / (tn + fn) if tn + fn else None
        both = 0 < int(y.sum()) < len(y)
        out["auc"] = metrics.roc_auc(y, self.scores) if both else None
        out["average_precision"] = metrics.average_precision(y, self.scores) if both else None
        return out

    def to_dict(self) -> dict[str, Any]:
        pos = self.truth_positive
        classification = self.classification()
        points = self.operating_points()
        classification["operating_points"] = None if points is None else [p.to_dict() for p in points]
        intervals = self.intervals()
        notes = self.notes() + [f"no BCa interval for {name}: {reason}"
                                for name, reason in intervals["not_computed"].items()]
        return {
            "images": len(self.image_ids),
            "positives": int(pos.sum()),
            "kaggle_dice": self.kaggle_dice,
            "empty_submission_dice": self.empty_submission_dice,
            "dice_on_positives": float(self.dice[pos].mean()) if pos.any() else None,
            "dice_on_negatives": float(self.dice[~pos].mean()) if (~pos).any() else None,
            "classification": classification,
            "not_predicted": len(self.not_predicted),
            "intervals": intervals,
            "calibration": self.calibration(),
            "notes": notes,
        }


def _share(hits: np.ndarray, of: np.ndarray) -> np.ndarray:
    """Per row (last axis), the share of ``of`` that ``hits`` marks; NaN, quietly, where ``of`` is empty."""
    with np.errstate(invalid="ignore"):
        return hits.sum(axis=-1) / of.sum(axis=-1)


def _targets(values: Any, name: str) -> tuple[float, ...]:
    # any iterable of reals (list, tuple, NumPy array, tensor); a string iterates but holds no numbers,
    # and a bare number (or 0-d array, whose iter() fails) is no collection of targets
    items: Optional[tuple[Any, ...]] = None
    if not isinstance(values, (str, bytes, bytearray)):
        try:
            items = tuple(values)
        except TypeError:
            pass
    if items is None:
        raise InvalidInputError(f"{name} must be a sequence (or array) of numbers in (0, 1], got {show(values)}")
    return tuple(check_real(v, f"{name}[{i}]", low=0.0, low_open=True, high=1.0) for i, v in enumerate(items))


def evaluate(pred: Mapping[str, Sequence[str]], truth: Mapping[str, Sequence[str]], *,
             scores: Optional[Mapping[str, float]] = None, threshold: float = 0.5,
             sensitivity: Iterable[float] = DEFAULT_SENSITIVITIES, specificity: Iterable[float] = DEFAULT_SPECIFICITIES,
             bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0, ci_method: str = DEFAULT_CI_METHOD,
             proportion_method: str = DEFAULT_PROPORTION_METHOD) -> Evaluation:
    """Score predicted RLEs (ImageId -> strings, as ``read_rle_csv`` gives) against the truth.

    Every predicted ImageId must have a truth (else :class:`pneumoseg.DataFormatError` naming some);
    truth ids without a prediction are left out and listed in ``not_predicted``. ``scores`` (ImageId ->
    probability) must cover every predicted image when given. ``sensitivity`` and ``specificity``
    are the operating points' targets (each in (0, 1]; a list, tuple or NumPy array); ``bootstrap``
    the intervals' resamples (0: none), drawn from ``seed``; ``ci_method`` their interval, "percentile"
    or "bca"; ``proportion_method`` the fixed threshold's rate intervals, "wilson" or
    "clopper-pearson". The figures are computed when asked for (``to_dict``)."""
    threshold = check_probability(threshold, "threshold")
    sensitivity_targets = _targets(sensitivity, "sensitivity")
    specificity_targets = _targets(specificity, "specificity")
    from ..metrics.intervals import BOOTSTRAP_METHODS, MAX_RESAMPLES, PROPORTION_METHODS

    ci_method = check_choice(ci_method, "ci_method", BOOTSTRAP_METHODS)
    proportion_method = check_choice(proportion_method, "proportion_method", PROPORTION_METHODS)

    bootstrap = check_int(bootstrap, "bootstrap", low=0, high=MAX_RESAMPLES)
    seed = check_int(seed, "seed", low=0)
    if not pred:
        raise InvalidInputError("the submission has no rows: nothing to evaluate")
    missing = [i for i in pred if i not in truth]
    if missing:
        raise DataFormatError(f"{len(missing)} predicted ImageId(s) have no ground truth, e.g. "
                              f"{', '.join(show(m, 70) for m in missing[:3])}")
    if scores is not None:
        lacking = [i for i in pred if i not in scores]
        if lacking:
            raise DataFormatError(f"{len(lacking)} predicted ImageId(s) have no score, e.g. {show(lacking[0], 70)}")
    ids = list(pred)
    dice = np.array([_image_dice(i, pred[i], truth[i]) for i in ids], dtype=np.float64)
    truth_pos = np.array([any(s.strip() not in ("-1", "") for s in truth[i]) for i in ids], dtype=bool)
    pred_pos = np.array([any(s.strip() not in ("-1", "") for s in pred[i]) for i in ids], dtype=bool)
    if scores is not None:
        score_values, source = np.array([float(scores[i]) for i in ids]), "scores"
    else:
        score_values, source = pred_pos.astype(np.float64), "masks"
    return Evaluation(ids, dice, truth_pos, pred_pos, score_values, source, threshold,
                      [i for i in truth if i not in pred], sensitivity_targets, specificity_targets, bootstrap, seed,
                      ci_method, proportion_method)


@quiet_matplotlib()  # matplotlib < 3.10.7 warns about pyparsing 3.3's deprecated names
def write_evaluation_plots(ev: Evaluation, folder: Any) -> list[str]:
    """PNG pictures of ``ev`` into an ``OutputFolder``: the per-image Dice histogram, the confusion
    matrix, (with both classes present) the ROC and precision-recall curves and (with probability
    scores) the reliability diagram. Returns the names written; without matplotlib, none (the caller
    says so)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from .. import metrics

    written = []

    def save(fig: Any, name: str) -> None:
        with folder.open(name) as f:
            fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 21)
    pos = ev.truth_positive
    # matplotlib's stub types bins as Sequence[float]; its docs (and hist) take any array of edges
    ax.hist([ev.dice[pos], ev.dice[~pos]], bins=bins,  # type: ignore[arg-type]
            stacked=True, label=["pneumothorax", "no pneumothorax"], color=["#d62728", "#7f7f7f"])
    ax.set_xlabel("per-image Dice")
    ax.set_ylabel("images")
    ax.set_title(f"Kaggle Dice {ev.kaggle_dice:.4f} (all-empty submission: {ev.empty_submission_dice:.4f})")
    ax.legend()
    save(fig, "dice_histogram.png")

    cls = ev.classification()
    cm = cls["confusion_matrix"]
    matrix = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(matrix, cmap="Blues")
    for (r, c), v in np.ndenumerate(matrix):
        ax.text(c, r, str(v), ha="center", va="center", color="black", fontsize=14)
    ax.set_xticks([0, 1], ["negative", "positive"])
    ax.set_yticks([0, 1], ["negative", "positive"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title("confusion matrix")
    save(fig, "confusion_matrix.png")

    if cls["auc"] is not None:
        y = ev.truth_positive.astype(np.int64)
        fpr, tpr, _ = metrics.roc_curve(y, ev.scores)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(fpr, tpr, color="#1f77b4", label=f"AUC {cls['auc']:.4f}")
        ax.plot([0, 1], [0, 1], color="#bbbbbb", linestyle="--")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title("ROC")
        ax.legend(loc="lower right")
        save(fig, "roc.png")
        precision, recall, _ = metrics.precision_recall_curve(y, ev.scores)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(recall, precision, color="#2ca02c", label=f"AP {cls['average_precision']:.4f}")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_ylim(0, 1.02)
        ax.set_title("precision-recall")
        ax.legend(loc="lower left")
        save(fig, "precision_recall.png")

    curve = ev.calibration_bins()
    if curve is not None:
        prob_true, prob_pred, _ = curve
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        top.plot([0, 1], [0, 1], color="#bbbbbb", linestyle="--", label="calibrated")
        top.plot(prob_pred, prob_true, color="#9467bd", marker="o", label="classifier")
        top.set_ylabel("share with pneumothorax")
        top.set_ylim(-0.02, 1.02)
        figures = ev.calibration()
        assert figures is not None  # as calibration_bins was not None
        top.set_title(f"reliability ({CALIBRATION_BINS} equal-width bins): ECE {figures['expected_calibration_error']:.3f}, "
                      f"Brier {figures['brier_score']:.3f}", fontsize=10)
        top.legend(loc="upper left")
        edges = np.linspace(0, 1, CALIBRATION_BINS + 1)
        bottom.hist([ev.scores[pos], ev.scores[~pos]], bins=edges,  # type: ignore[arg-type]
                    stacked=True, color=["#d62728", "#7f7f7f"], label=["pneumothorax", "no pneumothorax"])
        bottom.set_xlabel("score")
        bottom.set_ylabel("images")
        bottom.legend(loc="upper right", fontsize=7)
        bottom.set_xlim(0, 1)
        save(fig, "calibration.png")
    return written
