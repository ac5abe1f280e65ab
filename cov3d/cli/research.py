"""What `cov3d evaluate` prints for a study (intervals, groups, a baseline comparison), and `cov3d compare`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cov3d.cli.core import app, console, progress_bar, reported
from cov3d.errors import Cov3dError

LABELS = {"presence_macro_f1": "presence macro F1", "presence_accuracy": "presence accuracy",
          "presence_roc_auc": "presence ROC AUC", "severity_macro_f1": "severity macro F1"}


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _interval(entry: dict | None, digits: int = 3) -> str:
    """'0.912 [0.881, 0.940]' from {estimate, low, high}."""
    if not entry or entry.get("estimate") is None:
        return "-"
    if entry.get("low") is None:
        return _number(entry["estimate"], digits)
    return f"{entry['estimate']:.{digits}f} [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"


def print_intervals(metrics: dict) -> None:
    """One line of 95% intervals under evaluate's scores."""
    boot = metrics.get("bootstrap")
    if not boot:
        return
    ci = metrics["ci"]
    parts = [f"presence macro F1 {_interval(ci['presence'].get('macro_f1'))}",
             f"accuracy {_interval(ci['presence'].get('accuracy'))}",
             f"ROC AUC {_interval(ci['presence'].get('roc_auc'))}"]
    if "severity" in ci:
        parts.append(f"severity macro F1 {_interval(ci['severity'].get('macro_f1'))}")
    console.print(f"{boot['level']:.0%} CI ({boot['resamples']} stratified bootstrap resamples, seed {boot['seed']}): "
                  + "  ".join(parts), soft_wrap=True)
    small = boot.get("small_strata") or []
    if small:
        counts = ", ".join(f"{name} {boot['strata'][name]}" for name in small)
        console.print(f"Few scans in {counts}: resampled within their class, they barely vary, so the intervals "
                      "understate the uncertainty there.", soft_wrap=True, highlight=False)


def print_groups(grouped: dict) -> None:
    """The per-group table, then each metric's worst group and the gap."""
    table = Table(title=f"By {grouped['column']} ({escape(grouped['file'])})")
    table.add_column(grouped["column"])
    table.add_column("scans", justify="right")
    for metric in LABELS.values():
        table.add_column(metric)
    for name, scores in grouped["groups"].items():
        table.add_row(escape(name), str(scores["scans"]), *(_interval(scores[m]) for m in LABELS))
    console.print(table)
    for metric, label in LABELS.items():
        summary = grouped["summary"][metric]
        if summary["worst_group"] is not None:
            console.print(f"{label}: worst group {escape(summary['worst_group'])} {summary['worst']:.3f}, gap "
                          f"{summary['gap']:.3f} (best {escape(summary['best_group'])} {summary['best']:.3f})",
                          soft_wrap=True, highlight=False)


def print_comparison(comparison: dict) -> None:
    """This model − the baseline, per metric, with the paired interval, and McNemar's test."""
    console.print(f"Against {escape(comparison['baseline'])} on {comparison['scans']} shared scans "
                  "(this − baseline, paired bootstrap 95% CI):", soft_wrap=True, highlight=False)
    for metric, label in LABELS.items():
        d = comparison["differences"][metric]
        if d["estimate"] is None:
            continue
        console.print(f"  {label}: {d['first']:.3f} vs {d['second']:.3f}, difference "
                      f"{d['estimate']:+.3f}" + ("" if d["low"] is None else f" [{d['low']:+.3f}, {d['high']:+.3f}]"),
                      highlight=False)
    test = comparison["mcnemar_presence_accuracy"]
    console.print(f"  McNemar ({test['method']}) on presence accuracy: {test['first_only_right']} scans right only "
                  f"here, {test['second_only_right']} only in the baseline, p = {test['p_value']:.4g}",
                  highlight=False)


