"""The `cov3d` command line: parse options, call the library, report. Nothing else lives here."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cov3d import __version__
from cov3d.models.registry import ARCHS, arch_help
from cov3d.errors import Cov3dError

app = typer.Typer(
    help="Detect the presence and severity of COVID-19 in chest CT scans with 3D ResNets (Cov3d).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: rich's boxed tables cut long option names at 80 columns; this wraps the text instead.
    rich_markup_mode=None,
)
# soft_wrap: lines are never broken by rich, so paths in logs stay whole (the terminal wraps them on screen).
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


class SizeName(str, Enum):
    small = "small"
    medium = "medium"
    large = "large"


@contextmanager
def _reported(resume_hint: str = "run the command again to resume") -> Iterator[None]:
    """Turn expected errors into one red line and a non-zero exit."""
    try:
        yield
    except Cov3dError as error:
        errors.print(f"[bold red]Error{_rank()}:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        errors.print(f"[bold red]Interrupted.[/] Finished work is kept; {resume_hint}.")
        raise typer.Exit(130) from None


def _rank() -> str:
    """' (rank R of N)' in a process that torchrun started, so that a failing rank can be told apart."""
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    return f" (rank {rank} of {world})" if world.isdigit() and int(world) > 1 else ""


def _version(value: bool) -> None:
    if value:
        console.print(f"cov3d {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv for debug).")] = 0,
) -> None:
    """Detect the presence and severity of COVID-19 in chest CT scans with 3D ResNets (Cov3d)."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=errors, show_path=False)],
                        force=True)


WindowOption = Annotated[
    Optional[str],
    typer.Option(help="HU window LOW,HIGH mapped to [0, 1] for DICOM and volume files "
                      "(write --window=-1350,150; default: the lung window -1350,150)."),
]
SizeOption = Annotated[
    SizeName, typer.Option(help="Preprocessed size: small 64x128x128, medium 128x256x256, large 160x320x320.")
]
DepthOption = Annotated[Optional[int], typer.Option(min=1, help="Depth in slices; overrides --size.")]
WidthOption = Annotated[Optional[int], typer.Option(min=1, help="Slice width = height in pixels; overrides --size.")]
CacheOption = Annotated[
    Optional[Path],
    typer.Option(help="Cache folder (default: $COV3D_CACHE, else ~/.cache/cov3d, in a folder named after DATA). "
                      "Never inside DATA."),
]


def _bar(target: Console, transient: bool = False) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=target, transient=transient)


