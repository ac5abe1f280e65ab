"""Issue 19, for inference, preprocessing and the cache: non-finite values, full disks, Ctrl-C, messy inputs.

Full disks are real ENOSPC: the temporary file a write goes through is made a link to /dev/full
beforehand (Linux), so the write fails as on a full disk without filling one.
"""

import csv
import json
import logging
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import multiprocessing
import numpy as np
import pytest
import torch
from conftest import make_dataset, write_slices
from typer.testing import CliRunner

from cov3d import atomic
from cov3d.cli import app
from cov3d.data.catalog import read_severity_csv
from cov3d.data.preprocess import Size, load_cached, preprocess_dataset, read_manifest
from cov3d.errors import Cov3dError
from cov3d.inference import predict as predict_module
from cov3d.inference.predict import (
    PredictionFile, find_inputs, load_ensemble, predict_scans, prediction_rows, resume_record, write_submission,
)
from cov3d.inference.predict import Prediction

runner = CliRunner()
PREPROCESS_VOLUME = predict_module.preprocess_volume
SIZE = Size(depth=8, width=16)
FULL = Path("/dev/full")
needs_dev_full = pytest.mark.skipif(not FULL.exists(), reason="no /dev/full to stand in for a full disk")


def scan_volume(seed=0, depth=6, size=20):
    return np.random.default_rng(seed).integers(0, 255, size=(depth, size, size), dtype=np.uint8)


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def full_disk_at(target: Path) -> Path:
    """Make the next atomic write of `target` by this process hit a full disk; return the temporary's link."""
    suffix = target.suffix
    temporary = target.with_name(f".{target.name[: len(target.name) - len(suffix)]}.{os.getpid()}.tmp{suffix}")
    temporary.parent.mkdir(parents=True, exist_ok=True)
    temporary.symlink_to(FULL)
    return temporary


def three_scans(root: Path) -> Path:
    for i, name in enumerate(["s1", "s2", "s3"]):
        write_slices(root / name, scan_volume(i))
    return root


# --- 1. non-finite values never become predictions ---


def test_a_model_with_a_nan_output_fails_the_scan(trained_run, tmp_path):
    scan = write_slices(tmp_path / "s", scan_volume(1))
    members = load_ensemble([trained_run])
    with torch.no_grad():
        next(members[0].model.parameters()).fill_(float("nan"))  # loaded, then broken: the checkpoint was fine
    predictions, failures = predict_scans([scan], members, workers=0, precision="fp32")
    assert predictions == []
    [(path, reason)] = failures
    assert path == str(scan) and "gave a NaN or infinite output for it" in reason and "presence.pt" in reason


def test_a_cache_entry_with_nan_voxels_is_not_used(tmp_path, caplog):
    from cov3d.data.readers import DEFAULT_WINDOW

    scans = tmp_path / "scans"
    scan = write_slices(scans / "x", scan_volume(2))
    report = preprocess_dataset(scans, SIZE, workers=1)  # the default cache, which predict reads
    [row] = read_manifest(report.manifest)
    cached = report.manifest.parent / row["cache"]
    good = load_cached(cached).float()
    torch.save(torch.full((1, 8, 16, 16), float("nan"), dtype=torch.float16), cached)  # as an older cov3d wrote
    dataset = predict_module._CachedOrFresh([scan], [(SIZE, DEFAULT_WINDOW, "off")], [scans])
    assert dataset.cached[0] == {scan: cached}
    with caplog.at_level(logging.WARNING):
        _, [tensor], reason = dataset[0]
    assert reason == "" and "holds 2048 NaN or infinite value(s); preprocessing" in caplog.text
    torch.testing.assert_close(tensor, good, atol=1e-3, rtol=0)  # read from the scan instead


def test_a_scan_with_nan_voxels_is_a_failure_not_a_nan_row(trained_run, tmp_path):
    import SimpleITK as sitk

    hu = np.full((6, 20, 20), -500.0, dtype=np.float32)
    hu[2, 3:9, 3:9] = np.nan
    (tmp_path / "scans").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(hu), str(tmp_path / "scans" / "nan.mha"))
    write_slices(tmp_path / "scans" / "good", scan_volume(3))
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(tmp_path / "scans"), "--model", str(trained_run), "--output", str(out),
                                 "--workers", "0"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "1 scan(s) failed" in result.output and "nan.mha" in result.output
    [row] = read_rows(out)
    assert row["scan"] == "good" and np.isfinite(float(row["probability"]))


