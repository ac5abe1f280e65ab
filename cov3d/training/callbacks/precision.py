"""Mixed precision and memory layout of each batch."""

from __future__ import annotations

import torch
from fastai.callback.core import Callback


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
