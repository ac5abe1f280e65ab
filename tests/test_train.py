import csv
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import cov3d.training.loss
from cov3d.cli import app
from cov3d.errors import Cov3dError
from cov3d.models.registry import build_model
from cov3d.models.checkpoint import load_checkpoint
from cov3d.models.video import Cov3dNet
from cov3d.training.trainer import TrainConfig, train

runner = CliRunner()
TINY = ["--no-pretrained", "--depth", "8", "--width", "16", "--loader-workers", "0", "--penultimate", "16",
        "--batch-size", "2"]


def config(dataset, tmp_path, **overrides) -> TrainConfig:
    options = dict(data=str(dataset), output=str(tmp_path / "run"), pretrained=False, depth=8, width=16, epochs=2,
                   batch_size=2, loader_workers=0, penultimate=16, cache=str(tmp_path / "cache"))
    options.update(overrides)
    return TrainConfig(**options)


def interrupted_run(dataset, tmp_path, **overrides):
    """A run stopped by Ctrl-C after its first epoch; returns its directory."""
    def stop_after_first(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(dataset, tmp_path, **overrides), on_epoch=stop_after_first)
    return tmp_path / "run"


def history(run):
    with (run / "history.csv").open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_cli_trains_two_epochs_into_a_valid_run_directory(dataset, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(dataset), "--output", str(run), "--epochs", "2",
                                 "--cache", str(tmp_path / "cache"), *TINY])
    assert result.exit_code == 0, result.output
    assert "epoch   2/2" in result.output and "Run directory" in result.output
    assert {p.name for p in run.iterdir()} >= {"presence.pt", "severity.pt", "config.json", "history.csv", "last.pt",
                                              "history.png"}

    saved = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert saved["lambda"] == 0.1 and saved["seed"] == 42 and saved["pretrained"] is False
    # --no-pretrained alone gives the from-scratch recipe, recorded as the values used
    assert (saved["lr"], saved["batch_size"], saved["dropout"], saved["epochs"]) == (1e-3, 2, 0.0, 2)
    assert saved["resolved"]["recipe"] == "scratch" and saved["bn_scans"] == 64
    assert saved["severity_weights"] == "inverse"
    assert saved["resolved"]["depth"] == 8 and saved["resolved"]["width"] == 16
    # train split: 2 covid, 1 non-covid -> N / (2 N_class)
    assert saved["resolved"]["class_weights"] == pytest.approx({"non-covid": 1.5, "covid": 0.75})
    assert "torch" in saved["resolved"]["versions"]
    # auto trains in fp32 on any CPU, and says why
    assert saved["resolved"]["precision"] == "fp32" and "CPU" in saved["resolved"]["precision_reason"]

    rows = history(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "train_loss", "valid_loss", "presence_f1", "presence_accuracy",
                            "severity_f1", "lr", "valid_scans", "epoch_seconds", "train_seconds",
                            "batchnorm_seconds", "valid_seconds", "scans_per_second"}
    assert all(int(r["valid_scans"]) == 2 for r in rows)  # the fixture's two validation scans
    assert all(float(r["epoch_seconds"]) > 0 and float(r["scans_per_second"]) > 0 for r in rows)
    # the split covers the epoch: steps, precise BatchNorm, validation
    for r in rows:
        parts = float(r["train_seconds"]) + float(r["batchnorm_seconds"]) + float(r["valid_seconds"])
        assert 0 < parts <= float(r["epoch_seconds"]) + 1e-6
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
    run = interrupted_run(dataset, tmp_path)
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
    assert float(history(run)[0]["lr"]) == pytest.approx(1e-3 / 25)
    assert float(history(run)[1]["lr"]) == pytest.approx(0.75e-3, rel=1e-4)


def test_resume_without_a_run(tmp_path, dataset):
    with pytest.raises(Cov3dError, match="holds no interrupted run"):
        train(config(dataset, tmp_path), resume=True)


