"""What a training run writes for people to read: ``metrics.csv`` (one row per epoch, rewritten
atomically), TensorBoard event files where ``tensorboard`` is installed, and at the end PNG plots
(loss and Dice / AUC curves, ROC and PR curves, confusion matrix) where matplotlib is installed."""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .._fs import OutputFolder
from .._matplotlib import quiet_matplotlib

__all__ = ["RunLog", "write_plots"]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


class RunLog:
    """Per-epoch rows to ``metrics.csv`` (and TensorBoard scalars when available)."""

    def __init__(self, folder: OutputFolder, *, tensorboard: bool) -> None:
        self.folder = folder
        self.rows: list[dict[str, Any]] = []
        self.writer = None
        self.note: Optional[str] = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            except ImportError:
                self.note = "TensorBoard logging skipped: `pip install tensorboard` to get it"
            else:
                self.writer = SummaryWriter(log_dir=str(folder.file("tensorboard", "events").parent))

    def add(self, row: Mapping[str, Any]) -> None:
        self.rows.append(dict(row))
        self._write_csv()
        if self.writer is not None:
            step = int(row.get("epoch", len(self.rows)))
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
            self._record_tensorboard()

    def _record_tensorboard(self) -> None:
        folder = self.folder.path / "tensorboard"
        for path in sorted(folder.glob("events.out.tfevents.*")):
            self.folder.record("tensorboard", path.name)

    def _write_csv(self) -> None:
        keys: list[str] = []
        for row in self.rows:
            keys.extend(k for k in row if k not in keys)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(keys)
        for row in self.rows:
            w.writerow([_cell(row.get(k)) for k in keys])
        self.folder.write_bytes("metrics.csv", data=buf.getvalue())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self._record_tensorboard()
            self.writer = None


def _figure(width: float = 5.0, height: float = 3.6):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.add_subplot(1, 1, 1)


def _save(folder: OutputFolder, name: str, fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    folder.write_bytes("plots", name, data=buf.getvalue())
    return f"plots/{name}"


@quiet_matplotlib()  # matplotlib < 3.10.7 warns about pyparsing 3.3's deprecated names
def write_plots(
    folder: OutputFolder,
    history: Sequence[Mapping[str, Any]],
    *,
    labels: Optional[np.ndarray] = None,
    scores: Optional[np.ndarray] = None,
    score_name: str = "score",
    predictions: Optional[np.ndarray] = None,
    curve_key: str = "val_triplet_dice",
    curve_label: str = "validation Dice",
    baseline: Optional[float] = None,
) -> tuple[list[str], Optional[str]]:
    """PNG plots under ``plots/``; returns (written files, a note when matplotlib is missing)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (`pip install matplotlib`, or the dev extra)"
    from ..metrics import confusion_matrix, precision_recall_curve, roc_auc, roc_curve, average_precision

    written = []
    epochs = [r["epoch"] for r in history]
    if history:
        fig, ax = _figure()
        for key, label in (("train_loss", "training loss"), ("val_loss", "validation loss")):
            xs = [r["epoch"] for r in history if r.get(key) is not None]
            ys = [r[key] for r in history if r.get(key) is not None]
            if xs:
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        written.append(_save(folder, "loss.png", fig))

        fig, ax = _figure()
        plotted = False
        curves = {curve_key: curve_label}
        curves.setdefault("val_kaggle_dice", "validation Dice @ threshold")
        curves.setdefault("val_auc", "validation AUC")
        for key, label in curves.items():
            xs = [r["epoch"] for r in history if r.get(key) is not None]
            ys = [r[key] for r in history if r.get(key) is not None]
            if xs:
                ax.plot(xs, ys, marker="o", label=label)
                plotted = True
        if baseline is not None:
            ax.axhline(baseline, color="grey", linestyle="--", label="all-empty baseline")
        if plotted:
            ax.set_xlabel("epoch")
            ax.set_ylabel("score")
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
            ax.legend()
            ax.grid(alpha=0.3)
            name = "dice.png" if "dice" in curve_key else "auc.png"
            written.append(_save(folder, name, fig))

    if labels is not None and scores is not None and 0 < int(np.sum(labels)) < len(labels):
        fpr, tpr, _ = roc_curve(labels, scores)
        fig, ax = _figure(4.2, 4.0)
        ax.plot(fpr, tpr, label=f"AUC {roc_auc(labels, scores):.3f}")
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"ROC ({score_name})")
        ax.legend(loc="lower right")
        written.append(_save(folder, "roc.png", fig))

        precision, recall, _ = precision_recall_curve(labels, scores)
        fig, ax = _figure(4.2, 4.0)
        ax.step(recall, precision, where="post", label=f"AP {average_precision(labels, scores):.3f}")
        ax.axhline(float(np.mean(labels)), color="grey", linestyle="--", label="prevalence")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"precision-recall ({score_name})")
        ax.legend(loc="lower left")
        written.append(_save(folder, "pr.png", fig))

    if labels is not None and predictions is not None and len(labels):
        cm = confusion_matrix(labels, predictions)
        fig, ax = _figure(3.8, 3.4)
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(int(v)), ha="center", va="center",
                    color="white" if v > cm.max() / 2 else "black", fontsize=12)
        ax.set_xticks([0, 1], ["no", "yes"])
        ax.set_yticks([0, 1], ["no", "yes"])
        ax.set_xlabel("predicted pneumothorax")
        ax.set_ylabel("true pneumothorax")
        ax.set_title("validation images")
        written.append(_save(folder, "confusion.png", fig))
    return written, None
