"""fastai callbacks of a cov3d training run, one concern per module; their shared state is `RunState`."""

from fastai.callback.core import Callback, CancelFitException

from cov3d.training.callbacks.batchnorm import AverageBatchNorm, PreciseBatchNorm
from cov3d.training.callbacks.checkpointing import BestCheckpoint, LastCheckpoint, RestoreState, random_state
from cov3d.training.callbacks.guards import StopOnNaN, StopOnNonFiniteWeights
from cov3d.training.callbacks.ordering import order_violations
from cov3d.training.callbacks.parallel import AverageLoss, DataParallel
from cov3d.training.callbacks.precision import Autocast, ChannelsLast
from cov3d.training.callbacks.reporting import HISTORY_COLUMNS, BatchProgress, EpochReport, History, HistoryPlot
from cov3d.training.callbacks.scores import Timing, ValidationScores
from cov3d.training.callbacks.state import RunState
from cov3d.training.callbacks.tracking import Tracking

__all__ = [
    "HISTORY_COLUMNS", "AverageBatchNorm", "AverageLoss", "Autocast", "BatchProgress", "BestCheckpoint", "Callback",
    "CancelFitException", "ChannelsLast", "DataParallel", "EpochReport", "History", "HistoryPlot",
    "LastCheckpoint", "PreciseBatchNorm", "RestoreState", "RunState", "StopOnNaN", "StopOnNonFiniteWeights",
    "Timing", "Tracking",
    "ValidationScores", "order_violations", "random_state",
]
