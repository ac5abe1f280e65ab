"""Hardening of training, checkpoints, options, outputs and explain (issue 19): each defect's reproduction."""

import errno
import json
import logging
import math

import numpy as np
import pytest
import torch
from conftest import ramp_volume, write_slices
from test_archs import WIDTH, tiny
from typer.testing import CliRunner

import cov3d.models.checkpoint
import cov3d.reports.explanation
from cov3d.cli import app
from cov3d.data.readers import ScanMeta, parse_window
from cov3d.errors import Cov3dError
from cov3d.models.checkpoint import LAST, load_checkpoint, load_model, model_config, save_checkpoint
from cov3d.training.config import MAX_SEED, TrainConfig, cap_workers
from cov3d.training.trainer import train

runner = CliRunner()
TINY = ["--no-pretrained", "--depth", "8", "--width", "16", "--loader-workers", "0", "--penultimate", "16",
        "--batch-size", "2"]


def config(dataset, tmp_path, **overrides) -> TrainConfig:
    options = dict(data=str(dataset), output=str(tmp_path / "run"), pretrained=False, depth=8, width=16, epochs=1,
                   batch_size=2, loader_workers=0, penultimate=16, cache=str(tmp_path / "cache"))
    options.update(overrides)
    return TrainConfig(**options)


def one_error_line(result) -> str:
    """The one red line of a refused command: exit 1, no traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error"), result.output
    assert "Traceback" not in result.output
    return lines[0]


# --- 1. Non-finite values: hyper-parameters, weights, checkpoints, scans -------------------------------------

@pytest.mark.parametrize("field, value", [("lr", math.nan), ("lr", math.inf), ("weight_decay", math.nan),
                                          ("lam", math.nan), ("crop", math.inf)])
def test_non_finite_hyperparameters_are_refused(dataset, tmp_path, field, value):
    option = "--lambda" if field == "lam" else "--" + field.replace("_", "-")
    with pytest.raises(Cov3dError, match=f"^{option} {value} is not a finite number$"):
        config(dataset, tmp_path, **{field: value}).with_recipe().validate()


def test_cli_lr_nan_is_one_line_before_preprocessing(dataset, tmp_path):
    result = runner.invoke(app, ["train", str(dataset), "--output", str(tmp_path / "run"), "--lr", "nan",
                                 "--cache", str(tmp_path / "cache"), *TINY])
    assert "--lr nan is not a finite number" in one_error_line(result)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_weights_that_become_nan_stop_the_run_before_any_checkpoint(dataset, tmp_path):
    from fastai.callback.core import Callback

    class Poison(Callback):
        """After the epoch's last step (so that no loss sees it), a weight becomes NaN, as --lr inf made them."""
        order = 1

        def after_train(self):
            with torch.no_grad():
                self.learn.model.stem[0].weight[0, 0, 0, 0, 0] = math.nan

    with pytest.raises(Cov3dError, match=r"the weights became NaN or inf in epoch 1 \(first in 'stem.0.weight'\); "
                                         r"training stopped before saving them"):
        train(config(dataset, tmp_path), cbs=[Poison()])
    assert not list((tmp_path / "run").glob("*.pt"))  # neither presence.pt, severity.pt nor last.pt


def test_a_checkpoint_is_never_saved_with_non_finite_weights(tmp_path):
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.bias.fill_(math.inf)
    with pytest.raises(Cov3dError, match=r"not saving '.*x.pt': the weights hold NaN or inf \(first in 'bias'\)"):
        save_checkpoint(tmp_path / "x.pt", model, {})
    assert not (tmp_path / "x.pt").exists()


def _tiny_checkpoint(path, poison: bool):
    model = tiny("r3d_18")
    state = model.state_dict()
    if poison:
        state["layer1.0.0.conv1.0.weight"][0] = math.nan
    config = model_config(arch="r3d_18", depth=4, width=32, lam=0.1, window=(-1350.0, 150.0), penultimate=8,
                          dropout=0.0, pool="avg", final_bias=True)
    torch.save({"model": state, "config": config}, path)  # as a diverged run of an older cov3d wrote it
    return path


