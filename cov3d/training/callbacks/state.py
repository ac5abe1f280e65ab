"""The state that the callbacks of a run share, declared in one place: the Learner's `run_state`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cov3d.training.callbacks.checkpointing import BestCheckpoint


@dataclass
class RunState:
    """What a callback of a cov3d run writes for other callbacks (or the trainer) to read.

    `make_learner` creates one per Learner, as `learn.run_state`; callbacks
    reach it as `self.learn.run_state`. Each field says who writes and who reads it.
    """

    # The epoch's validation scores (`validation_scores`' keys, valid_loss, valid_scans), the same on every
    # rank. Written by ValidationScores: None at each epoch's start, the scores after its validation. None at
    # an epoch's end means it was not validated (skipped on --resume, or no validation scans): BestCheckpoint,
    # History, HistoryPlot, LastCheckpoint, EpochReport and Tracking then do nothing. Also read by callbacks
    # passed to train(cbs=...).
    scores: dict[str, float] | None = None
    # The last validation's outputs (logits) and targets over the whole split, in split order on every rank.
    # Written by ValidationScores (after_validate); read by Tracking (plots and predictions table).
    outputs: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    # The epoch's wall time, its split and throughput (train_seconds, batchnorm_seconds, valid_seconds,
    # epoch_seconds, scans_per_second, gpu_memory_gb on CUDA). Written by Timing; read by History.
    timing: dict[str, float | None] = field(default_factory=dict)
    # The epoch's history.csv row (plus "epochs", the run's total). Written by History (rank 0 only); read by
    # EpochReport and Tracking.
    last_row: dict | None = None
    # The metrics whose best checkpoint this epoch wrote. Written by BestCheckpoint; read by Tracking (which
    # logs plots and tables at such epochs).
    improved: set[str] = field(default_factory=set)
    # The best-checkpoint callbacks by metric, each holding its best score. Written by make_learner; read by
    # LastCheckpoint (the bests go into last.pt) and fit (the run's result, W&B summary).
    best_checkpoints: dict[str, BestCheckpoint] = field(default_factory=dict)
    # The 1-based epoch in which the training loss stopped being finite; None while it is finite. Written by
    # StopOnNaN; read by fit, which reports it.
    nan_epoch: int | None = None
    # The 1-based epoch and the name of the first weight (or BatchNorm statistic) found NaN or inf; None while
    # all are finite. Written by StopOnNonFiniteWeights (which stops the run before any checkpoint holds
    # them); read by fit, which reports it.
    nonfinite: tuple[int, str] | None = None
    # Why a file of the run could not be written (a full disk: "cannot write 'RUN/last.pt': no space left on
    # device"); None while every write succeeds. Written by BestCheckpoint, History and LastCheckpoint, which
    # stop the run then; read by fit, which reports it with the way to go on.
    write_failure: str | None = None
    # The epoch that last.pt holds (0: none yet). Set by make_learner from a resumed run's last.pt and by
    # LastCheckpoint after each write; read by fit, to say where a stopped run can resume from.
    saved_epoch: int = 0

    def best_scores(self) -> dict[str, float]:
        """Each best checkpoint's best score so far, by metric."""
        return {name: cb.best for name, cb in self.best_checkpoints.items()}
