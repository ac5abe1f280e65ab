"""Validation metrics (paper §3.4), computed with scikit-learn from whole-split predictions."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from cov3d import labels
from cov3d.labels import SEVERITY_CODES, SEVERITY_NAMES
from cov3d.training.loss import probabilities


def class_f1(truth: np.ndarray, predicted: np.ndarray, classes: list[int]) -> np.ndarray:
    """F1 of each of `classes` (0 where a class is never true nor predicted)."""
    return f1_score(truth, predicted, average=None, labels=classes, zero_division=0)


def macro_f1(truth: np.ndarray, predicted: np.ndarray, classes: list[int] | None = None) -> float:
    """Macro F1 over `classes`, or over the classes present in `truth` or `predicted` when None."""
    return float(f1_score(truth, predicted, average="macro", labels=classes, zero_division=0))


def presence_scores(probs: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Macro F1 and accuracy of covid vs non-covid; `probs` are P(covid)."""
    truth = labels.is_covid(targets).astype(int)
    predicted = (probs >= threshold).astype(int)
    return {
        "presence_f1": macro_f1(truth, predicted, [0, 1]),
        "presence_accuracy": float(accuracy_score(truth, predicted)),
    }


def severity_f1(severity_probs: np.ndarray, targets: np.ndarray) -> float:
    """Macro F1 over scans with a severity label; prediction = argmax over mild…critical.

    `severity_probs` holds the four covid severity probabilities (mild…critical).
    NaN when no scan carries a severity label.
    """
    labelled = labels.has_severity(targets)
    if not labelled.any():
        return float("nan")
    predicted = labels.severity_index(severity_probs[labelled])
    return macro_f1(targets[labelled], predicted)


def per_class_f1(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """F1 of each presence class (threshold 0.5) and of each severity class over severity-labelled scans."""
    truth = labels.is_covid(targets).astype(int)
    presence = class_f1(truth, (labels.presence(probs) >= 0.5).astype(int), [0, 1])
    scores = {"f1_non_covid": float(presence[0]), "f1_covid": float(presence[1])}
    labelled = labels.has_severity(targets)
    if labelled.any():
        predicted = labels.severity_index(labels.covid_severity(probs[labelled]))
        severity = class_f1(targets[labelled], predicted, list(SEVERITY_CODES))
        scores.update({f"f1_{name}": float(v) for name, v in zip(SEVERITY_NAMES, severity)})
    return scores


def validation_scores(logits: torch.Tensor, targets: torch.Tensor, lam: float) -> dict[str, float]:
    """All per-epoch metrics from a split's raw model outputs."""
    probs = probabilities(logits, lam).cpu().numpy()
    truth = targets.cpu().numpy()
    scores = presence_scores(labels.presence(probs), truth)
    scores["severity_f1"] = severity_f1(labels.covid_severity(probs), truth)
    scores.update(per_class_f1(probs, truth))
    return scores
