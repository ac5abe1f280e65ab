"""Each epoch's validation scores and timing, into the run state."""

from __future__ import annotations

import time

import torch
from fastai.callback.core import Callback
from fastai.learner import SkipToEpoch

from cov3d.training import distributed
from cov3d.training.callbacks.batchnorm import AverageBatchNorm, PreciseBatchNorm
from cov3d.training.metrics import validation_scores


class ValidationScores(Callback):
    """Macro F1, accuracy and loss on the whole validation split, in `run_state.scores` each epoch.

    Under distributed training each rank validates its shard; the outputs are
    gathered and put back in split order, so every rank scores every scan exactly
    once and all ranks hold the same scores (and agree on the best epoch).
    """

    order = 45
    # Epochs skipped on --resume still fire after_epoch in fastai: the scores must be reset before SkipToEpoch
    # cancels the epoch in before_epoch.
    run_before = SkipToEpoch

    def __init__(self, lam: float):
        self.lam = lam

    def before_epoch(self):
        self.learn.run_state.scores = None  # None until validated

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
            state = self.learn.run_state
            targets = distributed.interleave([part[1] for part in parts])
            state.outputs, state.targets = torch.stack(outputs), torch.stack(targets)  # in split order, for W&B
            state.scores = validation_scores(state.outputs, state.targets, self.lam)
            state.scores["valid_loss"] = sum(part[2] for part in parts) / len(outputs)
            state.scores["valid_scans"] = len(outputs)


class Timing(Callback):
    """Each epoch's wall time and its split, and training throughput over all ranks, in `run_state.timing`.

    The split: `train_seconds` (optimizer steps, loader waits included),
    `batchnorm_seconds` (precise BatchNorm and anything else between training
    and the first validation batch) and `valid_seconds`.
    """

    order = 44
    # The BatchNorm passes fall between after_train and this before_validate, in batchnorm_seconds.
    run_after = (PreciseBatchNorm, AverageBatchNorm)

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
        timing = {"scans_per_second": self.scans * distributed.world_size() / seconds if seconds else None,
                  "train_seconds": seconds}
        if self.dls.device.type == "cuda":
            timing["gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.dls.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.dls.device)
        self.learn.run_state.timing = timing

    def before_validate(self):
        self.valid_start = time.perf_counter()
        if hasattr(self, "train_end"):
            self.learn.run_state.timing["batchnorm_seconds"] = self.valid_start - self.train_end

    def after_validate(self):
        end = time.perf_counter()
        self.learn.run_state.timing["epoch_seconds"] = end - self.start
        self.learn.run_state.timing["valid_seconds"] = end - self.valid_start
