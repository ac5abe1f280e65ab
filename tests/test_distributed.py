"""Distributed training: two gloo processes under torchrun on CPU, and the pieces they rely on."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cov3d.training import distributed
from cov3d.models.checkpoint import load_model
from cov3d.cli import app
from cov3d.data.dataset import load_splits
from cov3d.errors import Cov3dError
from cov3d.training.loss import Cov3dLoss

TINY = ["--no-pretrained", "--depth", "8", "--width", "16", "--penultimate", "16", "--batch-size", "2",
        "--loader-workers", "0", "--bn-scans", "4"]


def torchrun(*args: str, processes: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N ARGS` on this machine, one thread per process, W&B off."""
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environ.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               *args]
    # A session of its own, so that a run past its time is stopped with all its workers.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun ran past {timeout} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def history(run: Path) -> list[dict]:
    with (run / "history.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, subprocess.CompletedProcess]:
    """Two epochs of a tiny model trained by two processes on 25 phantoms (5 validation scans: uneven shards)."""
    from cov3d.data.synth import synthesize

    base = tmp_path_factory.mktemp("ddp")
    data = base / "data"
    synthesize(data, scans=25, seed=3, width=32)
    run, cache = base / "run", base / "cache"
    done = torchrun("-m", "cov3d", "train", str(data), "--output", str(run), "--cache", str(cache),
                    "--epochs", "2", *TINY)
    return data, run, cache, done


def test_two_processes_leave_one_run_with_scores_over_every_validation_scan(two_process_run) -> None:
    data, run, cache, done = two_process_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir()) == [
        "config.json", "history.csv", "history.png", "last.pt", "presence.pt", "severity.pt"]
    rows = history(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    manifest = Path(config["resolved"]["manifest"])
    validation = len(load_splits(manifest).valid)
    assert validation == 5
    assert all(int(r["valid_scans"]) == validation for r in rows)
    assert config["resolved"]["world_size"] == 2 and config["resolved"]["global_batch_size"] == 4
    assert done.stdout.count("Done: 2 epochs") == 1  # rank 0 reports, rank 1 is silent


def test_final_scores_equal_a_single_process_evaluate_of_the_checkpoint(two_process_run, tmp_path: Path) -> None:
    data, run, cache, done = two_process_run
    assert done.returncode == 0, done.stderr[-3000:]
    last = history(run)[-1]
    result = CliRunner().invoke(app, ["evaluate", str(data), "--model", str(run / "last.pt"), "--no-tta",
                                      "--device", "cpu", "--precision", "fp32", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["scans"] == int(last["valid_scans"])
    assert metrics["presence"]["macro_f1"] == pytest.approx(float(last["presence_f1"]))
    assert metrics["presence"]["accuracy"] == pytest.approx(float(last["presence_accuracy"]))
    assert metrics["severity"]["macro_f1"] == pytest.approx(float(last["severity_f1"]))
    # The validation loss is a continuous function of every output: it pins the gathered outputs exactly.
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    splits = load_splits(Path(config["resolved"]["manifest"]), flip=False)
    model, _ = load_model(run / "last.pt")
    with torch.no_grad():
        outputs = torch.cat([model(splits.valid[i][0][None]) for i in range(len(splits.valid))])
    targets = splits.valid.targets
    weights = config["resolved"]["class_weights"]
    loss = Cov3dLoss(config["lambda"], (weights["non-covid"], weights["covid"]), config["presence_smoothing"],
                     config["severity_smoothing"], tuple(config["resolved"]["severity_class_weights"].values()))
    assert float(loss(outputs, targets)) == pytest.approx(float(last["valid_loss"]), rel=1e-4)


def test_a_two_process_run_resumes_in_one_process(two_process_run, tmp_path: Path) -> None:
    data, run, cache, done = two_process_run
    assert done.returncode == 0, done.stderr[-3000:]
    copy = tmp_path / "run"
    copy.mkdir()
    for file in run.iterdir():
        copy.joinpath(file.name).write_bytes(file.read_bytes())
    result = CliRunner().invoke(app, ["train", str(data), "--output", str(copy), "--cache", str(cache), "--resume",
                                      "--epochs", "3", "--loader-workers", "0"])
    assert result.exit_code == 0, result.output
    rows = history(copy)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert rows[:2] == history(run)
    assert json.loads((copy / "config.json").read_text(encoding="utf-8"))["resolved"]["world_size"] == 1


FAILING_RANK = """
import sys
import cov3d.data.dataset
from cov3d.errors import Cov3dError

original = cov3d.data.dataset.ScanDataset.__getitem__

def failing(self, index):
    if self.flip:  # training items only: rank 1 fails in its first training step, rank 0 trains on
        raise Cov3dError("scan 'broken.nii.gz' could not be read on purpose")
    return original(self, index)

if __name__ == "__main__":  # not in the processes that preprocessing spawns
    if __import__("os").environ["RANK"] == "1":
        cov3d.data.dataset.ScanDataset.__getitem__ = failing
    from cov3d.cli import app
    app(prog_name="cov3d", args=sys.argv[1:])
"""


def test_a_failing_rank_ends_every_rank_promptly_with_its_message(tmp_path: Path) -> None:
    from cov3d.data.synth import synthesize

    data = tmp_path / "data"
    synthesize(data, scans=12, seed=1, width=32)
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    start = time.monotonic()
    done = torchrun(str(script), "train", str(data), "--output", str(tmp_path / "run"), "--cache",
                    str(tmp_path / "cache"), "--epochs", "3", *TINY, timeout=120)
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    assert "Error (rank 1 of 2): scan 'broken.nii.gz' could not be read on purpose" in done.stderr
    assert elapsed < 90
    assert "[rank0]: Traceback" not in done.stderr  # rank 0 stops with one line too, or is stopped by torchrun
    assert not (tmp_path / "run" / "last.pt").exists()


def test_the_launcher_environment_is_read_and_checked() -> None:
    assert distributed.launch_from_environment({}) == distributed.Launch(1, 0, 0)
    launch = distributed.launch_from_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert launch == distributed.Launch(4, 3, 1) and launch.distributed


def test_a_launcher_variable_that_is_not_a_number_is_named() -> None:
    with pytest.raises(Cov3dError, match="WORLD_SIZE='two' is not a whole number"):
        distributed.launch_from_environment({"WORLD_SIZE": "two"})


def test_a_rank_outside_the_world_is_refused() -> None:
    with pytest.raises(Cov3dError, match="WORLD_SIZE=2, RANK=2"):
        distributed.launch_from_environment({"WORLD_SIZE": "2", "RANK": "2"})


def test_training_shards_are_disjoint_equal_and_reshuffled_each_epoch() -> None:
    shards = [distributed.shard(11, 0, 42, rank, 3) for rank in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]  # 11 → 9: every rank takes the same number of steps
    assert len(set().union(*shards)) == 9
    again = [distributed.shard(11, 0, 42, rank, 3) for rank in range(3)]
    assert again == shards  # the same on every rank and every call: drawn from (seed, epoch) alone
    assert [distributed.shard(11, 1, 42, rank, 3) for rank in range(3)] != shards


def test_validation_shards_cover_every_item_once_and_interleave_back() -> None:
    parts = [distributed.shard(7, None, 42, rank, 3) for rank in range(3)]
    assert sorted(i for part in parts for i in part) == list(range(7))
    assert distributed.interleave(parts) == list(range(7))


def test_sync_bn_on_cpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from cov3d.training.trainer import TrainConfig, make_model

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    config = TrainConfig(data="d", output="o", pretrained=False, sync_bn=True).with_recipe()
    config.resolved = {"device": "cpu", "precision": "fp32"}
    with pytest.raises(Cov3dError, match="--sync-bn needs CUDA GPUs"):
        make_model(config)


@pytest.mark.parametrize("device, synced", [("cpu", False), ("cuda:0", True)])
def test_sync_bn_by_default_on_distributed_gpus_only(monkeypatch: pytest.MonkeyPatch, device, synced) -> None:
    from cov3d.training.trainer import TrainConfig, make_model

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: self)  # no GPU needed to build it
    config = TrainConfig(data="d", output="o", pretrained=False).with_recipe()
    config.resolved = {"device": device, "precision": "fp32"}
    model = make_model(config)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()) == synced