def test_loading_a_checkpoint_with_non_finite_weights_is_refused_naming_the_file(tmp_path):
    path = _tiny_checkpoint(tmp_path / "presence.pt", poison=True)
    with pytest.raises(Cov3dError, match=r"'.*presence.pt' holds weights that are NaN or inf \(first in "
                                         r"'layer1.0.0.conv1.0.weight'\): its training diverged"):
        load_model(path)


def test_explaining_a_scan_with_nan_blames_the_scan_not_the_checkpoint(tmp_path, monkeypatch):
    import cov3d.inference.explain as explain
    from cov3d.inference.predict import load_ensemble

    checkpoint = _tiny_checkpoint(tmp_path / "model.pt", poison=False)
    scan = write_slices(tmp_path / "scan", ramp_volume(4, 16))
    real = explain.preprocess_volume

    def cached_with_nan(path, size, window, **options):
        tensor, meta = real(path, size, window, **options)
        tensor[0, 1, 2, 3] = math.nan
        return tensor, meta

    monkeypatch.setattr(explain, "preprocess_volume", cached_with_nan)
    with pytest.raises(Cov3dError) as raised:
        explain.explain_scan(scan, load_ensemble([checkpoint]), tta=False)
    message = str(raised.value)
    assert f"scan '{scan}' holds NaN or infinite values (1 of the" in message and "checkpoint" not in message


# --- 2. Options validated before any work, naming the value and the range -----------------------------------

@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1])
def test_a_seed_outside_numpys_range_is_refused(dataset, tmp_path, seed):
    with pytest.raises(Cov3dError, match=rf"--seed {seed} is outside 0 … 4294967295 \(2\^32 - 1\)"):
        config(dataset, tmp_path, seed=seed).with_recipe().validate()


def test_the_largest_seed_trains_under_every_seeding():
    from cov3d.training.runtime import seed_everything

    seed_everything(MAX_SEED + 3)  # a derived seed (seed + rank, resume's re-seeding) wraps instead of failing


def test_cli_seeds_out_of_range_are_one_line(dataset, tmp_path):
    train_result = runner.invoke(app, ["train", str(dataset), "--output", str(tmp_path / "run"), "--seed", "-1",
                                       "--cache", str(tmp_path / "cache"), *TINY])
    assert "--seed -1 is outside 0 … 4294967295" in one_error_line(train_result)
    synth_result = runner.invoke(app, ["synth", str(tmp_path / "synth"), "--seed", "-5", "--scans", "10"])
    assert "--seed -5 is outside 0 … 4294967295" in one_error_line(synth_result)
    demo_result = runner.invoke(app, ["demo", "--output", str(tmp_path / "demo"), "--seed", "-5"])
    assert "--seed -5 is outside 0 … 4294967295" in one_error_line(demo_result)
    assert not (tmp_path / "synth").exists() and not (tmp_path / "demo").exists()


def test_synth_states_the_seed_range_of_training():
    import cov3d.data.synth

    assert cov3d.data.synth.MAX_SEED == MAX_SEED


def test_a_negative_weight_decay_is_refused(dataset, tmp_path):
    with pytest.raises(Cov3dError, match=r"^--weight-decay -1.0 must be 0 \(none\) or more$"):
        config(dataset, tmp_path, weight_decay=-1.0).with_recipe().validate()


def test_a_batch_size_batchnorm_cannot_train_is_refused_before_preprocessing(dataset, tmp_path):
    # r3d_18 at 8x16x16: the last stage's map is 1x1x1, so a batch of one scan gives BatchNorm one value.
    result = runner.invoke(app, ["train", str(dataset), "--output", str(tmp_path / "run"),
                                 "--cache", str(tmp_path / "cache"), *TINY, "--batch-size", "1"])
    line = one_error_line(result)
    assert ("--batch-size 1 is too small for --arch r3d_18 at 8x16x16: in training, BatchNorm needs more than one "
            "value per channel") in line and "use --batch-size 2 or more, or a larger --depth and --width" in line
    assert not (tmp_path / "cache").exists()
    # Where the last stage keeps more than one voxel, a batch of one trains (checked without training).
    config(dataset, tmp_path, batch_size=1, depth=16, width=32).with_recipe().validate()


