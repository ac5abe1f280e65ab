import csv
import json

import numpy as np
import pytest
import torch
from conftest import write_slices
from typer.testing import CliRunner

from cov3d.cli import app
from cov3d.errors import Cov3dError
from cov3d.inference.evaluate import youden_threshold
from cov3d.inference.predict import (
    CSV_COLUMNS, find_inputs, load_ensemble, parse_threshold, predict_scans, prediction_rows, write_submission,
)

runner = CliRunner()


def scan_volume(seed=0, depth=6, size=20):
    rng = np.random.default_rng(seed)
    volume = rng.integers(0, 255, size=(depth, size, size), dtype=np.uint8)
    volume[:, :, : size // 3] //= 3  # an asymmetric scan, so its reflection really differs
    return volume


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def probability(members, scan, **options):
    predictions, failures = predict_scans([scan], members, workers=0, **options)
    assert not failures
    return predictions[0]


def test_predict_cli_writes_the_documented_csv(trained_run, tmp_path):
    scans = tmp_path / "scans"
    write_slices(scans / "ct_scan_2", scan_volume(1))
    write_slices(scans / "ct_scan_10", scan_volume(2))
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(scans), "--model", str(trained_run), "--output", str(out),
                                 "--workers", "0", "--submission", str(tmp_path / "sub")])
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert list(rows[0]) == CSV_COLUMNS
    assert [r["scan"] for r in rows] == ["ct_scan_2", "ct_scan_10"]  # natural order
    for row in rows:
        p = float(row["probability"])
        assert 0.0 <= p <= 1.0
        assert row["prediction"] == ("covid" if p >= 0.5 else "non-covid")
        four = [float(row[name]) for name in ("mild", "moderate", "severe", "critical")]
        assert sum(four) == pytest.approx(1.0, abs=1e-5)
        assert row["severity"] == ("mild", "moderate", "severe", "critical")[int(np.argmax(four))]
    files = sorted(p.name for p in (tmp_path / "sub").iterdir())
    assert files == ["covid.csv", "critical.csv", "mild.csv", "moderate.csv", "non-covid.csv", "severe.csv"]
    listed = (tmp_path / "sub" / "covid.csv").read_text(encoding="utf-8").split() + \
        (tmp_path / "sub" / "non-covid.csv").read_text(encoding="utf-8").split()
    assert sorted(listed) == ["ct_scan_10", "ct_scan_2"]


def test_tta_makes_predictions_reflection_invariant(trained_run, tmp_path):
    volume = scan_volume(3)
    # PNG: lossless, so the second scan is exactly the mirror image (JPEG blocks would not mirror)
    original = write_slices(tmp_path / "a", volume, suffix=".png")
    mirrored = write_slices(tmp_path / "b", volume[:, :, ::-1], suffix=".png")
    members = load_ensemble([trained_run])
    with_tta = [probability(members, s, tta=True, precision="fp32") for s in (original, mirrored)]
    assert with_tta[0].presence == pytest.approx(with_tta[1].presence, abs=1e-5)
    np.testing.assert_allclose(with_tta[0].severity[0], with_tta[1].severity[0], atol=1e-5)
    without = [probability(members, s, tta=False, precision="fp32") for s in (original, mirrored)]
    assert without[0].presence != pytest.approx(without[1].presence, abs=1e-7)  # the mirror really differs


def test_an_ensemble_of_a_model_with_itself_equals_the_model(trained_run, tmp_path):
    scan = write_slices(tmp_path / "s", scan_volume(4))
    single = prediction_rows([probability(load_ensemble([trained_run]), scan, precision="fp32")])
    double = prediction_rows([probability(load_ensemble([trained_run, trained_run]), scan, precision="fp32")])
    assert single == double


def test_single_checkpoint_files_answer_for_their_tasks(trained_run):
    [presence] = load_ensemble([trained_run / "presence.pt"])
    presence_member, severity_member = load_ensemble([trained_run / "presence.pt", trained_run / "severity.pt"])
    [last] = load_ensemble([trained_run / "last.pt"])
    assert (presence.presence, presence.severity) == (True, False)
    assert (severity_member.presence, severity_member.severity) == (False, True)
    assert (last.presence, last.severity) == (True, True)  # λ = 0.1 trained both heads


def test_bf16_inference_agrees_with_fp32(trained_run, tmp_path):
    scan = write_slices(tmp_path / "s", scan_volume(5))
    members = load_ensemble([trained_run])
    fp32 = probability(members, scan, precision="fp32")
    bf16 = probability(members, scan, precision="bf16")
    assert bf16.presence[0] == pytest.approx(fp32.presence[0], abs=0.02)


