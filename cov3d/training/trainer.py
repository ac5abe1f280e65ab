"""Training (paper §3.4–3.5): a plain fastai Learner, Adam, one-cycle, best weights per task.

`train()` reads as config → data → model → learner → fit. The run directory and
checkpoint format are in :mod:`cov3d.models.checkpoint`, the callbacks in
:mod:`cov3d.training.callbacks`, the architectures in :mod:`cov3d.models.registry`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import fastai.callback.fp16  # noqa: F401  (adds Learner.to_fp16)
import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle)
import torch
from fastai.data.core import DataLoaders, TfmdDL
from fastai.learner import Learner
from fastai.optimizer import Adam
from fastai.torch_core import to_detach
from fastcore.foundation import L

from cov3d.training import distributed
from cov3d.models.registry import build_model, get_arch, memory_format, resolve_pretrained
from cov3d.atomic import check_writable, remove_stale_temporaries, write_csv, write_text
from cov3d.training.callbacks import (
    HISTORY_COLUMNS, AverageBatchNorm, AverageLoss, Autocast, BatchProgress, BestCheckpoint, Callback, ChannelsLast,
    DataParallel, EpochReport, History, HistoryPlot, LastCheckpoint, PreciseBatchNorm, RestoreState, RunState,
    StopOnNaN, StopOnNonFiniteWeights, Timing, Tracking, ValidationScores, order_violations,
)
from cov3d.models.checkpoint import (
    CONFIG, HISTORY, HISTORY_PLOT, LAST, PRESENCE, SEVERITY, load_checkpoint, model_config, nonfinite,
)
from cov3d.reports.curves import read_history
from cov3d.data.dataset import Splits, load_splits
from cov3d.errors import Cov3dError
from cov3d.training.config import RECIPES, TrainConfig, cap_workers  # noqa: F401  (RECIPES: re-exported)
from cov3d.training.loss import Cov3dLoss
from cov3d.training.precision import resolve_precision
from cov3d.data.preprocess import preprocess_dataset, resolve_size
from cov3d.training.runtime import guard_cpu_bf16_conv3d, resolve_device, seed_everything, versions

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run: Path
    best: dict[str, float]
    epochs_done: int
    history: list[dict]
    main: bool = True  # False on the ranks of a distributed run other than 0, which report nothing


def train(config: TrainConfig, resume: bool = False, on_epoch: Callable[[dict], None] | None = None,
          on_preprocess: Callable[[int, int], None] | None = None,
          on_batch: Callable[[str | None, int, int], None] | None = None,
          options: Collection[str] = (), cbs: Collection[Callback] = (), restart: bool = False) -> TrainResult:
    """Train a cov3d model as configured; write the run directory; return the best scores.

    `on_epoch(row)` is called with each epoch's history row (its "epochs" is the
    run's total); `on_preprocess(done, total)` reports progress while the cache
    is brought up to date; `on_batch(phase, done, total)` as batches pass (phase
    is None within a phase). With `resume`, `options` names the fields of
    `config` the user set explicitly (see :func:`_resumed_config`). `cbs` are
    extra fastai callbacks for the Learner; they may read the run's shared
    state, `learn.run_state` (:class:`cov3d.training.callbacks.RunState`), and
    declare `run_after`/`run_before`, which are checked against their `order`.
    `restart` starts the run in `config.output` afresh, deleting what it holds
    (for a damaged last.pt that cannot be resumed).
    """
    if resume and restart:
        raise Cov3dError("--resume continues the run in --output and --restart replaces it; give one of them")
    launch = distributed.launch_from_environment()
    if launch.distributed:
        distributed.start(launch, config.device)
    if launch.rank != 0:  # only rank 0 reports; the others train in silence
        on_epoch = on_batch = on_preprocess = None
    try:
        run = Path(config.output)
        check_writable(run, folder=True)  # a file, or a read-only disk: said now, not after preprocessing
        if run.is_dir() and launch.rank == 0:
            remove_stale_temporaries(run)
        previous = _interrupted_run(run) if resume else None
        config = _resumed_config(run, config, previous, options) if resume else _new_run(run, config, restart)
        seed_everything(config.seed)
        splits = prepare_data(config, on_preprocess)
        model = make_model(config, resume)
        if launch.distributed:  # the same weights everywhere, but each rank its own augmentation draws
            seed_everything(config.seed + launch.rank)
        learn = make_learner(config, splits, model, run, previous, on_epoch, on_batch, cbs)
        return fit(learn, config, run, previous)
    except RuntimeError as error:
        if distributed.peer_lost(error):  # the rank that failed has printed why; torchrun is stopping the rest
            raise Cov3dError(f"stopped because another rank failed ({str(error).splitlines()[-1].strip()[:200]}); "
                             "its error is above") from None
        raise
    finally:
        if launch.distributed:
            distributed.stop()


def prepare_data(config: TrainConfig, on_preprocess: Callable[[int, int], None] | None = None) -> Splits:
    """Bring the cache up to date, load the splits, and record the resolved settings in `config.resolved`."""
    size = resolve_size(config.size, config.depth, config.width)
    device = distributed.device() if distributed.world_size() > 1 else resolve_device(config.device)
    precision = resolve_precision(config.precision, device, "training")
    # Rank 0 brings the cache up to date while the others wait; all then read its manifest.
    outcome = _preprocess(config, size, on_preprocess) if distributed.is_main() else None
    kind, value = distributed.from_main(outcome)
    if kind == "error":
        raise Cov3dError(value)
    manifest = Path(value)
    splits = load_splits(manifest, flip=config.flip, crop=config.crop)
    world = distributed.world_size()
    if len(splits.train) // world < config.batch_size:
        # fastai drops the last incomplete training batch: a smaller split would train on nothing.
        each = f" shared by {world} processes" if world > 1 else ""
        raise Cov3dError(f"the training split has {len(splits.train)} scans{each}, too few for --batch-size "
                         f"{config.batch_size} (per process); give a --batch-size of at most "
                         f"{max(1, len(splits.train) // world)}")
    if config.loader_workers is not None:
        loader_workers = cap_workers(config.loader_workers, "--loader-workers")
    else:
        loader_workers = min(4, os.cpu_count() or 1)
    config.resolved = {
        "depth": size.depth, "width": size.width, "size_name": size.name, "manifest": str(manifest),
        "input": get_arch(config.arch).input, "recipe": config.recipe,
        "class_weights": {"non-covid": splits.weights[0], "covid": splits.weights[1]},
        "severity_class_weights": dict(zip(["non-covid", "mild", "moderate", "severe", "critical", "unknown"],
                                           splits.severity_weights)),
        "counts": splits.counts, "device": str(device), **precision.record(),
        "loader_workers": loader_workers, "versions": versions(),
        "world_size": world, "global_batch_size": config.batch_size * world,
    }
    return splits


def _preprocess(config: TrainConfig, size, on_preprocess: Callable[[int, int], None] | None) -> tuple[str, str]:
    """('manifest', path) once the cache is up to date, or ('error', message) for every rank to raise."""
    try:
        report = preprocess_dataset(
            Path(config.data), size, Path(config.cache) if config.cache else None, window=tuple(config.window),
            lungs=config.lungs, severity_files={"train": _path(config.train_severity), "validation": _path(config.validation_severity)},
            progress=on_preprocess,
        )
        if report.failures:
            listed = "; ".join(f"{p}: {r}" for p, r in report.failures[:3])
            raise Cov3dError(f"{len(report.failures)} scan(s) could not be preprocessed ({listed}); "
                             "run `cov3d preprocess` to see them all, then fix or remove them")
    except Cov3dError as error:
        if distributed.world_size() == 1:
            raise
        return "error", str(error)
    return "manifest", str(report.manifest)


def make_model(config: TrainConfig, resume: bool = False) -> torch.nn.Module:
    """The network of `config`; a resumed run takes its weights from last.pt, so it loads no pretrained file."""
    model = build_model(config.arch, pretrained=config.pretrained and not resume,
                        weights=[] if resume else [Path(w) for w in config.weights],
                        penultimate=config.penultimate, dropout=config.dropout, pool=config.pool,
                        final_bias=config.final_bias, slices=config.slices, lungs=config.lungs)
    sync_bn = config.sync_bn
    if sync_bn is None:
        sync_bn = distributed.world_size() > 1 and config.resolved["device"].startswith("cuda")
    if sync_bn:
        if distributed.world_size() == 1:
            log.warning("--sync-bn has no effect in a single process; it applies to distributed runs")
        elif not config.resolved["device"].startswith("cuda"):
            raise Cov3dError("--sync-bn needs CUDA GPUs (torch's SyncBatchNorm has no CPU version); leave it out")
        else:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if config.resolved["device"].startswith("cuda"):
        model = model.to(memory_format=memory_format(config.arch))
    elif config.resolved["precision"] == "bf16":
        guard_cpu_bf16_conv3d(model)
    return model


def make_learner(config: TrainConfig, splits: Splits, model: torch.nn.Module, run: Path, previous: dict | None,
                 on_epoch: Callable[[dict], None] | None = None,
                 on_batch: Callable[[str | None, int, int], None] | None = None,
                 cbs: Collection[Callback] = ()) -> Learner:
    """A plain fastai Learner: Adam, the combined loss, and one callback per job; restored from `previous`.

    `cbs` are more fastai callbacks, the caller's; the callbacks share `learn.run_state` (a `RunState`).
    """
    device = torch.device(config.resolved["device"])
    precision = config.resolved["precision"]
    main = distributed.is_main()
    if main:
        run.mkdir(parents=True, exist_ok=True)
        _write_json(run / CONFIG, config.to_json())
    checkpoint_config = model_config(
        arch=config.arch, depth=config.resolved["depth"], width=config.resolved["width"], lam=config.lam,
        window=tuple(config.window), penultimate=config.penultimate, dropout=config.dropout, pool=config.pool,
        final_bias=config.final_bias, lungs=config.lungs)
    dls = make_loaders(config, splits, device)
    # fastai reads one item of a loader when its `n_inp` is first asked for, in the first training batch,
    # drawing random numbers for augmentation then. Asking here, before last.pt's random state is put back,
    # keeps a resumed run's draws in step with the uninterrupted run's.
    for loader in dls.loaders:
        loader.n_inp
    best = _best_checkpoints(config, run, checkpoint_config, previous)
    callbacks = [*_callbacks(config, run, device, checkpoint_config, best, on_epoch, on_batch), *cbs]
    loss = Cov3dLoss(config.lam, splits.weights, config.presence_smoothing, config.severity_smoothing,
                     splits.severity_weights if config.severity_weights == "inverse" else None)
    learn = Learner(dls, model, loss_func=loss, opt_func=Adam, lr=config.lr, wd=config.weight_decay,
                    cbs=callbacks, path=run, model_dir=".")
    learn.run_state = RunState(best_checkpoints=best, saved_epoch=int(previous["epoch"]) if previous else 0)
    if hasattr(learn, "progress"):  # fastai's console bar; progress goes through on_batch instead
        learn.remove_cb(learn.progress)
    if precision == "fp16":
        learn.to_fp16()
    if previous is not None:
        learn.add_cb(RestoreState(previous, config.seed))
        learn.model.load_state_dict(previous["model"])
        learn.create_opt()
        learn.opt.load_state_dict({"state": previous["optimizer"]["state"],
                                   "hypers": L(previous["optimizer"]["hypers"])})
    # fastai runs callbacks by `order` alone; the run_after / run_before the classes declare are checked here.
    problems = order_violations(learn.cbs)
    if problems:
        raise Cov3dError(f"callbacks out of order: {'; '.join(problems)}")
    return learn


def _best_checkpoints(config: TrainConfig, run: Path, checkpoint_config: dict,
                      previous: dict | None) -> dict[str, BestCheckpoint]:
    """One BestCheckpoint per task the run trains, each starting from the best a resumed run had reached."""
    best_so_far = previous.get("best", {}) if previous else {}
    best = {"presence_f1": BestCheckpoint("presence_f1", run / PRESENCE, checkpoint_config,
                                          best_so_far.get("presence_f1", -math.inf))}
    if config.lam > 0:
        best["severity_f1"] = BestCheckpoint("severity_f1", run / SEVERITY, checkpoint_config,
                                             best_so_far.get("severity_f1", -math.inf))
    if config.lam == 1.0:
        # The presence logit is never trained at λ = 1; presence comes from the severity sum.
        log.info("lambda is 1: presence is read from the severity probabilities")
    return best


def _callbacks(config: TrainConfig, run: Path, device: torch.device, checkpoint_config: dict,
               best: dict[str, BestCheckpoint], on_epoch: Callable[[dict], None] | None,
               on_batch: Callable[[str | None, int, int], None] | None) -> list[Callback]:
    """cov3d's callbacks for this run: one per job, those of files and reports on rank 0 only."""
    main, world = distributed.is_main(), distributed.world_size()
    callbacks = [ValidationScores(config.lam), Timing(), StopOnNaN(), StopOnNonFiniteWeights(), *best.values(),
                 LastCheckpoint(run / LAST, checkpoint_config)]
    if main:  # files of the run and reports: rank 0's job
        callbacks += [History(run / HISTORY), HistoryPlot(run / HISTORY, run / HISTORY_PLOT)]
    if world > 1:
        callbacks += [DataParallel(device), AverageLoss(), AverageBatchNorm()]
    if config.bn_scans:  # bn_scans counts scans over all ranks together
        callbacks.append(PreciseBatchNorm(math.ceil(config.bn_scans / (config.batch_size * world)),
                                          channels_last=device.type == "cuda"))
    if config.resolved["precision"] == "bf16":  # fp16 goes through fastai's MixedPrecision, with loss scaling
        callbacks.append(Autocast(device.type, torch.bfloat16))
    if device.type == "cuda":
        callbacks.append(ChannelsLast())
    if on_epoch and main:
        callbacks.append(EpochReport(on_epoch))
    if on_batch and main:
        callbacks.append(BatchProgress(on_batch))
    return callbacks


