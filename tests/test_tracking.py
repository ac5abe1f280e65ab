"""W&B dashboards, offline: what a run's files hold, evaluate into the run, model references, sweeps."""

from __future__ import annotations

import json
import time
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cov3d.cli import app
from cov3d.training.trainer import TrainResult

TINY = ["--no-pretrained", "--depth", "8", "--width", "16", "--penultimate", "16", "--batch-size", "2",
        "--loader-workers", "0", "--bn-scans", "0", "--device", "cpu"]


def wandb_records(run_folder: Path) -> list:
    """The records of an offline run's .wandb file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_folder.glob("*.wandb")).read_bytes()
    block, position, pending, records = 32768, 7, b"", []  # a 7-byte file header, then 32 KiB blocks
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a record header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 0:
            position += block - position % block if position % block else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # full, first | middle, last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def artifacts(records: list) -> list:
    return [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]


def history_keys(records: list) -> set[str]:
    return {item.key or "/".join(item.nested_key) for r in records if r.WhichOneof("record_type") == "history"
            for item in r.history.item}


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two epochs logged to an offline W&B run; W&B's staging and cache inside the test's folder."""
    from cov3d.data.synth import synthesize

    base = tmp_path_factory.mktemp("wandb")
    data = base / "data"
    synthesize(data, scans=16, seed=4, width=32)
    patch = pytest.MonkeyPatch()
    patch.setenv("WANDB_DATA_DIR", str(base / "wandb-data"))
    patch.setenv("WANDB_CACHE_DIR", str(base / "wandb-cache"))
    patch.setenv("WANDB_MODE", "offline")
    patch.setenv("COV3D_CACHE", str(base / "cache"))
    try:
        result = CliRunner().invoke(app, ["train", str(data), "--output", str(base / "run"), "--epochs", "2",
                                          "--wandb", "--wandb-mode", "offline", *TINY])
    finally:
        patch.undo()
    assert result.exit_code == 0, result.output
    return data, base / "run"


def test_each_epoch_logs_scores_time_and_throughput(wandb_run) -> None:
    data, run = wandb_run
    (folder,) = (run / "wandb").glob("offline-run-*")
    keys = history_keys(wandb_records(folder))
    for key in ("train_loss", "valid_loss", "presence_f1", "presence_accuracy", "severity_f1", "lr", "f1_covid",
                "f1_non_covid", "epoch_seconds", "scans_per_second", "valid_scans"):
        assert key in keys, key
    assert json.loads((run / "wandb.json").read_text(encoding="utf-8"))["id"] in folder.name


def test_panels_and_a_predictions_table_with_images_are_logged(wandb_run) -> None:
    data, run = wandb_run
    (folder,) = (run / "wandb").glob("offline-run-*")
    tables = {a.name: a for a in artifacts(wandb_records(folder)) if a.type == "run_table"}
    for panel in ("predictions", "presence_confusion_table", "presence_roc_table", "presence_pr_table",
                  "severity_confusion_table"):
        assert any(f"validation{panel}" in name for name in tables), panel
    (predictions,) = [a for name, a in tables.items() if "predictions" in name]
    entries = {entry.path: entry.local_path for entry in predictions.manifest.contents}
    table = json.loads(Path(next(p for k, p in entries.items() if k.endswith(".table.json"))).read_text(encoding="utf-8"))
    assert table["columns"][:4] == ["scan", "label", "severity_label", "p_covid"]
    validation = sorted(p.relative_to(data).as_posix() for p in (data / "validation").glob("*/*"))
    assert sorted(row[0] for row in table["data"]) == validation
    images = [k for k in entries if k.startswith("media/images/")]
    assert len(images) == len(validation) and all(Path(entries[k]).stat().st_size > 0 for k in images)


def test_checkpoints_are_model_artifacts_with_aliases(wandb_run) -> None:
    data, run = wandb_run
    (folder,) = (run / "wandb").glob("offline-run-*")
    models = [a for a in artifacts(wandb_records(folder)) if a.type == "model"]
    files = {frozenset(a.aliases): {entry.path for entry in a.manifest.contents} for a in models}
    # W&B gives every newly logged version "latest" too; the last one logged, last.pt, keeps it.
    assert files == {frozenset({"best-presence", "latest"}): {"presence.pt", "config.json"},
                     frozenset({"best-severity", "latest"}): {"severity.pt", "config.json"},
                     frozenset({"latest"}): {"last.pt", "config.json"}}
    assert [m.name for m in models] == ["cov3d-run"] * 3


def test_evaluate_logs_into_the_training_run(wandb_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, run = wandb_run
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    before = set((run / "wandb").glob("offline-run-*"))
    result = CliRunner().invoke(app, ["evaluate", str(data), "--model", str(run), "--no-tta", "--device", "cpu",
                                      "--output-dir", str(tmp_path / "ev"), "--wandb"])
    assert result.exit_code == 0, result.output
    (folder,) = set((run / "wandb").glob("offline-run-*")) - before
    run_id = json.loads((run / "wandb.json").read_text(encoding="utf-8"))["id"]
    assert folder.name.endswith(run_id)  # the same W&B run, resumed
    expected = {"evaluate/validation/presence/macro_f1", "evaluate/validation/presence/accuracy"}
    # W&B's service process may still be writing the offline run file when the command returns (seen under load).
    deadline = time.monotonic() + 20
    while not expected <= history_keys(records := wandb_records(folder)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert expected <= history_keys(records)
    assert any("evaluate" in a.name and "predictions" in a.name for a in artifacts(records))


def test_a_wandb_model_reference_offline_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    result = CliRunner().invoke(app, ["predict", str(tmp_path), "--model", "wandb:me/cov3d/cov3d-run:best-presence"])
    assert result.exit_code == 1
    assert "needs W&B online, but WANDB_MODE is offline" in result.output
    assert "Traceback" not in result.output


def test_a_malformed_wandb_model_reference_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "online")
    result = CliRunner().invoke(app, ["predict", str(tmp_path), "--model", "wandb:cov3d-run"])
    assert result.exit_code == 1
    assert "is not a W&B model reference; write wandb:ENTITY/PROJECT/NAME:ALIAS" in result.output


def test_wandb_without_login_or_network_fails_with_one_line(dataset: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "20")
    result = CliRunner().invoke(app, ["train", str(dataset), "--output", str(tmp_path / "run"), "--epochs", "1",
                                      "--wandb", *TINY])
    assert result.exit_code == 1
    assert "W&B could not start" in result.output and "wandb login" in result.output
    assert "Traceback" not in result.output


def test_a_sweep_agents_arguments_reach_the_training_config(dataset: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import cov3d.training.trainer

    seen = {}

    def fake_train(config, **kwargs):
        seen["config"] = config
        return TrainResult(Path(config.output), {}, 0, [])

    monkeypatch.setattr(cov3d.training.trainer, "train", fake_train)
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.setenv("WANDB_RUN_ID", "trial7")
    monkeypatch.chdir(tmp_path)
    # What `wandb agent` runs for the command [cov3d, train, DATA, ${args}] of docs/sweeps.md:
    result = CliRunner().invoke(app, ["train", str(dataset), "--lambda=0.5", "--size=medium", "--epochs=40",
                                      "--severity-smoothing=0.1"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (config.lam, config.size, config.epochs, config.severity_smoothing) == (0.5, "medium", 40, 0.1)
    assert config.wandb is True
    assert Path(config.output).parent == Path("runs") and config.output.endswith("-trial7")