@pytest.mark.parametrize("text, message", [
    ("-3e38,3e38", r"window '-3e38,3e38' reaches outside -10000 … 40000 HU"),
    ("-600,-599.5", r"window '-600,-599.5' is 0.5 HU wide; give one at least 1 HU wide"),
    ("-600,inf", r"window '-600,inf' must be finite numbers"),
])
def test_a_window_outside_the_ct_range_or_too_narrow_is_refused(text, message):
    with pytest.raises(Cov3dError, match=message):
        parse_window(text)


def test_a_window_pair_of_the_python_api_is_checked_like_the_option(dataset, tmp_path):
    assert parse_window((-1000, 400.0)) == (-1000.0, 400.0)
    with pytest.raises(Cov3dError, match=r"window '-3e\+38,3e\+38' reaches outside"):
        config(dataset, tmp_path, window=(-3e38, 3e38)).with_recipe().validate()


def test_cli_window_of_extreme_values_is_one_line(dataset, tmp_path):
    result = runner.invoke(app, ["train", str(dataset), "--output", str(tmp_path / "run"), "--window=-3e38,3e38",
                                 "--cache", str(tmp_path / "cache"), *TINY])
    assert "reaches outside -10000 … 40000 HU" in one_error_line(result)


def test_loader_workers_are_capped_at_the_cores_with_a_warning(dataset, tmp_path, monkeypatch, caplog):
    import cov3d.training.config
    from cov3d.training.trainer import prepare_data

    monkeypatch.setattr(cov3d.training.config, "available_cores", lambda: 2)
    with caplog.at_level(logging.WARNING):
        assert cap_workers(32, "--workers") == 2 and cap_workers(2, "--workers") == 2
    assert "--workers 32 is more than the 2 CPU core(s) here; using 2" in caplog.text
    # train's option goes through the cap (preparing the data needs no training)
    settings = config(dataset, tmp_path, loader_workers=32).with_recipe()
    prepare_data(settings)
    assert settings.resolved["loader_workers"] == 2


def _saved_run(tmp_path, epochs: int):
    run = tmp_path / "run"
    run.mkdir()
    saved = TrainConfig(data="data", output=str(run), pretrained=False, epochs=epochs).with_recipe()
    (run / "config.json").write_text(json.dumps(saved.to_json()))
    return run


def test_resume_with_fewer_epochs_than_planned_is_refused(tmp_path, caplog):
    from cov3d.training.trainer import _resumed_config

    run = _saved_run(tmp_path, epochs=4)
    given = TrainConfig(data="data", output=str(run), pretrained=False, epochs=2).with_recipe()
    with pytest.raises(Cov3dError, match=r"is a run of 4 epochs that has trained 1; --epochs 2 cannot shorten it "
                                         r".*leave --epochs out to finish the 4, or give more than 4 to extend it"):
        _resumed_config(run, given, {"epoch": 1}, options={"epochs"})
    given.epochs = 6
    with caplog.at_level(logging.WARNING):
        assert _resumed_config(run, given, {"epoch": 1}, options={"epochs"}).epochs == 6
    assert "from 4 to 6 epochs" in caplog.text


# --- 3. Outputs checked before any work; show's formats; whole scan names ------------------------------------

def test_train_into_a_file_is_one_line_before_preprocessing(dataset, tmp_path):
    (tmp_path / "run").write_text("not a folder")
    result = runner.invoke(app, ["train", str(dataset), "--output", str(tmp_path / "run"),
                                 "--cache", str(tmp_path / "cache"), *TINY])
    assert "is a file, not a folder" in one_error_line(result)
    assert not (tmp_path / "cache").exists()


def _read_only(monkeypatch):
    """Every probe file fails as on a read-only mount (tests may run as root, whom chmod does not stop)."""
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)


