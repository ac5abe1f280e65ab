"""`cov3d show` and `synth`: look at a scan (or a run's curves) as the model sees it; make synthetic scans."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cov3d.cli.core import app, console, progress_bar, reported
from cov3d.training.config import MAX_SEED
from cov3d.cli.options import (
    DEFAULT_SIZE, DepthOption, SeriesOption, SizeOption, WidthOption, WindowOption, scan_output_name,
)


@app.command()
def show(
    scan: Annotated[
        Path, typer.Argument(help="A scan folder or file; or a training run directory, to draw its curves.")
    ],
    output: Annotated[
        Optional[Path],
        typer.Option(help="Picture to write, in the format its suffix names: .png, .jpg, .pdf or .svg "
                          "(default: <scan name>.png here; for a run, RUN/history.png)."),
    ] = None,
    size: SizeOption = DEFAULT_SIZE,
    depth: DepthOption = None,
    width: WidthOption = None,
    window: WindowOption = None,
    lungs: Annotated[
        bool, typer.Option("--lungs/--no-lungs", help="Outline the lungs that segmentation finds (right red, left "
                                                      "cyan), and say what it measured.")
    ] = False,
    series: SeriesOption = None,
) -> None:
    """Save sections of a scan as the model sees it, or the training curves of a run directory."""
    from cov3d.atomic import check_writable
    from cov3d.errors import Cov3dError
    from cov3d.models.checkpoint import CONFIG, HISTORY, HISTORY_PLOT, LAST, PRESENCE
    from cov3d.reports.figures import image_format

    with reported():
        if output is not None:
            image_format(output)  # a suffix it cannot write: refused before any work
        if scan.is_dir() and (scan / HISTORY).is_file():
            from cov3d.reports.curves import plot_history

            check_writable(output or scan / HISTORY_PLOT)
            target = plot_history(scan / HISTORY, output or scan / HISTORY_PLOT)
            console.print(f"Saved {target}")
            return
        if scan.is_dir() and any((scan / name).is_file() for name in (CONFIG, LAST, PRESENCE)):
            raise Cov3dError(f"'{scan}' is a training run without {HISTORY} yet, so it has no curves to draw; "
                             "a run writes it after its first epoch")
        from cov3d.data.readers import DEFAULT_WINDOW, parse_window
        from cov3d.data.preprocess import preprocess_volume, resolve_size
        from cov3d.reports.show import render_views

        resolved = resolve_size(size.value, depth, width)
        hu_window = parse_window(window) if window is not None else DEFAULT_WINDOW
        target = output or _default_picture(scan)
        check_writable(target)
        tensor, meta = preprocess_volume(scan, resolved, hu_window, series=series)
        volume = tensor[0].float().numpy()
        title = f"{scan.name}: {meta['slices']} slices of {meta['height']}x{meta['width']} -> {resolved.name}"
        outline = None
        if lungs:
            from cov3d.data.lungs import segment_lungs

            mask = segment_lungs(volume)
            outline = mask.labels if mask.ok else None
            title += f"; lungs: {mask.quality}"
        render_views(volume, target, title, lungs=outline)
        console.print(f"Saved {target}")


def _default_picture(scan: Path) -> Path:
    """<scan name>.png here, the whole scan name kept; never the scan itself (a lone image file is a scan)."""
    target = Path(f"{scan_output_name(scan)}.png")
    if target.exists() and scan.exists() and target.resolve() == scan.resolve():
        target = Path(f"{scan_output_name(scan)}-sections.png")
    return target


@app.command()
def synth(
    output: Annotated[Path, typer.Argument(help="New folder for the synthetic data set.")],
    scans: Annotated[int, typer.Option(min=10, help="Number of scans (70% train, 20% validation, 10% test).")] = 160,
    seed: Annotated[
        int, typer.Option(help=f"Random seed, 0 to {MAX_SEED} (2^32 - 1); the same seed writes the same data set.")
    ] = 0,
    width: Annotated[int, typer.Option(min=32, help="Slice width = height in pixels.")] = 128,
) -> None:
    """Write a synthetic COV19-CT-DB-style data set of chest CT phantoms (JPEG slices + severity CSVs)."""
    from cov3d.data.synth import synthesize

    with reported():
        with progress_bar("Generating phantoms") as progress:
            made = synthesize(output, scans=scans, seed=seed, width=width, progress=progress)
        covid = sum(s.label == "covid" for s in made)
        labelled = sum(bool(s.label) for s in made)
        console.print(f"Wrote {len(made)} scans to {output}: {covid} covid and {labelled - covid} non-covid "
                      f"in train/validation, {len(made) - labelled} unlabelled in test.")
