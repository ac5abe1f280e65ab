"""Pictures of scans: sections as the model sees them (like the paper's Fig. 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cov3d import moved_names
from cov3d.reports.figures import pyplot, save

# Names this module held in cov3d 0.3, still importable from here.
__getattr__ = moved_names(__name__, dict.fromkeys(("render_saliency", "render_montage"), "cov3d.reports.explanation"))


def render_views(volume: np.ndarray, output: Path, title: str = "") -> Path:
    """Save axial, sagittal and coronal sections through the middle of a (D, H, W) volume as a PNG."""
    plt = pyplot()
    depth, height, width = volume.shape
    views = [("axial", volume[depth // 2]), ("sagittal", volume[:, :, width // 2]),
             ("coronal", volume[:, height // 2, :])]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (name, plane) in zip(axes, views):
        ax.imshow(plane, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"{name} {plane.shape[0]}x{plane.shape[1]}")
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save(fig, output)