def test_train_synth_and_demo_on_a_read_only_disk_are_one_line(dataset, tmp_path, monkeypatch):
    _read_only(monkeypatch)
    for args in (["train", str(dataset), "--output", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"),
                  *TINY], ["synth", str(tmp_path / "synth")], ["demo", "--output", str(tmp_path / "demo")]):
        line = one_error_line(runner.invoke(app, args))
        assert "cannot write" in line and "Read-only file system" in line, line
    assert not any((tmp_path / name).exists() for name in ("cache", "run", "synth", "demo"))


def test_synth_and_demo_into_a_file_are_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    for args in (["synth", str(tmp_path / "file")], ["demo", "--output", str(tmp_path / "file")]):
        assert "is a file, not a folder" in one_error_line(runner.invoke(app, args))
    assert (tmp_path / "file").read_text(encoding="utf-8") == "x"


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".jpg", b"\xff\xd8\xff"),
                                           (".jpeg", b"\xff\xd8\xff"), (".pdf", b"%PDF"), (".svg", b"<?xml")])
def test_show_writes_the_format_its_suffix_names(slice_scan, tmp_path, suffix, magic):
    target = tmp_path / f"views{suffix}"
    result = runner.invoke(app, ["show", str(slice_scan), "--output", str(target), "--depth", "4", "--width", "16"])
    assert result.exit_code == 0, result.output
    assert target.read_bytes().startswith(magic)


@pytest.mark.parametrize("name", ["views.bmp", "views"])
def test_show_refuses_a_suffix_it_cannot_write(slice_scan, tmp_path, name):
    result = runner.invoke(app, ["show", str(slice_scan), "--output", str(tmp_path / name)])
    assert "a picture is written as .png, .jpg (or .jpeg), .pdf or .svg" in one_error_line(result)
    assert not (tmp_path / name).exists()


def test_default_show_and_explain_names_keep_the_whole_scan_name(tmp_path, monkeypatch):
    from cov3d.cli.options import scan_output_name

    monkeypatch.chdir(tmp_path)
    for uid in ("1.2.840.113619.1", "1.2.840.113619.2"):
        write_slices(tmp_path / uid, ramp_volume(4, 16))
        result = runner.invoke(app, ["show", uid, "--depth", "4", "--width", "16"])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "1.2.840.113619.1.png").is_file() and (tmp_path / "1.2.840.113619.2.png").is_file()
    (tmp_path / "chest.v2.nii.gz").write_bytes(b"")
    assert scan_output_name(tmp_path / "chest.v2.nii.gz") == "chest.v2"
    assert scan_output_name(tmp_path / "1.2.840.113619.1") == "1.2.840.113619.1"


