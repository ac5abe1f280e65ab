"""Pictures of scans: sections as the model sees them (like the paper's Fig. 2), and saliency maps over them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cov3d.atomic import replacing


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
    return _save(fig, output)


def _section_aspects(explanation) -> tuple[float, float, float]:
    """Height/width of one voxel in the axial, coronal and sagittal sections (matplotlib's `aspect`)."""
    slices, _, width = explanation.scan.shape
    if explanation.meta.spacing is not None:
        along, row, column = explanation.meta.spacing
    else:  # unknown spacing: square pixels, and the depth the model's preprocessed volume gives the scan
        row = column = 1.0
        along = explanation.aspect_depth * width / slices
    return row / column, along / column, along / row


def render_saliency(explanation, task: str, output: Path) -> Path:
    """Axial, coronal and sagittal sections through the map's maximum, the map over the scan in the lung
    window, with a colour bar; P(covid) and the severity in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from cov3d.inference.explain import peak

    scan, heat = explanation.scan, explanation.maps[task]
    z, y, x = peak(heat)
    top = float(heat.max()) or 1.0
    axial, coronal, sagittal = _section_aspects(explanation)
    views = [(f"axial, slice {z}", scan[z], heat[z], axial),
             (f"coronal, row {y}", scan[:, y, :], heat[:, y, :], coronal),
             (f"sagittal, column {x}", scan[:, :, x], heat[:, :, x], sagittal)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 5.2))
    for ax, (name, plane, overlay, aspect) in zip(axes, views):
        _overlay(ax, plane, overlay, top, aspect)
        ax.set_title(name)
    fig.colorbar(ScalarMappable(Normalize(0.0, top), cmap="turbo"), ax=list(axes), shrink=0.8,
                 label=f"Grad-CAM ({task})")
    fig.suptitle(f"{explanation.title()} — {_what(explanation, task)}")
    return _save(fig, output)


def render_montage(explanation, task: str, output: Path, count: int = 12) -> Path:
    """The axial slices with the most map mass, the map over the scan in the lung window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from cov3d.inference.explain import top_slices

    scan, heat = explanation.scan, explanation.maps[task]
    chosen = top_slices(heat, count)
    total = float(heat.sum()) or 1.0
    top = float(heat.max()) or 1.0
    columns = min(4, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns + 1.2, 3.5 * rows + 0.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, chosen):
        _overlay(ax, scan[index], heat[index], top, _section_aspects(explanation)[0])
        ax.set_title(f"slice {index}: {100 * float(heat[index].sum()) / total:.1f}% of map", fontsize=9)
    fig.colorbar(ScalarMappable(Normalize(0.0, top), cmap="turbo"), ax=list(axes.flat), shrink=0.8,
                 label=f"Grad-CAM ({task})")
    fig.suptitle(f"{explanation.title()} — {_what(explanation, task)}: most attended axial slices")
    return _save(fig, output)


def _what(explanation, task: str) -> str:
    return "presence map" if task == "presence" else f"severity map for '{explanation.severity_name}'"


def _overlay(ax, plane: np.ndarray, heat: np.ndarray, top: float, aspect: float) -> None:
    """The scan in grey, the map in colour over it, transparent where the map is low."""
    import matplotlib.pyplot as plt

    ax.imshow(plane, cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="bilinear")
    colours = plt.get_cmap("turbo")(np.clip(heat / top, 0.0, 1.0))
    colours[..., 3] = 0.65 * np.clip(heat / top, 0.0, 1.0) ** 0.7
    ax.imshow(colours, aspect=aspect, interpolation="bilinear")
    ax.axis("off")


def _save(fig, output: Path) -> Path:
    import matplotlib.pyplot as plt

    with replacing(Path(output)) as temporary:
        fig.savefig(temporary, dpi=100, format="png")
    plt.close(fig)
    return Path(output)
