"""`cov3d preprocess`: resample scans and cache them as tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cov3d.cli.core import app, console, failure_table, progress_bar, reported
from cov3d.cli.options import (
    DEFAULT_SIZE, CacheOption, DepthOption, Lungs, LungsOption, SeriesOption, SizeOption, WidthOption, WindowOption,
)


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
    lungs: LungsOption = Lungs.off,
    series: SeriesOption = None,
    train_severity: Annotated[
        Optional[Path], typer.Option(help="Severity CSV for train (default: DATA/train_partition_covid_categories.csv).")
    ] = None,
    validation_severity: Annotated[
        Optional[Path], typer.Option(help="Severity CSV for validation (default: DATA/val_partition_covid_categories.csv).")
    ] = None,
) -> None:
    """Resample every scan under DATA to a fixed size and cache it as a tensor, with a manifest.csv."""
    from cov3d.data.readers import DEFAULT_WINDOW, parse_window
    from cov3d.data.preprocess import PreprocessInterrupted, preprocess_dataset, resolve_size

    def kept(interrupt: KeyboardInterrupt) -> str:
        if isinstance(interrupt, PreprocessInterrupted):
            return interrupt.kept() + "."
        return "No scan was preprocessed yet; run the command again."

    with reported(interrupted=kept):
        from cov3d.training.config import cap_workers

        resolved = resolve_size(size.value, depth, width)
        hu_window = parse_window(window) if window is not None else DEFAULT_WINDOW
        workers = cap_workers(workers, "--workers") if workers is not None else None
        what = resolved.name + ("" if lungs == Lungs.off else f", lungs {lungs.value}")
        with progress_bar(f"Preprocessing to {what}") as progress:
            report = preprocess_dataset(
                data, resolved, cache, window=hu_window, lungs=lungs.value, series=series, workers=workers,
                overwrite=overwrite,
                severity_files={"train": train_severity, "validation": validation_severity},
                progress=progress,
            )
        cached = report.processed + report.skipped
        console.print(f"Cached {cached} of {report.total} scans at {resolved.name} "
                      f"({report.processed} processed, {report.skipped} already up to date).")
        console.print(f"Manifest: {report.manifest}")
        if report.lung_fallbacks:
            console.print(f"Lung segmentation failed for {len(report.lung_fallbacks)} scan(s), which are cached "
                          "whole (the manifest's lung_quality says why): "
                          + ", ".join(f"{path} ({reason})" for path, reason in report.lung_fallbacks[:5]))
        if report.failures:
            failure_table(report.failures)
            raise typer.Exit(1)