def test_show_of_a_lone_image_never_overwrites_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_slices(tmp_path, ramp_volume(1, 16), suffix=".png")  # ./0.png: a 1-slice scan
    before = (tmp_path / "0.png").read_bytes()
    result = runner.invoke(app, ["show", "0.png", "--depth", "4", "--width", "16"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "0.png").read_bytes() == before and (tmp_path / "0-sections.png").is_file()


# --- 4 and 5. Full disks, damaged files, interrupted writes --------------------------------------------------

def _disk_full_on(monkeypatch, name: str, calls: int = 1):
    """Make the `calls`-th checkpoint write of file `name` fail as on a full disk."""
    real = cov3d.models.checkpoint.save_torch
    seen = {"n": 0}

    def save(obj, path):
        if path.name == name:
            seen["n"] += 1
            if seen["n"] == calls:
                from cov3d.atomic import write_failed

                raise write_failed(OSError(errno.ENOSPC, "No space left on device"), path)
        real(obj, path)

    monkeypatch.setattr(cov3d.models.checkpoint, "save_torch", save)


def test_a_full_disk_at_last_pt_leaves_the_run_resumable(dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _disk_full_on(monkeypatch, LAST, calls=2)  # epoch 1 is saved; epoch 2's last.pt meets a full disk
    with pytest.raises(Cov3dError) as raised:
        train(config(dataset, tmp_path, epochs=2))
    message = str(raised.value)
    assert message.startswith(f"cannot write '{run / LAST}': no space left on device; training stopped. "
                              f"{run / LAST} holds epoch 1")
    assert "--resume" in message and "\n" not in message
    assert load_checkpoint(run / LAST)["epoch"] == 1
    monkeypatch.undo()
    result = train(config(dataset, tmp_path, epochs=2), resume=True)
    assert result.epochs_done == 2 and load_checkpoint(run / LAST)["epoch"] == 2


def test_a_full_disk_at_the_best_checkpoint_stops_the_run_with_one_line(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from fastai.callback.core import CancelFitException

    from cov3d.training.callbacks import BestCheckpoint, RunState

    _disk_full_on(monkeypatch, "presence.pt")
    old = tmp_path / "presence.pt"
    old.write_bytes(b"the best weights of an earlier epoch")
    best = BestCheckpoint("presence_f1", old, {}, best=0.5)
    best.learn = SimpleNamespace(run_state=RunState(scores={"presence_f1": 0.8}), model=torch.nn.Linear(1, 1),
                                 epoch=2)
    with pytest.raises(CancelFitException):  # fastai stops the fit; LastCheckpoint does not run
        best.after_epoch()
    assert best.learn.run_state.write_failure == f"cannot write '{old}': no space left on device"
    assert old.read_bytes() == b"the best weights of an earlier epoch"


@pytest.mark.parametrize("damage, why", [("empty", "the file is empty"),
                                         ("cut", "the file is cut off or damaged at")])
def test_a_damaged_last_pt_names_the_way_out(tmp_path, damage, why):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    whole = tmp_path / "whole.pt"
    torch.save({"model": {"w": torch.zeros(1000)}, "config": {}, "epoch": 1}, whole)
    (run / LAST).write_bytes(b"" if damage == "empty" else whole.read_bytes()[:2000])
    with pytest.raises(Cov3dError, match=rf"'{run / LAST}' is not a cov3d checkpoint \({why}.*\), so the run cannot "
                                         r"be resumed from it; start the run afresh with --restart"):
        train(TrainConfig(data=str(tmp_path), output=str(run)), resume=True)


def test_a_last_pt_with_nan_weights_cannot_be_resumed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    torch.save({"model": {"w": torch.tensor([math.nan])}, "config": {}, "epoch": 1}, run / LAST)
    with pytest.raises(Cov3dError, match=r"holds weights that are NaN or inf \(first in 'w'\), so the run cannot be "
                                         r"resumed from it; start the run afresh with --restart"):
        train(TrainConfig(data=str(tmp_path), output=str(run)), resume=True)


def test_restart_replaces_a_run_with_a_damaged_last_pt(dataset, tmp_path, monkeypatch):
    import cov3d.training.trainer

    run = tmp_path / "run"
    run.mkdir()
    (run / LAST).write_bytes(b"")
    (run / "history.csv").write_text("epoch\n1\n2\n3\n")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(Cov3dError, match="already holds a training run; continue it with --resume, start it afresh "
                                         "with --restart"):
        train(config(dataset, tmp_path))
    with pytest.raises(Cov3dError, match="--resume continues the run in --output and --restart replaces it"):
        train(config(dataset, tmp_path), resume=True, restart=True)

    class Started(Exception):
        pass

    def started(*args, **kwargs):  # from here on --restart is a new run, as every training test trains one
        raise Started

    monkeypatch.setattr(cov3d.training.trainer, "prepare_data", started)
    with pytest.raises(Started):
        train(config(dataset, tmp_path), restart=True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def _explanation(tmp_path, severity: bool):
    from cov3d.inference.explain import Explanation

    scan = np.linspace(0, 1, 4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    maps = {"presence": scan.copy()}
    if severity:
        maps["severity"] = scan[::-1].copy()
    return Explanation(tmp_path / "scan", scan, ScanMeta("slices", 4, 8, 8), 0.7,
                       np.array([0.1, 0.2, 0.3, 0.4]) if severity else None, maps)


def test_explain_replaces_the_whole_set_and_keeps_other_files(tmp_path):
    from cov3d.reports.explanation import write_explanation

    out = tmp_path / "out"
    write_explanation(_explanation(tmp_path, severity=True), out)
    (out / "notes.txt").write_text("kept")
    write_explanation(_explanation(tmp_path, severity=False), out)
    names = {p.name for p in out.iterdir()}
    assert "notes.txt" in names and "presence.nii.gz" in names
    assert not any(name.startswith("severity") for name in names)  # no old severity map beside the new set
    assert json.loads((out / "explain.json").read_text(encoding="utf-8"))["severity"] is None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


@pytest.mark.parametrize("failure", ["disk full", "killed"])
def test_a_failed_or_killed_explain_leaves_the_old_set_whole(tmp_path, monkeypatch, failure):
    from cov3d.reports.explanation import write_explanation

    out = tmp_path / "out"
    write_explanation(_explanation(tmp_path, severity=True), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = cov3d.reports.explanation.render_montage

    def montage(explanation, task, output, count=12):
        if task == "severity":  # the presence files of the new set are written by then
            if failure == "killed":
                raise KeyboardInterrupt
            from cov3d.atomic import write_failed

            raise write_failed(OSError(errno.ENOSPC, "No space left on device"), output)
        return real(explanation, task, output, count)

    monkeypatch.setattr(cov3d.reports.explanation, "render_montage", montage)
    changed = _explanation(tmp_path, severity=True)
    changed.probability = 0.1
    if failure == "killed":
        with pytest.raises(KeyboardInterrupt):
            write_explanation(changed, out)
    else:
        with pytest.raises(Cov3dError, match=rf"^cannot write '{out / 'severity-montage.png'}': no space left on "
                                             rf"device; '{out}' keeps its previous files$"):
            write_explanation(changed, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_explain_never_swaps_in_a_map_that_a_full_disk_cut_off(tmp_path, monkeypatch):
    from cov3d.reports.explanation import write_explanation

    out = tmp_path / "out"
    write_explanation(_explanation(tmp_path, severity=False), out)
    before = (out / "presence.nii.gz").read_bytes()
    real = cov3d.reports.explanation.write_volume

    def cut_off(path, array, meta):  # what ITK leaves on a full disk, reporting no error
        real(path, array, meta)
        path.write_bytes(path.read_bytes()[:200])
        return path

    monkeypatch.setattr(cov3d.reports.explanation, "write_volume", cut_off)
    with pytest.raises(Cov3dError, match=rf"^cannot write '{out / 'presence.nii.gz'}': .*; '{out}' keeps its "
                                         r"previous files$"):
        write_explanation(_explanation(tmp_path, severity=False), out)
    assert (out / "presence.nii.gz").read_bytes() == before


def test_show_of_a_damaged_history_is_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "history.csv").write_bytes(b"\xff\xfe\x00garbage\x80\n")
    assert "history.csv' is damaged (not a CSV text file" in one_error_line(runner.invoke(app, ["show", str(run)]))
    (run / "history.csv").write_text("epoch,train_loss\none,0.5\n")
    assert "line 2: epoch 'one' is not a whole number" in one_error_line(runner.invoke(app, ["show", str(run)]))


def test_show_of_a_run_without_history_says_so(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    line = one_error_line(runner.invoke(app, ["show", str(run)]))
    assert "is a training run without history.csv yet" in line and "holds no slices" not in line


# --- 8. The review's bugs: Grad-CAM of slice models, res-dense widths, precise BatchNorm and --slices --------

def _evidence_model(task: str):
    """A slice model whose slice logit is (slice intensity − 3) × 1: intensity 3 is p = 0.5, 9.9 is p = 0.999."""
    from cov3d.models.registry import ARCH_ATTRIBUTE
    from cov3d.models.slices import SliceNet

    backbone = torch.nn.Conv2d(1, 1, 1, bias=False)
    model = SliceNet(backbone, 1, penultimate=1, dropout=0.0)
    with torch.no_grad():
        backbone.weight.fill_(1.0)
        first, last = model.head[1], model.head[4]
        first.weight.fill_(1.0), first.bias.zero_()
        last.weight.zero_(), last.bias.zero_()
        row = 0 if task == "presence" else 3  # the presence logit, or the severity logit of 'moderate'
        last.weight[row] = 1.0
        last.bias[row] = -3.0
    setattr(model, ARCH_ATTRIBUTE, "resnet50")  # whose stage 4 is the whole backbone, as here
    return model.eval()


@pytest.mark.parametrize("task", ["presence", "severity"])
def test_grad_cam_of_a_slice_model_gives_the_surest_slices_the_most_mass(task):
    from cov3d.inference.explain import grad_cam, presence_score, severity_score
    from cov3d.reports.explanation import top_slices

    intensities = [3.0, 9.9, 3.0, 9.9, 3.0, 9.9]  # borderline and confident slices, in turn
    volumes = torch.tensor(intensities).view(1, 1, 6, 1, 1).expand(1, 1, 6, 8, 8).contiguous()
    score = (lambda z: presence_score(z, 0.1)) if task == "presence" else (lambda z: severity_score(z, 2))
    maps, _ = grad_cam(_evidence_model(task), volumes, score)
    mass = maps[0].sum(dim=(1, 2))
    confident, borderline = mass[1::2], mass[0::2]
    # The map follows each slice's evidence (its activation, 9.9 against 3), not p(1 − p): the logit of the mean
    # probability gave a confident slice 0.013 of a borderline slice's mass here (0.08 for severity).
    torch.testing.assert_close(confident / borderline, torch.full((3,), 9.9 / 3.0))
    assert top_slices(maps[0].numpy(), count=3) == [1, 3, 5]


@pytest.mark.parametrize("width", [100, 112, 200, 240])
def test_res_dense_takes_widths_that_are_not_multiples_of_32(dataset, tmp_path, width):
    config(dataset, tmp_path, arch="res-dense", depth=2, width=width).with_recipe().validate()  # shapes only


def test_res_dense_predicts_at_width_100():
    model = tiny("res-dense").eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 1, 100, 100))
    assert out.shape == (1, 6) and torch.isfinite(out).all()


def test_an_input_size_an_architecture_cannot_take_is_refused_when_configured(dataset, tmp_path, monkeypatch):
    import cov3d.models.slices

    def broken(self, x):  # res-dense as it was: the two maps of a width of 100 do not add
        return self.resnet_projection(self.resnet(x)) + self.densenet_projection(self.densenet(x))

    monkeypatch.setattr(cov3d.models.slices.ResDense, "forward", broken)
    with pytest.raises(Cov3dError, match=r"^--arch res-dense cannot take 2x100x100 inputs \(.*\); choose another "
                                         r"--width or --depth, or another --arch$"):
        config(dataset, tmp_path, arch="res-dense", depth=2, width=100).with_recipe().validate()


def test_precise_batchnorm_of_a_slice_model_measures_the_slices_of_a_step():
    from cov3d.models.video import precise_batchnorm

    model = tiny("resnet50", slices=2)
    seen = []
    model.backbone.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    assert precise_batchnorm(model, [torch.rand(3, 1, 8, WIDTH, WIDTH)]) == 1
    assert seen == [3 * 2]  # 2 slices of each of the 3 scans, not all 8
    assert not model.training


def test_a_run_stays_trainable_for_the_default_sizes():
    # The meta-device check costs a fraction of a second and refuses nothing the defaults train.
    TrainConfig(data="d", output="o", pretrained=False).with_recipe().validate()


def test_the_cli_restates_the_readers_scan_file_suffixes():
    from cov3d.cli.options import SCAN_FILE_SUFFIXES
    from cov3d.data.readers import SLICE_SUFFIXES, VOLUME_SUFFIXES

    assert set(SCAN_FILE_SUFFIXES) == set(VOLUME_SUFFIXES) | set(SLICE_SUFFIXES)
