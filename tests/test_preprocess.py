import os
import stat

import numpy as np
import pytest
import torch
from conftest import SHARED_DICOM, write_slices

from cov3d.atomic import save_torch
from cov3d.errors import Cov3dError
from cov3d.data.preprocess import (
    MANIFEST_COLUMNS, Size, default_cache_dir, load_cached, preprocess_dataset,
    read_manifest, resolve_size,
)

SIZE = Size(depth=8, width=16)


def test_resolve_size():
    assert resolve_size("small") == Size(64, 128)
    assert resolve_size("medium") == Size(128, 256)
    assert resolve_size("large") == Size(160, 320)
    assert resolve_size("large", depth=10) == Size(10, 320)
    assert resolve_size("small", depth=16, width=32).name == "16x32x32"
    with pytest.raises(Cov3dError, match="size 'huge' is not one of small, medium, large"):
        resolve_size("huge")


def test_dataset_is_cached_with_manifest(dataset, tmp_path):
    cache = tmp_path / "cache"
    report = preprocess_dataset(dataset, SIZE, cache, workers=1)
    assert (report.total, report.processed, report.skipped, report.failures) == (6, 6, 0, [])
    assert report.manifest == cache / "8x16x16" / "manifest.csv"
    rows = {row["path"]: row for row in read_manifest(report.manifest)}
    assert list(read_manifest(report.manifest)[0]) == MANIFEST_COLUMNS
    row = rows["train/covid/ct_scan_0"]
    assert (row["split"], row["label"], row["severity"], row["slices"]) == ("train", "covid", "2", "5")
    assert rows["train/non-covid/ct_scan_0"]["label"] == "non-covid"
    assert rows["test/ct_scan_9"]["label"] == "" and rows["test/ct_scan_9"]["severity"] == ""
    tensor = load_cached(report.manifest.parent / row["cache"])
    assert tensor.shape == (1, 8, 16, 16) and tensor.dtype == torch.float16
    assert tensor.element_size() <= 2
    assert 0.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0
    # the cache mirrors the data's relative paths, outside the data
    assert (cache / "8x16x16" / "train" / "covid" / "ct_scan_0.pt").is_file()
    assert not any(p.suffix == ".pt" for p in dataset.rglob("*"))


def test_constant_scan_stays_constant_in_cache(tmp_path):
    scan = write_slices(tmp_path / "scan", np.full((5, 30, 30), 128, dtype=np.uint8), suffix=".png")
    report = preprocess_dataset(scan, SIZE, tmp_path / "cache", workers=1)
    tensor = load_cached(report.manifest.parent / "scan.pt").float()
    np.testing.assert_allclose(tensor.numpy(), 128 / 255, atol=1e-3)


def test_rerun_skips_up_to_date_and_redoes_changed(dataset, tmp_path):
    cache = tmp_path / "cache"
    preprocess_dataset(dataset, SIZE, cache, workers=1)
    again = preprocess_dataset(dataset, SIZE, cache, workers=1)
    assert (again.processed, again.skipped) == (0, 6)
    write_slices(dataset / "train" / "covid" / "ct_scan_1", np.zeros((9, 20, 20), dtype=np.uint8))
    changed = preprocess_dataset(dataset, SIZE, cache, workers=1)
    assert (changed.processed, changed.skipped) == (1, 5)
    rows = {row["path"]: row for row in read_manifest(changed.manifest)}
    assert rows["train/covid/ct_scan_1"]["slices"] == "9"
    forced = preprocess_dataset(dataset, SIZE, cache, workers=1, overwrite=True)
    assert (forced.processed, forced.skipped) == (6, 0)


def test_a_failing_scan_is_reported_and_the_others_kept(dataset, tmp_path):
    (dataset / "train" / "covid" / "ct_scan_1" / "3.jpg").write_bytes(b"broken")
    report = preprocess_dataset(dataset, SIZE, tmp_path / "cache", workers=1)
    assert report.processed == 5
    [(path, reason)] = report.failures
    assert path == "train/covid/ct_scan_1" and "3.jpg' cannot be read" in reason
    assert "train/covid/ct_scan_1" not in {r["path"] for r in read_manifest(report.manifest)}


def test_parallel_workers_match_serial(dataset, tmp_path):
    serial = preprocess_dataset(dataset, SIZE, tmp_path / "a", workers=1)
    parallel = preprocess_dataset(dataset, SIZE, tmp_path / "b", workers=2)
    assert parallel.processed == 6 and not parallel.failures
    for row in read_manifest(serial.manifest):
        a = load_cached(serial.manifest.parent / row["cache"])
        b = load_cached(parallel.manifest.parent / row["cache"])
        torch.testing.assert_close(a, b)


