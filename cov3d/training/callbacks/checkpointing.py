"""The run's checkpoints: the best weights per metric, last.pt after every epoch, and resuming from it."""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.fp16 import MixedPrecision
from fastai.learner import Recorder

from cov3d.atomic import write_failed
from cov3d.models.checkpoint import save_checkpoint
from cov3d.training import distributed
from cov3d.training.callbacks.scores import ValidationScores
from cov3d.training.runtime import seed_everything

log = logging.getLogger(__name__)


def stop_on_write_failure(learn, path: Path, error: OSError) -> None:
    """Record why `path` could not be written (a full disk) in `run_state.write_failure` and stop the run.

    What was written before stays whole (every write goes to a temporary file
    first), and last.pt still holds the previous epoch, so the run can resume.
    """
    learn.run_state.write_failure = str(write_failed(error, path))
    raise CancelFitException()


class BestCheckpoint(Callback):
    """Save the weights whenever a validation score improves on its best so far."""

    order = 70
    run_after = ValidationScores  # reads run_state.scores

    def __init__(self, metric: str, path: Path, config: dict, best: float = -math.inf):
        self.metric, self.file, self.config, self.best = metric, path, config, best

    def after_epoch(self):
        state = self.learn.run_state
        state.improved.discard(self.metric)
        if state.scores is None:
            return
        score = state.scores.get(self.metric, math.nan)
        if not math.isnan(score) and score > self.best:
            self.best = score  # every rank keeps the best, for its LastCheckpoint; rank 0 writes
            state.improved.add(self.metric)
            if distributed.is_main():
                try:
                    save_checkpoint(self.file, self.model, self.config, epoch=self.epoch + 1, metric=self.metric,
                                    score=score)
                except OSError as error:  # a full disk: the old file is whole, and last.pt is the last epoch's
                    stop_on_write_failure(self.learn, self.file, error)
                log.info("epoch %d: best %s %.4f, saved %s", self.epoch + 1, self.metric, score, self.file.name)


class LastCheckpoint(Callback):
    """Save model, optimizer, progress and the best scores (`run_state.best_checkpoints`) after every epoch so
    that --resume can continue.

    Runs on every rank: the random states of all ranks are gathered, and rank 0 writes."""

    order = 80
    run_after = BestCheckpoint  # last.pt holds this epoch's bests

    def __init__(self, path: Path, config: dict):
        self.file, self.config = path, config

    def after_epoch(self):
        state = self.learn.run_state
        if state.scores is None:
            return
        optimizer = self.opt.state_dict()
        # fastai keeps the hyper-parameters in fastcore's L; a plain list is what weights_only loading accepts.
        optimizer = {"state": optimizer["state"], "hypers": list(optimizer["hypers"])}
        scaler = getattr(self.learn, "scaler", None)  # fastai's fp16 loss scaler, on CUDA
        states = distributed.gather(random_state(self.dls.train))
        if not distributed.is_main():
            return
        try:
            save_checkpoint(self.file, self.model, self.config, epoch=self.epoch + 1, optimizer=optimizer,
                            best=state.best_scores(), rng=states[0],
                            rng_ranks=states if len(states) > 1 else None,
                            scaler=scaler.state_dict() if scaler is not None else None,
                            # fastai's reported training loss is smoothed across epochs: its state goes on too.
                            smooth_loss={"count": self.recorder.smooth_loss.count,
                                         "value": self.recorder.smooth_loss.val})
        except OSError as error:  # a full disk: the previous last.pt is whole
            stop_on_write_failure(self.learn, self.file, error)
        state.saved_epoch = self.epoch + 1


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

    order = 99
    # fastai's MixedPrecision makes its scaler, and its Recorder resets the smoothed loss, in before_fit.
    run_after = (MixedPrecision, Recorder)

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
                seed = (self.seed * 1_000_003 + distributed.rank() * 1009 + int(self.checkpoint["epoch"])) % 2**32
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
