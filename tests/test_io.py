import logging
import random
import shutil

import numpy as np
import pytest
from conftest import SHARED_DICOM, ramp_volume, write_dicom_series, write_nifti, write_slices

from cov3d.errors import Cov3dError
from cov3d.data import readers
from cov3d.data.readers import DEFAULT_WINDOW, natural_key, parse_window, read_scan, scan_kind


def test_natural_key_orders_numbers_by_value():
    names = ["10.jpg", "2.jpg", "1.jpg", "0.jpg", "100.jpg", "11.jpg"]
    assert sorted(names, key=natural_key) == ["0.jpg", "1.jpg", "2.jpg", "10.jpg", "11.jpg", "100.jpg"]


def test_slice_folder_reads_in_natural_order(tmp_path):
    volume = ramp_volume(depth=12)
    folder = write_slices(tmp_path / "scan", volume, suffix=".png")
    scan = read_scan(folder)
    assert scan.volume.shape == (12, 24, 24) and scan.volume.dtype == np.float32
    np.testing.assert_allclose(scan.volume[:, 5, 5], volume[:, 5, 5] / 255.0, atol=1e-6)
    assert scan.meta.source == "slices" and scan.meta.slices == 12
    assert (scan.meta.height, scan.meta.width) == (24, 24)


def test_slice_suffixes_any_case(tmp_path):
    volume = ramp_volume(depth=3)
    folder = write_slices(tmp_path / "scan", volume, names=["0.JPG", "1.jpeg", "2.Png"])
    scan = read_scan(folder)
    np.testing.assert_allclose(scan.volume[:, 3, 3], volume[:, 3, 3] / 255.0, atol=2 / 255)


def test_other_files_are_ignored_with_a_warning(slice_scan, caplog):
    (slice_scan / "notes.txt").write_text("hello")
    with caplog.at_level(logging.WARNING):
        scan = read_scan(slice_scan)
    assert scan.meta.slices == 6
    assert "notes.txt" in caplog.text


def test_odd_sized_slices_are_left_out_naming_them(tmp_path, caplog):
    folder = write_slices(tmp_path / "scan", ramp_volume(depth=4, size=24))
    write_slices(tmp_path / "odd", np.full((1, 30, 40), 200, dtype=np.uint8))
    shutil.copy(tmp_path / "odd" / "0.jpg", folder / "4.jpg")
    with caplog.at_level(logging.WARNING):
        scan = read_scan(folder)
    assert scan.volume.shape == (4, 24, 24)
    assert scan.volume.max() < 200 / 255 - 0.05
    assert "leaving out 1 image(s) of another size or mode than the 24x24 L slices: 4.jpg (40x30 L)" in caplog.text


def test_slice_width_resizes_while_reading(slice_scan):
    scan = read_scan(slice_scan, slice_width=8)
    assert scan.volume.shape == (6, 8, 8)
    assert (scan.meta.height, scan.meta.width) == (24, 24)
    np.testing.assert_allclose(scan.volume[:, 4, 4], ramp_volume()[:, 0, 0] / 255.0, atol=2 / 255)


def test_sixteen_bit_png_keeps_its_precision(tmp_path):
    from PIL import Image

    folder = tmp_path / "scan"
    folder.mkdir()
    for i, value in enumerate([1000, 30000, 65535]):
        Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(folder / f"{i}.png")
    scan = read_scan(folder)
    np.testing.assert_allclose(scan.volume[:, 0, 0], [1000 / 65535, 30000 / 65535, 1.0], atol=1e-6)


def hu_volume(depth=5, size=16):
    # Slice i is uniformly -1000 + 250·i HU: air at the head end, soft tissue at the feet.
    return np.stack([np.full((size, size), -1000 + 250 * i, dtype=np.int16) for i in range(depth)])


def expected_window(hu, window=DEFAULT_WINDOW):
    low, high = window
    return np.clip((hu.astype(np.float32) - low) / (high - low), 0, 1)


def test_dicom_series_is_ordered_by_position_and_windowed(tmp_path):
    hu = hu_volume()
    folder = write_dicom_series(tmp_path / "dicom", hu)
    scan = read_scan(folder)
    assert scan.meta.source == "dicom" and scan.meta.slices == 5
    np.testing.assert_allclose(scan.volume[:, 8, 8], expected_window(hu[:, 0, 0]), atol=1e-5)
    assert scan.meta.spacing == pytest.approx((2.5, 0.7, 0.7))


