"""`cov3d train`: parse the options, build a TrainConfig, call :func:`cov3d.training.trainer.train`, report.

Every default is TrainConfig's (:data:`DEFAULTS`) and every recipe value in a help text is RECIPES'; an option
left unset (None) takes TrainConfig's default, as --window does its lung window.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from cov3d.cli.core import app, bar, console, progress_bar, reported
from cov3d.cli.options import (
    TRAIN_DEFAULTS as DEFAULTS, CacheOption, DepthOption, Precision, SizeName, SizeOption, TrainSeverityOption,
    Lungs, LungsOption, ValidationSeverityOption, WandbModeOption, WidthOption, WindowOption, choices,
)
from cov3d.errors import Cov3dError
from cov3d.models.registry import ARCHS, arch_help
from cov3d.training.config import MAX_SEED, RECIPES, TrainConfig

FIELDS = {f.name for f in fields(TrainConfig)}

# The --arch choices come from the architecture registry (cov3d/models/registry.py).
Arch = choices("Arch", ARCHS)
SeverityWeights = choices("SeverityWeights", ("presence", "inverse"))  # cov3d.training.loss.SEVERITY_WEIGHTINGS
Pool = choices("Pool", ("avg", "max"))  # cov3d.models.video.POOLS


def _number(value: float) -> str:
    """A number as a help text writes it: 1e-4 (not 0.0001), 0.5, 0 (not 0.0), 8."""
    if value and abs(value) < 1e-2:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}"


def _by_recipe(name: str) -> str:
    """The recipes' values of option `name`: '2 fine-tuning, 8 from scratch', or one value where they agree."""
    tuned, scratch = RECIPES["fine-tune"][name], RECIPES["scratch"][name]
    return _number(tuned) if tuned == scratch else f"{_number(tuned)} fine-tuning, {_number(scratch)} from scratch"


Data = Annotated[Path, typer.Argument(help="A COV19-CT-DB dataset root with train/ and validation/ splits.")]
Output = Annotated[
    Optional[Path], typer.Option(help="Run directory for checkpoints, config and history (default: runs/<time>).")
]
Lambda = Annotated[
    float, typer.Option("--lambda", help="Weight of the severity loss: (1-λ)·presence + λ·severity, in [0, 1].")
]
ArchOption = Annotated[Arch, typer.Option(help=f"{arch_help()}.", metavar="NAME")]
Pretrained = Annotated[
    Optional[bool],
    typer.Option("--pretrained/--no-pretrained",
                 help="Start from Kinetics-400 (3D) or ImageNet (2D) weights (default: yes where they exist; "
                      "the 3D RegNets train from scratch)."),
]
Weights = Annotated[
    Optional[list[Path]],
    typer.Option(metavar="PATH",
                 help="Local copy of the pretrained checkpoint (instead of downloading it); for res-dense "
                      "give it twice: ResNet101's, then DenseNet121's."),
]
Epochs = Annotated[Optional[int], typer.Option(min=1, help=f"Training epochs (default: {_by_recipe('epochs')}).")]
BatchSize = Annotated[
    Optional[int], typer.Option(min=1, help="Scans per batch and process; under torchrun the global batch is this times "
                                     f"the number of processes (default: {_by_recipe('batch_size')}).")
]
LearningRate = Annotated[
    Optional[float],
    typer.Option(help=f"Maximum learning rate of the one-cycle schedule (default: {_by_recipe('lr')})."),
]
WeightDecay = Annotated[float, typer.Option(help="Weight decay of Adam.")]
PresenceSmoothing = Annotated[float, typer.Option(help="Label smoothing ε_p of the presence targets.")]
SeveritySmoothing = Annotated[
    float, typer.Option(help="Label smoothing ε_s shared among neighbouring severity classes.")
]
SeverityWeightsOption = Annotated[
    SeverityWeights,
    typer.Option(help="Weights of the severity loss: inverse (inverse frequency of each severity category, "
                      "as the paper's code) or presence (each scan's presence class weight, eq. 4-5).")
]
Dropout = Annotated[
    Optional[float],
    typer.Option(help="Dropout in the head; for the video ResNets also after each residual layer "
                      f"(default: {_by_recipe('dropout')}).")
]
Penultimate = Annotated[int, typer.Option(min=1, help="Width of the head's hidden layer.")]
PoolOption = Annotated[
    Pool, typer.Option(help="Global pooling before the head: avg (the paper) or max (the paper author's code).")
]
FinalBias = Annotated[
    bool, typer.Option("--final-bias/--no-final-bias",
                       help="Bias on the final layer (the paper; its author's code has none).")
]
Flip = Annotated[
    bool, typer.Option("--flip/--no-flip", help="Randomly reflect training scans through the sagittal plane.")
]
BnScans = Annotated[
    int, typer.Option(min=0, help="Re-estimate BatchNorm statistics on this many training scans before each "
                                  "validation (precise BN); 0: off.")
]
Crop = Annotated[
    float, typer.Option(help="Random crop (seed 004): keep at least this fraction of each axis, resize back; "
                             "1 = off.")
]
Slices = Annotated[
    int, typer.Option(min=0, help="2D slice models: train on this many random slices per scan a step (0: all).")
]
Seed = Annotated[int, typer.Option(help=f"Random seed, 0 to {MAX_SEED} (2^32 - 1).")]
PrecisionOption = Annotated[
    Precision, typer.Option(help="auto: fp16 mixed precision on CUDA, fp32 on CPU; or fp32, bf16 (slow where the CPU "
                            "has no native bf16), fp16.")
]
Device = Annotated[
    str, typer.Option(help="auto, cpu, cuda or cuda:N. Under torchrun each process takes the GPU of its "
                           "local rank (auto, cuda or cpu).")
]
SyncBn = Annotated[
    Optional[bool], typer.Option("--sync-bn/--no-sync-bn",
                                 help="Under torchrun on GPUs: BatchNorm statistics over the global batch "
                                      "(SyncBatchNorm) instead of each process's batch (default: on for "
                                      "distributed GPU runs, off otherwise).")
]
LoaderWorkers = Annotated[
    Optional[int], typer.Option(min=0, help="Data loader processes, at most the CPU cores (default: up to 4).")
]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --output.")]
Restart = Annotated[
    bool, typer.Option("--restart", help="Start the run in --output afresh, replacing its checkpoints and history "
                                         "(for a run whose last.pt is damaged and cannot be resumed).")
]
Wandb = Annotated[bool, typer.Option("--wandb/--no-wandb", help="Log to Weights & Biases.")]
WandbProject = Annotated[str, typer.Option(help="W&B project.")]
WandbEntity = Annotated[Optional[str], typer.Option(help="W&B entity (user or team).")]


