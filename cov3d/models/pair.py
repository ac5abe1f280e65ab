"""Two lungs, one network: the model of ``--lungs split``.

Under split each scan is two volumes, channels of one (B, 2, D, H, W) input:
the right lung, and the left lung mirrored so that it looks like a right one.
:class:`LungPair` scores both with one shared network (any cov3d
architecture: (B, 1, D, H, W) → (B, 6)) and combines the two scores:

* presence: the log-sum-exp of the two presence logits less log 2, a smooth
  maximum (it equals both when they agree, and nears the larger when they
  differ), so that disease in one lung is enough: an average would halve it;
* severity: the mean of the two lungs' severity logits, since severity is the
  share of both lungs affected.

Both are symmetric in the two lungs, so swapping them (which is what a
sagittal reflection of the scan does under split) leaves the output unchanged:
the model is reflection-invariant by construction, and TTA's reflection adds
nothing under split.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LUNG_CHANNELS = 2


class LungPair(nn.Module):
    """(B, 2, D, H, W) → (B, 6): one shared `model` per lung, scores combined symmetrically."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != LUNG_CHANNELS:
            raise ValueError(f"a LungPair takes (batch, 2, depth, height, width) input, got {tuple(x.shape)}")
        batch = x.shape[0]
        # Both lungs in one batch: (B, 2, …) → (2B, 1, …), the right lungs first.
        both = x.transpose(0, 1).reshape(LUNG_CHANNELS * batch, 1, *x.shape[2:])
        logits = self.model(both).reshape(LUNG_CHANNELS, batch, -1)
        presence = torch.logsumexp(logits[..., :1], dim=0) - math.log(LUNG_CHANNELS)
        severity = logits[..., 1:].mean(dim=0)
        return torch.cat([presence, severity], dim=-1)


def lung_pair(model: nn.Module) -> LungPair:
    """Wrap a cov3d model for split-lung input, keeping its arch name for explain."""
    pair = LungPair(model)
    for attribute in ("cov3d_arch",):
        if hasattr(model, attribute):
            setattr(pair, attribute, getattr(model, attribute))
    return pair