def test_nan_loss_stops_and_keeps_checkpoints(dataset, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = cov3d.training.loss.Cov3dLoss.per_item

    def poisoned(self, logits, target):
        calls["n"] += 1
        out = real(self, logits, target)
        return out * float("nan") if calls["n"] > 2 else out  # epoch 1 = 1 train + 1 valid batch

    monkeypatch.setattr(cov3d.training.loss.Cov3dLoss, "per_item", poisoned)
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
    for option in ["--lambda", "--arch", "--no-pretrained", "--weights", "--dropout", "--penultimate", "--pool",
                   "--no-final-bias", "--crop", "--slices", "--bn-scans", "--severity-weights",
                   "--presence-smoothing", "--severity-smoothing", "--lr", "--weight-decay", "--batch-size",
                   "--epochs", "--no-flip", "--seed", "--resume", "--wandb", "--wandb-mode", "--precision"]:
        assert option in result.output, option


def test_a_run_of_cov3d_0_1_still_resumes(dataset, tmp_path):
    run = interrupted_run(dataset, tmp_path)
    # config.json as cov3d 0.1 wrote it: one weights path or null, no pool, final_bias, crop or slices.
    saved = json.loads((run / "config.json").read_text(encoding="utf-8"))
    for key in ("pool", "final_bias", "crop", "slices", "bn_scans", "severity_weights"):
        saved.pop(key)
    saved["weights"] = None
    saved["lam"] = saved.pop("lambda")
    (run / "config.json").write_text(json.dumps(saved), encoding="utf-8")
    last = torch.load(run / "last.pt", weights_only=True)
    for key in ("pool", "final_bias", "input"):
        last["config"].pop(key)
    last["config"]["format"] = 1
    torch.save(last, run / "last.pt")

    result = train(config(dataset, tmp_path), resume=True)
    assert result.epochs_done == 2
    resumed = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert resumed["weights"] == [] and resumed["pool"] == "avg" and resumed["final_bias"] is True
    assert resumed["severity_weights"] == "presence" and resumed["bn_scans"] == 0  # as the old run began


def test_recipes_fill_only_what_is_not_given(dataset, tmp_path):
    from cov3d.training.trainer import RECIPES

    scratch = config(dataset, tmp_path, lr=5e-4, batch_size=None).with_recipe()
    assert (scratch.lr, scratch.batch_size, scratch.dropout) == (5e-4, 8, 0.0)
    tuned = TrainConfig(data=str(dataset), output=str(tmp_path / "r"), weights=["w.pth"]).with_recipe()
    assert tuned.recipe == "fine-tune" and tuned.lr == RECIPES["fine-tune"]["lr"] == 1e-4
    assert (tuned.batch_size, tuned.dropout, tuned.epochs) == (2, 0.5, 40)
    assert TrainConfig(data="d", output="o", arch="regnet3d").recipe == "scratch"  # no weights exist for it


def test_checkpoint_batchnorm_statistics_are_measured_on_training_data(dataset, tmp_path):
    from cov3d.models.checkpoint import load_model
    from cov3d.data.dataset import load_splits

    # One batch of all three training scans, no augmentation: the statistics are exactly computable.
    result = train(config(dataset, tmp_path, epochs=1, batch_size=3, flip=False))
    model, _ = load_model(result.run / "presence.pt")
    saved = {name: b.clone() for name, b in model.named_buffers() if "running" in name}
    manifest = json.loads((result.run / "config.json").read_text(encoding="utf-8"))["resolved"]["manifest"]
    batch = torch.stack([volume for volume, _ in load_splits(manifest, flip=False).train])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.reset_running_stats()
            m.momentum = None
            m.train()
    with torch.no_grad():
        model(batch)
    measured = {name: b for name, b in model.named_buffers() if "running" in name}
    assert saved.keys() == measured.keys() and len(saved) > 10
    for name in saved:
        torch.testing.assert_close(saved[name], measured[name], rtol=1e-4, atol=1e-5)


def test_without_precise_bn_the_checkpoint_keeps_fastai_running_averages(dataset, tmp_path):
    from cov3d.models.checkpoint import load_model

    result = train(config(dataset, tmp_path, epochs=1, batch_size=3, flip=False, bn_scans=0))
    model, _ = load_model(result.run / "presence.pt")
    bn = model.stem[1]
    # After one training batch with momentum 0.1 the running variance is still close to its initial 1.
    assert float(bn.running_var.mean()) > 0.85 and int(bn.num_batches_tracked) == 1


def test_show_draws_the_curves_of_a_run(trained_run, tmp_path):
    out = tmp_path / "curves.png"
    result = runner.invoke(app, ["show", str(trained_run), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (trained_run / "history.png").is_file()


def separated_dataset(root):
    """Covid scans hold a bright blob at a random place, non-covid scans none: a task a few epochs learn."""
    import numpy as np
    from conftest import write_slices

    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("validation", 6)):
        for i in range(count):
            label = "covid" if i % 2 else "non-covid"
            volume = rng.normal(60, 12, size=(6, 24, 24)).clip(0, 255)
            if label == "covid":
                z, y, x = rng.integers(1, 5), rng.integers(4, 20), rng.integers(4, 20)
                volume[z - 1:z + 2, y - 4:y + 4, x - 4:x + 4] = 230
            write_slices(root / split / label / f"ct_scan_{split}_{i}", volume.astype(np.uint8))
    return root


def test_five_epochs_from_scratch_separate_the_classes(tmp_path):
    from cov3d.inference.predict import load_ensemble, predict_scans

    data = separated_dataset(tmp_path / "data")
    result = train(config(data, tmp_path, epochs=5, lam=0.0))
    members = load_ensemble([result.run / "last.pt"])
    scans = sorted((data / "validation").glob("*/*"))
    predictions, failures = predict_scans(scans, members, workers=0, precision="fp32")
    assert not failures
    scores = {p.path.parent.name: [] for p in predictions}
    for p in predictions:
        scores[p.path.parent.name].append(p.presence[0])
    # Every covid scan scores above every non-covid one, and 0.5 splits them. Three epochs were too few on
    # AVX2-only CPUs, whose rounding differs: every scan stayed below 0.5 there.
    assert min(scores["covid"]) > max(scores["non-covid"]), scores
    assert any(s >= 0.5 for s in scores["covid"]) and not all(s >= 0.5 for s in scores["non-covid"]), scores


def test_a_training_split_smaller_than_the_batch(dataset, tmp_path):
    with pytest.raises(Cov3dError, match=r"the training split has 3 scans, too few for --batch-size 8 "
                                         r"\(per process\); give a --batch-size of at most 3"):
        train(config(dataset, tmp_path, batch_size=8))


def test_an_interrupted_and_resumed_run_goes_on_as_the_uninterrupted_one(dataset, tmp_path):
    # Flip augmentation and shuffling draw random numbers every epoch; precise BN too.
    straight = train(config(dataset, tmp_path / "a", epochs=3, batch_size=2))
    interrupted_run(dataset, tmp_path / "b", epochs=3, batch_size=2)
    resumed = train(config(dataset, tmp_path / "b", epochs=3, batch_size=2), resume=True)
    for a, b in zip(straight.history, resumed.history):
        for key in ("train_loss", "valid_loss", "presence_f1", "severity_f1"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-6), (a["epoch"], key)
    weights_a = load_checkpoint(straight.run / "last.pt")["model"]
    weights_b = load_checkpoint(resumed.run / "last.pt")["model"]
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=1e-4, atol=1e-5)


def test_resume_applies_more_epochs_and_refuses_conflicting_options(dataset, tmp_path):
    interrupted_run(dataset, tmp_path)
    with pytest.raises(Cov3dError, match=r"whose --lambda is 0.1, not 0.5; leave --lambda out"):
        train(config(dataset, tmp_path, lam=0.5), resume=True, options={"lam"})
    with pytest.raises(Cov3dError, match="is a run of 2 epochs that has trained 1; --epochs 0 cannot shorten it"):
        train(config(dataset, tmp_path, epochs=0), resume=True, options={"epochs"})
    result = train(config(dataset, tmp_path, epochs=3, lr=1e-3), resume=True, options={"epochs", "lr"})
    assert result.epochs_done == 3  # --epochs 3 extended the 2-epoch run; --lr equal to the saved one is fine
    saved = json.loads((result.run / "config.json").read_text(encoding="utf-8"))
    assert saved["epochs"] == 3 and saved["lambda"] == 0.1 and "lam" not in saved


def test_cli_resume_with_more_epochs_shows_the_new_total(dataset, tmp_path):
    run = tmp_path / "run"
    args = ["train", str(dataset), "--output", str(run), "--cache", str(tmp_path / "cache"), *TINY]
    assert runner.invoke(app, [*args, "--epochs", "1"]).exit_code == 0
    result = runner.invoke(app, [*args, "--epochs", "2", "--resume"])
    assert result.exit_code == 0, result.output
    assert "epoch   2/2" in result.output
    refused = runner.invoke(app, [*args, "--lambda", "0.3", "--resume"])
    assert refused.exit_code == 1 and "whose --lambda is 0.1, not 0.3" in refused.output


def test_a_run_interrupted_in_its_first_epoch_can_be_replaced(dataset, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "presence.pt").write_bytes(b"from an interrupted first epoch")  # no last.pt: cannot resume
    (run / ".last.12345678.tmp.pt").write_bytes(b"x")
    result = train(config(dataset, tmp_path, epochs=1))
    assert load_checkpoint(result.run / "presence.pt")["epoch"] == 1
    assert not (run / ".last.12345678.tmp.pt").exists()


def test_callback_order_keeps_every_declared_run_after_and_run_before(dataset, tmp_path):
    from fastai.callback.core import Callback
    from fastai.callback.fp16 import MixedPrecision
    from fastai.learner import SkipToEpoch

    from cov3d.training import callbacks
    from cov3d.training.trainer import make_learner, make_model, prepare_data

    cfg = config(dataset, tmp_path).with_recipe()
    splits = prepare_data(cfg)
    learn = make_learner(cfg, splits, make_model(cfg), tmp_path / "run", None, on_epoch=lambda row: None,
                         on_batch=lambda phase, done, total: None)
    # The callbacks a single-process CPU run leaves out, and those fastai adds for fp16 and --resume.
    learn.add_cbs([callbacks.DataParallel(torch.device("cpu")), callbacks.AverageLoss(), callbacks.AverageBatchNorm(),
                   callbacks.Autocast("cpu", torch.bfloat16), callbacks.ChannelsLast(), callbacks.RestoreState({}),
                   callbacks.Tracking(None), MixedPrecision(), SkipToEpoch(1)])
    ours = {value for value in map(callbacks.__dict__.get, callbacks.__all__)
            if isinstance(value, type) and issubclass(value, Callback) and value is not Callback}
    assert ours <= {type(cb) for cb in learn.cbs}  # every cov3d callback is in this learner

    def declared(cb, name):
        value = getattr(type(cb), name, ())
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)

    pairs = [(cb, other) for cb in learn.cbs for other in learn.cbs for name in ("run_after", "run_before")
             if isinstance(other, declared(cb, name))]
    assert len(pairs) == 24  # the declarations meet callbacks of this learner, not only absent classes
    assert callbacks.order_violations(learn.cbs) == []

    class TooEarly(Callback):
        order = 0
        run_after = callbacks.ValidationScores

    assert callbacks.order_violations([*learn.cbs, TooEarly()]) == [
        "TooEarly (order 0) must run after ValidationScores (order 45)"]


def test_callbacks_passed_to_train_see_every_epoch_and_the_run_state(dataset, tmp_path):
    from fastai.callback.core import Callback

    from cov3d.training.callbacks import BestCheckpoint

    class Watch(Callback):
        order, run_after = 100, BestCheckpoint  # sees this epoch's best scores

        def __init__(self):
            self.seen = []

        def after_epoch(self):
            self.seen.append((self.epoch + 1, self.learn.run_state.scores["presence_f1"]))
            self.best = self.learn.run_state.best_scores()

    watch = Watch()
    result = train(config(dataset, tmp_path), cbs=[watch])
    assert [epoch for epoch, _ in watch.seen] == [1, 2]
    assert [f1 for _, f1 in watch.seen] == pytest.approx([float(r["presence_f1"]) for r in history(result.run)])
    assert watch.best == result.best