@app.command()
def train(
    ctx: typer.Context,
    data: Data,
    output: Output = None,
    lam: Lambda = DEFAULTS["lam"],
    arch: ArchOption = Arch[DEFAULTS["arch"]],
    pretrained: Pretrained = DEFAULTS["pretrained"],
    weights: Weights = None,
    size: SizeOption = SizeName(DEFAULTS["size"]),
    depth: DepthOption = DEFAULTS["depth"],
    width: WidthOption = DEFAULTS["width"],
    epochs: Epochs = DEFAULTS["epochs"],
    batch_size: BatchSize = DEFAULTS["batch_size"],
    lr: LearningRate = DEFAULTS["lr"],
    weight_decay: WeightDecay = DEFAULTS["weight_decay"],
    presence_smoothing: PresenceSmoothing = DEFAULTS["presence_smoothing"],
    severity_smoothing: SeveritySmoothing = DEFAULTS["severity_smoothing"],
    severity_weights: SeverityWeightsOption = SeverityWeights(DEFAULTS["severity_weights"]),
    dropout: Dropout = DEFAULTS["dropout"],
    penultimate: Penultimate = DEFAULTS["penultimate"],
    pool: PoolOption = Pool(DEFAULTS["pool"]),
    final_bias: FinalBias = DEFAULTS["final_bias"],
    flip: Flip = DEFAULTS["flip"],
    bn_scans: BnScans = DEFAULTS["bn_scans"],
    crop: Crop = DEFAULTS["crop"],
    slices: Slices = DEFAULTS["slices"],
    seed: Seed = DEFAULTS["seed"],
    precision: PrecisionOption = Precision(DEFAULTS["precision"]),
    device: Device = DEFAULTS["device"],
    sync_bn: SyncBn = DEFAULTS["sync_bn"],
    loader_workers: LoaderWorkers = DEFAULTS["loader_workers"],
    cache: CacheOption = DEFAULTS["cache"],
    window: WindowOption = None,
    lungs: LungsOption = Lungs(DEFAULTS["lungs"]),
    train_severity: TrainSeverityOption = DEFAULTS["train_severity"],
    validation_severity: ValidationSeverityOption = DEFAULTS["validation_severity"],
    resume: Resume = False,
    restart: Restart = False,
    wandb: Wandb = DEFAULTS["wandb"],
    wandb_project: WandbProject = DEFAULTS["wandb_project"],
    wandb_entity: WandbEntity = DEFAULTS["wandb_entity"],
    wandb_mode: WandbModeOption = DEFAULTS["wandb_mode"],
    folds: Annotated[
        Optional[int], typer.Option(min=2, help="Cross-validation: pool the labelled scans, deal K folds stratified "
                                                "by presence and severity (and --cv-group-by), train each into "
                                                "OUTPUT/fold-I/, then write out-of-fold predictions and a summary "
                                                "(docs/research.md). Folds already trained are skipped, "
                                                "interrupted ones resumed.")
    ] = None,
    fold: Annotated[
        Optional[int], typer.Option(min=0, help="With --folds: train only fold I (0…K-1), e.g. one per machine; "
                                                "the summary is written once every fold has trained.")
    ] = None,
    cv_pool: Annotated[
        str, typer.Option(help="With --folds: the splits pooled into folds, train+validation or train.")
    ] = "train+validation",
    cv_groups: Annotated[
        Optional[Path], typer.Option(help="With --folds: a groups CSV (a 'scan' column) to stratify folds by.")
    ] = None,
    cv_group_by: Annotated[Optional[str], typer.Option(help="With --folds: the --cv-groups column.")] = None,
) -> None:
    """Train a model on presence and severity with the combined loss; keep the best weights per task."""
    from cov3d.training.trainer import train as run_training

    with reported("run the same command with --output RUN --resume to continue (a run stopped in its first "
                  "epoch has no last.pt yet: run it again without --resume)"):
        config = train_config(ctx)  # from the options above, which ctx.params holds by name
        if folds is not None or fold is not None:
            from cov3d.cli.research import cross_validate

            cross_validate(config, folds, fold, cv_pool, cv_groups, cv_group_by, _training_progress)
            return
        with _training_progress() as callbacks:
            result = run_training(config, resume=resume, restart=restart, options=_given(ctx), **callbacks)
        if not result.main:  # rank 0 of a distributed run reports
            return
        best = ", ".join(f"{name} {score:.4f}" for name, score in result.best.items() if score > float("-inf"))
        console.print(f"Done: {result.epochs_done} epochs. Best {best or 'scores: none'}.")
        console.print(f"Run directory: {result.run}")