def test_dicom_shuffled_file_names_give_the_same_volume(tmp_path):
    hu = hu_volume(depth=9)
    reference = read_scan(write_dicom_series(tmp_path / "a", hu)).volume
    names = [f"IM{n:04d}" for n in range(9)]
    random.Random(3).shuffle(names)
    shuffled = read_scan(write_dicom_series(tmp_path / "b", hu, names=names)).volume
    np.testing.assert_array_equal(reference, shuffled)


def test_dicom_order_follows_position_not_instance_number(tmp_path):
    # Slices written feet first (z increasing): the reader still returns head first.
    hu = hu_volume()
    folder = write_dicom_series(tmp_path / "dicom", hu, z0=-100.0, z_step=2.5)
    scan = read_scan(folder)
    np.testing.assert_allclose(scan.volume[:, 0, 0], expected_window(hu[::-1, 0, 0]), atol=1e-5)


def test_dicom_custom_window(tmp_path):
    hu = hu_volume()
    scan = read_scan(write_dicom_series(tmp_path / "dicom", hu), window=(-1000.0, 0.0))
    np.testing.assert_allclose(scan.volume[:, 0, 0], [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-5)


def test_dicom_folder_with_several_series_reads_the_largest(tmp_path, caplog):
    folder = write_dicom_series(tmp_path / "dicom", hu_volume(depth=6))
    write_dicom_series(folder, hu_volume(depth=2), names=["scout1.dcm", "scout2.dcm"], series="9.9.9")
    with caplog.at_level(logging.WARNING):
        scan = read_scan(folder)
    assert scan.meta.slices == 6
    assert "2 DICOM series" in caplog.text


def test_nifti_volume_depth_runs_head_to_feet(tmp_path):
    hu = hu_volume(depth=7)
    scan = read_scan(write_nifti(tmp_path / "scan.nii.gz", hu))
    assert scan.meta.source == "volume" and scan.volume.shape == (7, 16, 16)
    np.testing.assert_allclose(scan.volume[:, 0, 0], expected_window(hu[:, 0, 0]), atol=1e-5)
    assert scan.meta.spacing == pytest.approx((2.5, 0.7, 0.7))


def test_nifti_stored_feet_first_is_reoriented(tmp_path):
    import SimpleITK as sitk

    hu = hu_volume(depth=7)
    image = sitk.GetImageFromArray(hu[::-1].copy())  # index 0 at the feet, z pointing to the head
    sitk.WriteImage(image, str(tmp_path / "feet.nii"))
    scan = read_scan(tmp_path / "feet.nii")
    np.testing.assert_allclose(scan.volume[:, 0, 0], expected_window(hu[:, 0, 0]), atol=1e-5)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_other_volume_formats(tmp_path, suffix):
    hu = hu_volume()
    scan = read_scan(write_nifti(tmp_path / f"scan{suffix}", hu))
    np.testing.assert_allclose(scan.volume[:, 0, 0], expected_window(hu[:, 0, 0]), atol=1e-5)


def test_scan_kind(tmp_path, slice_scan):
    assert scan_kind(slice_scan) == "slices"
    assert scan_kind(write_dicom_series(tmp_path / "d", hu_volume(depth=2), names=["a", "b"])) == "dicom"
    assert scan_kind(write_nifti(tmp_path / "v.nii.gz", hu_volume(depth=2))) == "volume"
    assert scan_kind(tmp_path / "missing") is None


@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason="shared chest CT DICOM series not present")
def test_real_chest_ct_series():
    scan = read_scan(SHARED_DICOM, slice_width=128)
    assert scan.volume.shape == (64, 128, 128)
    assert scan.meta.slices == 64 and (scan.meta.height, scan.meta.width) == (512, 512)
    assert scan.meta.spacing == pytest.approx((5.0, 0.841796875, 0.841796875))
    # RescaleIntercept -1024 applied: padding outside the field of view reads -1024 HU.
    full = read_scan(SHARED_DICOM)
    assert full.volume.shape == (64, 512, 512)
    assert full.volume.min() == pytest.approx((-1024 + 1350) / 1500, abs=1e-6)
    # Head first: z runs from -124 mm (1-01.dcm) down to -439 mm (1-64.dcm).
    np.testing.assert_array_equal(full.volume[0], read_scan(SHARED_DICOM / "1-01.dcm").volume[0])
    np.testing.assert_array_equal(full.volume[-1], read_scan(SHARED_DICOM / "1-64.dcm").volume[0])


