"""BatchNorm statistics for validation and the checkpoints: measured again, and the same on every rank."""

from __future__ import annotations

from itertools import islice

import torch
from fastai.callback.core import Callback, TrainEvalCallback

from cov3d.models.video import precise_batchnorm
from cov3d.training import distributed
from cov3d.training.callbacks.parallel import DataParallel


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
    # After fastai's TrainEvalCallback puts the model in eval mode, and DataParallel puts back the plain module.
    run_after = (TrainEvalCallback, DataParallel)

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
    run_after = (PreciseBatchNorm, DataParallel)  # averages what PreciseBatchNorm measured, on the plain module

    def before_validate(self):
        for module in self.model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                distributed.mean_(module.running_mean)
                distributed.mean_(module.running_var)
