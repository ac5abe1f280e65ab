"""The label schema: classes, integer targets, the six-output layout, and accessors for each part.

Targets are one integer per scan::

    0 non-covid, 1 mild, 2 moderate, 3 severe, 4 critical, 5 covid of unknown severity

so presence is ``target >= MILD`` and every item carries its own label type.
A network gives six outputs per scan (paper §3.3): the presence logit, then
five severity logits (non-covid, mild, moderate, severe, critical).
:func:`cov3d.training.loss.probabilities` maps them to the same layout in
probabilities: P(covid), then the five severity probabilities. Every other
module reads outputs and probabilities through the accessors below, never by
raw index. They take torch tensors or NumPy arrays, one scan (…, 6) or many.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

NON_COVID, MILD, MODERATE, SEVERE, CRITICAL, COVID_UNKNOWN = range(6)
TARGET_NAMES = ("non-covid", "mild", "moderate", "severe", "critical", "unknown")
PRESENCE_NAMES = ("non-covid", "covid")
SEVERITY_NAMES = ("mild", "moderate", "severe", "critical")  # the covid severity classes, in order
SEVERITY_CODES = (MILD, MODERATE, SEVERE, CRITICAL)  # their categories in the challenge's CSVs (1–4)

OUTPUTS = 6
OUTPUT_NAMES = ("presence", "non-covid", *SEVERITY_NAMES)  # what each of the six outputs is
_PRESENCE = 0  # the presence logit / P(covid)
_SEVERITY = slice(1, 6)  # the five severity classes, non-covid first
_COVID_SEVERITY = slice(1 + MILD, 6)  # mild…critical within the outputs

Array = TypeVar("Array", torch.Tensor, np.ndarray)


def presence(outputs: Array) -> Array:
    """The presence logit of network outputs, or P(covid) of probabilities: shape (…,)."""
    return outputs[..., _PRESENCE]


def severity(outputs: Array) -> Array:
    """The five severity logits or probabilities (non-covid, mild…critical): shape (…, 5)."""
    return outputs[..., _SEVERITY]


def covid_severity(outputs: Array) -> Array:
    """The four covid severity logits or probabilities (mild…critical), as the network gives them: (…, 4)."""
    return outputs[..., _COVID_SEVERITY]


def covid_classes(five: Array) -> Array:
    """The covid classes (mild…critical) of a five-class severity vector (non-covid first): (…, 4)."""
    return five[..., MILD:]


def join(presence_part: torch.Tensor, severity_part: torch.Tensor) -> torch.Tensor:
    """Six outputs (…, 6) from a presence part (…,) and five severity values (…, 5), in the schema's layout."""
    return torch.cat([presence_part[..., None], severity_part], dim=-1)


def severity_given_covid(probabilities: Array) -> Array:
    """P(mild…critical | covid): the four covid severity probabilities renormalised to sum to 1, (…, 4)."""
    four = covid_severity(probabilities)
    if isinstance(four, torch.Tensor):
        return four / four.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return four / np.maximum(four.sum(axis=-1, keepdims=True), 1e-12)


def severity_index(four: Array) -> Array:
    """The most probable of four covid severity scores, as a target (MILD…CRITICAL)."""
    return four.argmax(-1) + MILD


def severity_name(target: int) -> str:
    """'mild'…'critical' for a target MILD…CRITICAL."""
    return SEVERITY_NAMES[int(target) - MILD]


def is_covid(targets: Array) -> Array:
    """Whether each target is a covid scan (of known or unknown severity)."""
    return targets >= MILD


def has_severity(targets: Array) -> Array:
    """Whether each target carries a severity label (mild…critical)."""
    return (targets >= MILD) & (targets <= CRITICAL)


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
    positives = int(is_covid(targets).sum())
    negatives = int(targets.numel() - positives)
    if positives == 0 or negatives == 0:
        raise ValueError("both covid and non-covid scans are needed to weight the classes")
    total = positives + negatives
    return total / (2 * negatives), total / (2 * positives)


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
