import re

import pytest

from typer.testing import CliRunner

from cov3d import __version__
from cov3d.cli import app
from cov3d.data.preprocess import read_manifest

runner = CliRunner()


def one_error_line(result) -> str:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_help_for_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "preprocess" in result.output
    result = runner.invoke(app, ["preprocess", "--help"])
    assert result.exit_code == 0
    for option in ["--size", "--depth", "--width", "--cache", "--workers", "--overwrite", "--window",
                   "--train-severity", "--validation-severity"]:
        assert option in result.output


def test_preprocess_command(dataset, tmp_path):
    result = runner.invoke(app, ["preprocess", str(dataset), "--depth", "8", "--width", "16",
                                 "--cache", str(tmp_path / "c"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "Cached 6 of 6 scans at 8x16x16" in result.output
    assert len(read_manifest(tmp_path / "c" / "8x16x16" / "manifest.csv")) == 6


def test_preprocess_reports_failures_in_a_table(dataset, tmp_path):
    (dataset / "test" / "ct_scan_9" / "1.jpg").write_bytes(b"xx")
    result = runner.invoke(app, ["preprocess", str(dataset), "--depth", "4", "--width", "8",
                                 "--cache", str(tmp_path / "c"), "--workers", "1"])
    assert result.exit_code == 1
    assert "1 scan(s) failed" in result.output and "test/ct_scan_9" in result.output
    assert "Cached 5 of 6" in result.output


def test_missing_data_is_one_line(tmp_path):
    line = one_error_line(runner.invoke(app, ["preprocess", str(tmp_path / "none")]))
    assert "does not exist" in line


def test_bad_window_is_one_line(dataset):
    line = one_error_line(runner.invoke(app, ["preprocess", str(dataset), "--window=5,1"]))
    assert re.search("window '5,1' needs LOW < HIGH", line)


def test_bad_severity_file_is_one_line(dataset, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("nobody;2\n")
    line = one_error_line(runner.invoke(app, ["preprocess", str(dataset), "--train-severity", str(bad)]))
    assert "scan 'nobody'" in line


def test_cache_inside_data_is_one_line(dataset):
    line = one_error_line(runner.invoke(app, ["preprocess", str(dataset), "--cache", str(dataset / "c")]))
    assert "inside the data" in line


@pytest.mark.parametrize("device", ["gpu0", "cuda:x", "tpu", "cpu:0:1"])
def test_bad_device_is_one_line_listing_the_valid_forms(trained_run, slice_scan, tmp_path, device):
    result = runner.invoke(app, ["predict", str(slice_scan), "--model", str(trained_run), "--device", device,
                                 "--output", str(tmp_path / "p.csv")])
    assert f"--device {device} is not a device; use auto, cpu, cuda or cuda:N" in one_error_line(result)


@pytest.mark.parametrize("command", ["preprocess", "train", "predict", "evaluate", "show", "synth", "demo"])
def test_help_keeps_every_option_name_whole_at_80_columns(command):
    from cov3d.cli import app as cli_app

    result = runner.invoke(cli_app, [command, "--help"], env={"COLUMNS": "80", "TERM": "xterm"})
    assert result.exit_code == 0
    assert max(len(line) for line in result.output.splitlines()) <= 80
    import typer

    group = typer.main.get_command(cli_app)
    for param in group.commands[command].params:
        for name in getattr(param, "opts", []):
            if name.startswith("--"):
                assert name in result.output, name


def test_train_options_default_to_train_config():
    import dataclasses

    import typer

    from cov3d.training.config import RECIPES, TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    params = {param.name: param for param in typer.main.get_command(app).commands["train"].params}
    # Every field has an option but `resolved`, which train() fills in.
    assert {f.name for f in dataclasses.fields(TrainConfig)} - {"resolved"} <= set(params)
    for name in defaults:
        default = params[name].default
        assert getattr(default, "value", default) == defaults[name], name
    # Fields with a default factory: left unset on the command line, they take TrainConfig's.
    assert params["weights"].default is None and params["window"].default is None
    # The recipe values the help texts quote are RECIPES'.
    for name in ("lr", "batch_size", "dropout"):
        tuned, scratch = re.search(r"default: (\S+) fine-tuning, (\S+) from scratch", params[name].help).groups()
        assert (float(tuned), float(scratch)) == (RECIPES["fine-tune"][name], RECIPES["scratch"][name]), name
    assert f"(default: {RECIPES['fine-tune']['epochs']})" in params["epochs"].help


def test_choices_restated_to_keep_torch_out_of_start_up_match_the_library():
    import subprocess
    import sys

    import typer

    from cov3d.cli import options, train as train_cli
    from cov3d.data.lungs import LUNG_MODES
    from cov3d.data.readers import DEFAULT_WINDOW
    from cov3d.data.resample import SIZES
    from cov3d.models.video import POOLS
    from cov3d.training.loss import SEVERITY_WEIGHTINGS
    from cov3d.training.precision import PRECISIONS
    from cov3d.training.tracking import MODES

    def values(enum) -> tuple:
        return tuple(member.value for member in enum)

    assert values(options.SizeName) == tuple(SIZES)
    assert values(options.Lungs) == LUNG_MODES
    assert values(options.Precision) == PRECISIONS
    assert values(options.WandbMode) == MODES
    assert values(train_cli.Pool) == POOLS
    assert values(train_cli.SeverityWeights) == SEVERITY_WEIGHTINGS
    params = {param.name: param for param in typer.main.get_command(app).commands["train"].params}
    sizes = ", ".join(f"{name} {depth}x{width}x{width}" for name, (depth, width) in SIZES.items())
    assert f"Preprocessed size: {sizes}." == params["size"].help
    window = "{:g},{:g}".format(*DEFAULT_WINDOW)
    assert f"(write --window={window}; default: the lung window {window})" in params["window"].help
    code = "import sys, cov3d.cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'fastai'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
