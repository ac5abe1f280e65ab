"""Stopping a run whose training has gone wrong: a loss or weights that are no longer finite."""

from __future__ import annotations

import torch
from fastai.callback.core import Callback, CancelFitException

from cov3d.models.checkpoint import nonfinite
from cov3d.training.callbacks.parallel import AverageLoss


class StopOnNaN(Callback):
    """Stop training when the loss stops being finite; the epoch goes into `run_state.nan_epoch`."""

    order = 5
    run_after = AverageLoss  # which makes a NaN on any rank every rank's, so that all stop together

    def after_loss(self):
        if self.training and not torch.isfinite(self.loss):
            self.learn.run_state.nan_epoch = self.epoch + 1
            raise CancelFitException()


class StopOnNonFiniteWeights(Callback):
    """Stop training when a weight or BatchNorm statistic is NaN or inf, before any checkpoint holds it.

    The loss of a step is computed before its update, so a step that makes the
    weights NaN (an --lr of inf, an overflowing gradient) shows in the loss only
    at the next step, or never in an epoch's last one. Checked after training
    (before validation spends time on such weights) and again at the epoch's
    end, after precise BatchNorm and before BestCheckpoint and LastCheckpoint,
    which then do not run. The epoch and the tensor go into
    `run_state.nonfinite`. Every rank holds the same weights, so all stop together.
    """

    order = 6

    def after_train(self):
        self._check()

    def after_epoch(self):
        self._check()

    def _check(self):
        model = getattr(self.learn.model, "module", self.learn.model)  # DDP's wrapped module
        name = nonfinite(model.state_dict())  # parameters and buffers (BatchNorm statistics)
        if name is not None:
            self.learn.run_state.nonfinite = (self.epoch + 1, name)
            raise CancelFitException()
