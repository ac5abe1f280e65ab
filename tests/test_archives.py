"""What hospitals and archives hold: several series, localizers, duplicates, nested and multi-frame folders, odd
slice folders. Each case reads the right data or fails naming the files, never silently."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import keep_locale, write_dicom_image, write_slices
from test_orientation import canonical_image, oriented, phantom

from cov3d.data.catalog import find_scans
from cov3d.data.readers import read_scan
from cov3d.errors import Cov3dError

ORIGINAL = {"0008|0008": "ORIGINAL\\PRIMARY\\AXIAL"}


def body(shift: int = 0):
    return canonical_image((phantom() + shift).astype(np.int16)) if shift else canonical_image(phantom())


def series(folder, image, uid, number, description="", start=1, names="s{uid}-{k:03d}.dcm", **tags):
    """One series into `folder`, file names chosen by the caller so listing order can be varied."""
    pattern = names.replace("{uid}", uid[-1]).replace("{k:03d}", "{:03d}")
    values = {"0020|0011": str(number), "0008|103e": description, **ORIGINAL}
    values.update({key.replace("_", "|"): value for key, value in tags.items()})
    return write_dicom_image(folder, image, series=uid, start=start, names=pattern, tags=values)


# --- series choice --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("first", ["a", "z"])
def test_two_kernels_of_one_size_read_the_lowest_series_number_whatever_the_file_names(tmp_path, caplog, first):
    folder = tmp_path / "ct"
    other = "z" if first == "a" else "a"
    series(folder, body(), "1.2.3.1", 2, "B30f soft", names=first + "{k:03d}.dcm")
    series(folder, body(300), "1.2.3.2", 3, "B70f lung", names=other + "{k:03d}.dcm")
    with caplog.at_level(logging.WARNING):
        scan = read_scan(folder)
    reference = read_scan(folder, series="2")
    assert np.array_equal(scan.volume, reference.volume)
    assert scan.meta.series == "1.2.3.1"
    assert "reading series 2 'B30f soft' (18 slices, UID 1.2.3.1)" in caplog.text
    assert "skipping series 3 'B70f lung' (18 slices, UID 1.2.3.2)" in caplog.text


def test_original_before_derived_before_more_slices(tmp_path):
    folder = tmp_path / "ct"
    series(folder, body(), "1.2.3.1", 5, "MPR", **{"0008_0008": "DERIVED\\SECONDARY\\AXIAL"})
    short = canonical_image(phantom()[:12])
    series(folder, short, "1.2.3.2", 9, "original")
    assert read_scan(folder).meta.series == "1.2.3.2"


def test_thinner_slices_before_a_lower_series_number(tmp_path):
    folder = tmp_path / "ct"
    series(folder, body(), "1.2.3.1", 2, "5 mm", **{"0018_0050": "5"})
    series(folder, body(300), "1.2.3.2", 3, "1 mm", **{"0018_0050": "1"})
    assert read_scan(folder).meta.series == "1.2.3.2"


def test_axial_before_sagittal_of_the_same_slice_count(tmp_path):
    import SimpleITK as sitk

    folder = tmp_path / "ct"
    cube = canonical_image(np.repeat(phantom()[:, :18, :18], 1, axis=0))
    series(folder, oriented(cube, "sagittal"), "1.2.3.1", 1, "sagittal")
    series(folder, cube, "1.2.3.2", 2, "axial")
    assert sitk.GetArrayFromImage(oriented(cube, "sagittal")).shape[0] == 18
    assert read_scan(folder).meta.series == "1.2.3.2"


def test_series_option_picks_by_uid_or_number_and_names_the_choices_when_absent(tmp_path):
    folder = tmp_path / "ct"
    series(folder, body(), "1.2.3.1", 2, "soft")
    series(folder, body(300), "1.2.3.2", 3, "lung")
    assert read_scan(folder, series="1.2.3.2").meta.series == "1.2.3.2"
    assert read_scan(folder, series="3").meta.series == "1.2.3.2"
    with pytest.raises(Cov3dError, match=r"holds no DICOM series '7'; it holds series 2 'soft' .*series 3 'lung'"):
        read_scan(folder, series="7")


def test_series_option_is_ignored_by_other_kinds(tmp_path):
    folder = write_slices(tmp_path / "scan", np.full((5, 8, 8), 100, dtype=np.uint8))
    assert read_scan(folder, series="3").volume.shape == (5, 8, 8)


# --- within a series ------------------------------------------------------------------------------------------

def test_localizers_filed_in_the_series_are_dropped(tmp_path, caplog):
    import SimpleITK as sitk

    folder = tmp_path / "ct"
    series(folder, body(), "1.2.3.1", 2)
    scout = sitk.PermuteAxes(canonical_image(phantom()), [0, 2, 1])[:, :, :3]  # three coronal images
    series(folder, scout, "1.2.3.1", 2, start=100, names="scout{k:03d}.dcm",
           **{"0008_0008": "ORIGINAL\\PRIMARY\\LOCALIZER"})
    with caplog.at_level(logging.WARNING):
        scan = read_scan(folder)
    alone = read_scan(series(tmp_path / "alone", body(), "1.2.3.1", 2))
    assert np.array_equal(scan.volume, alone.volume)
    assert "dropping 3 localizer image(s)" in caplog.text


def test_images_of_another_plane_in_the_series_are_dropped_naming_them(tmp_path, caplog):
    import SimpleITK as sitk

    folder = tmp_path / "ct"
    series(folder, body(), "1.2.3.1", 2)
    stray = sitk.PermuteAxes(canonical_image(phantom()), [0, 2, 1])[:, :, :2]
    series(folder, stray, "1.2.3.1", 2, start=100, names="other{k:03d}.dcm")
    with caplog.at_level(logging.WARNING):
        scan = read_scan(folder)
    assert scan.volume.shape == (18, 22, 26)
    assert "dropping 2 image(s) of another orientation" in caplog.text and "other100.dcm" in caplog.text


def test_a_localizer_series_is_skipped_and_a_folder_of_localizers_only_is_refused(tmp_path):
    import SimpleITK as sitk

    folder = tmp_path / "ct"
    scout = sitk.PermuteAxes(canonical_image(phantom()), [0, 2, 1])[:, :, :2]
    series(folder, scout, "1.2.3.9", 1, "scout", **{"0008_0008": "ORIGINAL\\PRIMARY\\LOCALIZER"})
    with pytest.raises(Cov3dError, match="holds only localizer"):
        read_scan(folder)
    series(folder, body(), "1.2.3.1", 2)
    assert read_scan(folder).meta.series == "1.2.3.1"


def test_every_slice_twice_with_identical_pixels_is_read_once_with_a_count(tmp_path, caplog):
    folder = tmp_path / "ct"
    series(folder, body(), "1.2.3.1", 2, names="a{k:03d}.dcm")
    series(folder, body(), "1.2.3.1", 2, names="b{k:03d}.dcm")
    with caplog.at_level(logging.WARNING):
        scan = read_scan(folder)
    assert scan.volume.shape == (18, 22, 26)
    assert scan.meta.spacing[0] == pytest.approx(2.5)
    assert "18 slice(s) repeat another at the same position" in caplog.text


def test_different_pixels_at_one_position_refuse_the_scan_naming_it(tmp_path):
    folder = tmp_path / "ct"
    series(folder, body(), "1.2.3.1", 2, names="a{k:03d}.dcm")
    series(folder, body(300)[:, :, :1], "1.2.3.1", 2, names="b{k:03d}.dcm")
    with pytest.raises(Cov3dError, match=r"different images at one position: 40 mm \('a001.dcm', 'b001.dcm'\)"):
        read_scan(folder)


# --- folders --------------------------------------------------------------------------------------------------

def test_a_series_folder_with_a_scout_subfolder_stays_one_scan(tmp_path, caplog):
    import SimpleITK as sitk

    folder = series(tmp_path / "data" / "patient1", body(), "1.2.3.1", 2)
    scout = sitk.PermuteAxes(canonical_image(phantom()), [0, 2, 1])[:, :, :1]
    series(folder / "scout", scout, "1.2.3.9", 1, **{"0008_0008": "ORIGINAL\\PRIMARY\\LOCALIZER"})
    with caplog.at_level(logging.WARNING):
        found = find_scans(tmp_path / "data")
    assert found == [(folder, "dicom")]
    assert "scout/" in caplog.text
    assert read_scan(folder).volume.shape == (18, 22, 26)


def test_a_thumbnails_subfolder_never_replaces_its_scan(tmp_path, caplog):
    scan = write_slices(tmp_path / "data" / "scan1", np.full((44, 16, 16), 90, dtype=np.uint8))
    write_slices(scan / "thumbs", np.full((3, 8, 8), 200, dtype=np.uint8))
    with caplog.at_level(logging.WARNING):
        found = find_scans(tmp_path / "data")
    assert found == [(scan, "slices")]
    assert read_scan(scan).volume.shape == (44, 16, 16)
    assert "thumbs/" in caplog.text


def test_a_folder_of_scans_with_an_overview_image_is_still_a_folder_of_scans(tmp_path):
    data = tmp_path / "data"
    write_slices(data / "a", np.full((6, 8, 8), 90, dtype=np.uint8))
    write_slices(data / "b", np.full((6, 8, 8), 90, dtype=np.uint8))
    Image.new("L", (8, 8)).save(data / "overview.png")
    assert [p.name for p, _ in find_scans(data)] == ["a", "b"]


def test_a_dicom_cd_with_a_dicomdir_and_a_dose_report_gives_its_series_only(tmp_path, caplog):
    study = tmp_path / "cd" / "DICOM" / "PAT1" / "STU1"
    series(study / "SER1", body(), "1.2.3.1", 2, names="IMG{k:03d}")
    series(study / "SER2", oriented(body(), "sagittal"), "1.2.3.2", 3, names="IMG{k:03d}")
    report = series(tmp_path / "report", body()[:, :, :1], "1.2.3.9", 99)
    shutil.copy(next(report.iterdir()), study / "DOSE0001")
    shutil.copy(next(report.iterdir()), tmp_path / "cd" / "DICOMDIR")
    with caplog.at_level(logging.WARNING):
        found = find_scans(tmp_path / "cd")
    assert [(p.name, kind) for p, kind in found] == [("SER1", "dicom"), ("SER2", "dicom")]
    assert "DOSE0001" in caplog.text
    assert np.array_equal(read_scan(found[0][0]).volume, read_scan(found[1][0]).volume)


def test_a_folder_of_multi_frame_files_gives_one_scan_per_file_in_the_convention(tmp_path):
    import SimpleITK as sitk

    folder = tmp_path / "enhanced"
    folder.mkdir()
    reference = read_scan(_nifti(tmp_path))
    # Right-handed frame orders, as scanners write them: axial stored feet first, and sagittal.
    for name, image in [("axial.dcm", sitk.Flip(body(), [False, False, True])),
                        ("sagittal", sitk.Flip(oriented(body(), "sagittal"), [False, False, True]))]:
        frames = sitk.Cast(image + 1024, sitk.sitkUInt16)
        for key, value in {"0028|1052": "-1024", "0028|1053": "1", "0008|0060": "CT"}.items():
            frames.SetMetaData(key, value)
        writer = sitk.ImageFileWriter()
        writer.SetImageIO("GDCMImageIO")
        writer.SetFileName(str(folder / name))
        with keep_locale():
            writer.Execute(frames)
    found = find_scans(folder)
    assert [(p.name, kind) for p, kind in found] == [("axial.dcm", "volume"), ("sagittal", "volume")]
    for path, _ in found:
        # The writer stores HU + 1024 without a rescale intercept, so the window moves by 1024.
        volume = read_scan(path, window=(-1350 + 1024, 150 + 1024)).volume
        assert np.abs(volume - reference.volume).max() <= 1e-3


def _nifti(tmp_path):
    import SimpleITK as sitk

    path = tmp_path / "body.nii.gz"
    sitk.WriteImage(body(), str(path))
    return path


# --- slice folders --------------------------------------------------------------------------------------------

def test_the_same_slice_number_twice_is_refused_naming_both_files(tmp_path):
    folder = write_slices(tmp_path / "scan", np.full((10, 8, 8), 90, dtype=np.uint8), suffix=".png")
    write_slices(folder, np.full((5, 8, 8), 90, dtype=np.uint8), names=[f"{i:04d}.png" for i in range(5)])
    with pytest.raises(Cov3dError, match=r"5 slice number\(s\) given twice: '0.png' and '0000.png'"):
        read_scan(folder)


def test_a_jpeg_and_a_png_of_each_slice_are_refused(tmp_path):
    folder = write_slices(tmp_path / "scan", np.full((6, 8, 8), 90, dtype=np.uint8), suffix=".jpg")
    write_slices(folder, np.full((6, 8, 8), 90, dtype=np.uint8), suffix=".png")
    with pytest.raises(Cov3dError, match=r"given twice: '0.jpg' and '0.png'"):
        read_scan(folder)


def test_negative_slice_numbers_sort_by_value(tmp_path):
    numbers = [-3, -2, -1, 0, 1, 2]
    volume = np.stack([np.full((8, 8), 30 * (i + 4), dtype=np.uint8) for i in numbers])
    folder = write_slices(tmp_path / "scan", volume, names=[f"{n}.png" for n in numbers])
    values = read_scan(folder).volume[:, 0, 0] * 255
    assert np.allclose(values, [30 * (n + 4) for n in numbers], atol=0.5)


def test_two_numbered_exports_in_one_folder_are_refused_naming_them(tmp_path):
    folder = write_slices(tmp_path / "scan", np.full((5, 8, 8), 90, dtype=np.uint8),
                          names=[f"IM-0001-{i:04d}.png" for i in range(5)])
    write_slices(folder, np.full((5, 8, 8), 90, dtype=np.uint8), names=[f"IM-0002-{i:04d}.png" for i in range(5)])
    with pytest.raises(Cov3dError, match=r"holds 2 numbered series of images: IM-0001-<N> \(5 images\), "
                                         r"IM-0002-<N> \(5 images\)"):
        read_scan(folder)


def test_a_numbered_preview_among_the_slices_is_left_out_naming_it(tmp_path, caplog):
    folder = write_slices(tmp_path / "scan", np.full((8, 16, 16), 90, dtype=np.uint8))
    Image.new("RGB", (256, 128), (255, 0, 0)).save(folder / "preview_256.png")
    Image.new("RGB", (16, 16), (255, 255, 255)).save(folder / "8.jpg")
    with caplog.at_level(logging.WARNING):
        scan = read_scan(folder, slice_width=16)
    assert scan.volume.shape == (8, 16, 16)
    assert np.allclose(scan.volume, 90 / 255, atol=2 / 255)
    assert "preview_256.png" in caplog.text
    assert "8.jpg (16x16 RGB)" in caplog.text


def test_apple_double_and_ds_store_files_are_ignored(tmp_path):
    folder = write_slices(tmp_path / "scan", np.full((5, 8, 8), 90, dtype=np.uint8))
    (folder / "._0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    assert read_scan(folder).volume.shape == (5, 8, 8)


def test_a_gap_in_the_slice_numbers_is_warned(tmp_path, caplog):
    folder = write_slices(tmp_path / "scan", np.full((20, 8, 8), 90, dtype=np.uint8),
                          names=[f"{i}.jpg" for i in [*range(10), *range(50, 60)]])
    with caplog.at_level(logging.WARNING):
        assert read_scan(folder).volume.shape == (20, 8, 8)
    assert "slice numbers have 1 gap(s), e.g. 9 → 50" in caplog.text


# --- files ----------------------------------------------------------------------------------------------------

def test_a_metaimage_without_its_raw_file_names_it(tmp_path):
    import SimpleITK as sitk

    path = tmp_path / "scan.mhd"
    sitk.WriteImage(body(), str(path), useCompression=False)
    raw = next(tmp_path.glob("scan.*raw"))
    raw.unlink()
    with pytest.raises(Cov3dError, match=rf"names its voxel data file '{raw.name}', which is missing"):
        read_scan(path)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_volume_with_non_finite_voxels_is_refused_with_the_count(tmp_path, suffix, value):
    import SimpleITK as sitk

    hu = phantom().astype(np.float32)
    hu[3, 4, 5:8] = value
    image = sitk.GetImageFromArray(hu)
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(image, str(path))
    with pytest.raises(Cov3dError, match=r"has 3 NaN or infinite voxel value\(s\)"):
        read_scan(path)


def _with_transfer_syntax(path, uid: str) -> None:
    """Rewrite a Part-10 file's meta group so that it announces `uid` (the data set is left as it was)."""
    import struct

    data = path.read_bytes()
    offset, elements = 132, []
    while data[offset:offset + 2] == b"\x02\x00":
        element = struct.unpack_from("<H", data, offset + 2)[0]
        vr = data[offset + 4:offset + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
            length, start = struct.unpack_from("<I", data, offset + 8)[0], offset + 12
        else:
            length, start = struct.unpack_from("<H", data, offset + 6)[0], offset + 8
        elements.append((element, vr, data[start:start + length]))
        offset = start + length
    value = uid.encode() + (b"\x00" if len(uid) % 2 else b"")
    body = b""
    for element, vr, content in elements:
        if element == 0x0000:
            continue
        content = value if element == 0x0010 else content
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
            body += struct.pack("<HH2s2xI", 2, element, vr, len(content)) + content
        else:
            body += struct.pack("<HH2sH", 2, element, vr, len(content)) + content
    group = struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body))
    path.write_bytes(data[:132] + group + body + data[offset:])


