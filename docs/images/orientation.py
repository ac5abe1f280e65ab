"""Draw docs/images/orientation.png: a sagittal and a prone DICOM series, stacked as stored and as cov3d reads them.

Both series are the real chest CT of ../shared/data/chest-ct-dicom rewritten in another plane or patient position
(the voxels stay where they are in the patient). Run from the repository root:
``python docs/images/orientation.py``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import SHARED_DICOM, write_dicom_image  # noqa: E402

from cov3d.data.readers import read_scan  # noqa: E402
from cov3d.reports.figures import pyplot, save  # noqa: E402


def main() -> None:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(SHARED_DICOM)))
    ct = sitk.Shrink(reader.Execute(), [4, 4, 1])  # 128x128 in-plane keeps the rewrite quick
    ct = sitk.Cast(ct, sitk.sitkInt16)
    plt = pyplot()
    figure, axes = plt.subplots(2, 3, figsize=(9.6, 6.6))
    with tempfile.TemporaryDirectory() as scratch:
        cases = [("sagittal series", sitk.PermuteAxes(ct, [1, 2, 0])),
                 ("prone series", sitk.Flip(ct, [True, True, False]))]
        for row, (title, image) in enumerate(cases):
            folder = write_dicom_image(Path(scratch) / title.replace(" ", "-"), image)
            stored = sitk.GetArrayFromImage(image)  # slice by slice, as the files hold them
            scan = read_scan(folder).volume
            mid = stored.shape[0] // 2
            axes[row, 0].imshow(np.clip((stored[mid] + 1350) / 1500, 0, 1), cmap="gray")
            axes[row, 0].set_title(f"{title}: file {mid + 1} as stored")
            axes[row, 1].imshow(scan[scan.shape[0] // 2 + 4], cmap="gray")
            axes[row, 1].set_title("read by cov3d: axial section")
            axes[row, 2].imshow(scan[:, scan.shape[1] // 2, :], cmap="gray", aspect=5.0 / (0.84 * 4))
            axes[row, 2].set_title("read by cov3d: coronal section")
        for axis in axes.ravel():
            axis.set_xticks([])
            axis.set_yticks([])
        figure.text(0.5, 0.01, "cov3d's convention: depth head→feet, rows anterior→posterior, columns patient "
                    "right→left (patient's right on the image's left)", ha="center", fontsize=9)
        figure.tight_layout(rect=(0, 0.03, 1, 1))
        save(figure, ROOT / "docs" / "images" / "orientation.png")


if __name__ == "__main__":
    main()
