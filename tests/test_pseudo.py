"""Pseudo-labels: confident predictions linked into the training layout, with their record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cov3d.cli import app
from cov3d.data.catalog import catalog
from cov3d.errors import Cov3dError
from cov3d.inference.pseudo import select, write_pseudo_labels

runner = CliRunner()


def row(tmp_path: Path, name: str, probability: float, severity: str = "", confidence: float = 0.0) -> dict:
    scan = tmp_path / "test" / name
    scan.mkdir(parents=True, exist_ok=True)
    (scan / "0.jpg").write_bytes(b"")
    values = {s: "" for s in ("mild", "moderate", "severe", "critical")}
    if severity:
        values = {s: f"{(1 - confidence) / 3:.6f}" for s in values}
        values[severity] = f"{confidence:.6f}"
    return {"scan": name, "path": str(scan), "probability": f"{probability:.6f}",
            "prediction": "covid" if probability >= 0.5 else "non-covid", "severity": severity, **values}


def test_only_confident_scans_are_kept_and_severity_only_when_confident(tmp_path):
    rows = [row(tmp_path, "a", 0.95, "severe", 0.92), row(tmp_path, "b", 0.97, "mild", 0.4),
            row(tmp_path, "c", 0.6), row(tmp_path, "d", 0.05)]
    chosen = select(rows, 0.9)
    assert [(c["scan"], c["label"], c["severity"]) for c in chosen] == [("a", "covid", 3), ("b", "covid", None),
                                                                       ("d", "non-covid", None)]


def test_pseudo_labels_are_a_training_split_the_catalog_reads(tmp_path):
    rows = [row(tmp_path, "a", 0.95, "severe", 0.92), row(tmp_path, "d", 0.05), row(tmp_path, "c", 0.6)]
    record = write_pseudo_labels(rows, tmp_path / "pseudo", 0.9, ["runs/a"])
    assert (record["kept"], record["covid"], record["non_covid"], record["with_severity"]) == (2, 1, 1, 1)
    records = {r.path: r for r in catalog(tmp_path / "pseudo")}
    assert set(records) == {"train/covid/a", "train/non-covid/d"}
    assert records["train/covid/a"].severity == 3 and records["train/covid/a"].split == "train"
    saved = json.loads((tmp_path / "pseudo" / "pseudo_labels.json").read_text(encoding="utf-8"))
    assert saved["threshold"] == 0.9 and saved["models"] == ["runs/a"]


def test_a_threshold_of_one_half_or_less_is_an_error(tmp_path):
    with pytest.raises(Cov3dError, match="--pseudo-threshold 0.5 must be within \\(0.5, 1\\]"):
        select([], 0.5)


def test_an_output_that_holds_files_is_an_error(tmp_path):
    (tmp_path / "pseudo").mkdir()
    (tmp_path / "pseudo" / "x").write_text("")
    with pytest.raises(Cov3dError, match="is not an empty folder"):
        write_pseudo_labels([], tmp_path / "pseudo", 0.9, [])


def test_two_kept_scans_of_one_name_are_an_error(tmp_path):
    first, second = row(tmp_path, "a", 0.99), row(tmp_path / "other", "a", 0.01)
    with pytest.raises(Cov3dError, match="two scans are named 'a'"):
        write_pseudo_labels([first, second], tmp_path / "pseudo", 0.9, [])


def test_predict_writes_pseudo_labels(trained_run, dataset, tmp_path):
    out = tmp_path / "pseudo"
    result = runner.invoke(app, ["predict", str(dataset / "test"), str(dataset / "validation"), "--model",
                                 str(trained_run), "--output", str(tmp_path / "p.csv"), "--workers", "0",
                                 "--no-tta", "--device", "cpu", "--pseudo-labels", str(out),
                                 "--pseudo-threshold", "0.51"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "pseudo_labels.json").read_text(encoding="utf-8"))
    assert record["scans_given"] == 3 and "Pseudo-labels:" in result.output
    assert len(list((out / "train").glob("*/*"))) == record["kept"]
