"""`cov3d preprocess`: resample scans and cache them as tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cov3d.cli.core import app, console, failure_table, progress_bar, reported
from cov3d.cli.options import DEFAULT_SIZE, CacheOption, DepthOption, SizeOption, WidthOption, WindowOption


@app.command()
def preprocess(
    data: Annotated[Path, typer.Argument(help="A COV19-CT-DB dataset root, a folder of scans, or one scan.")],
    size: SizeOption = DEFAULT_SIZE,
    depth: DepthOption = None,
    width: WidthOption = None,
    cache: CacheOption = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Scans processed at once (default: all cores).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo scans whose cache is up to date.")] = False,
    window: WindowOption = None,
    train_severity: Annotated[
        Optional[Path], typer.Option(help="Severity CSV for train (default: DATA/train_partition_covid_categories.csv).")
    ] = None,
    validation_severity: Annotated[
        Optional[Path], typer.Option(help="Severity CSV for validation (default: DATA/val_partition_covid_categories.csv).")
    ] = None,
) -> None:
    """Resample every scan under DATA to a fixed size and cache it as a tensor, with a manifest.csv."""
    from cov3d.data.readers import DEFAULT_WINDOW, parse_window
    from cov3d.data.preprocess import preprocess_dataset, resolve_size

    with reported():
        resolved = resolve_size(size.value, depth, width)
        hu_window = parse_window(window) if window is not None else DEFAULT_WINDOW
        with progress_bar(f"Preprocessing to {resolved.name}") as progress:
            report = preprocess_dataset(
                data, resolved, cache, window=hu_window, workers=workers, overwrite=overwrite,
                severity_files={"train": train_severity, "validation": validation_severity},
                progress=progress,
            )
        cached = report.processed + report.skipped
        console.print(f"Cached {cached} of {report.total} scans at {resolved.name} "
                      f"({report.processed} processed, {report.skipped} already up to date).")
        console.print(f"Manifest: {report.manifest}")
        if report.failures:
            failure_table(report.failures)
            raise typer.Exit(1)
