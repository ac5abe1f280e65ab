"""Training (paper §3.4–3.5): a plain fastai Learner, Adam, one-cycle, best weights per task.

A run directory holds ``presence.pt`` and ``severity.pt`` (best validation macro
F1 of each task), ``last.pt`` (the latest epoch with optimizer state, for
``--resume``), ``config.json`` and ``history.csv``. Checkpoints are tensors plus
a JSON-able config and load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import platform
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from fastcore.foundation import L

from . import __version__
from .atomic import write_csv, write_text
from .data import load_splits
from .errors import Cov3dError
from .io import DEFAULT_WINDOW
from .loss import Cov3dLoss
from .metrics import validation_scores
from .model import build_model
from .preprocess import atomic_save, preprocess_dataset, resolve_size

log = logging.getLogger(__name__)

PRESENCE, SEVERITY, LAST = "presence.pt", "severity.pt", "last.pt"
CONFIG, HISTORY = "config.json", "history.csv"
CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    """Every option of a training run; the paper's defaults (§3.2–3.5, Table 3 run 1 except size)."""

    data: str
    output: str
    arch: str = "r3d_18"
    pretrained: bool = True
    weights: str | None = None
    size: str | None = "small"
    depth: int | None = None
    width: int | None = None
    lam: float = 0.1
    presence_smoothing: float = 0.1
    severity_smoothing: float = 0.0
    dropout: float = 0.5
    penultimate: int = 512
    lr: float = 1e-4
    weight_decay: float = 1e-5
    batch_size: int = 2
    epochs: int = 40
    flip: bool = True
    seed: int = 42
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda[:N]
    loader_workers: int | None = None
    cache: str | None = None
    window: tuple[float, float] = DEFAULT_WINDOW
    train_severity: str | None = None
    validation_severity: str | None = None
    wandb: bool = False
    wandb_project: str = "cov3d"
    wandb_entity: str | None = None
    wandb_mode: str | None = None
    resolved: dict = field(default_factory=dict)  # filled in by train(): sizes, weights, versions…

    def validate(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise Cov3dError(f"--lambda {self.lam} is outside [0, 1]; 0 trains presence only, 1 severity only")
        for name in ("presence_smoothing", "severity_smoothing", "dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise Cov3dError(f"--{name.replace('_', '-')} {value} must be within [0, 1)")
        if self.epochs < 1 or self.batch_size < 1:
            raise Cov3dError(f"--epochs {self.epochs} and --batch-size {self.batch_size} must be at least 1")
        if self.lr <= 0:
            raise Cov3dError(f"--lr {self.lr} must be positive")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise Cov3dError(f"--precision {self.precision} is not one of auto, fp32, bf16, fp16")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Cov3dError(f"--device {name} asked for CUDA, but torch sees no GPU; use --device cpu")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is fp16 mixed precision on CUDA and fp32 on CPU (see docs/training.md for why)."""
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise Cov3dError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return precision
    return "fp16" if device.type == "cuda" else "fp32"


def versions() -> dict[str, str]:
    import fastai
    import sklearn

    from ._torchvision import import_torchvision

    return {"cov3d": __version__, "torch": torch.__version__, "torchvision": import_torchvision().__version__,
            "fastai": fastai.__version__, "scikit-learn": sklearn.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def model_config(config: TrainConfig) -> dict:
    """What `predict` needs to rebuild the model and read its outputs."""
    r = config.resolved
    return {"format": CHECKPOINT_FORMAT, "arch": config.arch, "penultimate": config.penultimate,
            "dropout": config.dropout, "depth": r["depth"], "width": r["width"], "lambda": config.lam,
            "window": list(config.window), "outputs": ["presence", "non-covid", "mild", "moderate", "severe",
                                                       "critical"]}


def _plain(value):
    """Tensors on the CPU and plain Python containers and numbers: what weights_only loading accepts."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, L)):  # fastcore's L holds fastai's optimizer hyper-parameters
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):  # fastai keeps some hyper-parameters as NumPy scalars
        return value.item()
    return value


def save_checkpoint(path: Path, model: torch.nn.Module, config: dict, **extra) -> None:
    atomic_save(_plain({"model": model.state_dict(), "config": config, **extra}), path)


def load_checkpoint(path: Path) -> dict:
    """A cov3d checkpoint as a dict: model state, config and bookkeeping; no pickled code is run."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a wrong or damaged file of any kind
        raise Cov3dError(f"'{path}' is not a cov3d checkpoint ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise Cov3dError(f"'{path}' is not a cov3d checkpoint (no model and config inside)")
    return checkpoint


# --- callbacks: each does one thing -----------------------------------------------------------------

def _callbacks():
    # fastai is imported lazily: it is slow to import and only training needs it.
    from fastai.callback.core import Callback, CancelFitException

    class ValidationScores(Callback):
        """Macro F1 and accuracy on the whole validation split, recorded in `learn.scores` each epoch."""

        order = 45  # before the Recorder (50) and everything that reads the scores

        def __init__(self, lam: float):
            self.lam = lam

        def before_epoch(self):
            # None until validated: epochs skipped on --resume still fire after_epoch in fastai.
            self.learn.scores = None

        def before_validate(self):
            self.outputs, self.targets = [], []

        def after_batch(self):
            if not self.training:
                self.outputs.append(self.pred.detach().float().cpu())
                self.targets.append(self.y.detach().cpu())

        def after_validate(self):
            if self.outputs:
                self.learn.scores = validation_scores(torch.cat(self.outputs), torch.cat(self.targets), self.lam)

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
            if self.learn.scores is None:
                return
            score = self.learn.scores.get(self.metric, math.nan)
            if not math.isnan(score) and score > self.best:
                self.best = score
                save_checkpoint(self.file, self.model, self.config, epoch=self.epoch + 1, metric=self.metric,
                                score=score)
                log.info("epoch %d: best %s %.4f, saved %s", self.epoch + 1, self.metric, score, self.file.name)

    class History(Callback):
        """Append each epoch's losses, scores and learning rate to history.csv."""

        order = 75

        def __init__(self, path: Path, columns: list[str]):
            self.file, self.columns = path, columns

        def after_epoch(self):
            if self.learn.scores is None:
                return
            names = self.recorder.metric_names[1:-1]  # drop 'epoch' and 'time'
            values = dict(zip(names, self.recorder.values[-1]))
            row = {"epoch": self.epoch + 1, "train_loss": values.get("train_loss"),
                   "valid_loss": values.get("valid_loss"), **self.learn.scores,
                   "lr": self.opt.hypers[-1]["lr"]}
            new = not self.file.exists()
            with self.file.open("a", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow(row)
            self.learn.last_row = row

    class LastCheckpoint(Callback):
        """Save model, optimizer and progress after every epoch so that --resume can continue."""

        order = 80

        def __init__(self, path: Path, config: dict, best: dict[str, BestCheckpoint]):
            self.file, self.config, self.best = path, config, best

        def after_epoch(self):
            if self.learn.scores is None:
                return
            save_checkpoint(self.file, self.model, self.config, epoch=self.epoch + 1,
                            optimizer=self.opt.state_dict(),
                            best={name: cb.best for name, cb in self.best.items()})

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
        """Feed volumes as channels_last_3d, the fast layout for 3D convolutions on GPUs."""

        order = 11

        def before_batch(self):
            self.learn.xb = tuple(x.contiguous(memory_format=torch.channels_last_3d) for x in self.xb)

    class EpochReport(Callback):
        """Hand each epoch's history row to a function (the CLI's progress line, W&B)."""

        order = 90

        def __init__(self, report):
            self.report = report

        def after_epoch(self):
            if self.learn.scores is not None:
                self.report(self.learn.last_row)

    class BatchProgress(Callback):
        """Report (phase, batches done, batches in the phase) as training and validation proceed."""

        order = 95

        def __init__(self, report):
            self.report = report

        def before_train(self):
            self.report(f"epoch {self.epoch + 1} train", 0, len(self.dl))

        def before_validate(self):
            self.report(f"epoch {self.epoch + 1} valid", 0, len(self.dl))

        def after_batch(self):
            self.report(None, self.iter + 1, len(self.dl))

    return (ValidationScores, StopOnNaN, BestCheckpoint, History, LastCheckpoint, Autocast, ChannelsLast,
            EpochReport, BatchProgress)


HISTORY_COLUMNS = ["epoch", "train_loss", "valid_loss", "presence_f1", "presence_accuracy", "severity_f1", "lr"]


@dataclass
class TrainResult:
    run: Path
    best: dict[str, float]
    epochs_done: int
    history: list[dict]


def train(config: TrainConfig, resume: bool = False, on_epoch=None, on_preprocess=None,
          on_batch=None) -> TrainResult:
    """Train a Cov3d model as configured; write the run directory; return the best scores.

    `on_epoch(row)` is called with each epoch's history row; `on_preprocess(done,
    total)` reports progress while the cache is brought up to date;
    `on_batch(phase, done, total)` as batches pass (phase is None within a phase).
    """
    import fastai.callback.fp16  # noqa: F401  (adds Learner.to_fp16)
    import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle)
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.optimizer import Adam

    run = Path(config.output)
    if resume:
        config = _resumed_config(run, config)
    else:
        _check_new_run(run)
    config.validate()
    seed_everything(config.seed)
    size = resolve_size(config.size, config.depth, config.width)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)

    report = preprocess_dataset(
        Path(config.data), size, Path(config.cache) if config.cache else None, window=tuple(config.window),
        severity_files={"train": _path(config.train_severity), "validation": _path(config.validation_severity)},
        progress=on_preprocess,
    )
    if report.failures:
        listed = "; ".join(f"{p}: {r}" for p, r in report.failures[:3])
        raise Cov3dError(f"{len(report.failures)} scan(s) could not be preprocessed ({listed}); "
                         "run `cov3d preprocess` to see them all, then fix or remove them")
    splits = load_splits(report.manifest, flip=config.flip)
    loader_workers = config.loader_workers if config.loader_workers is not None else min(4, os.cpu_count() or 1)
    config.resolved = {
        "depth": size.depth, "width": size.width, "size_name": size.name, "manifest": str(report.manifest),
        "class_weights": {"non-covid": splits.weights[0], "covid": splits.weights[1]},
        "counts": splits.counts, "device": str(device), "precision": precision,
        "loader_workers": loader_workers, "versions": versions(),
    }
    model = build_model(config.arch, pretrained=config.pretrained,
                        weights_path=_path(config.weights), penultimate=config.penultimate,
                        dropout=config.dropout)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    loss = Cov3dLoss(config.lam, splits.weights, config.presence_smoothing, config.severity_smoothing)

    run.mkdir(parents=True, exist_ok=True)
    _write_json(run / CONFIG, asdict(config))
    checkpoint_config = model_config(config)

    dls = DataLoaders.from_dsets(splits.train, splits.valid, bs=config.batch_size, num_workers=loader_workers,
                                 device=device, pin_memory=device.type == "cuda",
                                 persistent_workers=loader_workers > 0)
    (ValidationScores, StopOnNaN, BestCheckpoint, History, LastCheckpoint, Autocast, ChannelsLast,
     EpochReport, BatchProgress) = _callbacks()
    previous = load_checkpoint(run / LAST) if resume else None
    best_so_far = previous.get("best", {}) if previous else {}
    best = {"presence_f1": BestCheckpoint("presence_f1", run / PRESENCE, checkpoint_config,
                                          best_so_far.get("presence_f1", -math.inf))}
    if config.lam > 0:
        best["severity_f1"] = BestCheckpoint("severity_f1", run / SEVERITY, checkpoint_config,
                                             best_so_far.get("severity_f1", -math.inf))
    if config.lam == 1.0:
        # The presence logit is never trained at λ = 1; presence comes from the severity sum.
        log.info("lambda is 1: presence is read from the severity probabilities")
    nan_guard = StopOnNaN()
    callbacks = [ValidationScores(config.lam), nan_guard, *best.values(), History(run / HISTORY, HISTORY_COLUMNS),
                 LastCheckpoint(run / LAST, checkpoint_config, best)]
    if precision == "bf16":  # fp16 goes through fastai's MixedPrecision below, which adds loss scaling
        callbacks.append(Autocast(device.type, torch.bfloat16))
    if device.type == "cuda":
        callbacks.append(ChannelsLast())
    if on_epoch:
        callbacks.append(EpochReport(on_epoch))
    if on_batch:
        callbacks.append(BatchProgress(on_batch))
    tracker = None
    if config.wandb:
        from .tracking import WandbRun

        tracker = WandbRun(config, run)
        callbacks.append(EpochReport(tracker.log_epoch))

    learn = Learner(dls, model, loss_func=loss, opt_func=Adam, lr=config.lr, wd=config.weight_decay,
                    cbs=callbacks, path=run, model_dir=".")
    if hasattr(learn, "progress"):  # fastai's console bar; progress goes through on_batch instead
        learn.remove_cb(learn.progress)
    if precision == "fp16":
        learn.to_fp16()
    learn.scores = None
    start_epoch = 0
    if previous is not None:
        learn.model.load_state_dict(previous["model"])
        learn.create_opt()
        learn.opt.load_state_dict({"state": previous["optimizer"]["state"],
                                   "hypers": L(previous["optimizer"]["hypers"])})
        start_epoch = int(previous["epoch"])
        _truncate_history(run / HISTORY, start_epoch)
        log.info("resuming %s after epoch %d of %d", run, start_epoch, config.epochs)
    try:
        if start_epoch < config.epochs:
            with learn.no_logging():  # epochs are reported through on_epoch, not printed
                learn.fit_one_cycle(config.epochs, lr_max=config.lr, wd=config.weight_decay,
                                    moms=(0.95, 0.85, 0.95), start_epoch=start_epoch)
        if nan_guard.epoch_failed is not None:
            raise Cov3dError(f"the loss became NaN in epoch {nan_guard.epoch_failed}; training stopped. "
                             f"The best checkpoints so far are kept in {run}; try a lower --lr")
        if tracker:
            tracker.finish({name: cb.best for name, cb in best.items()})
    finally:
        if tracker:
            tracker.close()
    history = _read_history(run / HISTORY)
    return TrainResult(run, {name: cb.best for name, cb in best.items()}, len(history), history)


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _check_new_run(run: Path) -> None:
    if (run / LAST).exists() or (run / PRESENCE).exists():
        raise Cov3dError(f"'{run}' already holds a training run; continue it with --resume, "
                         "or choose another --output")


def _resumed_config(run: Path, given: TrainConfig) -> TrainConfig:
    if not (run / CONFIG).is_file() or not (run / LAST).is_file():
        raise Cov3dError(f"'{run}' holds no interrupted run to resume (config.json and last.pt are needed)")
    saved = json.loads((run / CONFIG).read_text(encoding="utf-8"))
    saved.pop("resolved", None)
    if "window" in saved:
        saved["window"] = tuple(saved["window"])
    config = TrainConfig(**saved)
    # A resumed run may change where it runs and what it logs, nothing that shapes the model.
    config.device, config.loader_workers = given.device, given.loader_workers
    config.wandb, config.wandb_mode = given.wandb, given.wandb_mode
    return config


def _read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _truncate_history(path: Path, epochs: int) -> None:
    write_csv(path, HISTORY_COLUMNS, [row for row in _read_history(path) if int(row["epoch"]) <= epochs])
