"""The `cov3d` command line: parse options, call the library, report. Nothing else lives here."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .errors import Cov3dError

app = typer.Typer(
    help="Detect the presence and severity of COVID-19 in chest CT scans with 3D ResNets (Cov3d).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)


class SizeName(str, Enum):
    small = "small"
    medium = "medium"
    large = "large"


@contextmanager
def _reported() -> Iterator[None]:
    """Turn expected errors into one red line and a non-zero exit."""
    try:
        yield
    except Cov3dError as error:
        errors.print(f"[bold red]Error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        errors.print("[bold red]Interrupted.[/] Finished work is kept; run the command again to resume.")
        raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        console.print(f"cov3d {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv for debug).")] = 0,
) -> None:
    """Detect the presence and severity of COVID-19 in chest CT scans with 3D ResNets (Cov3d)."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=errors, show_path=False)],
                        force=True)


WindowOption = Annotated[
    Optional[str],
    typer.Option(help="HU window LOW,HIGH mapped to [0, 1] for DICOM and volume files "
                      "(write --window=-1350,150; default: the lung window -1350,150)."),
]
SizeOption = Annotated[
    SizeName, typer.Option(help="Preprocessed size: small 64x128x128, medium 128x256x256, large 160x320x320.")
]
DepthOption = Annotated[Optional[int], typer.Option(min=1, help="Depth in slices; overrides --size.")]
WidthOption = Annotated[Optional[int], typer.Option(min=1, help="Slice width = height in pixels; overrides --size.")]
CacheOption = Annotated[
    Optional[Path],
    typer.Option(help="Cache folder (default: $COV3D_CACHE, else ~/.cache/cov3d, in a folder named after DATA). "
                      "Never inside DATA."),
]


@contextmanager
def _progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress callback(done, total) that shows a bar on stderr from its first call on."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=errors)
    task = bar.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        bar.stop()


@app.command()
def preprocess(
    data: Annotated[Path, typer.Argument(help="A COV19-CT-DB dataset root, a folder of scans, or one scan.")],
    size: SizeOption = SizeName.small,
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
    from .io import DEFAULT_WINDOW, parse_window
    from .preprocess import preprocess_dataset, resolve_size

    with _reported():
        resolved = resolve_size(size.value, depth, width)
        hu_window = parse_window(window) if window is not None else DEFAULT_WINDOW
        with _progress_bar(f"Preprocessing to {resolved.name}") as progress:
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
            table = Table(title=f"{len(report.failures)} scan(s) failed", title_style="bold red")
            table.add_column("scan", overflow="fold")
            table.add_column("reason", overflow="fold")
            for path, reason in report.failures:
                table.add_row(escape(path), escape(reason))
            errors.print(table)
            raise typer.Exit(1)


if __name__ == "__main__":  # pragma: no cover
    app()
