"""Pictures of scans: sections as the model sees them (like the paper's Fig. 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cov3d import moved_names
from cov3d.reports.figures import pyplot, save

# Names this module held in cov3d 0.3, still importable from here.
__getattr__ = moved_names(__name__, dict.fromkeys(("render_saliency", "render_montage"), "cov3d.reports.explanation"))


def render_views(volume: np.ndarray, output: Path, title: str = "", lungs: np.ndarray | None = None) -> Path:
    """Save axial, sagittal and coronal sections of a (D, H, W) volume as a picture.

    With `lungs` (labels on the same grid: 1 right lung, 2 left lung), the
    lungs are outlined, and the sections pass through the lungs' middle (the
    sagittal one through the right lung) rather than the volume's.
    """
    plt = pyplot()
    depth, height, width = volume.shape
    z, y, x = depth // 2, height // 2, width // 2
    if lungs is not None and lungs.any():
        z, y = (int(np.nonzero(lungs.any(axis=tuple(a for a in range(3) if a != axis)))[0].mean()) for axis in (0, 1))
        right = lungs == 1
        x = int(np.nonzero(right.any(axis=(0, 1)))[0].mean()) if right.any() else x
    views = [("axial", np.s_[z, :, :]), ("sagittal", np.s_[:, :, x]), ("coronal", np.s_[:, y, :])]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (name, index) in zip(axes, views):
        plane = volume[index]
        ax.imshow(plane, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        if lungs is not None:
            for side, colour in ((1, "red"), (2, "cyan")):
                part = lungs[index] == side
                if part.any():
                    ax.contour(part, levels=[0.5], colors=colour, linewidths=1.0)
        ax.set_title(f"{name} {plane.shape[0]}x{plane.shape[1]}")
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save(fig, output)
