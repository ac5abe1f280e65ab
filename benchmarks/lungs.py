"""Lung segmentation quality and speed (issue 20).

    python benchmarks/lungs.py [--phantoms 5] [--slices 300]

1. Dice against the lung masks of `cov3d synth` phantoms (which know them), every severity 0–4, at the
   phantoms' widths 96 and 128, and whether each phantom's lesions lie inside the lung crop.
2. The real chest CT of ../shared/data/chest-ct-dicom (when present): lung volumes, box, and Dice against
   a reference built differently — full resolution (no work grid), a fixed −500 HU threshold instead of
   Otsu's, slice-by-slice hole filling, and the trachea removed by hand (the slices above the carina where
   the airway is a separate component: chosen by looking at the overlays this script writes to
   --overlay) — so the Dice measures what the fast path (work grid, adaptive threshold, automatic trachea
   removal) loses.
3. Seconds: segmentation of a 300-slice 512×512 volume against preprocessing the same scan (a NIfTI file)
   to the large size, 160×320×320; the target is at most 25%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine  # noqa: E402
from cov3d.data.lungs import dice, lung_box, segment_lungs  # noqa: E402
from cov3d.data.preprocess import Size, preprocess_volume  # noqa: E402
from cov3d.data.readers import DEFAULT_WINDOW, read_scan  # noqa: E402
from cov3d.data.synth import make_phantom  # noqa: E402

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "chest-ct-dicom"


def windowed(hu: np.ndarray) -> np.ndarray:
    low, high = DEFAULT_WINDOW
    return np.clip((hu - low) / (high - low), 0, 1).astype(np.float32)


def phantoms(count: int) -> None:
    print("\n## Phantoms: Dice against the phantom's lung mask")
    print("| width | severity | n | Dice mean | Dice min | lesions inside the crop | seconds mean |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for width in (96, 128):
        for severity in range(5):
            scores, seconds, inside = [], [], 0
            for _ in range(count):
                phantom = make_phantom(rng, severity, width=width, slices=int(rng.integers(40, 100)))
                start = time.perf_counter()
                mask = segment_lungs(windowed(phantom.hu))
                seconds.append(time.perf_counter() - start)
                scores.append(dice(mask.labels > 0, phantom.lungs) if mask.ok else 0.0)
                if mask.ok:
                    (z0, z1), (y0, y1), (x0, x1) = lung_box(mask)
                    box = np.zeros(phantom.hu.shape, dtype=bool)
                    box[z0:z1, y0:y1, x0:x1] = True
                    inside += not (phantom.lesions & ~box).any()
            print(f"| {width} | {severity} | {count} | {statistics.mean(scores):.4f} | {min(scores):.4f} | "
                  f"{inside}/{count} | {statistics.mean(seconds):.2f} |")


def reference_mask(hu: np.ndarray, airway_slices: int) -> np.ndarray:
    """The careful reference: full resolution, −500 HU, border air out, two largest, holes filled, trachea cut."""
    from scipy.ndimage import binary_fill_holes, label

    dark = hu < -500
    components, _ = label(dark)
    border = np.unique(np.concatenate([components[:, [0, -1], :].ravel(), components[:, :, [0, -1]].ravel()]))
    dark &= ~np.isin(components, border[border > 0])
    components, count = label(dark)
    sizes = np.bincount(components.ravel())[1:]
    keep = np.argsort(-sizes)[:2] + 1
    lungs = np.isin(components, keep)
    plane = np.zeros((3, 3, 3), dtype=bool)
    plane[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    lungs = binary_fill_holes(lungs, structure=plane)
    # Trachea: in the first `airway_slices` slices, drop components of under 2 cm² (the airway), slice by slice.
    for z in range(airway_slices):
        parts, n = label(lungs[z])
        for index in range(1, n + 1):
            if (parts == index).sum() * 0.84 ** 2 < 200:
                lungs[z][parts == index] = False
    return lungs


def real_ct(overlay: Path | None) -> None:
    if not SHARED.is_dir():
        print("\n## Real chest CT: ../shared/data/chest-ct-dicom is not here; skipped")
        return
    import SimpleITK as sitk

    scan = read_scan(SHARED)
    start = time.perf_counter()
    mask = segment_lungs(scan.volume)
    seconds = time.perf_counter() - start
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(SHARED)))
    hu = sitk.GetArrayFromImage(sitk.DICOMOrient(reader.Execute(), "LPI")).astype(np.float32)
    reference = reference_mask(hu, airway_slices=20)
    right, left = mask.volumes_ml(scan.meta.spacing)
    print("\n## Real chest CT (64 slices, 512×512, 5 mm)")
    print(f"quality {mask.quality}; right lung {right:.0f} ml, left {left:.0f} ml; box {lung_box(mask)}; "
          f"{seconds:.2f} s; Dice against the reference {dice(mask.labels > 0, reference):.4f}")
    if overlay is not None:
        from cov3d.reports.figures import pyplot, save

        plt = pyplot()
        figure, axes = plt.subplots(1, 4, figsize=(16, 4.5))
        for axis, z in zip(axes[:3], (12, 30, 48)):
            axis.imshow(scan.volume[z], cmap="gray")
            axis.contour(mask.labels[z] > 0, [0.5], colors="r")
            axis.contour(reference[z], [0.5], colors="c", linestyles="dashed")
            axis.set_title(f"slice {z}: cov3d (red), reference (cyan)")
        axes[3].imshow(scan.volume[:, 256], cmap="gray", aspect=5 / 0.84)
        axes[3].contour(mask.labels[:, 256] > 0, [0.5], colors="r")
        axes[3].contour(reference[:, 256], [0.5], colors="c", linestyles="dashed")
        save(figure, overlay)
        print(f"overlay written to {overlay}")


def speed(slices: int) -> None:
    import SimpleITK as sitk

    from preprocess import make_scan  # benchmarks/preprocess.py's synthetic 512² JPEG scan

    rng = np.random.default_rng(1)
    phantom = make_phantom(rng, 3, width=128, slices=slices // 4 + 1)
    hu = phantom.hu.repeat(4, axis=0)[:slices].repeat(4, axis=1).repeat(4, axis=2).astype(np.int16)
    size = Size(160, 320)
    print(f"\n## Speed: {slices}×512×512 scans to 160×320×320 (best of 3 each)")
    print("| input | preprocess, --lungs off | segmentation alone | share | preprocess, --lungs crop |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        nifti = Path(scratch) / "scan.nii.gz"
        image = sitk.GetImageFromArray(hu)
        image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
        sitk.WriteImage(image, str(nifti))
        jpeg = make_scan(Path(scratch) / "jpeg", slices)
        for name, path in (("NIfTI (HU)", nifti), ("JPEG slices", jpeg)):
            def best(step) -> float:
                times = []
                for _ in range(3):
                    start = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - start)
                return min(times)

            off = best(lambda: preprocess_volume(path, size))
            volume = read_scan(path).volume
            segment = best(lambda: segment_lungs(volume))
            crop = best(lambda: preprocess_volume(path, size, lungs="crop"))
            print(f"| {name} | {off:.2f} s | {segment:.2f} s | {100 * segment / off:.0f}% (target ≤ 25%) | "
                  f"{crop:.2f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=int, default=5, help="phantoms per width and severity")
    parser.add_argument("--slices", type=int, default=300, help="slices of the speed test's scan")
    parser.add_argument("--overlay", type=Path, default=None, help="PNG of the real CT's masks, to look at")
    args = parser.parse_args()
    print(describe_machine())
    phantoms(args.phantoms)
    real_ct(args.overlay)
    speed(args.slices)


if __name__ == "__main__":
    main()
