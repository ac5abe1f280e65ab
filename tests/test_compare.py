"""`cov3d compare`: the Table 3 of run directories written here by hand (config, history, a checkpoint)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cov3d.cli import app
from cov3d.errors import Cov3dError
from cov3d.inference import compare
from cov3d.models.checkpoint import save_checkpoint

runner = CliRunner()


def tiny_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.BatchNorm3d(4), torch.nn.Flatten(),
                               torch.nn.Linear(8, 6))


def make_run(root: Path, name: str, arch: str = "r3d_18", lam: float = 0.1, epochs: int = 3,
             f1s=((0.5, 0.2), (0.8, 0.4), (0.7, 0.3))) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"arch": arch, "depth": 8, "width": 16, "lam": lam,
                                                 "epochs": epochs, "resolved": {"size_name": "8x16x16"}}))
    with (run / "history.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "presence_f1", "severity_f1", "epoch_seconds"])
        for epoch, (p, s) in enumerate(f1s, start=1):
            writer.writerow([epoch, p, s, 10.0])
    save_checkpoint(run / "presence.pt", tiny_model(), {"arch": arch})
    return run


def test_parameters_are_counted_from_the_state_dict_without_buffers(tmp_path):
    run = make_run(tmp_path, "a")
    assert compare.count_parameters(run / "presence.pt") == sum(p.numel() for p in tiny_model().parameters())


def test_a_row_holds_the_best_scores_their_epochs_time_and_size(tmp_path):
    row = compare.describe_run(make_run(tmp_path, "a"))
    assert (row["arch"], row["size"], row["lambda"], row["epochs"]) == ("r3d_18", "8x16x16", 0.1, "3/3")
    assert (row["presence_f1"], row["presence_epoch"], row["severity_f1"], row["severity_epoch"]) == (0.8, 2, 0.4, 2)
    assert row["seconds"] == 30.0 and row["presence_f1_evaluated"] is None


def test_an_evaluation_inside_the_run_adds_its_interval(tmp_path):
    run = make_run(tmp_path, "a")
    (run / "evaluation").mkdir()
    (run / "evaluation" / "metrics.json").write_text(json.dumps({
        "presence": {"macro_f1": 0.75}, "severity": {"macro_f1": 0.35},
        "ci": {"presence": {"macro_f1": {"estimate": 0.75, "low": 0.7, "high": 0.8}},
               "severity": {"macro_f1": {"estimate": 0.35, "low": 0.2, "high": 0.5}}}}))
    row = compare.describe_run(run)
    assert (row["presence_f1_evaluated"], row["presence_f1_low"], row["presence_f1_high"]) == (0.75, 0.7, 0.8)
    assert compare.with_interval(row, "severity_f1") == "0.400 (evaluated 0.350 [0.200, 0.500])"


def test_compare_cli_expands_globs_and_writes_csv_markdown_and_a_plot(tmp_path):
    from PIL import Image

    make_run(tmp_path / "runs", "a")
    make_run(tmp_path / "runs", "b", arch="mc3_18", lam=1.0, f1s=((0.6, 0.5),), epochs=2)
    (tmp_path / "runs" / "notes").mkdir()  # not a run: a glob passes over it
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(tmp_path / "runs" / "*"), "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "comparison.csv").open(encoding="utf-8")))
    assert [Path(r["run"]).name for r in rows] == ["a", "b"]
    assert rows[1]["arch"] == "mc3_18" and rows[1]["epochs"] == "1/2" and rows[1]["presence_f1"] == "0.6"
    table = (out / "comparison.md").read_text(encoding="utf-8")
    assert table.startswith("| run | arch | size | λ | epochs | presence F1 | severity F1 | time (s) | parameters |")
    assert "| b | mc3_18 | 8x16x16 | 1 | 1/2 | 0.600 | 0.500 | 10 |" in table
    with Image.open(out / "comparison.png") as image:
        assert image.width > 300
    assert "mc3_18" in result.output


def test_a_glob_that_matches_no_run_is_an_error(tmp_path):
    with pytest.raises(Cov3dError, match="matches no run directory"):
        compare.expand([str(tmp_path / "*")])


def test_a_missing_run_is_an_error(tmp_path):
    result = runner.invoke(app, ["compare", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "c")])
    assert result.exit_code == 1 and "does not exist; give run directories" in result.output


def test_a_folder_that_is_not_a_run_is_an_error(tmp_path):
    with pytest.raises(Cov3dError, match="is not a run directory: it has no config.json"):
        compare.expand([tmp_path])


def test_a_run_given_twice_is_listed_once(tmp_path):
    run = make_run(tmp_path, "a")
    assert compare.expand([run, str(tmp_path / "*")]) == [run]


def test_a_damaged_config_is_an_error(tmp_path):
    run = make_run(tmp_path, "a")
    (run / "config.json").write_text("{")
    with pytest.raises(Cov3dError, match="config.json' cannot be read"):
        compare.describe_run(run)
