import pytest
from conftest import write_nifti, write_slices

import numpy as np

from cov3d.data.catalog import catalog, read_severity_csv
from cov3d.errors import Cov3dError


def test_dataset_layout_labels_and_severity(dataset):
    records = {r.path: r for r in catalog(dataset)}
    assert set(records) == {
        "train/covid/ct_scan_0", "train/covid/ct_scan_1", "train/non-covid/ct_scan_0",
        "validation/covid/ct_scan_2", "validation/non_covid/ct_scan_3", "test/ct_scan_9",
    }
    # same name in two folders: two scans, keyed by path
    assert records["train/covid/ct_scan_0"].label == "covid"
    assert records["train/covid/ct_scan_0"].severity == 2
    assert records["train/non-covid/ct_scan_0"].label == "non-covid"
    assert records["train/non-covid/ct_scan_0"].severity is None
    assert records["train/covid/ct_scan_1"].severity == 4
    assert records["validation/covid/ct_scan_2"].severity == 1
    assert records["validation/non_covid/ct_scan_3"].label == "non-covid"
    assert records["test/ct_scan_9"].split == "test" and records["test/ct_scan_9"].label == ""
    assert all(r.kind == "slices" for r in records.values())


def test_single_scan_and_plain_folder(tmp_path, slice_scan):
    [record] = catalog(slice_scan)
    assert record.path == "." and record.split == "" and record.label == ""
    write_nifti(tmp_path / "scans" / "a.nii.gz", np.zeros((3, 8, 8)))
    write_slices(tmp_path / "scans" / "nested" / "b", np.zeros((2, 8, 8)))
    assert [r.path for r in catalog(tmp_path / "scans")] == ["a.nii.gz", "nested/b"]


def test_severity_csv_given_explicitly(dataset, tmp_path):
    other = tmp_path / "sev.csv"
    other.write_text("ct_scan_1;3\n")
    records = {r.path: r for r in catalog(dataset, {"train": other})}
    assert records["train/covid/ct_scan_1"].severity == 3
    assert records["train/covid/ct_scan_0"].severity is None


def test_severity_csv_without_header_and_with_commas(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("a,1\nb,4\n\n")
    assert read_severity_csv(path) == {"a": (1, 1), "b": (4, 2)}


def test_unknown_severity_name(dataset):
    (dataset / "train_partition_covid_categories.csv").write_text("Name;Category\nct_scan_0;2\nghost;1\n")
    with pytest.raises(Cov3dError, match=r"train_partition_covid_categories.csv, line 3: scan 'ghost' is not in"):
        catalog(dataset)


def test_severity_name_of_a_non_covid_scan_is_unknown(dataset):
    (dataset / "val_partition_covid_categories.csv").write_text("ct_scan_3;1\n")
    with pytest.raises(Cov3dError, match="scan 'ct_scan_3' is not in the validation split's covid folder"):
        catalog(dataset)


def test_unknown_severity_category(dataset):
    (dataset / "train_partition_covid_categories.csv").write_text("Name;Category\nct_scan_0;5\n")
    with pytest.raises(Cov3dError, match=r"line 2: unknown severity category '5'"):
        catalog(dataset)


def test_malformed_severity_row(dataset):
    (dataset / "train_partition_covid_categories.csv").write_text("ct_scan_0\n")
    with pytest.raises(Cov3dError, match=r"line 1: expected 'Name;Category'"):
        catalog(dataset)


def test_missing_data(tmp_path):
    with pytest.raises(Cov3dError, match="does not exist"):
        catalog(tmp_path / "nothing")


def test_empty_data_folder(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(Cov3dError, match="is empty"):
        catalog(tmp_path / "d")


def test_folder_without_scans(tmp_path):
    (tmp_path / "d" / "x").mkdir(parents=True)
    (tmp_path / "d" / "x" / "notes.txt").write_text("hi")
    with pytest.raises(Cov3dError, match="no scans found"):
        catalog(tmp_path / "d")


def test_unsupported_data_file(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(Cov3dError, match="unsupported file type"):
        catalog(tmp_path / "a.txt")


def test_a_lone_image_beside_scans_is_skipped_with_a_warning(dataset, caplog):
    import logging

    write_slices(dataset, np.zeros((1, 8, 8), dtype=np.uint8), names=["overview.png"])
    write_slices(dataset / "train" / "covid", np.zeros((1, 8, 8), dtype=np.uint8), names=["montage.png"])
    with caplog.at_level(logging.WARNING):
        records = catalog(dataset)
    assert len(records) == 6 and not any(r.path.endswith(".png") for r in records)
    assert "overview.png" in caplog.text and "montage.png" in caplog.text


def test_symbolic_link_loops_find_each_scan_once(tmp_path):
    root = tmp_path / "data"
    for i in range(10):
        write_slices(root / "scans" / f"s{i}", np.zeros((2, 8, 8), dtype=np.uint8))
    (root / "scans" / "loop").symlink_to(root)  # a link back to the top
    (root / "again").symlink_to(root / "scans" / "s3")  # a second way to one scan
    found = [r.path for r in catalog(root)]
    assert len(found) == 10 and len(set(found)) == 10


def test_utf16_severity_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "sev.csv"
    path.write_text("Name;Category\nct_scan_0;2\n", encoding="utf-16")
    with pytest.raises(Cov3dError, match=r"severity file '.*sev.csv' is not UTF-8 text"):
        read_severity_csv(path)


def test_header_only_severity_file_warns(tmp_path, caplog):
    import logging

    path = tmp_path / "sev.csv"
    path.write_text("Name;Category\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        assert read_severity_csv(path) == {}
    assert "lists no scans" in caplog.text


def test_a_name_listed_twice(tmp_path, caplog):
    import logging

    path = tmp_path / "sev.csv"
    path.write_text("Name;Category\nct_scan_0;2\nct_scan_1;3\nct_scan_0;2\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        assert read_severity_csv(path) == {"ct_scan_0": (2, 2), "ct_scan_1": (3, 3)}
    assert "'ct_scan_0' is listed twice (lines 2 and 4)" in caplog.text
    path.write_text("Name;Category\nct_scan_0;2\nct_scan_0;4\n", encoding="utf-8")
    with pytest.raises(Cov3dError, match="'ct_scan_0' is listed twice with different categories, 2 on line 2 "
                                         "and 4 on line 3"):
        read_severity_csv(path)
