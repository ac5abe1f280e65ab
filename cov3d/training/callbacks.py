"""fastai callbacks of a cov3d training run; each does one thing.

Orders: DataParallel -20 (before fastai's TrainEvalCallback), AverageLoss 4, StopOnNaN 5, Autocast 10, ChannelsLast 11, PreciseBatchNorm 20 (after
fastai's TrainEvalCallback puts the model in eval mode), AverageBatchNorm 21, Timing 44, ValidationScores 45
(before fastai's Recorder at 50 and everything that reads the scores),
BestCheckpoint 70, History 75, HistoryPlot 76, LastCheckpoint 80, EpochReport
90, Tracking 91, BatchProgress 95, RestoreState 99.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException

from cov3d.training import distributed
from cov3d.models.checkpoint import save_checkpoint
from cov3d.training.metrics import validation_scores
from cov3d.models.video import precise_batchnorm
from cov3d.training.runtime import seed_everything

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "train_loss", "valid_loss", "presence_f1", "presence_accuracy", "severity_f1", "lr",
                   "valid_scans", "epoch_seconds", "train_seconds", "batchnorm_seconds", "valid_seconds",
                   "scans_per_second"]


class ValidationScores(Callback):
    """Macro F1, accuracy and loss on the whole validation split, recorded in `learn.scores` each epoch.

    Under distributed training each rank validates its shard; the outputs are
    gathered and put back in split order, so every rank scores every scan exactly
    once and all ranks hold the same scores (and agree on the best epoch).
    """

    order = 45

    def __init__(self, lam: float):
        self.lam = lam

    def before_epoch(self):
        # None until validated: epochs skipped on --resume still fire after_epoch in fastai.
        self.learn.scores = None

    def before_validate(self):
        self.outputs, self.targets, self.loss_sum = [], [], 0.0

    def after_batch(self):
        if not self.training:
            self.outputs.extend(self.pred.detach().float().cpu())
            self.targets.extend(self.y.detach().cpu())
            self.loss_sum += float(self.loss) * len(self.y)  # fastai's loss is the batch mean

    def after_validate(self):
        parts = distributed.gather((self.outputs, self.targets, self.loss_sum))
        outputs = distributed.interleave([part[0] for part in parts])
        if outputs:
            targets = distributed.interleave([part[1] for part in parts])
            self.learn.validation = (torch.stack(outputs), torch.stack(targets))  # in split order, for W&B
            self.learn.scores = validation_scores(*self.learn.validation, self.lam)
            self.learn.scores["valid_loss"] = sum(part[2] for part in parts) / len(outputs)
            self.learn.scores["valid_scans"] = len(outputs)


class Timing(Callback):
    """Each epoch's wall time and its split, and training throughput over all ranks, in `learn.timing`.

    The split: `train_seconds` (optimizer steps, loader waits included),
    `batchnorm_seconds` (precise BatchNorm and anything else between training
    and the first validation batch) and `valid_seconds`.
    """

    order = 44  # after PreciseBatchNorm (20): its passes fall between after_train and this before_validate

    def before_epoch(self):
        self.start = time.perf_counter()

    def before_train(self):
        self.train_start, self.scans = time.perf_counter(), 0

    def after_batch(self):
        if self.training:
            self.scans += len(self.y)

    def after_train(self):
        self.train_end = time.perf_counter()
        seconds = self.train_end - self.train_start
        # Every rank takes the same number of equal batches, so the global count is this rank's times the world.
        self.learn.timing = {"scans_per_second": self.scans * distributed.world_size() / seconds if seconds else None,
                             "train_seconds": seconds}
        if self.dls.device.type == "cuda":
            self.learn.timing["gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.dls.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.dls.device)

    def before_validate(self):
        self.valid_start = time.perf_counter()
        if hasattr(self, "train_end"):
            self.learn.timing["batchnorm_seconds"] = self.valid_start - self.train_end

    def after_validate(self):
        end = time.perf_counter()
        self.learn.timing["epoch_seconds"] = end - self.start
        self.learn.timing["valid_seconds"] = end - self.valid_start


class PreciseBatchNorm(Callback):
    """Before each validation, re-estimate every BatchNorm's running statistics on training batches.

    BatchNorm's running averages lag weights that change fast (a high learning
    rate over few batches an epoch) and are noisy at batch size 2, so evaluation
    mode can see statistics that no longer fit the weights: validation collapses
    to one class while the training loss falls. Here the statistics are reset
    and measured again as the plain mean over up to `batches` training batches,
    with the current weights, BatchNorm in training mode and everything else
    (dropout) in evaluation mode, without gradients. Validation, and the
    checkpoints written after it, then use these statistics.
    """

    order = 20

    def __init__(self, batches: int, channels_last: bool = False):
        self.batches, self.channels_last = batches, channels_last

    def before_validate(self):
        if self.batches < 1:
            return

        def volumes():
            for xb, _ in islice(self.dls.train, self.batches):
                yield xb.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else xb

        precise_batchnorm(self.model, volumes())


class AverageBatchNorm(Callback):
    """Before each validation, average every BatchNorm's running statistics across ranks.

    Each rank's statistics follow its own shard; validation and the checkpoints
    need one set, the same on every rank (for PreciseBatchNorm's measurements,
    the mean over ranks is the mean over all their batches). Distributed runs only.
    """

    order = 21

    def before_validate(self):
        for module in self.model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                distributed.mean_(module.running_mean)
                distributed.mean_(module.running_var)


class AverageLoss(Callback):
    """Record each training step's loss as the mean over all ranks (what one process with the global batch
    would see), so that the reported loss is the run's and a NaN on any rank stops every rank together."""

    order = 4

    def after_loss(self):
        if self.training:
            self.learn.loss = distributed.mean_(self.loss.detach().clone())


