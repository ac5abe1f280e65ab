"""Cross-sections of a preprocessed scan, as the model sees it (like the paper's Fig. 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import replacing


def render_views(volume: np.ndarray, output: Path, title: str = "") -> Path:
    """Save axial, sagittal and coronal sections through the middle of a (D, H, W) volume as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

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
    with replacing(Path(output)) as temporary:
        fig.savefig(temporary, dpi=100, format="png")
    plt.close(fig)
    return Path(output)