@contextmanager
def _progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress callback(done, total) that shows a bar on stderr from its first call on."""
    bar = _bar(errors)
    task = bar.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        bar.stop()


def _failure_table(failures: list[tuple[str, str]], what: str = "scan") -> None:
    if not errors.is_terminal:
        # A log or a pipe: one unbroken line per failure, so a path can be found with grep.
        errors.print(f"{len(failures)} {what}(s) failed:", style="bold red")
        for path, reason in failures:
            errors.print(f"  {escape(path)}: {escape(reason)}", highlight=False)
        return
    table = Table(title=f"{len(failures)} {what}(s) failed", title_style="bold red")
    table.add_column(what, overflow="fold")
    table.add_column("reason", overflow="fold")
    for path, reason in failures:
        table.add_row(escape(path), escape(reason))
    errors.print(table)


@app.command()
def preprocess(
    data: Annotated[Path, typer.Argument(help="A COV19-CT-DB dataset root, a folder of scans, or one scan.")],
    size: SizeOption = SizeName.small,
    depth: DepthOption = None,
    width: WidthOption = None,
    cache: CacheOption = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Scans processed at once (default: all cores).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo scans whose cache is up to date.")] = False,
    window: WindowOption = None,
    train_severity: Annotated[
        Optional[Path], typer.Option(help="Severity CSV for train (default: DATA/train_partition_covid_categories.csv).")
    ] = None,
    validation_severity: Annotated[
        Optional[Path], typer.Option(help="Severity CSV for validation (default: DATA/val_partition_covid_categories.csv).")
    ] = None,
) -> None:
    """Resample every scan under DATA to a fixed size and cache it as a tensor, with a manifest.csv."""
    from cov3d.data.io import DEFAULT_WINDOW, parse_window
    from cov3d.data.preprocess import preprocess_dataset, resolve_size

    with _reported():
        resolved = resolve_size(size.value, depth, width)
        hu_window = parse_window(window) if window is not None else DEFAULT_WINDOW
        with _progress_bar(f"Preprocessing to {resolved.name}") as progress:
            report = preprocess_dataset(
                data, resolved, cache, window=hu_window, workers=workers, overwrite=overwrite,
                severity_files={"train": train_severity, "validation": validation_severity},
                progress=progress,
            )
        cached = report.processed + report.skipped
        console.print(f"Cached {cached} of {report.total} scans at {resolved.name} "
                      f"({report.processed} processed, {report.skipped} already up to date).")
        console.print(f"Manifest: {report.manifest}")
        if report.failures:
            _failure_table(report.failures)
            raise typer.Exit(1)


# The --arch choices come from the architecture registry (cov3d/archs.py).
Arch = Enum("Arch", {name: name for name in ARCHS}, type=str)


class SeverityWeights(str, Enum):
    presence = "presence"
    inverse = "inverse"


class Pool(str, Enum):
    avg = "avg"
    max = "max"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


@app.command()
def train(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(help="A COV19-CT-DB dataset root with train/ and validation/ splits.")],
    output: Annotated[
        Optional[Path], typer.Option(help="Run directory for checkpoints, config and history (default: runs/<time>).")
    ] = None,
    lam: Annotated[
        float, typer.Option("--lambda", help="Weight of the severity loss: (1-λ)·presence + λ·severity, in [0, 1].")
    ] = 0.1,
    arch: Annotated[
        Arch, typer.Option(help=f"{arch_help()}.", metavar="NAME")
    ] = Arch["r3d_18"],
    pretrained: Annotated[
        Optional[bool],
        typer.Option("--pretrained/--no-pretrained",
                     help="Start from Kinetics-400 (3D) or ImageNet (2D) weights (default: yes where they exist; "
                          "the 3D RegNets train from scratch)."),
    ] = None,
    weights: Annotated[
        Optional[list[Path]],
        typer.Option(metavar="PATH",
                     help="Local copy of the pretrained checkpoint (instead of downloading it); for res-dense "
                          "give it twice: ResNet101's, then DenseNet121's."),
    ] = None,
    size: SizeOption = SizeName.small,
    depth: DepthOption = None,
    width: WidthOption = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Training epochs (default: 40).")] = None,
    batch_size: Annotated[
        Optional[int], typer.Option(min=1, help="Scans per batch and process; under torchrun the global batch is this times "
                                         "the number of processes (default: 2 fine-tuning, 8 from scratch).")
    ] = None,
    lr: Annotated[
        Optional[float],
        typer.Option(help="Maximum learning rate of the one-cycle schedule (default: 1e-4 fine-tuning, "
                          "1e-3 from scratch)."),
    ] = None,
    weight_decay: Annotated[float, typer.Option(help="Weight decay of Adam.")] = 1e-5,
    presence_smoothing: Annotated[float, typer.Option(help="Label smoothing ε_p of the presence targets.")] = 0.1,
    severity_smoothing: Annotated[
        float, typer.Option(help="Label smoothing ε_s shared among neighbouring severity classes.")
    ] = 0.0,
    severity_weights: Annotated[
        SeverityWeights,
        typer.Option(help="Weights of the severity loss: inverse (inverse frequency of each severity category, "
                          "as the paper's code) or presence (each scan's presence class weight, eq. 4-5).")
    ] = SeverityWeights.inverse,
    dropout: Annotated[
        Optional[float],
        typer.Option(help="Dropout in the head; for the video ResNets also after each residual layer "
                          "(default: 0.5 fine-tuning, 0 from scratch).")
    ] = None,
    penultimate: Annotated[int, typer.Option(min=1, help="Width of the head's hidden layer.")] = 512,
    pool: Annotated[
        Pool, typer.Option(help="Global pooling before the head: avg (the paper) or max (the paper author's code).")
    ] = Pool.avg,
    final_bias: Annotated[
        bool, typer.Option("--final-bias/--no-final-bias",
                           help="Bias on the final layer (the paper; its author's code has none).")
    ] = True,
    flip: Annotated[
        bool, typer.Option("--flip/--no-flip", help="Randomly reflect training scans through the sagittal plane.")
    ] = True,
    bn_scans: Annotated[
        int, typer.Option(min=0, help="Re-estimate BatchNorm statistics on this many training scans before each "
                                      "validation (precise BN); 0: off.")
    ] = 64,
    crop: Annotated[
        float, typer.Option(help="Random crop (seed 004): keep at least this fraction of each axis, resize back; "
                                 "1 = off.")
    ] = 1.0,
    slices: Annotated[
        int, typer.Option(min=0, help="2D slice models: train on this many random slices per scan a step (0: all).")
    ] = 0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 42,
    precision: Annotated[
        Precision, typer.Option(help="auto: fp16 mixed precision on CUDA, fp32 on CPU; or fp32, bf16 (slow where the CPU "
                                "has no native bf16), fp16.")
    ] = Precision.auto,
    device: Annotated[
        str, typer.Option(help="auto, cpu, cuda or cuda:N. Under torchrun each process takes the GPU of its "
                               "local rank (auto, cuda or cpu).")
    ] = "auto",
    sync_bn: Annotated[
        Optional[bool], typer.Option("--sync-bn/--no-sync-bn",
                                     help="Under torchrun on GPUs: BatchNorm statistics over the global batch "
                                          "(SyncBatchNorm) instead of each process's batch (default: on for "
                                          "distributed GPU runs, off otherwise).")
    ] = None,
    loader_workers: Annotated[
        Optional[int], typer.Option(min=0, help="Data loader processes (default: up to 4).")
    ] = None,
    cache: CacheOption = None,
    window: WindowOption = None,
    train_severity: Annotated[Optional[Path], typer.Option(help="Severity CSV for train.")] = None,
    validation_severity: Annotated[Optional[Path], typer.Option(help="Severity CSV for validation.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --output.")] = False,
    wandb: Annotated[bool, typer.Option("--wandb/--no-wandb", help="Log to Weights & Biases.")] = False,
    wandb_project: Annotated[str, typer.Option(help="W&B project.")] = "cov3d",
    wandb_entity: Annotated[Optional[str], typer.Option(help="W&B entity (user or team).")] = None,
    wandb_mode: Annotated[
        Optional[WandbMode], typer.Option(help="W&B mode (default: $WANDB_MODE, else online).")
    ] = None,
) -> None:
    """Train a model on presence and severity with the combined loss; keep the best weights per task."""
    import time

    from cov3d.data.io import DEFAULT_WINDOW, parse_window
    from cov3d.training.trainer import TrainConfig
    from cov3d.training.trainer import train as run_training

    with _reported("run the same command with --output RUN --resume to continue"):
        if resume and output is None:
            raise Cov3dError("--resume needs --output RUN, the run directory to continue")
        # Under a W&B sweep agent each trial gets its own directory, named after its W&B run.
        sweep_run = os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID") else None
        run = output or Path("runs") / (time.strftime("%Y%m%d-%H%M%S") + (f"-{sweep_run}" if sweep_run else ""))
        if sweep_run and getattr(ctx.get_parameter_source("wandb"), "name", "") == "DEFAULT":
            wandb = True  # a sweep's trials log to W&B unless told --no-wandb
        config = TrainConfig(
            data=str(data), output=str(run), arch=arch.value, pretrained=pretrained,
            weights=[str(w) for w in weights or []], size=size.value, depth=depth, width=width, lam=lam,
            presence_smoothing=presence_smoothing, severity_smoothing=severity_smoothing,
            severity_weights=severity_weights.value, bn_scans=bn_scans, dropout=dropout,
            penultimate=penultimate, pool=pool.value, final_bias=final_bias, lr=lr, weight_decay=weight_decay,
            batch_size=batch_size, epochs=epochs, flip=flip, crop=crop, slices=slices, seed=seed,
            precision=precision.value, device=device, sync_bn=sync_bn, loader_workers=loader_workers,
            cache=str(cache) if cache else None, window=parse_window(window) if window is not None else DEFAULT_WINDOW,
            train_severity=str(train_severity) if train_severity else None,
            validation_severity=str(validation_severity) if validation_severity else None,
            wandb=wandb, wandb_project=wandb_project, wandb_entity=wandb_entity,
            wandb_mode=wandb_mode.value if wandb_mode else None,
        )
        config.with_recipe().validate()
        # The options typed on the command line: on --resume, each must agree with the saved run.
        # (By name: typer ships its own copy of click, whose ParameterSource is not click's.)
        given = {name for name in ctx.params
                 if getattr(ctx.get_parameter_source(name), "name", "") in ("COMMANDLINE", "ENVIRONMENT")
                 and hasattr(config, name)}

        def epoch_line(row: dict) -> None:
            def fmt(key: str) -> str:
                value = row.get(key)
                return "-" if value is None or value != value else f"{float(value):.4f}"

            console.print(f"epoch {row['epoch']:>3}/{row['epochs']}  train loss {fmt('train_loss')}  "
                          f"valid loss {fmt('valid_loss')}  presence F1 {fmt('presence_f1')}  "
                          f"accuracy {fmt('presence_accuracy')}  severity F1 {fmt('severity_f1')}", soft_wrap=True)

        bar = _bar(console, transient=True)
        task = bar.add_task("", total=None)

        def batch_progress(phase: Optional[str], done: int, total: int) -> None:
            if not bar.live.is_started:
                bar.start()
            if phase is not None:
                bar.reset(task, description=phase, total=total)
            bar.update(task, completed=done)

        def epoch_and_bar(row: dict) -> None:
            bar.stop()
            epoch_line(row)

        with _progress_bar("Preprocessing") as progress:
            try:
                result = run_training(config, resume=resume, on_epoch=epoch_and_bar, on_preprocess=progress,
                                      on_batch=batch_progress, options=given)
            finally:
                bar.stop()
        if not result.main:  # rank 0 of a distributed run reports
            return
        best = ", ".join(f"{name} {score:.4f}" for name, score in result.best.items() if score > float("-inf"))
        console.print(f"Done: {result.epochs_done} epochs. Best {best or 'scores: none'}.")
        console.print(f"Run directory: {result.run}")


ModelOption = Annotated[
    list[Path], typer.Option("--model", help="A run directory, a checkpoint file, or a W&B model artifact "
                                             "wandb:ENTITY/PROJECT/NAME:ALIAS; repeat to ensemble models.")
]
TtaOption = Annotated[
    bool, typer.Option("--tta/--no-tta", help="Average each scan with its sagittal reflection.")
]
InferencePrecision = Annotated[
    Precision, typer.Option(help="auto: fp16 on CUDA; on a CPU bf16 where it is native (AVX512-BF16 or AMX), "
                                "else fp32; or fp32, bf16, fp16.")
]
LoaderWorkers = Annotated[
    Optional[int], typer.Option(min=0, help="Processes reading scans ahead of the model (default: up to 4).")
]


@app.command()
def predict(
    scans: Annotated[list[Path], typer.Argument(help="Scans (folders or files) or folders holding scans.")],
    model: ModelOption,
    output: Annotated[Path, typer.Option(help="CSV file to write.")] = Path("predictions.csv"),
    tta: TtaOption = True,
    threshold: Annotated[
        str, typer.Option(help="P(covid) threshold: a number, or a metrics.json from `cov3d evaluate`.")
    ] = "0.5",
    submission: Annotated[
        Optional[Path], typer.Option(help="Also write the challenge lists (covid.csv, …, critical.csv) here.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Scans per forward pass.")] = 2,
    workers: LoaderWorkers = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: InferencePrecision = Precision.auto,
) -> None:
    """Predict COVID-19 presence and severity for scans with one model or an ensemble."""
    from cov3d.inference.predict import find_inputs, load_ensemble, parse_threshold, predict_scans, prediction_rows
    from cov3d.inference.predict import write_csv, write_submission

    from cov3d.atomic import check_writable
    from cov3d.training.runtime import resolve_device

    with _reported():
        cutoff = parse_threshold(threshold)
        check_writable(output)
        if submission is not None:
            check_writable(submission, folder=True)
        resolve_device(device)
        members = load_ensemble(model)
        found, missing = find_inputs(scans)
        failures = list(missing)
        rows: list[dict] = []
        if found:
            with _progress_bar("Predicting") as progress:
                predictions, failed = predict_scans(found, members, tta=tta, batch_size=batch_size, workers=workers,
                                                    device=device, precision=precision.value, roots=scans,
                                                    progress=progress)
            failures.extend(failed)
            rows = prediction_rows(predictions, cutoff)
        if not rows:
            # Nothing was predicted: an existing output keeps its predictions.
            errors.print(f"No scan could be predicted; '{output}' was not written.", style="bold red")
        else:
            write_csv(output, rows)
            covid = sum(r["prediction"] == "covid" for r in rows)
            console.print(f"Predicted {len(rows)} scan(s) with {len(members)} checkpoint(s): {covid} covid, "
                          f"{len(rows) - covid} non-covid (threshold {cutoff:g}).")
            console.print(f"Predictions: {output}")
            if submission is not None:
                write_submission(submission, rows)
                console.print(f"Submission lists: {submission}")
        if failures:
            _failure_table(failures)
            raise typer.Exit(1)


@app.command()
def evaluate(
    data: Annotated[Path, typer.Argument(help="A dataset root with labelled splits.")],
    model: ModelOption,
    split: Annotated[str, typer.Option(help="The labelled split to score: validation or train.")] = "validation",
    output_dir: Annotated[
        Path, typer.Option(help="Where metrics.json, predictions.csv and the plots go.")
    ] = Path("evaluation"),
    threshold: Annotated[
        str, typer.Option(help="P(covid) threshold: a number, 'youden' (maximise Youden's J on this split), "
                               "or a metrics.json.")
    ] = "0.5",
    tta: TtaOption = True,
    workers: LoaderWorkers = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: InferencePrecision = Precision.auto,
    train_severity: Annotated[Optional[Path], typer.Option(help="Severity CSV for train.")] = None,
    validation_severity: Annotated[Optional[Path], typer.Option(help="Severity CSV for validation.")] = None,
    wandb: Annotated[
        bool, typer.Option("--wandb/--no-wandb", help="Log metrics, plots and predictions to W&B: into the training "
                                                      "run of a --model run directory that has one, else a new run.")
    ] = False,
    wandb_project: Annotated[str, typer.Option(help="W&B project of a new run.")] = "cov3d",
    wandb_entity: Annotated[Optional[str], typer.Option(help="W&B entity of a new run.")] = None,
    wandb_mode: Annotated[
        Optional[WandbMode], typer.Option(help="W&B mode (default: $WANDB_MODE, else online).")
    ] = None,
) -> None:
    """Score models on a labelled split: F1, accuracy, ROC AUC, confusion matrices and plots."""
    from cov3d.inference.evaluate import describe, evaluate as run_evaluation, write_outputs

    from cov3d.atomic import check_writable
    from cov3d.training.runtime import resolve_device

    with _reported():
        check_writable(output_dir, folder=True)
        resolve_device(device)
        with _progress_bar("Evaluating") as progress:
            result = run_evaluation(data, model, split=split, threshold=threshold, tta=tta, workers=workers,
                                    device=device, precision=precision.value,
                                    severity_files={"train": train_severity, "validation": validation_severity},
                                    progress=progress)
        if result.metrics is None:
            errors.print(f"No scan of the {split} split could be predicted; nothing was written.", style="bold red")
            _failure_table(result.failures)
            raise typer.Exit(1)
        write_outputs(result, output_dir)
        if wandb:
            from cov3d.training.tracking import log_evaluation

            logged = log_evaluation(result, model, mode=wandb_mode.value if wandb_mode else None,
                                    project=wandb_project, entity=wandb_entity)
        m = result.metrics
        presence = m["presence"]
        fitted = " fitted on these scans: in-sample scores" if m.get("threshold_in_sample") else ""
        console.print(f"{split}: {m['scans']} scans, threshold {m['threshold']:.4f} ({m['threshold_method']}{fitted})")
        console.print(f"presence  macro F1 {describe(presence['macro_f1'])}  accuracy {describe(presence['accuracy'])}"
                      f"  ROC AUC {describe(presence['roc_auc'])}  F1 non-covid {describe(presence['f1']['non-covid'])}"
                      f"  covid {describe(presence['f1']['covid'])}", soft_wrap=True)
        if m["severity"]:
            severity = m["severity"]
            per_class = "  ".join(f"{k} {describe(v)}" for k, v in severity["f1"].items())
            console.print(f"severity  macro F1 {describe(severity['macro_f1'])} over {severity['scans']} scans  "
                          f"{per_class}", soft_wrap=True)
        console.print(f"Outputs: {output_dir}")
        if wandb and logged:
            console.print(f"Logged to W&B run {logged}")
        if result.failures:
            _failure_table(result.failures)
            raise typer.Exit(1)


@app.command()
def explain(
    scan: Annotated[Path, typer.Argument(help="One scan: a slice folder, a DICOM series folder or a volume file.")],
    model: ModelOption,
    output: Annotated[
        Optional[Path], typer.Option(help="Folder for the pictures, maps and explain.json (default: explain/<scan>).")
    ] = None,
    tta: TtaOption = True,
    stage: Annotated[
        int, typer.Option(min=1, max=4, help="Backbone stage to explain: 4, the last, is Grad-CAM's usual choice; "
                                             "an earlier stage gives a finer but less class-specific map.")
    ] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Show where the model looks: Grad-CAM maps for presence and the predicted severity over the scan."""
    from cov3d.atomic import check_writable
    from cov3d.inference.explain import explain_scan, write_explanation
    from cov3d.inference.predict import load_ensemble
    from cov3d.training.runtime import resolve_device

    with _reported():
        target = output or Path("explain") / (scan.name.split(".")[0] or "scan")
        check_writable(target, folder=True)
        torch_device = resolve_device(device)
        if not scan.exists():
            raise Cov3dError(f"scan '{scan}' does not exist")
        members = load_ensemble(model)
        with _progress_bar("Explaining") as progress:
            explanation = explain_scan(scan, members, tta=tta, stage=stage, device=torch_device, progress=progress)
        written = write_explanation(explanation, target)
        console.print(escape(explanation.title()), highlight=False)
        console.print(f"Wrote {len(written)} files to {target}: " + ", ".join(p.name for p in written), soft_wrap=True)


