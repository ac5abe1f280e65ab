"""`cov3d compare`: a table of runs like the paper's Table 3, from what each run directory holds.

A run directory holds config.json (arch, size, λ, epochs), history.csv (each
epoch's validation scores and seconds) and its checkpoints; the parameter
count comes from a checkpoint's state dict, without building the network. A
metrics.json written by `cov3d evaluate` inside the run (``RUN/evaluation/``,
say) adds the evaluated F1 with its confidence interval; a cross-validation
run (:mod:`cov3d.training.cv`) adds its pooled out-of-fold scores.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

from cov3d.atomic import write_csv, write_text
from cov3d.errors import Cov3dError
from cov3d.models.checkpoint import CONFIG, HISTORY, LAST, PRESENCE, SEVERITY, load_checkpoint
from cov3d.reports.curves import read_history

log = logging.getLogger(__name__)

COLUMNS = ["run", "arch", "size", "lambda", "epochs", "presence_f1", "presence_epoch", "severity_f1",
           "severity_epoch", "presence_f1_evaluated", "presence_f1_low", "presence_f1_high",
           "severity_f1_evaluated", "severity_f1_low", "severity_f1_high", "evaluation", "seconds", "parameters"]
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm state: not parameters
CV_SUMMARY = "cv.json"


def expand(patterns: Sequence[str | Path]) -> list[Path]:
    """Run directories from paths and globs (``runs/*``, quoted so that the shell leaves it), each once."""
    runs: list[Path] = []
    for pattern in map(str, patterns):
        if any(ch in pattern for ch in "*?["):
            matched = sorted(Path(p) for p in glob.glob(pattern) if _is_run(Path(p)))
            if not matched:
                raise Cov3dError(f"'{pattern}' matches no run directory (a folder with {CONFIG})")
            runs.extend(matched)
        else:
            path = Path(pattern)
            if not path.is_dir():
                raise Cov3dError(f"run '{path}' does not exist; give run directories written by `cov3d train`")
            if not _is_run(path):
                raise Cov3dError(f"'{path}' is not a run directory: it has no {CONFIG} (nor {CV_SUMMARY})")
            runs.append(path)
    unique, seen = [], set()
    for run in runs:
        if run.resolve() not in seen:
            seen.add(run.resolve())
            unique.append(run)
    return unique


def _is_run(path: Path) -> bool:
    return path.is_dir() and ((path / CONFIG).is_file() or (path / CV_SUMMARY).is_file())


def count_parameters(checkpoint: Path) -> int:
    """The trainable parameters in a checkpoint's state dict (BatchNorm running statistics aside)."""
    state = load_checkpoint(checkpoint)["model"]
    return int(sum(t.numel() for name, t in state.items() if not name.endswith(BUFFERS)))


def _best(rows: list[dict], key: str) -> tuple[float | None, int | None]:
    best, epoch = None, None
    for row in rows:
        try:
            value = float(row.get(key) or "nan")
        except ValueError:
            continue
        if math.isfinite(value) and (best is None or value > best):
            best, epoch = value, int(row["epoch"])
    return best, epoch


def latest_evaluation(run: Path) -> Path | None:
    """The newest metrics.json of `cov3d evaluate` inside `run` (one with scores and intervals), if any."""
    found = []
    for path in run.rglob("metrics.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "presence" in data:
            found.append((path.stat().st_mtime, path))
    return max(found)[1] if found else None


def describe_run(run: Path) -> dict:
    """One row of the table."""
    if (run / CV_SUMMARY).is_file() and not (run / CONFIG).is_file():
        return _describe_cv(run)
    try:
        config = json.loads((run / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise Cov3dError(f"'{run / CONFIG}' cannot be read ({error}); is '{run}' a cov3d run?") from None
    resolved = config.get("resolved") or {}
    history = read_history(run / HISTORY)
    presence, presence_epoch = _best(history, "presence_f1")
    severity, severity_epoch = _best(history, "severity_f1")
    seconds = sum(float(r.get("epoch_seconds") or 0) for r in history) or None
    checkpoint = next((run / name for name in (PRESENCE, LAST, SEVERITY) if (run / name).is_file()), None)
    row = {"run": str(run), "arch": config.get("arch", ""),
           "size": resolved.get("size_name") or f"{config.get('depth')}x{config.get('width')}x{config.get('width')}",
           "lambda": config.get("lam", config.get("lambda")), "epochs": f"{len(history)}/{config.get('epochs', '')}",
           "presence_f1": presence, "presence_epoch": presence_epoch, "severity_f1": severity,
           "severity_epoch": severity_epoch, "seconds": seconds,
           "parameters": count_parameters(checkpoint) if checkpoint else None}
    row.update(_evaluated(latest_evaluation(run)))
    return row


def _evaluated(metrics_file: Path | None) -> dict:
    row = {key: None for key in COLUMNS[9:15]}
    row["evaluation"] = ""
    if metrics_file is None:
        return row
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    ci = metrics.get("ci") or {}
    for task, prefix in (("presence", "presence_f1"), ("severity", "severity_f1")):
        scores = metrics.get(task) or {}
        interval = (ci.get(task) or {}).get("macro_f1") or {}
        row[f"{prefix}_evaluated"] = scores.get("macro_f1")
        row[f"{prefix}_low"], row[f"{prefix}_high"] = interval.get("low"), interval.get("high")
    row["evaluation"] = str(metrics_file)
    return row


def _describe_cv(run: Path) -> dict:
    """A cross-validation run: its folds' settings and pooled out-of-fold scores."""
    summary = json.loads((run / CV_SUMMARY).read_text(encoding="utf-8"))
    config = summary.get("config", {})
    pooled = summary.get("pooled") or {}
    row = {key: None for key in COLUMNS}
    row.update({"run": str(run), "arch": config.get("arch", ""),
                "size": f"{config.get('depth')}x{config.get('width')}x{config.get('width')}",
                "lambda": config.get("lam"), "epochs": f"{config.get('epochs', '')} x {summary.get('folds')} folds",
                "presence_f1": (summary.get("mean") or {}).get("presence_f1"),
                "severity_f1": (summary.get("mean") or {}).get("severity_f1"),
                "seconds": summary.get("seconds"), "parameters": summary.get("parameters"),
                "evaluation": str(run / CV_SUMMARY), "evaluated_as": "pooled out-of-fold"})
    for task, prefix in (("presence_macro_f1", "presence_f1"), ("severity_macro_f1", "severity_f1")):
        entry = pooled.get(task) or {}
        row[f"{prefix}_evaluated"], row[f"{prefix}_low"], row[f"{prefix}_high"] = (
            entry.get("estimate"), entry.get("low"), entry.get("high"))
    return row


def compare_runs(patterns: Sequence[str | Path]) -> list[dict]:
    """A row per run, in the order given."""
    return [describe_run(run) for run in expand(patterns)]


def cell(value, digits: int | None = 3) -> str:
    """A table cell: '' for nothing, a float to `digits` places (None: as short as it goes, for λ)."""
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:g}" if digits is None else f"{value:.{digits}f}"
    return str(value)


def with_interval(row: dict, prefix: str) -> str:
    best, evaluated = row.get(prefix), row.get(f"{prefix}_evaluated")
    text = cell(best)
    if evaluated is not None:
        ci = "" if row.get(f"{prefix}_low") is None else f" [{row[f'{prefix}_low']:.3f}, {row[f'{prefix}_high']:.3f}]"
        said = row.get("evaluated_as") or "evaluated"
        text = f"{text} ({said} {evaluated:.3f}{ci})" if text else f"{evaluated:.3f}{ci}"
    return text


def markdown(rows: list[dict]) -> str:
    """The table in Markdown, as the paper's Table 3 reads: arch, size, λ, epochs, best F1s, time, parameters."""
    head = ["run", "arch", "size", "λ", "epochs", "presence F1", "severity F1", "time (s)", "parameters"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    names = short_names([row["run"] for row in rows])
    for row, name in zip(rows, names):
        cells = [name, row["arch"], row["size"], cell(row["lambda"], None), row["epochs"],
                 with_interval(row, "presence_f1"), with_interval(row, "severity_f1"), cell(row["seconds"], 0),
                 f"{row['parameters']:,}" if row["parameters"] else ""]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def short_names(runs: Sequence[str]) -> list[str]:
    """Each run's path below the folder all of them share ('a', 'cv/fold-0'); a lone run's name."""
    resolved = [Path(run).resolve() for run in runs]
    if len(resolved) < 2:
        return [path.name for path in resolved]
    common = Path(os.path.commonpath(resolved))
    return [path.relative_to(common).as_posix() if path != common else path.name for path in resolved]


def write_comparison(rows: list[dict], directory: Path) -> list[Path]:
    """comparison.csv, comparison.md and comparison.png in `directory`."""
    from cov3d.reports.comparison import plot_comparison

    directory = Path(directory)
    written = [directory / "comparison.csv", directory / "comparison.md", directory / "comparison.png"]
    write_csv(written[0], COLUMNS, [{k: "" if row.get(k) is None else row[k] for k in COLUMNS} for row in rows])
    write_text(written[1], markdown(rows))
    plot_comparison([{**row, "name": name} for row, name in zip(rows, short_names([r["run"] for r in rows]))],
                    written[2])
    return written
