"""Every input in one orientation: DICOM series in any plane and position read like the NIfTI of the same body."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch

from cov3d.data.dataset import reflect
from cov3d.data.preprocess import Size, preprocess_volume
from cov3d.data.readers import read_scan
from cov3d.data.readers.orientation import OBLIQUE_TOLERANCE, to_canonical
from conftest import SHARED_DICOM, write_dicom_image

# (depth, rows, columns) in cov3d's convention: head→feet, anterior→posterior, patient right→left.
SHAPE = (18, 22, 26)


def phantom() -> np.ndarray:
    """A body with three markers of distinct HU: head (top slices), anterior (first rows), left (last columns)."""
    depth, rows, columns = SHAPE
    hu = np.full(SHAPE, -1000, dtype=np.int16)
    z, y, x = np.ogrid[:depth, :rows, :columns]
    body = ((y - rows / 2) / (rows / 2.4)) ** 2 + ((x - columns / 2) / (columns / 2.4)) ** 2 <= 1
    hu[np.broadcast_to(body, SHAPE)] = 0
    hu[1:4, 8:14, 10:16] = 400      # head marker: the first slices
    hu[8:11, 2:5, 11:15] = 700      # anterior marker: the first rows
    hu[8:11, 9:13, 20:24] = 1000    # left marker: the last columns (patient left)
    hu[14:17, 15:19, 4:8] = -300    # right-posterior-foot marker, to catch any remaining mirror
    return hu


def canonical_image(hu: np.ndarray):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((-10.0, -12.0, 40.0))
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))  # columns to the left, rows to posterior, slices to the feet
    return image


def oriented(image, name: str):
    """The same voxels in physical space, stored as a series in another plane or patient position."""
    import SimpleITK as sitk

    return {
        "axial-head-first": lambda i: i,
        "axial-feet-first": lambda i: sitk.Flip(i, [True, False, True]),
        "axial-prone": lambda i: sitk.Flip(i, [True, True, False]),
        "decubitus": lambda i: sitk.Flip(sitk.PermuteAxes(i, [1, 0, 2]), [True, False, False]),
        "axial-transposed": lambda i: sitk.PermuteAxes(i, [1, 0, 2]),
        "sagittal": lambda i: sitk.PermuteAxes(i, [1, 2, 0]),
        "coronal": lambda i: sitk.Flip(sitk.PermuteAxes(i, [0, 2, 1]), [False, False, True]),
    }[name](image)


ORIENTATIONS = ["axial-head-first", "axial-feet-first", "axial-prone", "decubitus", "axial-transposed", "sagittal",
                "coronal"]


@pytest.fixture(scope="module")
def nifti(tmp_path_factory):
    import SimpleITK as sitk

    path = tmp_path_factory.mktemp("nifti") / "body.nii.gz"
    sitk.WriteImage(canonical_image(phantom()), str(path))
    return path


@pytest.mark.parametrize("name", ORIENTATIONS)
def test_dicom_series_in_any_orientation_reads_like_the_nifti(tmp_path, nifti, name):
    import SimpleITK as sitk

    image = oriented(canonical_image(phantom()), name)
    assert sitk.GetArrayFromImage(image).shape != SHAPE or name.startswith("axial") or name == "decubitus"
    folder = write_dicom_image(tmp_path / name, image)
    scan = read_scan(folder)
    reference = read_scan(nifti)
    assert scan.volume.shape == SHAPE
    assert np.abs(scan.volume - reference.volume).max() <= 1e-3
    assert scan.meta.spacing == pytest.approx(reference.meta.spacing)
    assert scan.meta.origin == pytest.approx(reference.meta.origin, abs=1e-4)
    assert scan.meta.direction == pytest.approx(reference.meta.direction, abs=1e-6)
    size = Size(8, 16)
    cached, _ = preprocess_volume(folder, size)
    expected, _ = preprocess_volume(nifti, size)
    assert (cached.float() - expected.float()).abs().max().item() <= 1e-3


def test_the_markers_sit_where_the_convention_says_and_reflect_swaps_left_and_right(nifti):
    volume = read_scan(nifti).volume
    hu = phantom()
    lit = lambda value: np.argwhere(np.isclose(hu, value))  # noqa: E731
    head, anterior, left = lit(400), lit(700), lit(1000)
    assert head[:, 0].max() < SHAPE[0] / 3                       # head marker in the first slices
    assert anterior[:, 1].max() < SHAPE[1] / 3                   # anterior marker in the first rows
    assert left[:, 2].min() > SHAPE[2] * 2 / 3                   # left marker in the last columns
    tensor = torch.from_numpy(volume.copy())[None]
    mirrored = reflect(tensor)[0].numpy()
    left_value = volume[tuple(left[0])]
    right_of = left.copy()
    right_of[:, 2] = SHAPE[2] - 1 - left[:, 2]
    assert np.allclose(mirrored[tuple(right_of.T)], left_value)  # the left marker is now on the right side
    assert not np.isclose(mirrored[tuple(left.T)], left_value).any()


def test_every_signed_permutation_maps_to_the_convention():
    for permutation in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            matrix = np.zeros((3, 3))
            for column, (row, sign) in enumerate(zip(permutation, signs)):
                matrix[row, column] = sign
            reorientation = to_canonical(tuple(matrix.ravel()))
            vectors = np.stack([matrix[:, 2 - axis] for axis in range(3)])
            result = []
            for source, flip in zip(reorientation.axes, reorientation.flips):
                result.append(-vectors[source] if flip else vectors[source])
            assert np.allclose(result, [[0, 0, -1], [0, 1, 0], [1, 0, 0]])
            assert reorientation.tilt == pytest.approx(0.0)


def _tilted(degrees: float):
    image = canonical_image(phantom())
    angle = np.radians(degrees)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    image.SetDirection(tuple((rotation @ np.diag([1.0, 1.0, -1.0])).ravel()))
    return image


def test_an_oblique_series_beyond_the_tolerance_is_warned_naming_the_angle(tmp_path, caplog):
    folder = write_dicom_image(tmp_path / "oblique", _tilted(OBLIQUE_TOLERANCE + 10))
    with caplog.at_level(logging.WARNING):
        scan = read_scan(folder)
    assert scan.volume.shape == SHAPE
    assert f"tilted {OBLIQUE_TOLERANCE + 10:.1f}°" in caplog.text


def test_a_slightly_tilted_series_reads_without_a_warning(tmp_path, caplog):
    folder = write_dicom_image(tmp_path / "tilted", _tilted(4))
    with caplog.at_level(logging.WARNING):
        scan = read_scan(folder)
    assert scan.volume.shape == SHAPE
    assert "tilted" not in caplog.text


@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason="../shared/data/chest-ct-dicom is not here")
@pytest.mark.parametrize("name", ["sagittal", "axial-prone"])
def test_the_real_chest_ct_rewritten_in_another_plane_reads_as_the_original(tmp_path, name):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(SHARED_DICOM)))
    ct = sitk.Cast(sitk.Shrink(reader.Execute(), [8, 8, 2]), sitk.sitkInt16)  # 64x64x32: quick to rewrite
    original = read_scan(write_dicom_image(tmp_path / "axial", ct))
    scan = read_scan(write_dicom_image(tmp_path / name, oriented(ct, name)))
    assert scan.volume.shape == original.volume.shape == (32, 64, 64)
    assert np.abs(scan.volume - original.volume).max() <= 1e-3
