"""Writing arrays on a scan's voxel grid, for viewers to lay over the original scan."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cov3d.errors import Cov3dError
from cov3d.data.readers.base import ScanMeta


def write_volume(path: Path, array: np.ndarray, meta: ScanMeta) -> Path:
    """Save a (slices, height, width) array on a scan's voxel grid as NIfTI, NRRD or MetaImage (by suffix).

    With the scan's geometry (spacing, origin, direction) where the reader knew
    it, so a viewer lays the array over the original scan. Without it (JPEG/PNG
    slices): 1 mm voxels with the slices running head to feet.
    """
    import SimpleITK as sitk

    from cov3d.atomic import replacing

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    if meta.spacing is not None:
        image.SetSpacing(tuple(float(s) for s in reversed(meta.spacing)))
    if meta.origin is not None and meta.direction is not None:
        image.SetOrigin(meta.origin)
        image.SetDirection(meta.direction)
    else:
        image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0))  # slice index runs to the feet
    if not Path(path).name.lower().endswith((".nii", ".nii.gz", ".nrrd", ".mha")):
        raise Cov3dError(f"'{path}' is not a .nii.gz, .nii, .nrrd or .mha file name")
    with replacing(Path(path)) as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=True)
    return Path(path)