@app.command()
def show(
    scan: Annotated[
        Path, typer.Argument(help="A scan folder or file; or a training run directory, to draw its curves.")
    ],
    output: Annotated[
        Optional[Path],
        typer.Option(help="PNG to write (default: <scan name>.png here; for a run, RUN/history.png)."),
    ] = None,
    size: SizeOption = SizeName.small,
    depth: DepthOption = None,
    width: WidthOption = None,
    window: WindowOption = None,
) -> None:
    """Save sections of a scan as the model sees it, or the training curves of a run directory."""
    from cov3d.atomic import check_writable
    from cov3d.models.checkpoint import HISTORY, HISTORY_PLOT

    with _reported():
        if scan.is_dir() and (scan / HISTORY).is_file():
            from cov3d.reports.curves import plot_history

            check_writable(output or scan / HISTORY_PLOT)
            target = plot_history(scan / HISTORY, output or scan / HISTORY_PLOT)
            console.print(f"Saved {target}")
            return
        from cov3d.data.io import DEFAULT_WINDOW, parse_window
        from cov3d.data.preprocess import preprocess_volume, resolve_size
        from cov3d.reports.show import render_views

        resolved = resolve_size(size.value, depth, width)
        hu_window = parse_window(window) if window is not None else DEFAULT_WINDOW
        name = scan.name.split(".")[0] or "scan"
        target = output or Path(f"{name}.png")
        check_writable(target)
        tensor, meta = preprocess_volume(scan, resolved, hu_window)
        render_views(tensor[0].float().numpy(), target,
                     f"{scan.name}: {meta['slices']} slices of {meta['height']}x{meta['width']} -> {resolved.name}")
        console.print(f"Saved {target}")


