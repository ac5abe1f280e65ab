"""Evaluation on a labelled split: scores, Youden threshold, plots."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score, roc_curve

from cov3d.atomic import write_csv, write_text
from cov3d.data.catalog import catalog
from cov3d.errors import Cov3dError
from cov3d.labels import PRESENCE_NAMES, SEVERITY_CODES, SEVERITY_NAMES, severity_index, severity_name
from cov3d.reports.evaluation import plot_evaluation
from cov3d.training.metrics import class_f1, macro_f1
from cov3d.inference.predict import CSV_COLUMNS, load_ensemble, parse_threshold, predict_scans, prediction_rows
from cov3d.inference.stats import RESAMPLES, SEED, Scored, add_intervals, scored_from_rows
from cov3d.training.runtime import resolve_device


def youden_threshold(truth: Sequence[int], scores: Sequence[float]) -> float:
    """The score threshold that maximises Youden's J = TPR − FPR (ties: the highest threshold)."""
    truth, scores = np.asarray(truth), np.asarray(scores, dtype=float)
    if len(set(truth.tolist())) < 2:
        raise Cov3dError("Youden's threshold needs both covid and non-covid scans in the split")
    fpr, tpr, thresholds = roc_curve(truth, scores)
    j = tpr - fpr
    best = int(np.flatnonzero(j == j.max())[0])  # roc_curve lists thresholds from high to low
    return float(min(1.0, thresholds[best]))


def presence_metrics(truth: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Macro and per-class F1, accuracy, ROC AUC (None with one class) and confusion matrix of presence."""
    predicted = (scores >= threshold).astype(int)
    return {
        "macro_f1": macro_f1(truth, predicted, [0, 1]),
        "f1": dict(zip(PRESENCE_NAMES, map(float, class_f1(truth, predicted, [0, 1])))),
        "accuracy": float(accuracy_score(truth, predicted)),
        "roc_auc": float(roc_auc_score(truth, scores)) if len(set(truth.tolist())) == 2 else None,
        "confusion_matrix": confusion_matrix(truth, predicted, labels=[0, 1]).tolist(),
    }


def severity_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict:
    """Macro and per-class F1 and confusion matrix over scans with a severity label (targets MILD…CRITICAL)."""
    codes = list(SEVERITY_CODES)
    return {
        "scans": len(truth),
        "macro_f1": macro_f1(truth, predicted),
        "f1": dict(zip(SEVERITY_NAMES, map(float, class_f1(truth, predicted, codes)))),
        "confusion_matrix": confusion_matrix(truth, predicted, labels=codes).tolist(),
    }


@dataclass
class Evaluation:
    metrics: dict | None  # None when no scan could be predicted
    rows: list[dict]
    failures: list[tuple[str, str]]
    roc: tuple[np.ndarray, np.ndarray] | None
    presence_confusion: np.ndarray
    severity_confusion: np.ndarray | None
    scored: Scored | None = None  # the per-scan answers as arrays (cov3d.inference.stats)


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
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Evaluation:
    """Predict the labelled scans of `split` and score them against their labels; with `resamples` > 0, each
    score's stratified bootstrap 95% interval too (seeded by `seed`)."""
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
    truth = np.array([int(by_path[p.path].label == "covid") for p in predictions])
    scores = np.array([float(np.mean(p.presence)) for p in predictions])
    if threshold == "youden":
        chosen, method = youden_threshold(truth, scores), "youden"
    else:
        chosen, method = parse_threshold(threshold), "given"
    rows = prediction_rows(predictions, chosen)
    for row, p in zip(rows, predictions):
        record = by_path[p.path]
        row["label"] = record.label
        row["true_severity"] = severity_name(record.severity) if record.severity else ""
    metrics: dict = {
        "split": split, "scans": len(predictions), "failed": len(failures), "threshold": chosen,
        "threshold_method": method,
        # Youden's threshold is fitted on the scans it is scored on: those scores are optimistic.
        "threshold_in_sample": method == "youden", "models": [str(m.path) for m in members], "tta": tta,
        "device": str(resolve_device(device)),
        # each model's precision as predict chose it, with the reason (auto: from the hardware and a measurement)
        "precision": [{"model": str(m.path), **m.precision.record()} for m in members if m.precision],
        "presence": presence_metrics(truth, scores, chosen),
    }
    roc = roc_curve(truth, scores)[:2] if len(set(truth.tolist())) == 2 else None
    labelled = [(by_path[p.path].severity, p) for p in predictions if by_path[p.path].severity and p.severity]
    metrics["severity"] = severity_metrics(np.array([s for s, _ in labelled]),
                                           np.array([int(severity_index(np.mean(p.severity, axis=0)))
                                                     for _, p in labelled])) if labelled else None
    presence_confusion = np.array(metrics["presence"]["confusion_matrix"])
    severity_confusion = np.array(metrics["severity"]["confusion_matrix"]) if labelled else None
    scored = scored_from_rows(rows, data, scores)
    if resamples:
        add_intervals(metrics, scored, resamples, seed)
    return Evaluation(metrics, rows, failures, roc, presence_confusion, severity_confusion, scored)


def write_outputs(evaluation: Evaluation, directory: Path) -> list[Path]:
    """metrics.json, predictions.csv, roc.png, presence_confusion.png and severity_confusion.png."""
    directory = Path(directory)
    written = [directory / "metrics.json", directory / "predictions.csv"]
    write_text(written[0], json.dumps(evaluation.metrics, indent=2) + "\n")
    write_csv(written[1], [*CSV_COLUMNS, "label", "true_severity"], evaluation.rows)
    written.extend(plot_evaluation(evaluation, directory))
    return written


def describe(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
