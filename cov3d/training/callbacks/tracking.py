"""The experiment tracker (W&B) fed from each epoch of the run."""

from __future__ import annotations

from fastai.callback.core import Callback

from cov3d.training.callbacks.checkpointing import BestCheckpoint
from cov3d.training.callbacks.reporting import History


class Tracking(Callback):
    """Hand each epoch's row and validation outputs to an experiment tracker (W&B), with plots and tables at
    each epoch that improves a best score and at the last epoch."""

    order = 91
    run_after = (BestCheckpoint, History)  # reads run_state.improved and .last_row

    def __init__(self, tracker):
        self.tracker = tracker

    def after_epoch(self):
        state = self.learn.run_state
        if state.scores is None:
            return
        panels = bool(state.improved) or self.epoch + 1 == self.n_epoch
        self.tracker.log_epoch(state.last_row, state.outputs, state.targets, panels=panels)