def test_evaluate_lists_a_non_finite_scan_as_failed(trained_run, dataset, tmp_path, monkeypatch):
    real = PREPROCESS_VOLUME

    def nan_for_one(scan, *args, **kwargs):
        tensor, meta = real(scan, *args, **kwargs)
        return (torch.full_like(tensor, float("nan")) if Path(scan).name == "ct_scan_2" else tensor), meta

    monkeypatch.setattr(predict_module, "preprocess_volume", nan_for_one)
    out = tmp_path / "ev"
    result = runner.invoke(app, ["evaluate", str(dataset), "--model", str(trained_run), "--output-dir", str(out),
                                 "--workers", "0"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "1 scan(s) failed" in result.output and "NaN or infinite voxel(s)" in result.output
    [row] = read_rows(out / "predictions.csv")
    assert row["scan"] == "ct_scan_3" and np.isfinite(float(row["probability"]))
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["failed"] == 1


# --- 4. full disks: one line naming the file, nothing existing replaced ---


def test_write_failed_names_the_file_and_pickles():
    import errno
    import pickle

    error = atomic.WriteFailed(errno.ENOSPC, "No space left on device", "/x/y.pt")
    assert str(error) == "cannot write '/x/y.pt': no space left on device" and error.device
    assert isinstance(error, Cov3dError) and isinstance(error, OSError)
    again = pickle.loads(pickle.dumps(error))  # a worker process sends it back to the parent
    assert str(again) == str(error) and again.errno == errno.ENOSPC


def test_a_full_disk_at_the_rename_keeps_the_old_file(tmp_path, monkeypatch):
    import errno

    target = tmp_path / "rows.csv"
    atomic.write_csv(target, ["a"], [{"a": 1}])

    def full(source, destination):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "replace", full)
    with pytest.raises(atomic.WriteFailed, match=r"cannot write '.*rows.csv': no space left on device"):
        atomic.write_csv(target, ["a"], [{"a": 2}])
    monkeypatch.undo()
    assert read_rows(target) == [{"a": "1"}] and [p.name for p in tmp_path.iterdir()] == ["rows.csv"]


@needs_dev_full
def test_save_torch_names_the_full_disk_that_torch_reports_as_a_runtime_error(tmp_path, monkeypatch):
    target = tmp_path / "x.pt"
    atomic.save_torch(torch.ones(2), target)
    full_disk_at(target)

    def zip_writer(obj, f):  # as torch's: a failed write of the file object comes back as its own error
        try:
            f.write(b"\0" * 100_000)
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    monkeypatch.setattr(torch, "save", zip_writer)
    with pytest.raises(atomic.WriteFailed, match=r"cannot write '.*x.pt': no space left on device$"):
        atomic.save_torch(torch.zeros(2), target)
    monkeypatch.undo()
    torch.testing.assert_close(torch.load(target, weights_only=True), torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


@needs_dev_full
def test_preprocess_on_a_full_disk_stops_with_one_line_and_keeps_the_old_cache(dataset, tmp_path):
    cache = tmp_path / "cache"
    first = preprocess_dataset(dataset, SIZE, cache, workers=1)
    old = load_cached(first.manifest.parent / "train" / "covid" / "ct_scan_1.pt")
    write_slices(dataset / "train" / "covid" / "ct_scan_1", np.zeros((9, 20, 20), dtype=np.uint8))  # to redo
    full_disk_at(first.manifest.parent / "train" / "covid" / "ct_scan_1.pt")
    result = runner.invoke(app, ["preprocess", str(dataset), "--cache", str(cache), "--depth", "8", "--width", "16",
                                 "--workers", "1"])
    assert result.exit_code == 1 and "Traceback" not in result.output and "RuntimeError" not in result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert "ct_scan_1.pt': no space left on device; preprocessing stopped: the 5 scan(s) cached so far are " \
           "recorded in" in line
    torch.testing.assert_close(load_cached(first.manifest.parent / "train" / "covid" / "ct_scan_1.pt"), old)
    assert "train/covid/ct_scan_1" not in {r["path"] for r in read_manifest(first.manifest)}  # no longer up to date
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name]


@needs_dev_full
def test_preprocess_whose_manifest_cannot_be_written_keeps_the_old_one(dataset, tmp_path):
    cache = tmp_path / "cache"
    first = preprocess_dataset(dataset, SIZE, cache, workers=1)
    before = first.manifest.read_bytes()
    full_disk_at(first.manifest)
    with pytest.raises(Cov3dError, match=r"cannot write '.*manifest.csv': no space left on device; the 6 scan\(s\) "
                                         "preprocessed in this run are cached but not recorded"):
        preprocess_dataset(dataset, SIZE, cache, workers=1, overwrite=True)
    assert first.manifest.read_bytes() == before


@needs_dev_full
def test_predict_on_a_full_disk_keeps_the_csv_and_resumes(trained_run, tmp_path):
    scans = three_scans(tmp_path / "scans")
    out = tmp_path / "p.csv"
    out.write_text("scan,probability\nold,0.9\n", encoding="utf-8")
    full_disk_at(out)
    command = ["predict", str(scans), "--model", str(trained_run), "--output", str(out), "--workers", "0"]
    result = runner.invoke(app, command)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"cannot write '{out}': no space left on device; it was left as it was" in result.output
    assert out.read_text(encoding="utf-8") == "scan,probability\nold,0.9\n"
    # Space again: the same command keeps what the record beside it holds (written before the CSV). The write
    # failed at the end, or at a save every few seconds on the way, where the run then stopped.
    settings = json.loads(resume_record(out).read_text(encoding="utf-8"))["settings"]
    todo = PredictionFile(out, settings).start(find_inputs([scans])[0])
    assert [p.name for p in todo] in ([], ["s3"])


# --- 5. Ctrl-C: no worker tracebacks, and the truth about what was kept ---


def _sigint_handler_in(pool):
    with pool:
        return pool.submit(signal.getsignal, signal.SIGINT).result()


def test_preprocess_workers_leave_ctrl_c_to_the_parent():
    from cov3d.data.preprocess import _pool, _sigint_ignored

    def plain():
        return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    # A Ctrl-C reaches every process of the group: workers that answered it would print tracebacks.
    assert _sigint_handler_in(plain()) is signal.default_int_handler  # what a worker does by default
    assert _sigint_handler_in(_pool(1)) is signal.SIG_IGN
    with _sigint_ignored():  # while workers start (and import torch), they inherit SIGINT ignored
        assert _sigint_handler_in(plain()) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_preprocess_ctrl_c_says_what_was_kept(dataset, tmp_path, monkeypatch):
    import cov3d.data.preprocess as module

    calls, real = [], module._work

    def interrupted_at_the_third(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(module, "_work", interrupted_at_the_third)
    result = runner.invoke(app, ["preprocess", str(dataset), "--cache", str(tmp_path / "c"), "--depth", "8",
                                 "--width", "16", "--workers", "1"])
    assert result.exit_code == 130 and "Traceback" not in result.output
    manifest = tmp_path / "c" / "8x16x16" / "manifest.csv"
    assert f"Interrupted. 2 of 6 scan(s) are cached and recorded in {manifest}; run the same command again" \
           in result.output.replace("\n", "")
    assert len(read_manifest(manifest)) == 2


def _interrupt_after(monkeypatch, count):
    """preprocess_volume raises KeyboardInterrupt when asked for scan number `count` + 1."""
    real, read = PREPROCESS_VOLUME, []

    def reading(scan, *args, **kwargs):
        if len(read) == count:
            raise KeyboardInterrupt
        read.append(scan)
        return real(scan, *args, **kwargs)

    monkeypatch.setattr(predict_module, "preprocess_volume", reading)
    return read


def test_predict_ctrl_c_keeps_the_finished_rows_and_the_same_command_resumes(trained_run, tmp_path, monkeypatch):
    scans = three_scans(tmp_path / "scans")
    out = tmp_path / "p.csv"
    command = ["predict", str(scans), "--model", str(trained_run), "--output", str(out), "--workers", "0",
               "--batch-size", "1"]
    _interrupt_after(monkeypatch, 2)
    result = runner.invoke(app, command)
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert f"Interrupted. '{out}' holds the 2 scan(s) predicted so far; run the same command again to predict " \
           "the other 1." in result.output.replace("\n", "")
    first = read_rows(out)
    assert [r["scan"] for r in first] == ["s1", "s2"]
    read = _interrupt_after(monkeypatch, 99)
    again = runner.invoke(app, command)
    assert again.exit_code == 0, again.output
    assert "Resuming: 2 of 3 scan(s)" in again.output and [p.name for p in read] == ["s3"]
    rows = read_rows(out)
    assert [r["scan"] for r in rows] == ["s1", "s2", "s3"] and rows[:2] == first


SETTINGS = {"models": [{"path": "/run/presence.pt", "file": "1:2", "tasks": [True, False]}], "tta": True,
            "threshold": 0.5, "precision": "auto"}


def finished_file(tmp_path, scans, settings=SETTINGS):
    """A predictions CSV of `scans` with its record, as a finished run leaves it."""
    out = tmp_path / "p.csv"
    record = PredictionFile(out, settings)
    record.start(scans)
    record.add(prediction_rows([Prediction(scan, presence=[0.1 * (i + 1)]) for i, scan in enumerate(scans)],
                               settings["threshold"]))
    record.save()
    return out


def test_predict_resumes_only_the_same_settings(tmp_path, caplog):
    scans = find_inputs([three_scans(tmp_path / "scans")])[0]
    out = finished_file(tmp_path, scans[:2])
    assert [r["scan"] for r in read_rows(out)] == ["s1", "s2"]
    assert PredictionFile(out, SETTINGS).start(scans) == scans[2:]  # the same command: the third only
    write_slices(scans[1], scan_volume(9))  # changed since: predicted again
    assert PredictionFile(out, SETTINGS).start(scans) == scans[1:]
    assert PredictionFile(out, SETTINGS, fresh=True).start(scans) == scans  # --fresh
    with caplog.at_level(logging.WARNING):
        assert PredictionFile(out, {**SETTINGS, "threshold": 0.25}).start(scans) == scans
    assert f"'{out}' holds predictions made with threshold 0.5; every scan is predicted again" in caplog.text
    with caplog.at_level(logging.WARNING):
        assert PredictionFile(out, {**SETTINGS, "models": []}).start(scans) == scans
    assert "holds predictions made with other models" in caplog.text
    resume_record(out).write_text("{not json", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        assert PredictionFile(out, SETTINGS).start(scans) == scans
    assert "is damaged; every scan is predicted again" in caplog.text


def test_predict_lists_exactly_the_scans_given_in_their_order(tmp_path):
    scans = find_inputs([three_scans(tmp_path / "scans")])[0]
    out = finished_file(tmp_path, scans)
    record = PredictionFile(out, SETTINGS)
    assert record.start([scans[2], scans[0]]) == [] and record.kept == 2
    record.save()
    assert [r["scan"] for r in read_rows(out)] == ["s3", "s1"]


def test_predict_replaces_a_csv_it_has_no_record_of(tmp_path, caplog):
    scans = find_inputs([three_scans(tmp_path / "scans")])[0]
    out = tmp_path / "p.csv"
    out.write_text("scan,probability\nold,0.9\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        record = PredictionFile(out, SETTINGS)
    assert record.start(scans) == scans and "exists without the record of the cov3d run that wrote it" in caplog.text
    record.save()  # nothing predicted: the old file stays
    assert out.read_text(encoding="utf-8") == "scan,probability\nold,0.9\n"


def test_evaluate_ctrl_c_says_nothing_was_written(trained_run, dataset, tmp_path, monkeypatch):
    _interrupt_after(monkeypatch, 1)
    out = tmp_path / "ev"
    result = runner.invoke(app, ["evaluate", str(dataset), "--model", str(trained_run), "--output-dir", str(out),
                                 "--workers", "0"])
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert f"Interrupted. Nothing was written: evaluate writes '{out}' once every scan is scored" \
           in result.output.replace("\n", "")
    assert "Finished work is kept" not in result.output and not (out / "metrics.json").exists()


# --- 6. predict inputs ---


def test_a_file_that_is_not_a_scan_is_a_failure_and_the_rest_found(tmp_path):
    scans = tmp_path / "test"
    write_slices(scans / "ct_scan_1", scan_volume(4))
    (scans / "README.txt").write_text("the test split", encoding="utf-8")
    found, missing = find_inputs(sorted(scans.iterdir()))  # test/*: the CLI lists `missing` among its failures
    assert found == [scans / "ct_scan_1"]
    assert missing == [(str(scans / "README.txt"), "is not a scan: no reader takes this kind of file (volume "
                                                   "files, DICOM files, images and folders of them are scans)")]


def test_a_scan_given_twice_is_predicted_once(tmp_path, monkeypatch, caplog):
    write_slices(tmp_path / "scans" / "a", scan_volume(5))
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        found, missing = find_inputs([Path("scans/a"), tmp_path / "scans" / "a", tmp_path / "scans"])
    assert found == [Path("scans/a")] and missing == []
    assert f"scans/a and {tmp_path / 'scans' / 'a'} are the same scan; it is predicted once" in caplog.text


def test_duplicate_names_in_the_submission_lists_are_warned_of(tmp_path, caplog):
    rows = [{"scan": "ct_scan_1", "path": "a/ct_scan_1", "prediction": "covid", "severity": "mild"},
            {"scan": "ct_scan_1", "path": "b/ct_scan_1", "prediction": "non-covid", "severity": ""}]
    with caplog.at_level(logging.WARNING):
        write_submission(tmp_path / "sub", rows)
    assert "two scans are named 'ct_scan_1': a/ct_scan_1 and b/ct_scan_1" in caplog.text


# --- 7. the cache ---


@pytest.mark.parametrize("content, reason", [(b"\xff\xfe\x00garbage\x81", "not UTF-8 text"),
                                             (b"a,b\n1,2\n", "its columns are 'a', 'b', not cov3d's")])
def test_a_damaged_or_foreign_manifest_is_rebuilt_from_the_cached_files(dataset, tmp_path, caplog, content, reason):
    cache = tmp_path / "cache"
    first = preprocess_dataset(dataset, SIZE, cache, workers=1)
    # changed after it was cached: its cache file is older than its slices, and is not taken
    write_slices(dataset / "train" / "covid" / "ct_scan_1", np.zeros((9, 20, 20), dtype=np.uint8))
    first.manifest.write_bytes(content)
    with pytest.raises(Cov3dError, match=f"manifest '.*manifest.csv' is damaged \\({reason}"):
        read_manifest(first.manifest)
    with caplog.at_level(logging.WARNING):
        again = preprocess_dataset(dataset, SIZE, cache, workers=1)
    assert f"is damaged ({reason}" in caplog.text
    assert "rebuilding it from the 5 whole cached scan file(s) newer than their scans" in caplog.text
    assert (again.skipped, again.processed, again.failures) == (5, 1, [])
    assert len(read_manifest(again.manifest)) == 6
    assert (first.manifest.parent / "manifest.csv.damaged").read_bytes() == content


def test_predict_ignores_a_damaged_default_cache(tmp_path, caplog):
    from cov3d.data.readers import DEFAULT_WINDOW

    scans = tmp_path / "scans"
    scan = write_slices(scans / "x", scan_volume(6))
    report = preprocess_dataset(scans, SIZE, workers=1)
    assert predict_module._cache_index([scan], SIZE, DEFAULT_WINDOW, [scans]) != {}
    report.manifest.write_bytes(b"\xff\xfe")
    with caplog.at_level(logging.WARNING):
        assert predict_module._cache_index([scan], SIZE, DEFAULT_WINDOW, [scans]) == {}  # preprocessed instead
    assert "is damaged (not UTF-8 text)" in caplog.text and "its cached scans are not used" in caplog.text


def test_one_cache_shared_by_two_data_paths_keeps_both(tmp_path, caplog):
    first, second = make_dataset(tmp_path / "one"), make_dataset(tmp_path / "two")
    cache = tmp_path / "cache"
    a = preprocess_dataset(first, SIZE, cache, workers=1)
    with caplog.at_level(logging.WARNING):
        b = preprocess_dataset(second, SIZE, cache, workers=1)
    assert a.manifest == cache / "8x16x16" / "manifest.csv" and b.manifest != a.manifest
    assert b.manifest.parent.parent.parent == cache and "holds the cache of another data path" in caplog.text
    assert len(read_manifest(a.manifest)) == 6 and len(read_manifest(b.manifest)) == 6
    assert {r["root"] for r in read_manifest(b.manifest)} == {str(second.resolve())}
    assert preprocess_dataset(first, SIZE, cache, workers=1).skipped == 6  # each finds its own again
    assert preprocess_dataset(second, SIZE, cache, workers=1).skipped == 6


# --- severity CSVs ---


@pytest.mark.parametrize("text", ["\nName;Category\nct_scan_0;2\n", "\n\n  \nName,Category\nct_scan_0,2\n",
                                  "\nct_scan_0;2\n"])
def test_a_severity_csv_may_start_with_blank_lines(tmp_path, text):
    path = tmp_path / "sev.csv"
    path.write_text(text, encoding="utf-8")
    assert {name: category for name, (category, _) in read_severity_csv(path).items()} == {"ct_scan_0": 2}
