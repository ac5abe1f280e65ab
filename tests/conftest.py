"""Synthetic scans written to tmp_path: JPEG/PNG slice folders, DICOM series, NIfTI volumes."""

from __future__ import annotations

import contextlib
import locale
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DICOM = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "chest-ct-dicom"


def write_slices(folder: Path, volume: np.ndarray, suffix: str = ".jpg", names: list[str] | None = None) -> Path:
    """Write a (D, H, W) uint8 volume as numbered image files."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, array in enumerate(volume):
        name = names[index] if names else f"{index}{suffix}"
        options = {"quality": 95} if suffix.lower() in (".jpg", ".jpeg") else {}
        Image.fromarray(np.asarray(array, dtype=np.uint8)).save(folder / name, **options)
    return folder


@contextlib.contextmanager
def keep_locale():
    """GDCM's DICOM writer sets the C locale and leaves it: Python's text I/O would then default to ASCII."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def write_dicom_series(folder: Path, hu: np.ndarray, names: list[str] | None = None, z0: float = 0.0,
                       z_step: float = -2.5, series: str = "1.2.826.0.1.3680043.2.1125.1") -> Path:
    """Write a (D, H, W) HU volume as a DICOM series, head first (z decreasing), InstanceNumber 1…D."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # file names need not end in .dcm
    with keep_locale():
        _write_series(writer, folder, hu, names, z0, z_step, series)
    return folder


def _write_series(writer, folder: Path, hu: np.ndarray, names: list[str] | None, z0: float, z_step: float,
                  series: str) -> None:
    import SimpleITK as sitk

    for index, array in enumerate(hu):
        image = sitk.GetImageFromArray(np.asarray(array, dtype=np.int16))
        image.SetSpacing((0.7, 0.7))
        tags = {
            "0008|0060": "CT",
            "0020|000e": series,
            "0020|0013": str(index + 1),
            "0020|0032": f"-100\\-100\\{z0 + index * z_step}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|1052": "-1024",
            "0028|1053": "1",
        }
        for key, value in tags.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / (names[index] if names else f"slice{index:03d}.dcm")))
        writer.Execute(image)


def write_nifti(path: Path, hu: np.ndarray, spacing=(0.7, 0.7, 2.5)) -> Path:
    """Write a (D, H, W) HU volume as NIfTI with depth running head to feet."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.asarray(hu, dtype=np.int16))
    image.SetSpacing(spacing)
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))  # third index axis points to the feet
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def ramp_volume(depth: int = 6, size: int = 24) -> np.ndarray:
    """A uint8 volume whose slice i is uniformly 10 + 19·i (up to 13 slices): each slice identifiable by value."""
    return np.stack([np.full((size, size), 10 + 19 * i, dtype=np.uint8) for i in range(depth)])


@pytest.fixture
def slice_scan(tmp_path: Path) -> Path:
    return write_slices(tmp_path / "scan", ramp_volume())


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A small COV19-CT-DB-style dataset with repeated scan names and severity CSVs."""
    return make_dataset(tmp_path / "data")


def make_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)

    def scan(path: Path, depth: int) -> None:
        write_slices(path, rng.integers(0, 255, size=(depth, 20, 20), dtype=np.uint8))

    scan(root / "train" / "covid" / "ct_scan_0", 5)
    scan(root / "train" / "covid" / "ct_scan_1", 7)
    scan(root / "train" / "non-covid" / "ct_scan_0", 4)
    scan(root / "validation" / "covid" / "ct_scan_2", 3)
    scan(root / "validation" / "non_covid" / "ct_scan_3", 6)
    scan(root / "test" / "ct_scan_9", 2)
    (root / "train_partition_covid_categories.csv").write_text("Name;Category\nct_scan_0;2\nct_scan_1;4\n")
    (root / "val_partition_covid_categories.csv").write_text("Name,Category\nct_scan_2,1\n")
    return root


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory from one epoch of training a tiny-input model (λ = 0.1: both checkpoints)."""
    from cov3d.training.trainer import TrainConfig, train

    base = tmp_path_factory.mktemp("trained")
    data = make_dataset(base / "data")
    # Running BatchNorm statistics (bn_scans=0): statistics measured on three random-noise scans make this
    # tiny model's outputs saturate on other scans, and the inference tests need graded probabilities.
    config = TrainConfig(data=str(data), output=str(base / "run"), pretrained=False, depth=8, width=16, epochs=1,
                         batch_size=2, bn_scans=0, loader_workers=0, penultimate=16, cache=str(base / "cache"))
    return train(config).run


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Never write into the user's real ~/.cache during tests.
    monkeypatch.setenv("COV3D_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    os.environ.setdefault("OMP_NUM_THREADS", "2")


def write_dicom_image(folder: Path, image, series: str = "1.2.826.0.1.3680043.2.1125.7", start: int = 1,
                      names: str = "slice{:03d}.dcm", tags: dict[str, str] | None = None) -> Path:
    """Write a 3D SimpleITK image of HU as a DICOM series in its own slice plane: one file per index k along z.

    Each file carries the position of voxel (0, 0, k) and the direction of the image's first two index axes,
    as a scanner writes a series acquired in that plane.
    """
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    orientation = "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1]))
    array = sitk.GetArrayFromImage(image)
    for k in range(image.GetSize()[2]):
        plane = sitk.GetImageFromArray(np.asarray(array[k], dtype=np.int16))
        plane.SetSpacing(image.GetSpacing()[:2])
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        values = {
            "0008|0060": "CT",
            "0020|000e": series,
            "0020|0013": str(start + k),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": orientation,
            "0028|1052": "-1024",
            "0028|1053": "1",
            **(tags or {}),
        }
        for key, value in values.items():
            plane.SetMetaData(key, value)
        writer.SetFileName(str(folder / names.format(start + k)))
        with keep_locale():
            writer.Execute(plane)
    return folder
