"""One file holding a whole volume (NIfTI, NRRD, MetaImage, a multi-frame DICOM file), read by SimpleITK."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cov3d.errors import Cov3dError
from cov3d.data.integrity import check_detached_data, check_nifti_complete, describe_itk_error
from cov3d.data.readers.base import Reader, Scan, ScanMeta, _window, check_finite
from cov3d.data.readers.dicom import _is_dicom_file
from cov3d.data.readers.orientation import to_canonical, warn_if_oblique
from cov3d.data.resample import resize_slice

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def is_volume_file(path: Path) -> bool:
    """True for a file SimpleITK reads as a whole volume (a DICOM file without a suffix included)."""
    return path.is_file() and (path.name.lower().endswith(VOLUME_SUFFIXES) or _is_dicom_file(path))


class VolumeReader(Reader):
    """A volume file in Hounsfield units (8-bit volumes are taken as windowed already), oriented head first."""

    kind = "volume"
    windowed = True

    def can_read(self, path: Path) -> bool:
        return is_volume_file(path)

    def read(self, path: Path, window: tuple[float, float], slice_width: int | None, threads: int) -> Scan:
        return _read_volume(path, window, slice_width)

    def scan_name(self, name: str) -> str:
        # Label files name 'ct_scan_3.nii.gz' as 'ct_scan_3'; '1.2.840.113619.2.dcm' is '1.2.840.113619.2'.
        for suffix in VOLUME_SUFFIXES:
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return name


def _read_volume(path: Path, window: tuple[float, float], slice_width: int | None) -> Scan:
    import SimpleITK as sitk

    if path.name.lower().endswith((".nii", ".nii.gz")):
        check_nifti_complete(path)  # ITK would fill missing voxels with zeros
    check_detached_data(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise Cov3dError(f"volume '{path}' cannot be read: {describe_itk_error(error)}") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise Cov3dError(f"volume '{path}' has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                         "cov3d needs a single-channel CT volume")
    if image.GetDimension() == 3:
        # Depth along the cranio-caudal axis, head first; rows anterior to
        # posterior and columns patient right to left, as DICOM slices are shown.
        warn_if_oblique(path, to_canonical(image.GetDirection()))
        image = sitk.DICOMOrient(image, "LPI")
    elif image.GetDimension() != 2:
        raise Cov3dError(f"volume '{path}' has {image.GetDimension()} dimensions; cov3d needs a 3D volume")
    data = sitk.GetArrayViewFromImage(image)
    check_finite(data, path)
    if data.ndim == 2:
        data = data[None]
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    origin = direction = None
    if len(spacing) == 2:
        spacing = (1.0, *spacing)
    else:
        origin, direction = tuple(image.GetOrigin()), tuple(image.GetDirection())
    # 8-bit volumes are already windowed grey images; anything else is taken as HU.
    if data.dtype == np.uint8:
        to_unit = lambda a: a.astype(np.float32) / np.float32(255.0)  # noqa: E731
    else:
        to_unit = lambda a: _window(a, window)  # noqa: E731
    slices, height, width = data.shape
    if slice_width is None:
        volume = to_unit(data)
    else:
        volume = np.stack([resize_slice(Image.fromarray(to_unit(s)), slice_width) for s in data])
    return Scan(np.clip(volume, 0.0, 1.0, out=volume),
                ScanMeta("volume", slices, height, width, spacing, origin, direction))