class DataParallel(Callback):
    """Train through torch's DistributedDataParallel: gradients are averaged across ranks at each step.

    Validation and PreciseBatchNorm run on the plain module: DDP's forward may
    synchronise, and ranks validate shards of different sizes. Each epoch the
    training loader is told the epoch, which picks its shard (see distributed.shard).
    """

    order = -20  # before fastai's TrainEvalCallback sets train or eval mode on learn.model

    def __init__(self, device: torch.device):
        self.device = device

    def before_fit(self):
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # Buffers are synchronised once, at the start, and not before each step: AverageBatchNorm makes the
        # BatchNorm statistics agree before they are used. (torch 2.13 renamed the option.)
        options = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})
        self.wrapped = DistributedDataParallel(
            self.model, device_ids=[self.device] if self.device.type == "cuda" else None, **options)

    def before_epoch(self):
        self.dls.train.get_idxs.epoch = self.epoch

    def before_train(self):
        self.learn.model = self.wrapped

    def before_validate(self):
        self.learn.model = self.wrapped.module

    def after_fit(self):
        self.learn.model = self.wrapped.module


class StopOnNaN(Callback):
    """Stop training when the loss stops being finite; remember the epoch."""

    order = 5

    def __init__(self):
        self.epoch_failed: int | None = None

    def after_loss(self):
        if self.training and not torch.isfinite(self.loss):
            self.epoch_failed = self.epoch + 1
            raise CancelFitException()


class BestCheckpoint(Callback):
    """Save the weights whenever a validation score improves on its best so far."""

    order = 70

    def __init__(self, metric: str, path: Path, config: dict, best: float = -math.inf):
        self.metric, self.file, self.config, self.best = metric, path, config, best

    def after_epoch(self):
        self.improved = False
        if self.learn.scores is None:
            return
        score = self.learn.scores.get(self.metric, math.nan)
        if not math.isnan(score) and score > self.best:
            self.best, self.improved = score, True  # every rank keeps the best, for its LastCheckpoint; rank 0 writes
            if distributed.is_main():
                save_checkpoint(self.file, self.model, self.config, epoch=self.epoch + 1, metric=self.metric,
                                score=score)
                log.info("epoch %d: best %s %.4f, saved %s", self.epoch + 1, self.metric, score, self.file.name)


class History(Callback):
    """Append each epoch's losses, scores and learning rate to history.csv."""

    order = 75

    def __init__(self, path: Path, columns: list[str] = HISTORY_COLUMNS):
        self.file, self.columns = path, columns

    def after_epoch(self):
        if self.learn.scores is None:
            return
        names = self.recorder.metric_names[1:-1]  # drop 'epoch' and 'time'
        values = dict(zip(names, self.recorder.values[-1]))
        row = {"epoch": self.epoch + 1, "train_loss": values.get("train_loss"),
               "valid_loss": values.get("valid_loss"), **self.learn.scores, **getattr(self.learn, "timing", {}),
               "lr": self.opt.hypers[-1]["lr"],
               "epochs": self.n_epoch}  # the run's total, for progress lines; not a history column
        new = not self.file.exists() or self.file.stat().st_size == 0
        # A resumed run appends under the header it began with (cov3d 0.2 had no valid_scans column).
        columns = self.columns if new else _header(self.file)
        with self.file.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        self.learn.last_row = row


def _header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as handle:
        return next(csv.reader(handle), [])


class HistoryPlot(Callback):
    """Redraw history.png (losses, F1, learning rate per epoch) from history.csv after each epoch."""

    order = 76

    def __init__(self, history: Path, image: Path):
        self.history, self.image = history, image

    def after_epoch(self):
        if self.learn.scores is None:
            return
        from cov3d.reports.curves import plot_history

        try:
            plot_history(self.history, self.image)
        except (OSError, ValueError) as error:  # a picture must never stop training
            log.warning("could not draw %s: %s", self.image, error)


