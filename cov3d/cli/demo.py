"""`cov3d demo`: the whole job offline on synthetic phantoms."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cov3d.cli.core import app, bar, console, reported
from cov3d.training.config import MAX_SEED

if TYPE_CHECKING:
    from cov3d.demo import DemoResult


@app.command()
def demo(
    output: Annotated[Path, typer.Option(help="New folder for everything the demo makes.")] = Path("cov3d-demo"),
    scans: Annotated[int, typer.Option(min=10, help="Synthetic scans to generate.")] = 160,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 12,
    depth: Annotated[int, typer.Option(min=4, help="Preprocessed depth.")] = 16,
    width: Annotated[int, typer.Option(min=8, help="Preprocessed width = height.")] = 32,
    seed: Annotated[int, typer.Option(help=f"Random seed for data and training, 0 to {MAX_SEED} (2^32 - 1).")] = 0,
) -> None:
    """Run the whole job offline on synthetic phantoms: synth, preprocess, train, evaluate, predict."""
    import time

    from cov3d.demo import run_demo
    from cov3d.inference.evaluate import describe

    with reported(f"run the same command again to go on where it stopped in '{output}'"):
        start = time.perf_counter()
        shown = bar(console, transient=True)
        task = shown.add_task("", total=None)

        def pause() -> None:
            if shown.live.is_started:
                shown.stop()

        def stage(name: str) -> None:
            pause()
            console.print(f"[bold]{name}[/] ({time.perf_counter() - start:.0f} s)")
            shown.reset(task, description=name, total=None)

        def progress(done: int, total: int) -> None:
            if not shown.live.is_started:
                shown.start()
            shown.update(task, completed=done, total=total)

        def epoch(row: dict) -> None:
            pause()
            console.print(f"  epoch {row['epoch']:>2}  train loss {float(row['train_loss']):.4f}  valid loss "
                          f"{float(row['valid_loss']):.4f}  presence F1 {describe(row['presence_f1'])}  "
                          f"severity F1 {describe(row['severity_f1'])}", soft_wrap=True)

        try:
            result = run_demo(output, scans=scans, epochs=epochs, depth=depth, width=width, seed=seed, stage=stage,
                              progress=progress, on_epoch=epoch)
        finally:
            pause()
        _print_outcome(result, time.perf_counter() - start)


def _print_outcome(result: DemoResult, seconds: float) -> None:
    """The demo's validation scores and where its outputs are."""
    from cov3d.inference.evaluate import describe

    m = result.evaluation.metrics
    severity = m["severity"]["macro_f1"] if m["severity"] else None
    console.print(f"[bold]Validation[/] ({m['scans']} scans): presence macro F1 "
                  f"{describe(m['presence']['macro_f1'])}, accuracy {describe(m['presence']['accuracy'])}, "
                  f"ROC AUC {describe(m['presence']['roc_auc'])}; severity macro F1 {describe(severity)}",
                  soft_wrap=True)
    console.print(f"Done in {seconds:.0f} s. Outputs:")
    for label, path in [("synthetic data", result.data), ("trained run", result.run),
                        ("evaluation", result.evaluation_dir), ("test predictions", result.predictions),
                        ("submission lists", result.submission)]:
        console.print(f"  {label:<17} {path}")
