"""Validation metrics (paper §3.4), computed with scikit-learn from whole-split predictions."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from cov3d.training.loss import CRITICAL, MILD, probabilities


def presence_scores(probs: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Macro F1 and accuracy of covid vs non-covid; `probs` are P(covid)."""
    truth = (targets >= MILD).astype(int)
    predicted = (probs >= threshold).astype(int)
    return {
        "presence_f1": float(f1_score(truth, predicted, average="macro", labels=[0, 1], zero_division=0)),
        "presence_accuracy": float(accuracy_score(truth, predicted)),
    }


def severity_f1(severity_probs: np.ndarray, targets: np.ndarray) -> float:
    """Macro F1 over scans with a severity label; prediction = argmax over mild…critical.

    `severity_probs` holds the four covid severity probabilities (mild…critical).
    NaN when no scan carries a severity label.
    """
    labelled = (targets >= MILD) & (targets <= CRITICAL)
    if not labelled.any():
        return float("nan")
    predicted = severity_probs[labelled].argmax(axis=1) + MILD
    return float(f1_score(targets[labelled], predicted, average="macro", zero_division=0))


def per_class_f1(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """F1 of each presence class (threshold 0.5) and of each severity class over severity-labelled scans."""
    truth = (targets >= MILD).astype(int)
    presence = f1_score(truth, (probs[:, 0] >= 0.5).astype(int), average=None, labels=[0, 1], zero_division=0)
    scores = {"f1_non_covid": float(presence[0]), "f1_covid": float(presence[1])}
    labelled = (targets >= MILD) & (targets <= CRITICAL)
    if labelled.any():
        predicted = probs[labelled, 2:6].argmax(axis=1) + MILD
        severity = f1_score(targets[labelled], predicted, average=None, labels=[1, 2, 3, 4], zero_division=0)
        scores.update({f"f1_{name}": float(v) for name, v in zip(("mild", "moderate", "severe", "critical"),
                                                                  severity)})
    return scores


def validation_scores(logits: torch.Tensor, targets: torch.Tensor, lam: float) -> dict[str, float]:
    """All per-epoch metrics from a split's raw model outputs."""
    probs = probabilities(logits, lam).cpu().numpy()
    truth = targets.cpu().numpy()
    scores = presence_scores(probs[:, 0], truth)
    scores["severity_f1"] = severity_f1(probs[:, 2:6], truth)
    scores.update(per_class_f1(probs, truth))
    return scores
