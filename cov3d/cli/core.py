"""The typer app and what every command shares: logging, errors as one red line, progress bars, failure tables."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cov3d import __version__
from cov3d.errors import Cov3dError

app = typer.Typer(
    help="Detect the presence and severity of COVID-19 in chest CT scans with 3D ResNets (Cov3d).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: rich's boxed tables cut long option names at 80 columns; this wraps the text instead.
    rich_markup_mode=None,
)
# soft_wrap: lines are never broken by rich, so paths in logs stay whole (the terminal wraps them on screen).
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


@contextmanager
def reported(resume_hint: str = "run the command again to resume",
             interrupted: Callable[[KeyboardInterrupt], str] | None = None) -> Iterator[None]:
    """Turn expected errors into one red line and a non-zero exit.

    On Ctrl-C, `interrupted(the KeyboardInterrupt)` says what was kept, when given;
    else the line says that finished work is kept, and `resume_hint`.
    """
    try:
        yield
    except Cov3dError as error:
        errors.print(f"[bold red]Error{_rank()}:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as interrupt:
        kept = interrupted(interrupt) if interrupted else f"Finished work is kept; {resume_hint}."
        errors.print(f"[bold red]Interrupted.[/] {escape(kept)}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


def _rank() -> str:
    """' (rank R of N)' in a process that torchrun started, so that a failing rank can be told apart."""
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    return f" (rank {rank} of {world})" if world.isdigit() and int(world) > 1 else ""


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


def bar(target: Console, transient: bool = False) -> Progress:
    """A rich progress bar on `target`: description, bar, done/total, elapsed and remaining time."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=target, transient=transient)


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress callback(done, total) that shows a bar on stderr from its first call on."""
    shown = bar(errors)
    task = shown.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        if not shown.live.is_started:
            shown.start()
        shown.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        shown.stop()


def failure_table(failures: list[tuple[str, str]], what: str = "scan") -> None:
    """List what failed and why on stderr: a table on a terminal, one line per failure elsewhere."""
    if not errors.is_terminal:
        # A log or a pipe: one unbroken line per failure, so a path can be found with grep.
        errors.print(f"{len(failures)} {what}(s) failed:", style="bold red")
        for path, reason in failures:
            errors.print(f"  {escape(path)}: {escape(reason)}", highlight=False)
        return
    table = Table(title=f"{len(failures)} {what}(s) failed", title_style="bold red")
    table.add_column(what, overflow="fold")
    table.add_column("reason", overflow="fold")
    for path, reason in failures:
        table.add_row(escape(path), escape(reason))
    errors.print(table)