def make_loaders(config: TrainConfig, splits: Splits, device: torch.device) -> DataLoaders:
    """fastai loaders of `config.batch_size` scans per process; each rank takes its shard when distributed."""
    workers = config.resolved["loader_workers"]
    common = {"bs": config.batch_size, "num_workers": workers, "device": device, "pin_memory": device.type == "cuda",
              "persistent_workers": workers > 0}
    world = distributed.world_size()
    if world == 1:
        return DataLoaders.from_dsets(splits.train, splits.valid, **common)
    train = _Shard(len(splits.train), config.seed, distributed.rank(), world, training=True)
    valid = _Shard(len(splits.valid), config.seed, distributed.rank(), world, training=False)
    return DataLoaders(
        _RankLoader(splits.train, shuffle=False, drop_last=True, n=len(train), get_idxs=train, **common),
        _RankLoader(splits.valid, shuffle=False, drop_last=False, n=len(valid), get_idxs=valid, **common),
        device=device)


class _RankLoader(TfmdDL):
    """A fastai loader whose batches stay on their rank.

    fastai's Recorder detaches each loss through the loader, and fastai then
    all-gathers it whenever WORLD_SIZE > 1: with shards of unequal length in
    validation, the ranks would wait for each other forever. cov3d gathers what
    it needs itself (ValidationScores, AverageLoss).
    """

    def to_detach(self, b, cpu: bool = True, gather: bool = True):
        return to_detach(b, cpu, gather=False)


