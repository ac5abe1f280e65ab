"""Stopping a run whose training has gone wrong."""

from __future__ import annotations

import torch
from fastai.callback.core import Callback, CancelFitException

from cov3d.training.callbacks.parallel import AverageLoss


class StopOnNaN(Callback):
    """Stop training when the loss stops being finite; the epoch goes into `run_state.nan_epoch`."""

    order = 5
    run_after = AverageLoss  # which makes a NaN on any rank every rank's, so that all stop together

    def after_loss(self):
        if self.training and not torch.isfinite(self.loss):
            self.learn.run_state.nan_epoch = self.epoch + 1
            raise CancelFitException()