def test_parallel_failure_is_reported(dataset, tmp_path):
    (dataset / "test" / "ct_scan_9" / "0.jpg").write_bytes(b"")
    report = preprocess_dataset(dataset, SIZE, tmp_path / "cache", workers=2)
    assert [p for p, _ in report.failures] == ["test/ct_scan_9"] and report.processed == 5


def test_interrupted_run_leaves_no_partial_file_and_resumes(dataset, tmp_path, monkeypatch):
    import cov3d.data.preprocess as module

    calls = {"n": 0}
    real = module._work

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(module, "_work", flaky)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        preprocess_dataset(dataset, SIZE, cache, workers=1)
    folder = cache / "8x16x16"
    assert len(read_manifest(folder / "manifest.csv")) == 2  # the finished scans were recorded
    assert not [p for p in folder.rglob("*") if ".tmp" in p.name]
    monkeypatch.setattr(module, "_work", real)
    resumed = preprocess_dataset(dataset, SIZE, cache, workers=1)
    assert (resumed.processed, resumed.skipped) == (4, 2)


def test_save_torch_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "x.pt"
    save_torch(torch.ones(1, 2, 2, 2), target)

    def boom(obj, f):
        f.write(b"half")  # save_torch hands torch a file object, so that a full disk is an OSError
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_torch(torch.zeros(1, 2, 2, 2), target)
    monkeypatch.undo()
    torch.testing.assert_close(load_cached(target), torch.ones(1, 2, 2, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_default_cache_is_outside_the_data(dataset, tmp_path):
    cache = default_cache_dir(dataset)
    assert cache.is_relative_to(tmp_path / "default-cache")  # COV3D_CACHE, set by conftest
    assert not cache.resolve().is_relative_to(dataset.resolve())
    report = preprocess_dataset(dataset, SIZE, workers=1)
    assert report.manifest.parent.parent == cache


def test_cache_inside_data_is_refused(dataset):
    with pytest.raises(Cov3dError, match="is inside the data"):
        preprocess_dataset(dataset, SIZE, dataset / "cache")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_cache(dataset, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(Cov3dError, match="is not writable"):
        preprocess_dataset(dataset, SIZE, locked / "cache")


def test_cache_path_that_is_a_file_is_unwritable(dataset, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(Cov3dError, match="is not writable"):
        preprocess_dataset(dataset, SIZE, tmp_path / "file" / "cache")


@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason="shared chest CT DICOM series not present")
def test_real_dicom_series_preprocessed(tmp_path):
    report = preprocess_dataset(SHARED_DICOM, Size(16, 32), tmp_path / "cache", workers=1)
    [row] = read_manifest(report.manifest)
    assert (row["source"], row["slices"], row["height"], row["width"]) == ("dicom", "64", "512", "512")
    assert row["window"] == "-1350,150"
    tensor = load_cached(report.manifest.parent / row["cache"])
    assert tensor.shape == (1, 16, 32, 32)


def test_a_damaged_cache_file_is_redone_and_never_unpickled(dataset, tmp_path):
    import pickle

    first = preprocess_dataset(dataset, SIZE, tmp_path / "cache", workers=1)
    rows = read_manifest(first.manifest)
    damaged = first.manifest.parent / rows[0]["cache"]
    foreign = first.manifest.parent / rows[1]["cache"]
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    foreign.write_bytes(pickle.dumps(Boom()))  # not a tensor, and code if unpickled
    for path in (damaged, foreign):
        with pytest.raises(Cov3dError, match=rf"cache file '.*{path.name}' (is damaged|does not hold)"):
            load_cached(path)
    again = preprocess_dataset(dataset, SIZE, tmp_path / "cache", workers=1)
    assert again.processed == 2 and again.skipped == 4  # both redone, not reported as up to date
    assert load_cached(damaged).shape == (1, 8, 16, 16) and load_cached(foreign).shape == (1, 8, 16, 16)
    assert not (tmp_path / "pwned").exists()


def test_temporary_files_of_killed_writers_are_removed(dataset, tmp_path):
    first = preprocess_dataset(dataset, SIZE, tmp_path / "cache", workers=1)
    folder = first.manifest.parent
    dead = folder / "train" / ".ct_scan_0.999999999.tmp.pt"  # no such process
    alive = folder / f".other.{os.getpid()}.tmp.pt"  # this process: still writing
    dead.write_bytes(b"x" * 1000)
    alive.write_bytes(b"x")
    preprocess_dataset(dataset, SIZE, tmp_path / "cache", workers=1)
    assert not dead.exists() and alive.exists()