@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason="shared chest CT DICOM series not present")
def test_real_series_order_is_independent_of_file_names(tmp_path):
    files = sorted(SHARED_DICOM.glob("*.dcm"))[:12]
    names = [f"x{n}" for n in range(len(files))]
    random.Random(0).shuffle(names)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for file, name in zip(files, names):
        shutil.copy(file, tmp_path / "a" / file.name)
        shutil.copy(file, tmp_path / "b" / name)
    np.testing.assert_array_equal(read_scan(tmp_path / "a", slice_width=32).volume,
                                  read_scan(tmp_path / "b", slice_width=32).volume)


# --- errors: one test per message ---------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(Cov3dError, match="does not exist"):
        read_scan(tmp_path / "nope")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Cov3dError, match="is empty"):
        read_scan(tmp_path / "empty")


def test_folder_without_slices(tmp_path):
    (tmp_path / "scan").mkdir()
    (tmp_path / "scan" / "readme.txt").write_text("no images here")
    with pytest.raises(Cov3dError, match="holds no slices"):
        read_scan(tmp_path / "scan")


def test_truncated_jpeg(slice_scan):
    data = (slice_scan / "3.jpg").read_bytes()
    (slice_scan / "3.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(Cov3dError, match=r"slice '.*3\.jpg' cannot be read"):
        read_scan(slice_scan)


def test_corrupt_image(slice_scan):
    (slice_scan / "2.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(Cov3dError, match=r"slice '.*2\.jpg' cannot be read"):
        read_scan(slice_scan)


def test_unreadable_dicom(tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    with pytest.raises(Cov3dError, match="DICOM series .* cannot be read"):
        read_scan(folder)


def test_unsupported_file_type(tmp_path):
    (tmp_path / "scan.txt").write_text("x")
    with pytest.raises(Cov3dError, match="unsupported file type"):
        read_scan(tmp_path / "scan.txt")


def test_unreadable_volume(tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"not gzip")
    with pytest.raises(Cov3dError, match="volume .* cannot be read"):
        read_scan(tmp_path / "broken.nii.gz")


@pytest.mark.parametrize("text", ["abc", "1", "100,-100", "1,2,3"])
def test_bad_window(text):
    with pytest.raises(Cov3dError, match="window"):
        parse_window(text)


def test_window_parses():
    assert parse_window("-1000,400") == (-1000.0, 400.0)


def test_an_unnumbered_image_among_numbered_slices_is_not_a_slice(tmp_path, caplog):
    folder = write_slices(tmp_path / "scan", ramp_volume(depth=5))
    write_slices(folder, np.full((1, 24, 24), 255, dtype=np.uint8), names=["thumbnail.jpg"])
    with caplog.at_level(logging.WARNING):
        scan = read_scan(folder)
    assert scan.volume.shape[0] == 5 and scan.volume.max() < 0.7  # no white last slice
    assert "thumbnail.jpg" in caplog.text and "without a slice number" in caplog.text


def test_one_image_given_on_its_own_is_a_one_slice_scan(tmp_path, caplog):
    write_slices(tmp_path, ramp_volume(depth=1), names=["single.png"])
    with caplog.at_level(logging.WARNING):
        scan = read_scan(tmp_path / "single.png")
    assert scan.volume.shape == (1, 24, 24) and scan.meta.slices == 1
    assert "single.png has only 1 slice(s)" in caplog.text


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_short_scans_are_read_with_a_warning_naming_them(tmp_path, caplog, depth):
    folder = write_slices(tmp_path / "short_scan", ramp_volume(depth=depth))
    with caplog.at_level(logging.WARNING):
        assert read_scan(folder).volume.shape[0] == depth
    assert f"short_scan has only {depth} slice(s)" in caplog.text


def test_a_folder_of_scans_with_an_overview_image_is_not_a_scan(tmp_path):
    write_slices(tmp_path / "data" / "scan_a", ramp_volume(depth=4))
    write_slices(tmp_path / "data", ramp_volume(depth=1), names=["overview.png"])
    assert scan_kind(tmp_path / "data") is None
    assert scan_kind(tmp_path / "data" / "scan_a") == "slices"
    with pytest.raises(Cov3dError, match="is a folder of scans, not one scan"):
        read_scan(tmp_path / "data")


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_truncated_nifti_is_an_error_naming_it(tmp_path, name):
    hu = np.random.default_rng(0).integers(-1000, 400, size=(6, 32, 32)).astype(np.int16)
    path = write_nifti(tmp_path / name, hu)
    assert read_scan(path).volume.shape == (6, 32, 32)  # whole: fine
    data = path.read_bytes()
    assert len(data) > 1000
    for cut in (len(data) // 2, 352):  # half the voxels; about the header alone
        (tmp_path / f"cut-{name}").write_bytes(data[:cut])
        with pytest.raises(Cov3dError, match=rf"volume '.*cut-{name}' cannot be read"):
            read_scan(tmp_path / f"cut-{name}")


def test_truncated_nrrd_and_metaimage_are_errors_naming_them(tmp_path):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.full((6, 32, 32), -600, dtype=np.int16))
    for name in ("v.nrrd", "v.mha"):
        sitk.WriteImage(image, str(tmp_path / name))
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(Cov3dError, match=rf"volume '.*cut-{name}' cannot be read"):
            read_scan(tmp_path / f"cut-{name}")


def test_dicom_series_with_an_unreadable_slice_fails_naming_it(tmp_path):
    hu = np.full((5, 16, 16), -600, dtype=np.int16)
    folder = write_dicom_series(tmp_path / "series", hu)
    broken = sorted(folder.iterdir())[2]
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    with pytest.raises(Cov3dError, match=rf"1 DICOM slice\(s\) of .* cannot be read: '.*{broken.name}'"):
        read_scan(folder)


def test_dicom_series_with_a_position_gap_is_read_with_a_warning(tmp_path, caplog):
    folder = write_dicom_series(tmp_path / "series", np.full((6, 16, 16), -600, dtype=np.int16))
    sorted(folder.iterdir())[3].unlink()
    with caplog.at_level(logging.WARNING):
        assert read_scan(folder).volume.shape[0] == 5
    assert "1 gap(s)" in caplog.text


@pytest.mark.parametrize("text", ["-inf,inf", "nan,100", "-1000,inf"])
def test_non_finite_window(text):
    with pytest.raises(Cov3dError, match="must be finite numbers"):
        parse_window(text)


def test_dicom_series_geometry_is_that_of_its_first_slice_head_first(tmp_path):
    folder = write_dicom_series(tmp_path / "s", np.zeros((4, 8, 8)) - 500, z0=10.0, z_step=-2.5)
    meta = read_scan(folder).meta
    assert meta.spacing == pytest.approx((2.5, 0.7, 0.7))
    assert meta.origin == pytest.approx((-100.0, -100.0, 10.0))
    # Columns run along x, rows along y, slices to the feet (−z in LPS).
    assert meta.direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, -1))


@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason="shared chest CT DICOM series not present")
def test_real_dicom_geometry_agrees_with_itk_series_reader():
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(SHARED_DICOM)))
    itk = sitk.DICOMOrient(reader.Execute(), "LPI")
    meta = read_scan(SHARED_DICOM, slice_width=32).meta
    assert meta.origin == pytest.approx(itk.GetOrigin(), abs=1e-3)
    assert meta.direction == pytest.approx(itk.GetDirection(), abs=1e-6)
    assert tuple(reversed(meta.spacing)) == pytest.approx(itk.GetSpacing(), abs=1e-3)


