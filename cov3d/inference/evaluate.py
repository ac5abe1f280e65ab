"""Evaluation on a labelled split: scores, Youden threshold, plots."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score, roc_curve

from cov3d.atomic import replacing, write_csv, write_text
from cov3d.data.catalog import catalog
from cov3d.errors import Cov3dError
from cov3d.training.loss import SEVERITY_NAMES
from cov3d.inference.predict import CSV_COLUMNS, load_ensemble, parse_threshold, predict_scans, prediction_rows
from cov3d.training.runtime import resolve_device

PRESENCE_NAMES = ("non-covid", "covid")


def youden_threshold(truth: Sequence[int], scores: Sequence[float]) -> float:
    """The score threshold that maximises Youden's J = TPR − FPR (ties: the highest threshold)."""
    truth, scores = np.asarray(truth), np.asarray(scores, dtype=float)
    if len(set(truth.tolist())) < 2:
        raise Cov3dError("Youden's threshold needs both covid and non-covid scans in the split")
    fpr, tpr, thresholds = roc_curve(truth, scores)
    j = tpr - fpr
    best = int(np.flatnonzero(j == j.max())[0])  # roc_curve lists thresholds from high to low
    return float(min(1.0, thresholds[best]))


@dataclass
class Evaluation:
    metrics: dict | None  # None when no scan could be predicted
    rows: list[dict]
    failures: list[tuple[str, str]]
    roc: tuple[np.ndarray, np.ndarray] | None
    presence_confusion: np.ndarray
    severity_confusion: np.ndarray | None


def evaluate(
    data: Path,
    models: Sequence[Path],
    *,
    split: str = "validation",
    threshold: str | float = 0.5,
    tta: bool = True,
    severity_files: dict[str, Path | None] | None = None,
    device: str = "auto",
    precision: str = "auto",
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Predict the labelled scans of `split` and score them against their labels."""
    data = Path(data)
    records = [r for r in catalog(data, severity_files) if r.split == split and r.label]
    if not records:
        raise Cov3dError(f"no labelled scans in the {split} split of '{data}'; expected "
                         f"{split}/covid and {split}/non-covid folders")
    members = load_ensemble(models)
    by_path = {(data / r.path): r for r in records}
    predictions, failures = predict_scans(list(by_path), members, tta=tta, device=device, precision=precision,
                                          workers=workers, roots=[data], progress=progress)
    if not predictions:
        return Evaluation(None, [], failures, None, np.zeros((2, 2), dtype=int), None)
    truth = np.array([1 if by_path[p.path].label == "covid" else 0 for p in predictions])
    scores = np.array([float(np.mean(p.presence)) for p in predictions])
    if threshold == "youden":
        chosen, method = youden_threshold(truth, scores), "youden"
    else:
        chosen, method = parse_threshold(threshold), "given"
    rows = prediction_rows(predictions, chosen)
    for row, p in zip(rows, predictions):
        record = by_path[p.path]
        row["label"] = record.label
        row["true_severity"] = SEVERITY_NAMES[record.severity - 1] if record.severity else ""
    predicted = (scores >= chosen).astype(int)
    both = len(set(truth.tolist())) == 2
    metrics: dict = {
        "split": split, "scans": len(predictions), "failed": len(failures), "threshold": chosen,
        "threshold_method": method,
        # Youden's threshold is fitted on the scans it is scored on: those scores are optimistic.
        "threshold_in_sample": method == "youden", "models": [str(m.path) for m in members], "tta": tta,
        "device": str(resolve_device(device)),
        # each model's precision as predict chose it, with the reason (auto: from the hardware and a measurement)
        "precision": [{"model": str(m.path), **m.precision.record()} for m in members if m.precision],
        "presence": {
            "macro_f1": float(f1_score(truth, predicted, average="macro", labels=[0, 1], zero_division=0)),
            "f1": dict(zip(PRESENCE_NAMES, map(float, f1_score(truth, predicted, average=None, labels=[0, 1],
                                                                 zero_division=0)))),
            "accuracy": float(accuracy_score(truth, predicted)),
            "roc_auc": float(roc_auc_score(truth, scores)) if both else None,
            "confusion_matrix": confusion_matrix(truth, predicted, labels=[0, 1]).tolist(),
        },
    }
    presence_confusion = np.array(metrics["presence"]["confusion_matrix"])
    roc = roc_curve(truth, scores)[:2] if both else None
    severity_confusion = None
    labelled = [(by_path[p.path].severity, p) for p in predictions if by_path[p.path].severity and p.severity]
    if labelled:
        true_sev = np.array([s for s, _ in labelled])
        pred_sev = np.array([int(np.mean(p.severity, axis=0).argmax()) + 1 for _, p in labelled])
        severity_confusion = confusion_matrix(true_sev, pred_sev, labels=[1, 2, 3, 4])
        metrics["severity"] = {
            "scans": len(labelled),
            "macro_f1": float(f1_score(true_sev, pred_sev, average="macro", zero_division=0)),
            "f1": dict(zip(SEVERITY_NAMES, map(float, f1_score(true_sev, pred_sev, average=None, labels=[1, 2, 3, 4],
                                                                zero_division=0)))),
            "confusion_matrix": severity_confusion.tolist(),
        }
    else:
        metrics["severity"] = None
    return Evaluation(metrics, rows, failures, roc, presence_confusion, severity_confusion)


def write_outputs(evaluation: Evaluation, directory: Path) -> list[Path]:
    """metrics.json, predictions.csv, roc.png, presence_confusion.png and severity_confusion.png."""
    directory = Path(directory)
    written = [directory / "metrics.json", directory / "predictions.csv"]
    write_text(written[0], json.dumps(evaluation.metrics, indent=2) + "\n")
    write_csv(written[1], [*CSV_COLUMNS, "label", "true_severity"], evaluation.rows)
    written.extend(_plots(evaluation, directory))
    return written


def _plots(evaluation: Evaluation, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    written = []
    if evaluation.roc is not None:
        fpr, tpr = evaluation.roc
        auc = evaluation.metrics["presence"]["roc_auc"]
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(fpr, tpr, label=f"ROC (AUC {auc:.3f})")
        ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="COVID-19 presence",
               xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right")
        fig.tight_layout()
        with replacing(directory / "roc.png") as temporary:
            fig.savefig(temporary, dpi=120, format="png")
        plt.close(fig)
        written.append(directory / "roc.png")
    matrices = [("presence_confusion.png", evaluation.presence_confusion, PRESENCE_NAMES, "Presence")]
    if evaluation.severity_confusion is not None:
        matrices.append(("severity_confusion.png", evaluation.severity_confusion, SEVERITY_NAMES, "Severity"))
    for name, matrix, labels, title in matrices:
        fig, ax = plt.subplots(figsize=(1.3 * len(labels) + 2, 1.3 * len(labels) + 1.5))
        ax.imshow(matrix, cmap="Blues")
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, str(value), ha="center", va="center",
                    color="white" if value > matrix.max() / 2 else "black")
        ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels, yticklabels=labels,
               xlabel="predicted", ylabel="true", title=f"{title} confusion matrix")
        fig.tight_layout()
        with replacing(directory / name) as temporary:
            fig.savefig(temporary, dpi=120, format="png")
        plt.close(fig)
        written.append(directory / name)
    return written


def describe(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