def relative_to_cwd(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class Study:
    """evaluate's --groups, --group-by, --baseline and --report: checked first, computed after the scores."""

    def __init__(self, groups: Path | None, group_by: str | None, baseline: Path | None, report: Path | None,
                 resamples: int, seed: int, gradcam: bool = False, device: str = "cpu"):
        from cov3d.atomic import check_writable
        from cov3d.inference.research import check_group_options

        self.groups, self.group_by, self.baseline, self.report = groups, group_by, baseline, report
        self.resamples, self.seed, self.gradcam, self.device = resamples, seed, gradcam, device
        if gradcam and report is None:
            raise Cov3dError("--report-gradcam adds Grad-CAM maps to the report: give --report FILE.html too")
        self.table = check_group_options(groups, group_by)
        if baseline is not None and not str(baseline).startswith("wandb:") and not Path(baseline).exists():
            raise Cov3dError(f"baseline '{baseline}' does not exist; give a run directory, a checkpoint, or an "
                             "earlier evaluate's output folder or predictions.csv")
        if report is not None:
            if Path(report).suffix.lower() not in (".html", ".htm"):
                raise Cov3dError(f"report '{report}' must end in .html: it is one self-contained web page")
            check_writable(report)

    def extend(self, result, data: Path, evaluate_baseline: Callable) -> None:
        """Add "groups" and "comparison" to the evaluation's metrics (before metrics.json is written)."""
        from cov3d.inference import research

        if self.table is not None:
            result.metrics["groups"] = research.score_groups(result.scored, self.table, self.groups, self.group_by,
                                                             self.resamples, self.seed)
        if self.baseline is not None:
            if research.is_evaluation(self.baseline):
                other = research.read_evaluation(self.baseline, data)
            else:
                with progress_bar("Evaluating the baseline") as progress:
                    evaluated = evaluate_baseline([self.baseline], progress)
                if evaluated.scored is None or not len(evaluated.scored):
                    raise Cov3dError(f"the baseline '{self.baseline}' could predict no scan of the split")
                other = evaluated.scored
            result.metrics["comparison"] = research.compare_with_baseline(result.scored, other, str(self.baseline),
                                                                          self.resamples, self.seed)

    def finish(self, result, output_dir: Path, models: Sequence[Path]) -> None:
        """Print intervals, groups and the comparison; write groups.csv and the report."""
        from cov3d.inference import research

        print_intervals(result.metrics)
        if "groups" in result.metrics:
            print_groups(result.metrics["groups"])
            research.write_group_table(result.metrics["groups"], Path(output_dir) / "groups.csv")
        if "comparison" in result.metrics:
            print_comparison(result.metrics["comparison"])
        if self.report is not None:
            with progress_bar("Reading mistakes for the report") as progress:
                research.write_report(result, self.report, models, progress=progress, gradcam=self.gradcam,
                                      device=self.device)
            console.print(f"Report: {self.report}")


@app.command()
def compare(
    runs: Annotated[list[str], typer.Argument(help="Run directories, or globs such as 'runs/*' (quoted).")],
    output_dir: Annotated[
        Path, typer.Option(help="Where comparison.csv, comparison.md and comparison.png go.")
    ] = Path("comparison"),
) -> None:
    """Compare runs as the paper's Table 3: arch, size, λ, epochs, best F1 (with CIs where evaluated), time,
    parameters."""
    from cov3d.atomic import check_writable
    from cov3d.inference.compare import cell, compare_runs, with_interval, write_comparison

    with reported():
        check_writable(output_dir, folder=True)
        rows = compare_runs(runs)
        table = Table(title=f"{len(rows)} run(s)")
        for column in ("run", "arch", "size", "λ", "epochs", "presence F1", "severity F1", "time (s)", "parameters"):
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(escape(relative_to_cwd(row["run"])), row["arch"], row["size"], cell(row["lambda"], None),
                          row["epochs"], with_interval(row, "presence_f1"), with_interval(row, "severity_f1"),
                          cell(row["seconds"], 0), f"{row['parameters']:,}" if row["parameters"] else "")
        console.print(table)
        written = write_comparison(rows, output_dir)
        console.print(f"Wrote {', '.join(str(p) for p in written)}", soft_wrap=True, highlight=False)


def cross_validate(config, folds: int | None, fold: int | None, pool: str, groups: Path | None,
                   group_by: str | None, training_progress) -> None:
    """`cov3d train --folds K [--fold I]`: plan the folds, train them, predict out of fold, summarise."""
    from cov3d.inference.crossval import out_of_fold, summarise
    from cov3d.training.cv import PLAN, fold_run, plan_folds, read_plan, train_fold, write_plan

    run = Path(config.output)
    if folds is None:
        if not (run / PLAN).is_file():
            raise Cov3dError(f"--fold {fold} needs --folds K (or an --output whose {PLAN} plans the folds)")
        folds = int(read_plan(run)["folds"])
    if fold is not None and fold >= folds:
        raise Cov3dError(f"--fold {fold} is not among the folds 0…{folds - 1} of --folds {folds}")
    scans = plan_folds(Path(config.data), folds, config.seed, pool,
                       {"train": config.train_severity, "validation": config.validation_severity}, groups, group_by)
    plan = write_plan(run, scans, folds, config.seed, pool, config, groups, group_by)
    sizes = [sum(s["fold"] == i for s in plan["scans"]) for i in range(folds)]
    console.print(f"Cross-validation in {run}: {len(plan['scans'])} labelled scans in {folds} folds of "
                  f"{', '.join(map(str, sizes))} (pool {pool}, seed {config.seed}).", soft_wrap=True)
    for i in ([fold] if fold is not None else range(folds)):
        console.print(f"Fold {i}: validating on {sizes[i]} scans, training on {sum(sizes) - sizes[i]}.")
        with training_progress() as callbacks:
            result = train_fold(config, run, plan, i, **callbacks)
        if result is None:
            console.print(f"Fold {i} has trained its {config.epochs} epochs already.")
        if result is None or result.main:
            oof = fold_run(run, i) / "oof.csv"
            if result is not None or not oof.is_file():
                with progress_bar(f"Fold {i}: out-of-fold predictions") as progress:
                    out_of_fold(run, i, device=config.device, workers=config.loader_workers, progress=progress)
    missing = [i for i in range(folds) if not (fold_run(run, i) / "oof.csv").is_file()]
    if missing:
        console.print(f"Folds {', '.join(map(str, missing))} are still to train; the summary is written once they "
                      "have (run the same command without --fold, or with each --fold).")
        return
    summary = summarise(run)
    print_cv_summary(summary, run)


def print_cv_summary(summary: dict, run: Path) -> None:
    mean, std, pooled = summary["mean"], summary["std"], summary["pooled"]

    def pm(key: str) -> str:
        return "-" if mean[key] is None else f"{mean[key]:.3f} ± {std[key]:.3f}"

    console.print(f"Best validation presence F1 over folds {pm('presence_f1')}, severity F1 {pm('severity_f1')} "
                  "(mean ± std)", soft_wrap=True)
    console.print(f"Pooled out-of-fold ({summary['scans']} scans, last.pt): presence macro F1 "
                  f"{_interval(pooled['presence_macro_f1'])}  accuracy {_interval(pooled['presence_accuracy'])}  "
                  f"ROC AUC {_interval(pooled['presence_roc_auc'])}  severity macro F1 "
                  f"{_interval(pooled['severity_macro_f1'])} (95% CI)", soft_wrap=True)
    console.print(f"Summary: {run / 'cv.json'}; out-of-fold predictions: {run / 'oof.csv'}")
