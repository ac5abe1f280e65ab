"""Validation metrics (paper §3.4), computed with scikit-learn from whole-split predictions."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from .loss import CRITICAL, MILD, probabilities


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


def validation_scores(logits: torch.Tensor, targets: torch.Tensor, lam: float) -> dict[str, float]:
    """All per-epoch metrics from a split's raw model outputs."""
    probs = probabilities(logits, lam).cpu().numpy()
    truth = targets.cpu().numpy()
    scores = presence_scores(probs[:, 0], truth)
    scores["severity_f1"] = severity_f1(probs[:, 2:6], truth)
    return scores