class _Shard:
    """A fastai loader's `get_idxs` under DDP: this rank's indices of the split (see distributed.shard).
    DataParallel sets `epoch` before each training epoch."""

    def __init__(self, length: int, seed: int, rank: int, world: int, training: bool):
        self.length, self.seed, self.rank, self.world, self.training = length, seed, rank, world, training
        self.epoch = 0

    def __len__(self) -> int:
        if self.training:
            return self.length // self.world
        return len(range(self.rank, self.length, self.world))

    def __call__(self) -> list[int]:
        return distributed.shard(self.length, self.epoch if self.training else None, self.seed, self.rank,
                                 self.world)


def fit(learn: Learner, config: TrainConfig, run: Path, previous: dict | None = None) -> TrainResult:
    """One-cycle training from where `previous` stopped; W&B around it when asked."""
    start_epoch = int(previous["epoch"]) if previous is not None else 0
    main = distributed.is_main()
    if previous is not None and main:
        _truncate_history(run / HISTORY, start_epoch)
        log.info("resuming %s after epoch %d of %d", run, start_epoch, config.epochs)
    tracker = None
    if config.wandb and main:
        from cov3d.training.tracking import WandbRun

        valid = learn.dls.valid.dataset
        tracker = WandbRun(config, run, names=valid.names, files=valid.files)
        learn.add_cb(Tracking(tracker))
    state = learn.run_state
    try:
        if start_epoch < config.epochs:
            with learn.no_logging():  # epochs are reported through on_epoch, not printed
                learn.fit_one_cycle(config.epochs, lr_max=config.lr, wd=config.weight_decay,
                                    moms=(0.95, 0.85, 0.95), start_epoch=start_epoch)
        if state.write_failure is not None:
            raise Cov3dError(f"{state.write_failure}; training stopped. {_how_to_go_on(run, state.saved_epoch)}")
        if state.nan_epoch is not None:
            raise Cov3dError(f"the loss became NaN in epoch {state.nan_epoch}; training stopped. "
                             f"The best checkpoints so far are kept in {run}; try a lower --lr")
        if state.nonfinite is not None:
            epoch, name = state.nonfinite
            raise Cov3dError(f"the weights became NaN or inf in epoch {epoch} (first in '{name}'); training stopped "
                             f"before saving them. The checkpoints of earlier epochs are kept in {run}; try a "
                             "lower --lr")
        if tracker:
            tracker.finish(state.best_scores())
    finally:
        if tracker:
            tracker.close()
    if distributed.world_size() > 1:
        distributed.barrier()  # history.csv is complete once rank 0 gets here
    history = read_history(run / HISTORY)
    return TrainResult(run, state.best_scores(), len(history), history, main)


