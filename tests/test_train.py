import csv
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import cov3d.loss
from cov3d.cli import app
from cov3d.errors import Cov3dError
from cov3d.archs import build_model
from cov3d.checkpoint import load_checkpoint
from cov3d.model import Cov3dNet
from cov3d.train import TrainConfig, train

runner = CliRunner()
TINY = ["--no-pretrained", "--depth", "8", "--width", "16", "--loader-workers", "0", "--penultimate", "16"]


def config(dataset, tmp_path, **overrides) -> TrainConfig:
    options = dict(data=str(dataset), output=str(tmp_path / "run"), pretrained=False, depth=8, width=16, epochs=2,
                   loader_workers=0, penultimate=16, cache=str(tmp_path / "cache"))
    options.update(overrides)
    return TrainConfig(**options)


def history(run):
    with (run / "history.csv").open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_cli_trains_two_epochs_into_a_valid_run_directory(dataset, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(dataset), "--output", str(run), "--epochs", "2",
                                 "--cache", str(tmp_path / "cache"), *TINY])
    assert result.exit_code == 0, result.output
    assert "epoch   2/2" in result.output and "Run directory" in result.output
    assert {p.name for p in run.iterdir()} >= {"presence.pt", "severity.pt", "config.json", "history.csv", "last.pt"}

    saved = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert saved["lam"] == 0.1 and saved["lr"] == 1e-4 and saved["batch_size"] == 2 and saved["seed"] == 42
    assert saved["resolved"]["depth"] == 8 and saved["resolved"]["width"] == 16
    # train split: 2 covid, 1 non-covid -> N / (2 N_class)
    assert saved["resolved"]["class_weights"] == pytest.approx({"non-covid": 1.5, "covid": 0.75})
    assert "torch" in saved["resolved"]["versions"]

    rows = history(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "train_loss", "valid_loss", "presence_f1", "presence_accuracy",
                            "severity_f1", "lr"}
    assert all(float(r["train_loss"]) > 0 for r in rows)


def test_checkpoint_round_trip_rebuilds_the_model_from_the_file_alone(dataset, tmp_path):
    result = train(config(dataset, tmp_path, epochs=1))
    checkpoint = torch.load(result.run / "presence.pt", map_location="cpu", weights_only=True)
    cfg = checkpoint["config"]
    assert checkpoint["metric"] == "presence_f1" and checkpoint["epoch"] == 1
    assert (cfg["arch"], cfg["depth"], cfg["width"], cfg["lambda"]) == ("r3d_18", 8, 16, 0.1)
    model = build_model(cfg["arch"], pretrained=False, penultimate=cfg["penultimate"], dropout=cfg["dropout"])
    assert isinstance(model, Cov3dNet)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    x = torch.rand(1, 1, 8, 16, 16)
    with torch.no_grad():
        first = model(x)
        model.load_state_dict(load_checkpoint(result.run / "presence.pt")["model"])
        torch.testing.assert_close(model(x), first)


def test_lambda_zero_writes_no_severity_checkpoint(dataset, tmp_path):
    result = train(config(dataset, tmp_path, lam=0.0, epochs=1))
    assert (result.run / "presence.pt").is_file() and not (result.run / "severity.pt").exists()


def test_resume_continues_an_interrupted_run(dataset, tmp_path):
    def stop_after_first(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(dataset, tmp_path), on_epoch=stop_after_first)
    run = tmp_path / "run"
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert [r["epoch"] for r in history(run)] == ["1"]
    with pytest.raises(Cov3dError, match="already holds a training run"):
        train(config(dataset, tmp_path))
    result = train(config(dataset, tmp_path), resume=True)
    assert result.epochs_done == 2
    assert [r["epoch"] for r in history(run)] == ["1", "2"]
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    # One batch an epoch: epoch 1 ran at the cycle's start (lr_max / 25) and the resumed epoch 2 at its
    # middle, where the cosine annealing from lr_max (over 25%..100%) gives 0.75 lr_max: not a restart.
    assert float(history(run)[0]["lr"]) == pytest.approx(1e-4 / 25)
    assert float(history(run)[1]["lr"]) == pytest.approx(0.75e-4, rel=1e-4)


def test_resume_without_a_run(tmp_path, dataset):
    with pytest.raises(Cov3dError, match="holds no interrupted run"):
        train(config(dataset, tmp_path), resume=True)


def test_nan_loss_stops_and_keeps_checkpoints(dataset, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = cov3d.loss.Cov3dLoss.per_item

    def poisoned(self, logits, target):
        calls["n"] += 1
        out = real(self, logits, target)
        return out * float("nan") if calls["n"] > 2 else out  # epoch 1 = 1 train + 1 valid batch

    monkeypatch.setattr(cov3d.loss.Cov3dLoss, "per_item", poisoned)
    with pytest.raises(Cov3dError, match="loss became NaN in epoch 2"):
        train(config(dataset, tmp_path, epochs=3))
    assert load_checkpoint(tmp_path / "run" / "presence.pt")["epoch"] == 1


def test_wandb_offline_logs_the_run(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = train(config(dataset, tmp_path, epochs=1, wandb=True, wandb_mode="offline"))
    runs = list((result.run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))
    assert (result.run / "presence.pt").is_file()


def test_no_validation_split(dataset, tmp_path):
    shutil.rmtree(dataset / "validation")
    (dataset / "val_partition_covid_categories.csv").unlink()
    with pytest.raises(Cov3dError, match="no labelled validation scans"):
        train(config(dataset, tmp_path))


def test_empty_class(dataset, tmp_path):
    shutil.rmtree(dataset / "validation" / "non_covid")
    with pytest.raises(Cov3dError, match="the validation split has no non-covid scans"):
        train(config(dataset, tmp_path))


def test_lambda_out_of_range_is_one_line(dataset):
    result = runner.invoke(app, ["train", str(dataset), "--lambda", "1.5", *TINY])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--lambda 1.5 is outside [0, 1]" in result.output


def test_train_help_lists_the_paper_options():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ["--lambda", "--arch", "--no-pretrained", "--weights", "--dropout", "--penultimate",
                   "--presence-smoothing", "--severity-smoothing", "--lr", "--weight-decay", "--batch-size",
                   "--epochs", "--no-flip", "--seed", "--resume", "--wandb", "--wandb-mode", "--precision"]:
        assert option in result.output, option