@app.command()
def synth(
    output: Annotated[Path, typer.Argument(help="New folder for the synthetic data set.")],
    scans: Annotated[int, typer.Option(min=10, help="Number of scans (70% train, 20% validation, 10% test).")] = 160,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes the same data set.")] = 0,
    width: Annotated[int, typer.Option(min=32, help="Slice width = height in pixels.")] = 128,
) -> None:
    """Write a synthetic COV19-CT-DB-style data set of chest CT phantoms (JPEG slices + severity CSVs)."""
    from cov3d.data.synth import synthesize

    with _reported():
        with _progress_bar("Generating phantoms") as progress:
            made = synthesize(output, scans=scans, seed=seed, width=width, progress=progress)
        covid = sum(s.label == "covid" for s in made)
        labelled = sum(bool(s.label) for s in made)
        console.print(f"Wrote {len(made)} scans to {output}: {covid} covid and {labelled - covid} non-covid "
                      f"in train/validation, {len(made) - labelled} unlabelled in test.")


@app.command()
def demo(
    output: Annotated[Path, typer.Option(help="New folder for everything the demo makes.")] = Path("cov3d-demo"),
    scans: Annotated[int, typer.Option(min=10, help="Synthetic scans to generate.")] = 160,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 12,
    depth: Annotated[int, typer.Option(min=4, help="Preprocessed depth.")] = 16,
    width: Annotated[int, typer.Option(min=8, help="Preprocessed width = height.")] = 32,
    seed: Annotated[int, typer.Option(help="Random seed for data and training.")] = 0,
) -> None:
    """Run the whole job offline on synthetic phantoms: synth, preprocess, train, evaluate, predict."""
    import time

    from cov3d.demo import run_demo
    from cov3d.inference.evaluate import describe

    with _reported(f"run the same command again to go on where it stopped in '{output}'"):
        start = time.perf_counter()
        bar = _bar(console, transient=True)
        task = bar.add_task("", total=None)

        def pause() -> None:
            if bar.live.is_started:
                bar.stop()

        def stage(name: str) -> None:
            pause()
            console.print(f"[bold]{name}[/] ({time.perf_counter() - start:.0f} s)")
            bar.reset(task, description=name, total=None)

        def progress(done: int, total: int) -> None:
            if not bar.live.is_started:
                bar.start()
            bar.update(task, completed=done, total=total)

        def epoch(row: dict) -> None:
            pause()
            console.print(f"  epoch {row['epoch']:>2}  train loss {float(row['train_loss']):.4f}  valid loss "
                          f"{float(row['valid_loss']):.4f}  presence F1 {describe(row['presence_f1'])}  "
                          f"severity F1 {describe(row['severity_f1'])}", soft_wrap=True)

        try:
            result = run_demo(output, scans=scans, epochs=epochs, depth=depth, width=width, seed=seed, stage=stage,
                              progress=progress, on_epoch=epoch)
        finally:
            pause()
        m = result.evaluation.metrics
        severity = m["severity"]["macro_f1"] if m["severity"] else None
        console.print(f"[bold]Validation[/] ({m['scans']} scans): presence macro F1 "
                      f"{describe(m['presence']['macro_f1'])}, accuracy {describe(m['presence']['accuracy'])}, "
                      f"ROC AUC {describe(m['presence']['roc_auc'])}; severity macro F1 {describe(severity)}",
                      soft_wrap=True)
        console.print(f"Done in {time.perf_counter() - start:.0f} s. Outputs:")
        for label, path in [("synthetic data", result.data), ("trained run", result.run),
                            ("evaluation", result.evaluation_dir), ("test predictions", result.predictions),
                            ("submission lists", result.submission)]:
            console.print(f"  {label:<17} {path}")


if __name__ == "__main__":  # pragma: no cover
    app()