def test_cached_scans_are_used_and_give_the_same_result(trained_run, tmp_path):
    from cov3d.data.preprocess import Size, preprocess_dataset

    scans = tmp_path / "scans"
    scan = write_slices(scans / "x", scan_volume(6))
    members = load_ensemble([trained_run])
    fresh = probability(members, scan, precision="fp32", roots=[scans])
    preprocess_dataset(scans, Size(8, 16), workers=1)  # the default cache, as `cov3d preprocess scans` makes
    from cov3d.inference.predict import _cache_index

    assert _cache_index([scan], Size(8, 16), (-1350.0, 150.0), [scans]) != {}
    cached = probability(members, scan, precision="fp32", roots=[scans])
    assert cached.presence[0] == pytest.approx(fresh.presence[0], abs=2e-3)  # float16 cache
    assert not [p for p in scans.rglob("*") if p.suffix == ".pt"]  # nothing written into the scans


def test_unreadable_scan_is_reported_and_the_others_predicted(trained_run, tmp_path):
    scans = tmp_path / "scans"
    write_slices(scans / "good", scan_volume(7))
    bad = write_slices(scans / "bad", scan_volume(8))
    (bad / "2.jpg").write_bytes(b"broken")
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(scans), str(tmp_path / "nothing"), "--model", str(trained_run),
                                 "--output", str(out), "--workers", "0"])
    assert result.exit_code == 1
    assert [r["scan"] for r in read_rows(out)] == ["good"]
    assert "2 scan(s) failed" in result.output and "2.jpg" in result.output and "does not exist" in result.output


