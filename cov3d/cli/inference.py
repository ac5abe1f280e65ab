"""`cov3d predict`, `evaluate` and `explain`: trained models applied to scans."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from cov3d.cli.core import app, console, errors, failure_table, progress_bar, reported
from cov3d.cli.options import Precision, SeriesOption, TrainSeverityOption, ValidationSeverityOption, WandbModeOption
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
    pseudo_labels: Annotated[
        Optional[Path], typer.Option(help="Also link the confidently predicted scans into this new folder in the "
                                          "training layout (train/covid, train/non-covid, severity CSV), with "
                                          "pseudo_labels.json recording the threshold: for a second round.")
    ] = None,
    pseudo_threshold: Annotated[
        float, typer.Option(help="With --pseudo-labels: keep scans with P(covid) ≥ t (covid) or ≤ 1 − t "
                                 "(non-covid); a severity where its probability reaches t too.")
    ] = 0.9,
    batch_size: Annotated[int, typer.Option(min=1, help="Scans per forward pass.")] = 2,
    workers: LoaderWorkers = None,
    device: DeviceOption = "auto",
    precision: InferencePrecision = Precision.auto,
    series: SeriesOption = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Predict every scan again. Without it, scans that OUTPUT already holds "
                                           "from a run with the same models, TTA, threshold and precision (and "
                                           "unchanged since) are kept, so an interrupted run resumes.")
    ] = False,
) -> None:
    """Predict COVID-19 presence and severity for scans with one model or an ensemble."""
    from cov3d.inference.predict import PredictionFile, find_inputs, load_ensemble, parse_threshold
    from cov3d.inference.predict import predict_scans, prediction_rows, prediction_settings, write_submission

    from cov3d.atomic import check_writable
    from cov3d.training.runtime import resolve_device

    state: dict = {}  # what the interrupt message needs to know

    def kept(_: KeyboardInterrupt) -> str:
        record = state.get("record")
        if record is None or not record.written:
            return f"No prediction was written; '{output}' was left as it was."
        left = len(state["found"]) - record.written
        return (f"'{output}' holds the {record.written} scan(s) predicted so far; run the same command again to "
                f"predict the other {left}.")

    with reported(interrupted=kept):
        cutoff = parse_threshold(threshold)
        check_writable(output)
        if pseudo_labels is not None:  # refused before any scan is predicted
            from cov3d.inference.pseudo import check_output

            check_output(pseudo_labels, pseudo_threshold)
        if submission is not None:
            check_writable(submission, folder=True)
        resolve_device(device)
        from cov3d.inference.onnx_predict import exported_graphs, load_exported, predict_exported

        exported = load_exported(exported_graphs(model), device, cutoff)  # `cov3d export` graphs: ONNX Runtime
        members = exported or load_ensemble(model)
        found, missing = find_inputs(scans)
        failures = list(missing)
        settings = prediction_settings(members, tta, cutoff, precision.value)
        if series is not None:
            settings["series"] = series  # another DICOM series gives other predictions: never mixed on resume
        record = PredictionFile(output, settings, fresh=fresh)
        todo = record.start(found)
        state.update(record=record, found=found)
        if record.kept:
            console.print(f"Resuming: {record.kept} of {len(found)} scan(s) are in '{output}' from an earlier run "
                          f"with these settings; predicting the other {len(todo)} (--fresh predicts all).")
        if todo:
            try:
                with progress_bar("Predicting") as progress:
                    run = predict_exported if exported else partial(predict_scans, series=series)
                    if exported and series is not None:
                        raise Cov3dError("--series applies to cov3d checkpoints; an exported model reads each "
                                         "DICOM folder by the series rule")
                    _, failed = run(todo, members, tta=tta, batch_size=batch_size, workers=workers,
                                    device=device, precision=precision.value, roots=scans, progress=progress,
                                    on_batch=lambda done: record.add(prediction_rows(done, cutoff)))
                failures.extend(failed)
            finally:
                record.save()  # also on Ctrl-C: every scan finished so far is kept, and the same command resumes
        else:
            record.save()
        rows = record.ordered()
        if not rows:
            # Nothing was predicted: an existing output keeps its predictions.
            errors.print(f"No scan could be predicted; '{output}' was not written.", style="bold red")
        else:
            covid = sum(r["prediction"] == "covid" for r in rows)
            console.print(f"Predicted {len(rows)} scan(s) with {len(members)} checkpoint(s): {covid} covid, "
                          f"{len(rows) - covid} non-covid (threshold {cutoff:g}).")
            console.print(f"Predictions: {output}")
            if submission is not None:
                write_submission(submission, rows)
                console.print(f"Submission lists: {submission}")
            if pseudo_labels is not None:
                from cov3d.inference.pseudo import write_pseudo_labels

                kept = write_pseudo_labels(rows, pseudo_labels, pseudo_threshold, [str(m) for m in model])
                console.print(f"Pseudo-labels: {kept['kept']} of {len(rows)} scan(s) at threshold "
                              f"{pseudo_threshold:g} ({kept['covid']} covid, {kept['non_covid']} non-covid, "
                              f"{kept['with_severity']} with a severity) in {pseudo_labels}")
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
    resamples: Annotated[
        int, typer.Option(min=0, help="Bootstrap resamples (stratified by true class) for the 95% confidence "
                                      "intervals of macro F1, accuracy and ROC AUC; 0: no intervals.")
    ] = 2000,  # cov3d.inference.stats.RESAMPLES
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap resamples.")] = 0,
    groups: Annotated[
        Optional[Path], typer.Option(help="CSV of scan groups: a 'scan' column (the scan's path under DATA, e.g. "
                                          "validation/covid/ct_scan_0, or its name where no other scan has it) and "
                                          "one column per grouping (site, sex, scanner…).")
    ] = None,
    group_by: Annotated[
        Optional[str], typer.Option(help="The --groups column to score by: every metric per group with its CI, "
                                         "the worst group and the gap (best − worst); also groups.csv.")
    ] = None,
    baseline: Annotated[
        Optional[Path], typer.Option(help="Compare with another model on the same scans: a run directory or "
                                          "checkpoint (evaluated here too), or an earlier evaluate's output folder "
                                          "or predictions.csv. Paired bootstrap CI of each difference, McNemar's "
                                          "test of accuracy.")
    ] = None,
    report: Annotated[
        Optional[Path], typer.Option(help="Also write one self-contained HTML report: scores with CIs, confusion "
                                          "matrices, ROC and PR curves, groups, training curves of --model runs, "
                                          "and the most confident mistakes.")
    ] = None,
    report_gradcam: Annotated[
        bool, typer.Option("--report-gradcam", help="With --report: add each mistake's Grad-CAM presence map "
                                                    "(as `cov3d explain`; one backward pass per scan and model).")
    ] = False,
) -> None:
    """Score models on a labelled split: F1, accuracy, ROC AUC with confidence intervals, confusion matrices, plots."""
    from cov3d.inference.evaluate import evaluate as run_evaluation, write_outputs

    from cov3d.atomic import check_writable
    from cov3d.training.runtime import resolve_device

    def kept(_: KeyboardInterrupt) -> str:
        return (f"Nothing was written: evaluate writes '{output_dir}' once every scan is scored; run the command "
                "again to start over.")

    with reported(interrupted=kept):
        check_writable(output_dir, folder=True)
        resolve_device(device)
        from cov3d.cli.research import Study

        study = Study(groups, group_by, baseline, report, resamples, seed,  # its files are checked before any work
                      gradcam=report_gradcam, device=device)
        with progress_bar("Evaluating") as progress:
            result = run_evaluation(data, model, split=split, threshold=threshold, tta=tta, workers=workers,
                                    device=device, precision=precision.value,
                                    severity_files={"train": train_severity, "validation": validation_severity},
                                    progress=progress, resamples=resamples, seed=seed)
        if result.metrics is None:
            errors.print(f"No scan of the {split} split could be predicted; nothing was written.", style="bold red")
            failure_table(result.failures)
            raise typer.Exit(1)
        study.extend(result, data, lambda models, progress: run_evaluation(
            data, models, split=split, threshold=threshold, tta=tta, workers=workers, device=device,
            precision=precision.value, severity_files={"train": train_severity, "validation": validation_severity},
            progress=progress, resamples=0))
        write_outputs(result, output_dir)
        if wandb:
            from cov3d.training.tracking import log_evaluation

            logged = log_evaluation(result, model, mode=wandb_mode.value if wandb_mode else None,
                                    project=wandb_project, entity=wandb_entity)
        _print_metrics(result.metrics, split)
        study.finish(result, output_dir, model)
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
    series: SeriesOption = None,
) -> None:
    """Show where the model looks: Grad-CAM maps for presence and the predicted severity over the scan."""
    from cov3d.atomic import check_writable
    from cov3d.inference.explain import explain_scan
    from cov3d.reports.explanation import write_explanation
    from cov3d.inference.predict import load_ensemble
    from cov3d.training.runtime import resolve_device

    with reported():
        from cov3d.cli.options import scan_output_name

        target = output or Path("explain") / scan_output_name(scan)  # the whole name: UIDs differ after a dot
        check_writable(target, folder=True)
        torch_device = resolve_device(device)
        if not scan.exists():
            raise Cov3dError(f"scan '{scan}' does not exist")
        members = load_ensemble(model)
        with progress_bar("Explaining") as progress:
            explanation = explain_scan(scan, members, tta=tta, stage=stage, device=torch_device, progress=progress,
                                       series=series)
        written = write_explanation(explanation, target)
        console.print(escape(explanation.title()), highlight=False)
        if explanation.lung_share is not None:
            shares = ", ".join(f"{task} {share:.0%}" for task, share in explanation.lung_share.items())
            console.print(f"Share of each map inside the lungs: {shares}.")
        else:
            console.print(f"Lung segmentation: {explanation.lungs_quality}; no lung share measured.")
        console.print(f"Wrote {len(written)} files to {target}: " + ", ".join(p.name for p in written), soft_wrap=True)
