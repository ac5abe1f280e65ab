"""`cov3d predict`, `evaluate` and `explain`: trained models applied to scans."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from cov3d.cli.core import app, console, errors, failure_table, progress_bar, reported
from cov3d.cli.options import Precision, TrainSeverityOption, ValidationSeverityOption, WandbModeOption
from cov3d.errors import Cov3dError

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
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]


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
    device: DeviceOption = "auto",
    precision: InferencePrecision = Precision.auto,
) -> None:
    """Predict COVID-19 presence and severity for scans with one model or an ensemble."""
    from cov3d.inference.predict import find_inputs, load_ensemble, parse_threshold, predict_scans, prediction_rows
    from cov3d.inference.predict import write_csv, write_submission

    from cov3d.atomic import check_writable
    from cov3d.training.runtime import resolve_device

    with reported():
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
            with progress_bar("Predicting") as progress:
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
            failure_table(failures)
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
    device: DeviceOption = "auto",
    precision: InferencePrecision = Precision.auto,
    train_severity: TrainSeverityOption = None,
    validation_severity: ValidationSeverityOption = None,
    wandb: Annotated[
        bool, typer.Option("--wandb/--no-wandb", help="Log metrics, plots and predictions to W&B: into the training "
                                                      "run of a --model run directory that has one, else a new run.")
    ] = False,
    wandb_project: Annotated[str, typer.Option(help="W&B project of a new run.")] = "cov3d",
    wandb_entity: Annotated[Optional[str], typer.Option(help="W&B entity of a new run.")] = None,
    wandb_mode: WandbModeOption = None,
) -> None:
    """Score models on a labelled split: F1, accuracy, ROC AUC, confusion matrices and plots."""
    from cov3d.inference.evaluate import evaluate as run_evaluation, write_outputs

    from cov3d.atomic import check_writable
    from cov3d.training.runtime import resolve_device

    with reported():
        check_writable(output_dir, folder=True)
        resolve_device(device)
        with progress_bar("Evaluating") as progress:
            result = run_evaluation(data, model, split=split, threshold=threshold, tta=tta, workers=workers,
                                    device=device, precision=precision.value,
                                    severity_files={"train": train_severity, "validation": validation_severity},
                                    progress=progress)
        if result.metrics is None:
            errors.print(f"No scan of the {split} split could be predicted; nothing was written.", style="bold red")
            failure_table(result.failures)
            raise typer.Exit(1)
        write_outputs(result, output_dir)
        if wandb:
            from cov3d.training.tracking import log_evaluation

            logged = log_evaluation(result, model, mode=wandb_mode.value if wandb_mode else None,
                                    project=wandb_project, entity=wandb_entity)
        _print_metrics(result.metrics, split)
        console.print(f"Outputs: {output_dir}")
        if wandb and logged:
            console.print(f"Logged to W&B run {logged}")
        if result.failures:
            failure_table(result.failures)
            raise typer.Exit(1)


def _print_metrics(m: dict, split: str) -> None:
    """The scores of `cov3d evaluate`: the threshold, then a line for presence and one for severity."""
    from cov3d.inference.evaluate import describe

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
    device: DeviceOption = "auto",
) -> None:
    """Show where the model looks: Grad-CAM maps for presence and the predicted severity over the scan."""
    from cov3d.atomic import check_writable
    from cov3d.inference.explain import explain_scan
    from cov3d.reports.explanation import write_explanation
    from cov3d.inference.predict import load_ensemble
    from cov3d.training.runtime import resolve_device

    with reported():
        target = output or Path("explain") / (scan.name.split(".")[0] or "scan")
        check_writable(target, folder=True)
        torch_device = resolve_device(device)
        if not scan.exists():
            raise Cov3dError(f"scan '{scan}' does not exist")
        members = load_ensemble(model)
        with progress_bar("Explaining") as progress:
            explanation = explain_scan(scan, members, tta=tta, stage=stage, device=torch_device, progress=progress)
        written = write_explanation(explanation, target)
        console.print(escape(explanation.title()), highlight=False)
        console.print(f"Wrote {len(written)} files to {target}: " + ", ".join(p.name for p in written), soft_wrap=True)