class LastCheckpoint(Callback):
    """Save model, optimizer and progress after every epoch so that --resume can continue.

    Runs on every rank: the random states of all ranks are gathered, and rank 0 writes."""

    order = 80

    def __init__(self, path: Path, config: dict, best: dict[str, BestCheckpoint]):
        self.file, self.config, self.best = path, config, best

    def after_epoch(self):
        if self.learn.scores is None:
            return
        optimizer = self.opt.state_dict()
        # fastai keeps the hyper-parameters in fastcore's L; a plain list is what weights_only loading accepts.
        optimizer = {"state": optimizer["state"], "hypers": list(optimizer["hypers"])}
        scaler = getattr(self.learn, "scaler", None)  # fastai's fp16 loss scaler, on CUDA
        states = distributed.gather(random_state(self.dls.train))
        if not distributed.is_main():
            return
        save_checkpoint(self.file, self.model, self.config, epoch=self.epoch + 1, optimizer=optimizer,
                        best={name: cb.best for name, cb in self.best.items()}, rng=states[0],
                        rng_ranks=states if len(states) > 1 else None,
                        scaler=scaler.state_dict() if scaler is not None else None,
                        # fastai's reported training loss is smoothed across epochs: its state goes on too.
                        smooth_loss={"count": self.recorder.smooth_loss.count,
                                     "value": self.recorder.smooth_loss.val})


def random_state(loader) -> dict:
    """Every random number generator a training epoch draws from, as weights_only-loadable values."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
             "torch": torch.get_rng_state(), "loader": loader.rng.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_state(saved) -> tuple:
    version, internal, gauss = saved
    return version, tuple(internal), gauss


class RestoreState(Callback):
    """At the start of a resumed fit, put back the random number generators and loss scaler of last.pt,
    so that the resumed run goes on as the uninterrupted one would have."""

    order = 99  # after fastai's MixedPrecision has made its scaler in before_fit

    def __init__(self, checkpoint: dict, seed: int = 0):
        self.checkpoint, self.seed = checkpoint, seed

    def before_fit(self):
        state = self.checkpoint.get("rng")
        ranks = self.checkpoint.get("rng_ranks") or [state]
        if distributed.world_size() > 1 or len(ranks) > 1:
            # Each rank goes on from its own state when the process count is unchanged; otherwise the
            # shards differ anyway, and each rank's numbers are drawn afresh from the seed, rank and epoch.
            state = ranks[distributed.rank()] if len(ranks) == distributed.world_size() else None
            if state is None:
                seed = self.seed * 1_000_003 + distributed.rank() * 1009 + int(self.checkpoint["epoch"])
                seed_everything(seed)
                self.dls.train.rng.seed(seed)
        if state:  # absent from runs of cov3d 0.1
            random.setstate(_python_state(state["python"]))
            kind, keys, position, has_gauss, gauss = state["numpy"]
            np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
            torch.set_rng_state(state["torch"])
            self.dls.train.rng.setstate(_python_state(state["loader"]))
            if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(state["cuda"])
        scaler = getattr(self.learn, "scaler", None)
        if scaler is not None and self.checkpoint.get("scaler"):
            scaler.load_state_dict(self.checkpoint["scaler"])
        smooth = self.checkpoint.get("smooth_loss")
        if smooth:  # fastai's Recorder (order 50) has just reset it
            self.recorder.smooth_loss.count = int(smooth["count"])
            self.recorder.smooth_loss.val = torch.as_tensor(smooth["value"]).to(self.dls.device)


class Autocast(Callback):
    """Mixed precision with torch.autocast on CPU or CUDA (fastai's own callback is CUDA-only)."""

    order = 10

    def __init__(self, device_type: str, dtype: torch.dtype):
        self.device_type, self.dtype = device_type, dtype

    def before_batch(self):
        self.context = torch.autocast(self.device_type, dtype=self.dtype)
        self.context.__enter__()

    def after_pred(self):
        self.learn.pred = self.pred.float()
        self.context.__exit__(None, None, None)

    def after_cancel_batch(self):
        if getattr(self, "context", None) is not None:
            self.context.__exit__(None, None, None)


class ChannelsLast(Callback):
    """Feed volumes as channels_last_3d, the fast layout for convolutions on GPUs."""

    order = 11

    def before_batch(self):
        self.learn.xb = tuple(x.contiguous(memory_format=torch.channels_last_3d) for x in self.xb)


class EpochReport(Callback):
    """Hand each epoch's history row to a function (the CLI's progress line, W&B)."""

    order = 90

    def __init__(self, report: Callable[[dict], None]):
        self.report = report

    def after_epoch(self):
        if self.learn.scores is not None:
            self.report(self.learn.last_row)


class Tracking(Callback):
    """Hand each epoch's row and validation outputs to an experiment tracker (W&B), with plots and tables at
    each epoch that improves a best score and at the last epoch."""

    order = 91

    def __init__(self, tracker, best: dict):
        self.tracker, self.best = tracker, best

    def after_epoch(self):
        if self.learn.scores is None:
            return
        panels = any(getattr(cb, "improved", False) for cb in self.best.values()) or self.epoch + 1 == self.n_epoch
        outputs, targets = getattr(self.learn, "validation", (None, None))
        self.tracker.log_epoch(self.learn.last_row, outputs, targets, panels=panels)


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
