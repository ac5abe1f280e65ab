"""Pseudo-labels: confident predictions on unlabelled scans, written in the training layout for a second round.

`cov3d predict SCANS --model RUN --pseudo-labels OUT` keeps the scans whose
P(covid) is at least the threshold (covid) or at most 1 − threshold
(non-covid) and links each into ``OUT/train/{covid,non-covid}/<scan>``; a
covid scan whose most probable severity is that confident too goes into
``OUT/train_partition_covid_categories.csv``. ``OUT/pseudo_labels.json``
records the threshold, the models and every scan kept with its probability,
so that a second round can say what it was trained on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cov3d.atomic import write_text
from cov3d.errors import Cov3dError
from cov3d.labels import SEVERITY_NAMES

RECORD = "pseudo_labels.json"


def check_output(output: Path, threshold: float) -> None:
    """Refuse a threshold outside (0.5, 1] or an output folder that holds something."""
    if not 0.5 < threshold <= 1.0:
        raise Cov3dError(f"--pseudo-threshold {threshold} must be within (0.5, 1]: a pseudo-label needs "
                         "P(covid) ≥ t or ≤ 1 − t")
    output = Path(output)
    if output.is_file() or (output.is_dir() and any(output.iterdir())):
        raise Cov3dError(f"'{output}' is not an empty folder; pseudo-labels go into a new folder")


def select(rows: list[dict], threshold: float) -> list[dict]:
    """The rows confident enough to label: label, and severity (1–4) where its probability reaches the
    threshold too."""
    if not 0.5 < threshold <= 1.0:
        raise Cov3dError(f"--pseudo-threshold {threshold} must be within (0.5, 1]: a pseudo-label needs "
                         "P(covid) ≥ t or ≤ 1 − t")
    chosen = []
    for row in rows:
        probability = float(row["probability"])
        label = "covid" if probability >= threshold else "non-covid" if probability <= 1 - threshold else None
        if label is None:
            continue
        severity = None
        if label == "covid" and row.get("severity"):
            confidence = float(row[row["severity"]])
            if confidence >= threshold:
                severity = SEVERITY_NAMES.index(row["severity"]) + 1
        chosen.append({"scan": row["scan"], "path": row["path"], "label": label, "probability": probability,
                       "severity": severity})
    return chosen


def write_pseudo_labels(rows: list[dict], output: Path, threshold: float, models: list[str]) -> dict:
    """Link the confident scans into OUTPUT/train/<label>/ and write the severity CSV and the record."""
    output = Path(output)
    check_output(output, threshold)
    chosen = select(rows, threshold)
    names: dict[str, str] = {}
    for item in chosen:
        if item["scan"] in names:
            raise Cov3dError(f"two scans are named '{item['scan']}' ({names[item['scan']]} and {item['path']}); "
                             "pseudo-label them in separate runs")
        names[item["scan"]] = item["path"]
    for item in chosen:
        link = output / "train" / item["label"] / item["scan"]
        link.parent.mkdir(parents=True, exist_ok=True)
        source = Path(item["path"]).resolve()
        try:
            os.symlink(source, link, target_is_directory=source.is_dir())
        except OSError as error:
            raise Cov3dError(f"cannot link '{source}' into '{output}': {error.strerror or error}") from None
    severity_rows = [f"{i['scan']};{i['severity']}" for i in chosen if i["severity"]]
    output.mkdir(parents=True, exist_ok=True)
    write_text(output / "train_partition_covid_categories.csv",
               "Name;Category\n" + "".join(f"{r}\n" for r in severity_rows))
    record = {"threshold": threshold, "models": models, "scans_given": len(rows), "kept": len(chosen),
              "covid": sum(i["label"] == "covid" for i in chosen),
              "non_covid": sum(i["label"] == "non-covid" for i in chosen),
              "with_severity": len(severity_rows), "scans": chosen}
    write_text(output / RECORD, json.dumps(record, indent=2) + "\n")
    return record
