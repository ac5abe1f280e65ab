"""What `cov3d evaluate` adds for a study: scores per group, a paired comparison with a baseline, a report.

The statistics are :mod:`cov3d.inference.stats`'; this module finds their
inputs (a groups file, a baseline's answers on the same scans, a run's history,
the most confident mistakes) and writes their outputs.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cov3d.atomic import write_csv
from cov3d.data.groups import group_table, groups_of
from cov3d.errors import Cov3dError
from cov3d.inference import stats
from cov3d.inference.stats import Scored

log = logging.getLogger(__name__)

GROUP_COLUMNS = ["group", "scans", *[f"{m}{end}" for m in stats.METRICS for end in ("", "_low", "_high")]]


def check_group_options(groups: Path | None, group_by: str | None) -> dict[str, str] | None:
    """The groups file's {scan: group}, read before any scan is predicted; None without --groups."""
    if groups is None and group_by is None:
        return None
    if groups is None:
        raise Cov3dError(f"--group-by {group_by} needs --groups FILE.csv, the file that gives each scan's groups")
    if group_by is None:
        raise Cov3dError(f"--groups {groups} needs --group-by COLUMN, the column of '{groups}' to group scans by")
    return group_table(groups, group_by)


def score_groups(scored: Scored, table: dict[str, str], groups: Path, group_by: str, resamples: int,
                 seed: int) -> dict:
    """metrics.json's "groups": every metric per group with its interval, the worst group and the gap."""
    assigned = groups_of(scored.scans, table, groups)
    result = stats.group_scores(scored, assigned, resamples, seed)
    return {"file": str(groups), "column": group_by, **result}


def write_group_table(grouped: dict, path: Path) -> Path:
    """groups.csv: one row per group, each metric with its interval bounds (empty where undefined)."""
    rows = []
    for name, scores in grouped["groups"].items():
        row = {"group": name, "scans": scores["scans"]}
        for metric in stats.METRICS:
            for end, key in (("", "estimate"), ("_low", "low"), ("_high", "high")):
                value = scores[metric][key]
                row[metric + end] = "" if value is None else f"{value:.6f}"
        rows.append(row)
    write_csv(path, GROUP_COLUMNS, rows)
    return path


def is_evaluation(path: Path) -> bool:
    """Whether `path` is an output of `cov3d evaluate` (its predictions.csv, or the folder holding one)."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".csv"
    return (path / "predictions.csv").is_file() and (path / "metrics.json").is_file()


def read_evaluation(path: Path, root: Path) -> Scored:
    """The answers in an earlier `cov3d evaluate`'s predictions.csv (or its output folder), keyed under `root`."""
    path = Path(path)
    csv_path = path / "predictions.csv" if path.is_dir() else path
    try:
        with csv_path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise Cov3dError(f"cannot read baseline predictions '{csv_path}': {error}") from None
    if not rows:
        raise Cov3dError(f"baseline predictions '{csv_path}' hold no scan")
    return stats.scored_from_rows(rows, root)


def compare_with_baseline(scored: Scored, baseline: Scored, name: str, resamples: int, seed: int) -> dict:
    """metrics.json's "comparison": this evaluation − the baseline on their shared scans."""
    result = stats.paired_comparison(scored, baseline, resamples, seed)
    if result["scans"] < len(scored):
        log.warning("the baseline scored %d of the %d scans; the comparison uses those", result["scans"],
                    len(scored))
    return {"baseline": name, **result}


def confident_mistakes(scored: Scored, paths: Sequence[str], count: int = 6) -> list[dict]:
    """The `count` presence mistakes made with the most confidence (|P(covid) − 0.5| largest among wrong answers)."""
    wrong = np.flatnonzero(scored.covid != scored.predicted)
    order = wrong[np.argsort(-np.abs(scored.probability[wrong] - 0.5), kind="stable")][:count]
    return [{"scan": scored.scans[i], "path": str(paths[i]), "truth": "covid" if scored.covid[i] else "non-covid",
             "probability": float(scored.probability[i])} for i in order]


