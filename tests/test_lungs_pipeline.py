"""--lungs crop and split through preprocess, train, predict, explain and show; old caches and runs still load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cov3d.cli import app
from cov3d.data.lungs import LEFT, RIGHT, lung_views, resample_labels
from cov3d.data.preprocess import Size, load_cached, load_mask, preprocess_dataset, preprocess_volume, read_manifest
from cov3d.data.readers import read_scan
from cov3d.data.synth import synthesize
from cov3d.models.checkpoint import checked_config
from cov3d.models.pair import LungPair
from cov3d.models.registry import ARCHS, build_model

runner = CliRunner()


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms") / "data"
    synthesize(root, scans=10, seed=3, width=64)
    return root


@pytest.mark.parametrize("mode", ["crop", "split"])
def test_preprocess_caches_the_lungs_and_their_mask(phantoms, tmp_path, mode):
    report = preprocess_dataset(phantoms, Size(8, 16), tmp_path / "cache", lungs=mode, workers=1)
    assert report.manifest.parent.name == f"8x16x16-lungs-{mode}" and not report.failures
    rows = read_manifest(report.manifest)
    assert len(rows) == 10 and all(r["lungs"] == mode and r["lung_quality"] == "ok" for r in rows)
    row = rows[0]
    tensor = load_cached(report.manifest.parent / row["cache"])
    labels = load_mask(report.manifest.parent / row["mask"])
    channels = 2 if mode == "split" else 1
    assert tensor.shape == (channels, 8, 16, 16) and labels.shape == tensor.shape and labels.dtype == np.uint8
    # The round trip: the mask cached is the segmentation of the scan, on the tensor's grid.
    views = lung_views(read_scan(phantoms / row["path"]).volume, mode)
    expected = np.stack([resample_labels(v, 8, 16) for v in views.labels])
    assert np.array_equal(labels, expected)
    assert row["lung_box"].count(";") == channels - 1
    if mode == "split":
        assert (labels[0] == RIGHT).sum() > (labels[0] == LEFT).sum()
        assert (labels[1] == LEFT).sum() > (labels[1] == RIGHT).sum()
    again = preprocess_dataset(phantoms, Size(8, 16), tmp_path / "cache", lungs=mode, workers=1)
    assert again.skipped == 10 and again.processed == 0


def test_the_crop_shows_the_lungs_larger_than_the_whole_volume(phantoms):
    scan = phantoms / "train" / "covid" / "ct_scan_0"
    whole, _ = preprocess_volume(scan, Size(8, 32))
    cropped, meta = preprocess_volume(scan, Size(8, 32), lungs="crop")
    share = lambda labels: float((labels > 0).mean())  # noqa: E731
    assert share(meta["labels"]) > 1.3 * share(resample_labels(
        lung_views(read_scan(scan).volume, "crop").mask.labels, 8, 32))
    assert whole.shape == cropped.shape == (1, 8, 32, 32)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_arch_scores_split_lungs_symmetrically(arch):
    torch.manual_seed(0)
    model = build_model(arch, pretrained=False, penultimate=8, lungs="split").eval()
    assert isinstance(model, LungPair)
    x = torch.rand(2, 2, 16, 32, 32)
    with torch.no_grad():
        out = model(x)
        swapped = model(x.flip(1))
    assert out.shape == (2, 6)
    # Reflection under split swaps the lungs: the output does not change.
    torch.testing.assert_close(out, swapped, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_without_a_lungs_setting_is_read_as_off(tmp_path):
    config = {"arch": "r3d_18", "depth": 8, "width": 16, "lambda": 0.1,
              "outputs": ["presence", "non-covid", "mild", "moderate", "severe", "critical"]}
    assert checked_config(config, tmp_path / "old.pt")["lungs"] == "off"


@pytest.fixture(scope="module")
def split_run(phantoms, tmp_path_factory):
    base = tmp_path_factory.mktemp("split")
    result = runner.invoke(app, ["train", str(phantoms), "--output", str(base / "run"), "--no-pretrained",
                                 "--depth", "8", "--width", "16", "--epochs", "1", "--batch-size", "2",
                                 "--bn-scans", "0", "--loader-workers", "0", "--penultimate", "8",
                                 "--lungs", "split", "--cache", str(base / "cache")])
    assert result.exit_code == 0, result.output
    return base / "run"


def test_a_split_run_records_its_setting_and_predict_applies_it(split_run, phantoms, tmp_path):
    config = json.loads((split_run / "config.json").read_text(encoding="utf-8"))
    assert config["lungs"] == "split"
    checkpoint = torch.load(split_run / "presence.pt", weights_only=True)
    assert checkpoint["config"]["lungs"] == "split"
    scans = [str(phantoms / "test")]
    outputs = {}
    for tta in ("--tta", "--no-tta"):
        target = tmp_path / f"{tta}.csv"
        result = runner.invoke(app, ["predict", *scans, "--model", str(split_run), "--output", str(target), tta,
                                     "--workers", "0", "--precision", "fp32"])
        assert result.exit_code == 0, result.output
        outputs[tta] = [float(line.split(",")[2]) for line in target.read_text(encoding="utf-8").splitlines()[1:]]
    # Under split the model is reflection-invariant by construction: TTA changes no probability.
    assert len(outputs["--tta"]) == 2
    assert outputs["--tta"] == pytest.approx(outputs["--no-tta"], abs=1e-5)


def test_explain_a_split_model_places_both_lungs_maps_and_measures_the_lung_share(split_run, phantoms, tmp_path):
    scan = phantoms / "test" / "ct_scan_0"
    result = runner.invoke(app, ["explain", str(scan), "--model", str(split_run), "--output", str(tmp_path / "x"),
                                 "--no-tta"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "x" / "explain.json").read_text(encoding="utf-8"))
    assert summary["lungs"]["segmentation"] == "ok"
    share = summary["lungs"]["map_share"]["presence"]
    assert 0.0 <= share <= 1.0
    assert "inside the lungs" in result.output


def test_show_outlines_the_lungs(phantoms, tmp_path):
    target = tmp_path / "lungs.png"
    result = runner.invoke(app, ["show", str(phantoms / "test" / "ct_scan_0"), "--lungs", "--output", str(target),
                                 "--depth", "16", "--width", "64"])
    assert result.exit_code == 0, result.output
    assert target.stat().st_size > 1000


def test_a_cache_made_before_lungs_existed_still_loads(phantoms, tmp_path):
    from cov3d.data.dataset import load_splits

    report = preprocess_dataset(phantoms, Size(8, 16), tmp_path / "cache", workers=1)
    lines = report.manifest.read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    keep = [i for i, name in enumerate(header) if name not in ("series", "series_rule", "lungs", "mask",
                                                               "lung_quality", "lung_ml", "right_lung_ml",
                                                               "left_lung_ml", "lung_box")]
    old = [",".join(line.split(",")[i] for i in keep) for line in lines]
    report.manifest.write_text("\n".join(old) + "\n", encoding="utf-8")
    splits = load_splits(report.manifest)
    assert len(splits.train) + len(splits.valid) == 8
    assert preprocess_dataset(phantoms, Size(8, 16), tmp_path / "cache", workers=1).skipped == 10


def test_a_lungs_model_cannot_be_exported(split_run, tmp_path):
    result = runner.invoke(app, ["export", str(split_run), "--output", str(tmp_path / "exported")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "was trained with --lungs split" in result.output