def _how_to_go_on(run: Path, saved_epoch: int) -> str:
    """Where a run stopped by a failed write can go on from, and how."""
    if saved_epoch:
        return (f"{run / LAST} holds epoch {saved_epoch}, and every checkpoint is whole: free some space, then "
                f"continue with --output {run} --resume")
    return "No epoch was saved yet: free some space, then run the same command again (without --resume)"


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


RUN_FILES = (LAST, PRESENCE, SEVERITY, HISTORY, HISTORY_PLOT)  # what a run writes as it trains (and config.json)


def _new_run(run: Path, config: TrainConfig, restart: bool = False) -> TrainConfig:
    if (run / LAST).exists() and not restart:
        raise Cov3dError(f"'{run}' already holds a training run; continue it with --resume, start it afresh with "
                         "--restart, or choose another --output")
    # Record the values actually used, not "the architecture's default" or "the recipe's".
    config.with_recipe()
    config.pretrained = resolve_pretrained(config.arch, config.pretrained, len(config.weights))
    config.validate()  # before anything of an old run is deleted
    # Without last.pt a run cannot resume: one interrupted in its first epoch. A new run replaces it; --restart
    # replaces any run.
    stale = [run / name for name in RUN_FILES if (run / name).exists()]
    if stale:
        if restart:
            log.warning("--restart: replacing the run in %s", run)
        else:
            log.warning("%s holds a run interrupted before its first epoch ended; replacing it", run)
        for path in stale if distributed.is_main() else ():
            path.unlink()
    return config


