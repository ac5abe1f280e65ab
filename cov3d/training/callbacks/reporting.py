"""Reports of a run as it goes: history.csv and history.png, each epoch's row, and batch progress."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from pathlib import Path

from fastai.callback.core import Callback
from fastai.learner import Recorder

from cov3d.training.callbacks.checkpointing import LastCheckpoint, stop_on_write_failure
from cov3d.training.callbacks.scores import Timing, ValidationScores

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "train_loss", "valid_loss", "presence_f1", "presence_accuracy", "severity_f1", "lr",
                   "valid_scans", "epoch_seconds", "train_seconds", "batchnorm_seconds", "valid_seconds",
                   "scans_per_second"]


class History(Callback):
    """Append each epoch's losses, scores and learning rate to history.csv; the row goes to `run_state.last_row`."""

    order = 75
    # Reads run_state.scores and .timing, and the training loss that fastai's Recorder adds in after_epoch.
    run_after = (ValidationScores, Timing, Recorder)

    def __init__(self, path: Path, columns: list[str] = HISTORY_COLUMNS):
        self.file, self.columns = path, columns

    def after_epoch(self):
        state = self.learn.run_state
        if state.scores is None:
            return
        names = self.recorder.metric_names[1:-1]  # drop 'epoch' and 'time'
        values = dict(zip(names, self.recorder.values[-1]))
        row = {"epoch": self.epoch + 1, "train_loss": values.get("train_loss"),
               "valid_loss": values.get("valid_loss"), **state.scores, **state.timing,
               "lr": self.opt.hypers[-1]["lr"],
               "epochs": self.n_epoch}  # the run's total, for progress lines; not a history column
        new = not self.file.exists() or self.file.stat().st_size == 0
        # A resumed run appends under the header it began with (cov3d 0.2 had no valid_scans column).
        columns = self.columns if new else _header(self.file)
        try:
            with self.file.open("a", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow(row)
        except OSError as error:  # a full disk; on --resume the history is cut back to last.pt's epoch
            stop_on_write_failure(self.learn, self.file, error)
        state.last_row = row


def _header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as handle:
        return next(csv.reader(handle), [])


class HistoryPlot(Callback):
    """Redraw history.png (losses, F1, learning rate per epoch) from history.csv after each epoch."""

    order = 76
    run_after = History  # draws the row History has just written

    def __init__(self, history: Path, image: Path):
        self.history, self.image = history, image

    def after_epoch(self):
        if self.learn.run_state.scores is None:
            return
        from cov3d.reports.curves import plot_history

        try:
            plot_history(self.history, self.image)
        except (OSError, ValueError) as error:  # a picture must never stop training
            log.warning("could not draw %s: %s", self.image, error)


class EpochReport(Callback):
    """Hand each epoch's history row to a function (the CLI's progress line, W&B)."""

    order = 90
    # The row comes from History; and last.pt is written before the report, which may stop the run (Ctrl-C).
    run_after = (History, LastCheckpoint)

    def __init__(self, report: Callable[[dict], None]):
        self.report = report

    def after_epoch(self):
        state = self.learn.run_state
        if state.scores is not None:
            self.report(state.last_row)


class BatchProgress(Callback):
    """Report (phase, batches done, batches in the phase) as training and validation proceed."""

    order = 95

    def __init__(self, report: Callable[[str | None, int, int], None]):
        self.report = report

    def before_train(self):
        self.report(f"epoch {self.epoch + 1} train", 0, len(self.dl))

    def before_validate(self):
        self.report(f"epoch {self.epoch + 1} valid", 0, len(self.dl))

    def after_batch(self):
        self.report(None, self.iter + 1, len(self.dl))
