"""Distributed training: DistributedDataParallel around the model, and the loss averaged over ranks."""

from __future__ import annotations

import inspect

import torch
from fastai.callback.core import Callback, TrainEvalCallback

from cov3d.training import distributed


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

    order = -20
    run_before = TrainEvalCallback  # which sets train or eval mode on learn.model

    def __init__(self, device: torch.device):
        self.device = device

    def before_fit(self):
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
