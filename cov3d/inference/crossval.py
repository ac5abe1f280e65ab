"""Cross-validation results: out-of-fold predictions, the study's summary, and its fold models for predict.

Each fold's held-out scans are predicted with the fold's last checkpoint
(last.pt: chosen by no score on those scans, so the pooled out-of-fold scores
are not optimistic the way a best-on-validation checkpoint's would be) and
written to ``RUN/fold-I/oof.csv``. ``RUN/oof.csv`` pools them, one row per
labelled scan, and ``RUN/cv.json`` gains a summary: each fold's best
validation scores from its history, their mean ± std over folds, and the
pooled out-of-fold scores with stratified bootstrap intervals.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cov3d.atomic import write_csv, write_text
from cov3d.errors import Cov3dError
from cov3d.inference import stats
from cov3d.inference.predict import CSV_COLUMNS, load_ensemble, predict_scans, prediction_rows
from cov3d.labels import severity_name
from cov3d.models.checkpoint import LAST, PRESENCE
from cov3d.reports.curves import read_history
from cov3d.training.cv import PLAN, fold_run, fold_scans, read_plan

log = logging.getLogger(__name__)

OOF_COLUMNS = [*CSV_COLUMNS, "label", "true_severity", "fold"]


def is_cv_run(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / PLAN).is_file()


def out_of_fold(run: Path, fold: int, *, device: str = "auto", workers: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> Path:
    """Predict fold `fold`'s held-out scans with its last.pt; write RUN/fold-I/oof.csv."""
    plan = read_plan(run)
    data = Path(plan["data"])
    held_out = [s for s in fold_scans(plan) if s.fold == fold]
    checkpoint = fold_run(run, fold) / LAST
    if not checkpoint.is_file():
        raise Cov3dError(f"fold {fold} has no {LAST} yet; train it first")
    members = load_ensemble([checkpoint])
    by_path = {data / s.path: s for s in held_out}
    predictions, failures = predict_scans(list(by_path), members, tta=False, device=device, workers=workers,
                                          roots=[data], progress=progress)
    for path, reason in failures:
        log.warning("fold %d: %s could not be predicted: %s", fold, path, reason)
    rows = prediction_rows(predictions, 0.5)
    for row, p in zip(rows, predictions):
        scan = by_path[p.path]
        row.update(label=scan.label, true_severity=severity_name(scan.severity) if scan.severity else "", fold=fold)
    target = fold_run(run, fold) / "oof.csv"
    write_csv(target, OOF_COLUMNS, rows)
    return target


def _best(history: list[dict], key: str) -> float | None:
    values = [float(r[key]) for r in history if r.get(key) not in (None, "", "nan")]
    values = [v for v in values if np.isfinite(v)]
    return max(values) if values else None


def summarise(run: Path, resamples: int = stats.RESAMPLES, seed: int = stats.SEED) -> dict:
    """Pool the folds' oof.csv into RUN/oof.csv and add the summary to RUN/cv.json; return the summary."""
    run = Path(run)
    plan = read_plan(run)
    data = Path(plan["data"])
    rows, per_fold = [], []
    for fold in range(plan["folds"]):
        history = read_history(fold_run(run, fold) / "history.csv")
        oof = fold_run(run, fold) / "oof.csv"
        if not oof.is_file():
            raise Cov3dError(f"fold {fold} of '{run}' has no out-of-fold predictions yet; train it (cov3d train "
                             f"DATA --folds {plan['folds']} --fold {fold} --output {run})")
        with oof.open(newline="", encoding="utf-8") as handle:
            fold_rows = list(csv.DictReader(handle))
        rows.extend(fold_rows)
        scored = stats.scored_from_rows(fold_rows, data)
        points = stats.point_scores(scored)
        per_fold.append({"fold": fold, "scans": len(fold_rows),
                         "best_presence_f1": _best(history, "presence_f1"),
                         "best_severity_f1": _best(history, "severity_f1"),
                         "seconds": sum(float(r.get("epoch_seconds") or 0) for r in history),
                         "oof_presence_macro_f1": points["presence_macro_f1"],
                         "oof_severity_macro_f1": points["severity_macro_f1"]})
    write_csv(run / "oof.csv", OOF_COLUMNS, rows)
    pooled = stats.intervals(stats.scored_from_rows(rows, data), resamples, seed)

    def spread(key: str) -> tuple[float | None, float | None]:
        values = [f[key] for f in per_fold if f[key] is not None]
        if not values:
            return None, None
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    mean, std = {}, {}
    for key, name in (("best_presence_f1", "presence_f1"), ("best_severity_f1", "severity_f1"),
                      ("oof_presence_macro_f1", "oof_presence_f1"), ("oof_severity_macro_f1", "oof_severity_f1")):
        mean[name], std[name] = spread(key)
    summary = {"folds": per_fold, "mean": mean, "std": std, "scans": len(rows),
               "pooled": {name: interval.to_json() for name, interval in pooled.items()},
               "bootstrap": stats.bootstrap_record(resamples, seed),
               "oof_checkpoint": LAST, "seconds": sum(f["seconds"] for f in per_fold)}
    try:
        from cov3d.inference.compare import count_parameters

        summary["parameters"] = count_parameters(fold_run(run, 0) / PRESENCE)
    except Cov3dError:
        summary["parameters"] = None
    plan.update(summary=summary, mean=mean, pooled=summary["pooled"], seconds=summary["seconds"],
                parameters=summary["parameters"])
    write_text(run / PLAN, json.dumps(plan, indent=2) + "\n")
    return summary