def test_volume_geometry_is_kept_after_orienting_head_first(tmp_path):
    import SimpleITK as sitk

    path = write_nifti(tmp_path / "v.nii.gz", np.zeros((5, 6, 7)) - 500, spacing=(0.8, 0.7, 2.5))
    meta = read_scan(path).meta
    oriented = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPI")
    assert meta.origin == pytest.approx(oriented.GetOrigin()) and meta.direction == pytest.approx(oriented.GetDirection())
    assert meta.spacing == pytest.approx((2.5, 0.7, 0.8))


def test_the_default_readers_are_slices_dicom_volume_in_precedence_order():
    assert list(readers.READERS) == ["slices", "dicom", "volume"]
    assert [reader.kind for reader in readers.READERS.values()] == ["slices", "dicom", "volume"]
    assert [readers.get_reader(kind).windowed for kind in readers.READERS] == [False, True, True]
    with pytest.raises(Cov3dError, match="no reader for scan kind 'numpy'; known kinds: slices, dicom, volume"):
        readers.get_reader("numpy")
    with pytest.raises(Cov3dError, match="scan kind 'volume' is already registered"):
        readers.register_reader(readers.VolumeReader())


class NumpyReader(readers.Reader):
    """A toy format: a (D, H, W) array of HU in a .npy file."""

    kind = "numpy"
    windowed = True

    def can_read(self, path):
        return path.is_file() and path.suffix == ".npy"

    def read(self, path, window, slice_width, threads):
        low, high = window
        from PIL import Image

        from cov3d.data.resample import resize_slice

        volume = np.clip((np.load(path).astype(np.float32) - low) / (high - low), 0.0, 1.0)
        meta = readers.ScanMeta(self.kind, *volume.shape)
        if slice_width is not None:
            volume = np.stack([resize_slice(Image.fromarray(s), slice_width) for s in volume])
        return readers.Scan(volume, meta)

    def scan_name(self, name):
        return name.removesuffix(".npy")


