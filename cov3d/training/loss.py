"""The combined presence/severity loss of the paper (§3.3, eq. 1–6), with its activation and decoding.

Targets, outputs and their layout are the label schema's (:mod:`cov3d.labels`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cov3d import labels, moved_names
from cov3d.labels import COVID_UNKNOWN, CRITICAL

SEVERITY_WEIGHTINGS = ("presence", "inverse")

# Names this module held in cov3d 0.3, still importable from here.
__getattr__ = moved_names(__name__, {
    **{name: "cov3d.labels" for name in ("NON_COVID", "MILD", "MODERATE", "SEVERE", "CRITICAL", "SEVERITY_NAMES",
                                         "target_of", "class_weights", "severity_class_weights")},
    "slice_mean_logits": "cov3d.models.slices"})


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
    weight per target category (see :func:`cov3d.labels.severity_class_weights`).
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
        positive = labels.is_covid(target)
        w = self.weights[positive.long()]
        loss = torch.zeros_like(w)
        if self.lam < 1.0:
            eps = self.presence_smoothing
            y = torch.where(positive, 1.0 - eps, eps)
            presence = F.binary_cross_entropy_with_logits(labels.presence(logits), y, reduction="none")
            loss = loss + (1.0 - self.lam) * w * presence
        if self.lam > 0.0:
            log_s = F.log_softmax(labels.severity(logits), dim=1)
            soft = self.smoothing[target.clamp(max=CRITICAL)]
            labelled = -(soft * log_s).sum(dim=1)
            unlabelled = -torch.logsumexp(labels.covid_classes(log_s), dim=1)
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
        return (labels.presence(probs) >= 0.5).long(), labels.severity_index(labels.covid_severity(probs))


def probabilities(logits: torch.Tensor, lam: float) -> torch.Tensor:
    """P(covid) and the five severity probabilities of a model trained with `lam`."""
    logits = logits.float()
    severity = F.softmax(labels.severity(logits), dim=1)
    presence = labels.covid_classes(severity).sum(dim=1) if lam >= 1.0 else torch.sigmoid(labels.presence(logits))
    return labels.join(presence, severity)
