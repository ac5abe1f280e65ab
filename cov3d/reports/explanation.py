"""Pictures and files of a Grad-CAM explanation: sections and montages over the scan, NIfTI maps, explain.json.

Takes the :class:`cov3d.inference.explain.Explanation` that `explain_scan`
computes and writes it; nothing here computes a map.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cov3d.atomic import replacing_folder, write_failed, write_text
from cov3d.errors import Cov3dError
from cov3d.data.writers import write_volume
from cov3d.labels import SEVERITY_NAMES
from cov3d.reports.figures import pyplot, save

if TYPE_CHECKING:  # for annotations only: computing modules never import this package's callers
    from cov3d.inference.explain import Explanation


def peak(volume_map: np.ndarray) -> tuple[int, int, int]:
    """(slice, row, column) of a map's maximum."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(volume_map)), volume_map.shape))


def top_slices(volume_map: np.ndarray, count: int = 12) -> list[int]:
    """The `count` slices holding the most map mass, in slice order.

    Slices closer than slices/(3·count) to one already chosen are passed over,
    so that a thin-slice scan shows several regions rather than one region
    twelve times over.
    """
    mass = volume_map.reshape(volume_map.shape[0], -1).sum(axis=1)
    gap = max(1, math.ceil(len(mass) / (3 * count))) if len(mass) > count else 1
    chosen: list[int] = []
    for index in np.argsort(-mass, kind="stable"):
        if len(chosen) == count:
            break
        if all(abs(int(index) - c) >= gap for c in chosen):
            chosen.append(int(index))
    return sorted(chosen)


def _section_aspects(explanation) -> tuple[float, float, float]:
    """Height/width of one voxel in the axial, coronal and sagittal sections (matplotlib's `aspect`)."""
    slices, _, width = explanation.scan.shape
    if explanation.meta.spacing is not None:
        along, row, column = explanation.meta.spacing
    else:  # unknown spacing: square pixels, and the depth the model's preprocessed volume gives the scan
        row = column = 1.0
        along = explanation.aspect_depth * width / slices
    return row / column, along / column, along / row


def render_saliency(explanation: Explanation, task: str, output: Path) -> Path:
    """Axial, coronal and sagittal sections through the map's maximum, the map over the scan in the lung
    window, with a colour bar; P(covid) and the severity in the title."""
    plt = pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

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
    return save(fig, output)


def render_montage(explanation: Explanation, task: str, output: Path, count: int = 12) -> Path:
    """The axial slices with the most map mass, the map over the scan in the lung window."""
    plt = pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

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
    return save(fig, output)


def _what(explanation, task: str) -> str:
    return "presence map" if task == "presence" else f"severity map for '{explanation.severity_name}'"


def _overlay(ax, plane: np.ndarray, heat: np.ndarray, top: float, aspect: float) -> None:
    """The scan in grey, the map in colour over it, transparent where the map is low."""
    plt = pyplot()
    ax.imshow(plane, cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="bilinear")
    colours = plt.get_cmap("turbo")(np.clip(heat / top, 0.0, 1.0))
    colours[..., 3] = 0.65 * np.clip(heat / top, 0.0, 1.0) ** 0.7
    ax.imshow(colours, aspect=aspect, interpolation="bilinear")
    ax.axis("off")


# The files of an explanation set: those of each task, the scan's slices, the summary.
TASK_FILES = ("{task}.nii.gz", "{task}.png", "{task}-montage.png")
SET_FILES = frozenset([name.format(task=task) for task in ("presence", "severity") for name in TASK_FILES]
                      + ["scan.nii.gz", "explain.json"])


def write_explanation(explanation: Explanation, output: Path) -> list[Path]:
    """Pictures, NIfTI maps and explain.json for each task into `output`; returns the files written.

    `<task>.png` (three sections through the map's maximum), `<task>-montage.png`
    (the most attended axial slices) and `<task>.nii.gz` (the map on the original
    slices, with the scan's geometry). A scan without geometry (JPEG/PNG slices)
    gets its slices written too, as `scan.nii.gz` on the same grid, to lay the map over.

    The set is whole or absent: it is written into a temporary folder beside
    `output`, which then takes the place of `output` in one step, so a failed
    or killed explain leaves the previous set as it was, never a mix of the
    two. Other files in `output` (not an explanation's) are carried over.
    """
    output = Path(output)
    if Path.cwd().resolve().is_relative_to(output.resolve()):
        raise Cov3dError(f"cannot write the explanation into '{output}': it is the current folder or holds it; "
                         "give a folder below it, e.g. --output explain")
    try:
        with replacing_folder(output, keep=lambda name: name not in SET_FILES) as folder:
            names = _write_set(explanation, folder)
            _check_volumes(folder, names)
    except OSError as error:  # a full disk: name the file the set was writing, in its final place
        name = Path(error.filename).name if getattr(error, "filename", None) else ""
        target = output / name if name in SET_FILES else output
        named = write_failed(OSError(error.errno, error.strerror or str(error)), target)  # not the temporary path
        raise Cov3dError(f"{named}; '{output}' keeps its previous files") from None
    return [output / name for name in names]


def _check_volumes(folder: Path, names: list[str]) -> None:
    """An OSError unless every NIfTI file of the new set is whole.

    ITK reports no error when a disk fills under it: it leaves a cut-off file
    (and prints "wrote only 0 of … bytes"). Such a set is not swapped in.
    """
    import errno
    import shutil

    from cov3d.data.integrity import check_nifti_complete

    for name in names:
        if name.endswith(".nii.gz"):
            try:
                check_nifti_complete(folder / name)
            except Cov3dError:
                full = shutil.disk_usage(folder).free < 1 << 20
                code = errno.ENOSPC if full else errno.EIO
                raise OSError(code, os.strerror(code), str(folder / name)) from None


def _write_set(explanation: Explanation, output: Path) -> list[str]:
    """Write the files of an explanation into the (new, empty) folder `output`; their names."""
    written: list[Path] = []
    summary: dict = {"scan": str(explanation.path), "probability": explanation.probability,
                     "severity": explanation.severity_name,
                     "severity_probabilities": None if explanation.severity is None else
                     {name: float(p) for name, p in zip(SEVERITY_NAMES, explanation.severity)},
                     "shape": list(explanation.scan.shape), "maps": {},
                     # The share of each map's mass inside the segmented lungs: a sanity check on real scans.
                     "lungs": {"segmentation": explanation.lungs_quality, "map_share": explanation.lung_share}}
    for task, volume_map in explanation.maps.items():
        written.append(write_volume(output / f"{task}.nii.gz", volume_map, explanation.meta))
        written.append(render_saliency(explanation, task, output / f"{task}.png"))
        written.append(render_montage(explanation, task, output / f"{task}-montage.png"))
        summary["maps"][task] = {"peak": list(peak(volume_map)), "max": float(volume_map.max()),
                                 "mean": float(volume_map.mean()), "top_slices": top_slices(volume_map)}
    if explanation.meta.origin is None:
        grey = np.round(explanation.scan * 255).astype(np.uint8)
        written.append(write_volume(output / "scan.nii.gz", grey, explanation.meta))
    written.append(output / "explain.json")
    write_text(output / "explain.json", json.dumps(summary, indent=2) + "\n")
    return [path.name for path in written]