def train_config(ctx: typer.Context) -> TrainConfig:
    """The TrainConfig of `cov3d train`'s parsed options, its recipe filled in, validated.

    Choices become their values and paths strings; an option left unset (None) takes TrainConfig's default.
    """
    from cov3d.data.readers import parse_window

    values = {name: _plain(value) for name, value in ctx.params.items() if name in FIELDS and value is not None}
    if ctx.params["resume"] and "output" not in values:
        raise Cov3dError("--resume needs --output RUN, the run directory to continue")
    if ctx.params.get("restart") and ctx.params["resume"]:
        raise Cov3dError("--resume continues the run in --output and --restart replaces it; give one of them")
    # Under a W&B sweep agent each trial gets its own directory, named after its W&B run.
    sweep_run = os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID") else None
    stamp = time.strftime("%Y%m%d-%H%M%S") + (f"-{sweep_run}" if sweep_run else "")
    values.setdefault("output", str(Path("runs") / stamp))
    if sweep_run and _source(ctx, "wandb") == "DEFAULT":
        values["wandb"] = True  # a sweep's trials log to W&B unless told --no-wandb
    if "window" in values:
        values["window"] = parse_window(values["window"])
    config = TrainConfig(**values).with_recipe()
    config.validate()
    return config


def _plain(value: object) -> object:
    """An option's value as TrainConfig holds it: a choice's value, a path's string, a list of strings."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [str(item) for item in value]
    return value


def _source(ctx: typer.Context, name: str) -> str:
    # By name: typer ships its own copy of click, whose ParameterSource is not click's.
    return getattr(ctx.get_parameter_source(name), "name", "")


def _given(ctx: typer.Context) -> set[str]:
    """The options typed on the command line: on --resume, each must agree with the saved run."""
    return {name for name in ctx.params if _source(ctx, name) in ("COMMANDLINE", "ENVIRONMENT") and name in FIELDS}


def _epoch_line(row: dict) -> str:
    def fmt(key: str) -> str:
        value = row.get(key)
        return "-" if value is None or value != value else f"{float(value):.4f}"

    return (f"epoch {row['epoch']:>3}/{row['epochs']}  train loss {fmt('train_loss')}  "
            f"valid loss {fmt('valid_loss')}  presence F1 {fmt('presence_f1')}  "
            f"accuracy {fmt('presence_accuracy')}  severity F1 {fmt('severity_f1')}")


@contextmanager
def _training_progress() -> Iterator[dict]:
    """train()'s callbacks: a bar while the cache is brought up to date, one over the batches, a line an epoch."""
    batches = bar(console, transient=True)
    task = batches.add_task("", total=None)

    def on_batch(phase: Optional[str], done: int, total: int) -> None:
        if not batches.live.is_started:
            batches.start()
        if phase is not None:
            batches.reset(task, description=phase, total=total)
        batches.update(task, completed=done)

    def on_epoch(row: dict) -> None:
        batches.stop()
        console.print(_epoch_line(row), soft_wrap=True)

    with progress_bar("Preprocessing") as on_preprocess:
        try:
            yield {"on_epoch": on_epoch, "on_preprocess": on_preprocess, "on_batch": on_batch}
        finally:
            batches.stop()