# What a resumed run may change: where it runs and what it logs; nothing that shapes the model or its data.
RESUMABLE = ("device", "sync_bn", "loader_workers", "wandb", "wandb_mode", "wandb_project", "wandb_entity", "data", "cache")


def _option(name: str) -> str:
    return "--lambda" if name == "lam" else "--" + name.replace("_", "-")


def _interrupted_run(run: Path) -> dict:
    """The last.pt of a run to resume; a directory without config.json and last.pt holds none.

    A damaged last.pt (empty or cut off by a crash or a full disk) or one whose weights are NaN cannot be
    resumed; the error names the way out, --restart.
    """
    if not (run / CONFIG).is_file() or not (run / LAST).is_file():
        raise Cov3dError(f"'{run}' holds no interrupted run to resume (config.json and last.pt are needed)")
    way_out = (f"start the run afresh with --restart (which replaces what {run} holds), or train into another "
               "--output")
    try:
        checkpoint = load_checkpoint(run / LAST)
    except Cov3dError as error:
        raise Cov3dError(f"{error}, so the run cannot be resumed from it; {way_out}") from None
    bad = nonfinite(checkpoint["model"]) if isinstance(checkpoint["model"], dict) else None
    if bad is not None:
        raise Cov3dError(f"'{run / LAST}' holds weights that are NaN or inf (first in '{bad}'), so the run cannot "
                         f"be resumed from it; {way_out}")
    return checkpoint