def mid_slices(mistakes: list[dict], window: tuple[float, float], width: int = 128,
               progress: Callable[[int, int], None] | None = None) -> list[np.ndarray | None]:
    """The middle axial slice of each mistake's scan (width × width, 0…1), None where it cannot be read."""
    from cov3d.data.preprocess import Size, preprocess_volume

    images: list[np.ndarray | None] = []
    for done, mistake in enumerate(mistakes):
        try:
            volume = preprocess_volume(Path(mistake["path"]), Size(16, width), window, threads=1)[0]
            images.append(volume[0, volume.shape[1] // 2].float().numpy())
        except (Cov3dError, OSError, ValueError, RuntimeError) as error:  # a picture less; the report goes on
            log.warning("no mid-slice of %s for the report: %s", mistake["path"], error)
            images.append(None)
        if progress:
            progress(done + 1, len(mistakes))
    return images


def _run_directory(model: Path) -> Path | None:
    """The run directory of a --model: itself, or the folder of its checkpoint, when it has a history."""
    model = Path(model)
    for candidate in (model, model.parent):
        if candidate.is_dir() and (candidate / "history.csv").is_file():
            return candidate
    return None


def _window(models: Sequence[Path]) -> tuple[float, float]:
    """The HU window of the first model whose run records one (else the lung window): mid-slices as it saw them."""
    import json

    from cov3d.data.readers import DEFAULT_WINDOW

    for model in models:
        run = Path(model) if Path(model).is_dir() else Path(model).parent
        try:
            low, high = json.loads((run / "config.json").read_text(encoding="utf-8"))["window"]
            return float(low), float(high)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return DEFAULT_WINDOW


def gradcam_montages(mistakes: list[dict], models: Sequence[Path], device: str = "cpu") -> list[str | None]:
    """A Grad-CAM montage (presence map, 4 most attended slices) of each mistake, as a PNG data URI; None where
    it cannot be made. Reuses `cov3d explain`: one backward pass per presence model and scan."""
    import tempfile

    from cov3d.inference.explain import explain_scan
    from cov3d.inference.predict import load_ensemble
    from cov3d.reports.html import file_uri
    from cov3d.reports.explanation import render_montage
    from cov3d.training.runtime import resolve_device

    members = load_ensemble(models)
    montages: list[str | None] = []
    with tempfile.TemporaryDirectory() as workdir:
        for i, mistake in enumerate(mistakes):
            try:
                explanation = explain_scan(Path(mistake["path"]), members, tta=False, device=resolve_device(device))
                montages.append(file_uri(render_montage(explanation, "presence", Path(workdir) / f"{i}.png", 4)))
            except (Cov3dError, OSError, RuntimeError, ValueError) as error:  # a picture less; the report goes on
                log.warning("no Grad-CAM of %s for the report: %s", mistake["path"], error)
                montages.append(None)
    return montages


def write_report(evaluation, path: Path, models: Sequence[Path], mistakes: int = 6,
                 progress: Callable[[int, int], None] | None = None, gradcam: bool = False,
                 device: str = "cpu") -> Path:
    """The HTML report of an evaluation: its scores with intervals, curves, groups, comparison, the training
    curves of --model run directories, and the most confident mistakes with their mid-slices (and, with
    `gradcam`, their Grad-CAM presence maps)."""
    import tempfile

    from cov3d.reports.html import history_uri, write_report as write_html

    scored = evaluation.scored
    paths = [row["path"] for row in evaluation.rows]
    worst = confident_mistakes(scored, paths, mistakes)
    slices = mid_slices(worst, _window(models), progress=progress)
    montages = gradcam_montages(worst, models, device) if gradcam and worst else []
    histories = []
    runs = []
    for model in models:
        run = _run_directory(model) if not str(model).startswith("wandb:") else None
        if run is not None and run.resolve() not in runs:
            runs.append(run.resolve())
            with tempfile.TemporaryDirectory() as workdir:
                try:
                    histories.append((str(run), history_uri(run / "history.csv", Path(workdir))))
                except Cov3dError as error:  # a run with no epoch yet, or a damaged history: a section less
                    log.warning("no training curves of %s in the report: %s", run, error)
    return write_html(path, evaluation.metrics, scored.covid, scored.probability,
                      title=f"cov3d evaluation: {evaluation.metrics.get('split', '')}", histories=histories,
                      mistakes=worst, slices=slices, gradcams=montages)
