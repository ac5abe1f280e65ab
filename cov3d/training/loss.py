"""The combined presence/severity loss of the paper (§3.3, eq. 1–6), with its activation and decoding.

Targets are one integer per scan:

    0 non-covid, 1 mild, 2 moderate, 3 severe, 4 critical, 5 covid of unknown severity

so presence is ``target >= 1`` and every item carries its own label type.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NON_COVID, MILD, MODERATE, SEVERE, CRITICAL, COVID_UNKNOWN = range(6)
SEVERITY_NAMES = ("mild", "moderate", "severe", "critical")


def target_of(label: str, severity: int | None) -> int:
    """The integer target of a scan labelled 'covid'/'non-covid' with an optional severity 1–4."""
    if label == "non-covid":
        return NON_COVID
    if label == "covid":
        return COVID_UNKNOWN if severity is None else int(severity)
    raise ValueError(f"scan label must be 'covid' or 'non-covid', got '{label}'")


def class_weights(targets: list[int] | torch.Tensor) -> tuple[float, float]:
    """Weights (non-covid, covid) that balance the two presence classes: N / (2 · N_class).

    Computed from the training targets, so each class contributes equally to the loss.
    """
    targets = torch.as_tensor(targets)
    positives = int((targets >= MILD).sum())
    negatives = int(targets.numel() - positives)
    if positives == 0 or negatives == 0:
        raise ValueError("both covid and non-covid scans are needed to weight the classes")
    total = positives + negatives
    return total / (2 * negatives), total / (2 * positives)


SEVERITY_WEIGHTINGS = ("presence", "inverse")


def severity_class_weights(targets: list[int] | torch.Tensor) -> tuple[float, ...]:
    """Inverse-frequency weights of the six target categories (the paper author's code): N / (K · N_c).

    Categories: non-covid, mild, moderate, severe, critical, covid of unknown
    severity; K counts those present in the training split, so the weights
    average 1 over its scans. A category absent from training gets weight 0
    (nothing in training carries it).
    """
    targets = torch.as_tensor(targets)
    counts = torch.bincount(targets, minlength=COVID_UNKNOWN + 1)[: COVID_UNKNOWN + 1].tolist()
    present = sum(1 for n in counts if n)
    total = sum(counts)
    return tuple(total / (present * n) if n else 0.0 for n in counts)


def neighbour_smoothing(epsilon: float, classes: int = 5) -> torch.Tensor:
    """Target distributions (row = true class) with ε shared among adjacent classes only.

    The true class keeps 1 − ε; ε is split equally between its neighbours, so a
    class at either end (non-covid, whose neighbour is mild; critical) gives it
    all to its single neighbour.
    """
    matrix = torch.zeros(classes, classes)
    for c in range(classes):
        neighbours = [n for n in (c - 1, c + 1) if 0 <= n < classes]
        matrix[c, c] = 1.0 - epsilon
        for n in neighbours:
            matrix[c, n] = epsilon / len(neighbours)
    return matrix


class Cov3dLoss(nn.Module):
    """ℓ = (1 − λ)·ℓ_covid + λ·ℓ_severity, averaged over the batch.

    ℓ_covid is BCE on the presence logit with targets 1 − ε_p / ε_p; ℓ_severity is
    cross entropy over the five severity classes with neighbour label smoothing
    ε_s, or −log Σ_{c=1..4} s_c for covid scans of unknown severity. Both are
    weighted by the item's presence class weight w_i (eq. 4–5 as the paper
    states them), unless `severity_weights` gives the severity term its own
    weight per target category (see :func:`severity_class_weights`).
    """

    def __init__(self, lam: float = 0.1, weights: tuple[float, float] = (1.0, 1.0),
                 presence_smoothing: float = 0.1, severity_smoothing: float = 0.0,
                 severity_weights: tuple[float, ...] | None = None):
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lambda must be within [0, 1], got {lam}")
        self.lam = lam
        self.presence_smoothing = presence_smoothing
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))
        self.register_buffer("smoothing", neighbour_smoothing(severity_smoothing))
        self.register_buffer("severity_weights", None if severity_weights is None
                             else torch.tensor(severity_weights, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.per_item(logits, target).mean()

    def per_item(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of each item, before the batch mean.

        `logits` is (B, 6), or (B, S, 6) per-slice logits of a 2D slice model in
        training: every slice carries its scan's target (seeds 000 and 003), and an
        item's loss is the mean of its slices' losses.
        """
        if logits.ndim == 3:
            items, slices = logits.shape[:2]
            per_slice = self.per_item(logits.reshape(items * slices, -1), target.repeat_interleave(slices))
            return per_slice.view(items, slices).mean(dim=1)
        logits = logits.float()  # stable under autocast
        target = target.long()
        positive = target >= MILD
        w = self.weights[positive.long()]
        loss = torch.zeros_like(w)
        if self.lam < 1.0:
            eps = self.presence_smoothing
            y = torch.where(positive, 1.0 - eps, eps)
            presence = F.binary_cross_entropy_with_logits(logits[:, 0], y, reduction="none")
            loss = loss + (1.0 - self.lam) * w * presence
        if self.lam > 0.0:
            log_s = F.log_softmax(logits[:, 1:6], dim=1)
            soft = self.smoothing[target.clamp(max=CRITICAL)]
            labelled = -(soft * log_s).sum(dim=1)
            unlabelled = -torch.logsumexp(log_s[:, MILD:], dim=1)
            severity = torch.where(target == COVID_UNKNOWN, unlabelled, labelled)
            w_s = w if self.severity_weights is None else self.severity_weights[target]
            loss = loss + self.lam * w_s * severity
        return loss

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, 6) probabilities: P(covid), then the five severity probabilities.

        A model trained with λ = 1 never trained its presence logit; its P(covid)
        is the sum of the four covid severity probabilities (paper §3.3).
        """
        return probabilities(logits, self.lam)

    def decodes(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Presence (0/1 at threshold 0.5) and severity 1–4 (argmax over the four covid classes)."""
        probs = self.activation(logits)
        return (probs[:, 0] >= 0.5).long(), probs[:, 2:6].argmax(dim=1) + MILD


def probabilities(logits: torch.Tensor, lam: float) -> torch.Tensor:
    """P(covid) and the five severity probabilities of a model trained with `lam`."""
    logits = logits.float()
    severity = F.softmax(logits[:, 1:6], dim=1)
    presence = severity[:, MILD:].sum(dim=1) if lam >= 1.0 else torch.sigmoid(logits[:, 0])
    return torch.cat([presence[:, None], severity], dim=1)


def slice_mean_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, S, 6) per-slice logits → (B, 6) logits whose probabilities are the mean of the slices' (seed 000 §4).

    The presence logit is log(mean σ) − log(mean (1 − σ)) and the severity
    logits are log(mean softmax), computed in log space so that no probability
    is clipped: :func:`probabilities` of the result equals the mean of
    :func:`probabilities` over the slices, whatever λ.
    """
    logits = logits.float()
    slices = logits.shape[1]
    z = logits[..., 0]
    presence = torch.logsumexp(F.logsigmoid(z), dim=1) - torch.logsumexp(F.logsigmoid(-z), dim=1)
    severity = torch.logsumexp(F.log_softmax(logits[..., 1:6], dim=-1), dim=1) - math.log(slices)
    return torch.cat([presence[:, None], severity], dim=1)