def test_a_registered_reader_is_found_read_catalogued_and_cached(tmp_path, monkeypatch):
    from cov3d.data.catalog import catalog, find_scans
    from cov3d.data.preprocess import Size, preprocess_dataset, preprocess_volume, read_manifest

    monkeypatch.setattr(readers, "READERS", dict(readers.READERS))  # the toy reader goes when the test ends
    readers.register_reader(NumpyReader())
    assert list(readers.READERS) == ["slices", "dicom", "volume", "numpy"]
    hu = hu_volume(depth=6)
    data = tmp_path / "data"
    (data / "train" / "covid").mkdir(parents=True)
    np.save(data / "train" / "covid" / "ct_scan_0.npy", hu)
    write_slices(data / "train" / "non-covid" / "ct_scan_1", ramp_volume())
    (data / "train_partition_covid_categories.csv").write_text("Name;Category\nct_scan_0;3\n")
    npy = data / "train" / "covid" / "ct_scan_0.npy"

    assert scan_kind(npy) == "numpy"
    scan = read_scan(npy, window=(-1000.0, 0.0))
    assert scan.meta.source == "numpy" and scan.volume.shape == hu.shape
    np.testing.assert_allclose(scan.volume, np.clip((hu + 1000.0) / 1000.0, 0, 1), atol=1e-6)
    assert find_scans(data) == [(npy, "numpy"), (data / "train" / "non-covid" / "ct_scan_1", "slices")]
    records = {r.path: r for r in catalog(data)}
    assert (records["train/covid/ct_scan_0.npy"].kind, records["train/covid/ct_scan_0.npy"].severity) == ("numpy", 3)
    tensor, meta = preprocess_volume(npy, Size(depth=4, width=8))
    assert tuple(tensor.shape) == (1, 4, 8, 8) and meta["source"] == "numpy"
    report = preprocess_dataset(data, Size(depth=4, width=8), tmp_path / "cache", workers=1)
    assert (report.processed, report.failures) == (2, [])
    rows = {row["path"]: row for row in read_manifest(report.manifest)}
    assert rows["train/covid/ct_scan_0.npy"]["source"] == "numpy"
    assert rows["train/covid/ct_scan_0.npy"]["window"] == "-1350,150"  # windowed: the HU window applies
    assert rows["train/non-covid/ct_scan_1"]["window"] == ""
    # An image beside a folder holding a .npy scan is an overview of a folder of scans, not a 1-slice scan.
    scans = tmp_path / "scans"
    write_slices(scans, ramp_volume(depth=1), names=["overview.png"])
    (scans / "a").mkdir()
    np.save(scans / "a" / "scan.npy", hu)
    assert scan_kind(scans) is None and find_scans(scans) == [(scans / "a" / "scan.npy", "numpy")]