def test_model_that_is_not_a_checkpoint(tmp_path, slice_scan):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    result = runner.invoke(app, ["predict", str(slice_scan), "--model", str(tmp_path / "junk.pt")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "is not a cov3d checkpoint" in result.output
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(Cov3dError, match="is not a cov3d checkpoint"):
        load_ensemble([tmp_path / "other.pt"])
    with pytest.raises(Cov3dError, match="is not a cov3d run directory"):
        load_ensemble([tmp_path])
    with pytest.raises(Cov3dError, match="does not exist"):
        load_ensemble([tmp_path / "missing"])


def test_members_that_disagree_on_outputs(trained_run, tmp_path):
    checkpoint = torch.load(trained_run / "presence.pt", weights_only=True)
    checkpoint["config"]["outputs"] = ["presence", "something", "else"]
    torch.save(checkpoint, tmp_path / "odd.pt")
    with pytest.raises(Cov3dError, match="config key 'outputs' is .*, not the list"):
        load_ensemble([trained_run, tmp_path / "odd.pt"])


def test_thresholds(tmp_path):
    assert parse_threshold("0.3") == 0.3
    (tmp_path / "metrics.json").write_text(json.dumps({"threshold": 0.42}), encoding="utf-8")
    assert parse_threshold(str(tmp_path / "metrics.json")) == 0.42
    with pytest.raises(Cov3dError, match="outside"):
        parse_threshold("1.5")
    with pytest.raises(Cov3dError, match="neither a number nor"):
        parse_threshold("abc")


def test_youden_threshold_on_hand_made_scores():
    truth = [0, 0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.35, 0.6, 0.4, 0.7, 0.8, 0.9]
    # at 0.7: TPR 3/4, FPR 0 -> J 0.75; at 0.4: TPR 1, FPR 1/4 -> J 0.75; the higher threshold wins ties
    assert youden_threshold(truth, scores) == pytest.approx(0.7)
    assert youden_threshold([0, 1, 0, 1], [0.2, 0.8, 0.3, 0.9]) == pytest.approx(0.8)
    with pytest.raises(Cov3dError, match="both covid and non-covid"):
        youden_threshold([1, 1], [0.2, 0.3])


def test_submission_lists_in_natural_order(tmp_path):
    rows = [{"scan": n, "prediction": p, "severity": s} for n, p, s in
            [("s10", "covid", "severe"), ("s2", "covid", "severe"), ("s1", "non-covid", "mild")]]
    write_submission(tmp_path, rows)
    assert (tmp_path / "covid.csv").read_text(encoding="utf-8") == "s2\ns10\n"
    assert (tmp_path / "severe.csv").read_text(encoding="utf-8") == "s2\ns10\n"
    assert (tmp_path / "mild.csv").read_text(encoding="utf-8") == "s1\n"
    assert (tmp_path / "critical.csv").read_text(encoding="utf-8") == ""


def test_find_inputs(tmp_path, slice_scan):
    found, missing = find_inputs([slice_scan, tmp_path / "none"])
    assert found == [slice_scan] and missing == [(str(tmp_path / "none"), "does not exist")]


def test_evaluate_cli_writes_metrics_and_plots(trained_run, dataset, tmp_path):
    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", str(dataset), "--model", str(trained_run), "--output-dir", str(out),
                                 "--threshold", "youden", "--workers", "0"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["scans"] == 2 and metrics["threshold_method"] == "youden" and metrics["threshold_in_sample"]
    assert "in-sample" in result.output
    assert set(metrics["presence"]) == {"macro_f1", "f1", "accuracy", "roc_auc", "confusion_matrix"}
    # the precision each model ran in, and why (auto: chosen from this CPU)
    assert [entry["precision"] for entry in metrics["precision"]] in (["fp32"] * 2, ["bf16"] * 2, ["fp32", "bf16"],
                                                                      ["bf16", "fp32"])
    assert all(entry["precision_reason"] for entry in metrics["precision"])
    rows = read_rows(out / "predictions.csv")
    truth = [1 if r["label"] == "covid" else 0 for r in rows]
    assert metrics["threshold"] == pytest.approx(youden_threshold(truth, [float(r["probability"]) for r in rows]))
    assert all(r["prediction"] == ("covid" if float(r["probability"]) >= metrics["threshold"] else "non-covid")
               for r in rows)
    assert metrics["severity"]["scans"] == 1 and len(metrics["severity"]["confusion_matrix"]) == 4
    for name in ("roc.png", "presence_confusion.png", "severity_confusion.png", "predictions.csv"):
        assert (out / name).stat().st_size > 0
    # the recorded threshold feeds predict
    assert parse_threshold(str(out / "metrics.json")) == pytest.approx(metrics["threshold"])


def test_show_writes_a_png(tmp_path, slice_scan):
    from PIL import Image

    out = tmp_path / "views.png"
    result = runner.invoke(app, ["show", str(slice_scan), "--output", str(out), "--depth", "8", "--width", "16"])
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.width > 600 and image.height > 200


def test_a_threshold_fitted_on_one_split_applies_to_another(trained_run, dataset, tmp_path):
    fitted = runner.invoke(app, ["evaluate", str(dataset), "--model", str(trained_run), "--split", "train",
                                 "--output-dir", str(tmp_path / "train"), "--threshold", "youden", "--workers", "0"])
    assert fitted.exit_code == 0, fitted.output
    applied = runner.invoke(app, ["evaluate", str(dataset), "--model", str(trained_run), "--output-dir",
                                  str(tmp_path / "valid"), "--threshold", str(tmp_path / "train" / "metrics.json"),
                                  "--workers", "0"])
    assert applied.exit_code == 0, applied.output
    train = json.loads((tmp_path / "train" / "metrics.json").read_text(encoding="utf-8"))
    valid = json.loads((tmp_path / "valid" / "metrics.json").read_text(encoding="utf-8"))
    assert valid["threshold"] == train["threshold"] and valid["threshold_method"] == "given"
    assert not valid["threshold_in_sample"]


@pytest.mark.parametrize("command", ["predict", "evaluate", "show"])
def test_unwritable_outputs_fail_before_any_work(trained_run, dataset, slice_scan, tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("x", encoding="utf-8")
    target = str(blocker / ("out.png" if command == "show" else "out"))  # below a file: never writable
    args = {"predict": ["predict", str(slice_scan), "--model", str(trained_run), "--output", target],
            "evaluate": ["evaluate", str(dataset), "--model", str(trained_run), "--output-dir", target],
            "show": ["show", str(slice_scan), "--output", target]}[command]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"cannot write '{target}'" in result.output and "Predicted" not in result.output


def test_predict_submission_folder_that_is_a_file(trained_run, slice_scan, tmp_path):
    (tmp_path / "sub").write_text("x", encoding="utf-8")
    result = runner.invoke(app, ["predict", str(slice_scan), "--model", str(trained_run), "--output",
                                 str(tmp_path / "p.csv"), "--submission", str(tmp_path / "sub")])
    assert result.exit_code == 1 and "is a file, not a folder" in result.output


def test_predict_where_every_scan_fails_keeps_the_old_csv(trained_run, tmp_path):
    bad = write_slices(tmp_path / "scans" / "bad", scan_volume(8))
    (bad / "2.jpg").write_bytes(b"broken")
    out = tmp_path / "p.csv"
    out.write_text("scan,probability\nold,0.9\n", encoding="utf-8")
    result = runner.invoke(app, ["predict", str(tmp_path / "scans"), "--model", str(trained_run), "--output",
                                 str(out), "--workers", "0"])
    assert result.exit_code == 1 and "No scan could be predicted" in result.output
    assert out.read_text(encoding="utf-8") == "scan,probability\nold,0.9\n"


def test_evaluate_where_every_scan_fails_lists_them(trained_run, dataset, tmp_path):
    for scan in (dataset / "validation").glob("*/*"):
        (scan / "0.jpg").write_bytes(b"broken")
    result = runner.invoke(app, ["evaluate", str(dataset), "--model", str(trained_run), "--output-dir",
                                 str(tmp_path / "ev"), "--workers", "0"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "No scan of the validation split could be predicted" in result.output
    assert "2 scan(s) failed" in result.output and "ct_scan_2" in result.output
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_an_ensemble_of_severity_checkpoints_alone_gives_p_covid(trained_run, dataset, slice_scan, tmp_path):
    members = load_ensemble([trained_run / "severity.pt"])
    assert members[0].presence and members[0].severity
    prediction = probability(members, slice_scan)
    assert 0.0 <= prediction.presence[0] <= 1.0
    result = runner.invoke(app, ["evaluate", str(dataset), "--model", str(trained_run / "severity.pt"),
                                 "--output-dir", str(tmp_path / "ev"), "--workers", "0"])
    assert result.exit_code == 0, result.output