def _resumed_config(run: Path, given: TrainConfig, previous: dict, options: Collection[str] = ()) -> TrainConfig:
    """The saved config of `run`, with the options given again applied where sound, else refused.

    `previous` is the run's last.pt. `options` names the fields the user set
    explicitly. Equal values are fine; a larger --epochs extends the run (the
    one-cycle schedule is stretched to the new total); a smaller one is refused
    (the schedule of the epochs done was the planned one); anything else that
    differs from the saved run is an error.
    """
    config = TrainConfig.from_json(json.loads((run / CONFIG).read_text(encoding="utf-8")))
    done = int(previous["epoch"])
    for name in options:
        value, saved = getattr(given, name), getattr(config, name)
        if name in RESUMABLE or name == "output" or value == saved:
            continue
        if name == "epochs" and value > saved:
            log.warning("extending %s from %d to %d epochs: the one-cycle schedule is stretched to the new total",
                        run, saved, value)
            continue
        if name == "epochs":
            raise Cov3dError(f"{run} is a run of {saved} epochs that has trained {done}; --epochs {value} cannot "
                             f"shorten it (its learning rate followed the {saved}-epoch schedule): leave --epochs "
                             f"out to finish the {saved}, or give more than {saved} to extend it")
        raise Cov3dError(f"--resume continues the run saved in {run}, whose {_option(name)} is {saved}, not "
                         f"{value}; leave {_option(name)} out, or train a new run with another --output")
    for name in (*RESUMABLE, "epochs"):
        if name in options or name in ("device", "loader_workers", "wandb", "wandb_mode"):
            setattr(config, name, getattr(given, name))
    config.validate()
    return config


def _truncate_history(path: Path, epochs: int) -> None:
    write_csv(path, HISTORY_COLUMNS, [row for row in read_history(path) if int(row["epoch"]) <= epochs])