def test_an_undecodable_transfer_syntax_is_named(tmp_path, monkeypatch):
    import SimpleITK as sitk

    from cov3d.data.readers.dicom import transfer_syntax

    folder = series(tmp_path / "ct", body(), "1.2.3.1", 2)
    path = sorted(folder.iterdir())[0]
    _with_transfer_syntax(path, "1.2.840.10008.1.2.4.201")
    assert transfer_syntax(path) == "1.2.840.10008.1.2.4.201"
    # This GDCM sniffs the raw pixels and reads them anyway; a GDCM without an HTJ2K codec fails like this:
    read = sitk.ReadImage

    def failing(name, *args, **kwargs):
        if str(name) == str(path):
            raise RuntimeError("itk::ERROR: GDCMImageIO(0x1): Cannot read requested file")
        return read(name, *args, **kwargs)

    monkeypatch.setattr(sitk, "ReadImage", failing)
    with pytest.raises(Cov3dError, match=r"cannot be decoded: its transfer syntax is 1\.2\.840\.10008\.1\.2\.4\.201 "
                                         r"\(High-Throughput JPEG 2000 Lossless\)"):
        read_scan(folder)


def test_the_cache_records_the_series_and_is_made_again_for_another_series(tmp_path):
    from cov3d.data.preprocess import Size, preprocess_dataset, read_manifest

    data = tmp_path / "data"
    series(data / "ct", body(), "1.2.3.1", 2, "soft")
    series(data / "ct", body(300), "1.2.3.2", 3, "lung")
    write_slices(data / "jpeg", np.full((5, 8, 8), 90, dtype=np.uint8))
    first = preprocess_dataset(data, Size(4, 8), tmp_path / "cache", workers=1)
    rows = {r["path"]: r for r in read_manifest(first.manifest)}
    assert rows["ct"]["series"] == "1.2.3.1" and rows["ct"]["series_rule"] == ""
    other = preprocess_dataset(data, Size(4, 8), tmp_path / "cache", workers=1, series="3")
    assert (other.processed, other.skipped) == (1, 1)  # the JPEG scan ignores --series and stays cached
    rows = {r["path"]: r for r in read_manifest(other.manifest)}
    assert rows["ct"]["series"] == "1.2.3.2" and rows["ct"]["series_rule"] == "3" and rows["jpeg"]["series_rule"] == ""
    again = preprocess_dataset(data, Size(4, 8), tmp_path / "cache", workers=1, series="3")
    assert (again.processed, again.skipped) == (0, 2)
