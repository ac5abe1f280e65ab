"""Training curves of a run directory: history.csv → history.png."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from cov3d.errors import Cov3dError
from cov3d.reports.figures import pyplot, save


def _column(rows: list[dict], key: str) -> list[float]:
    values = []
    for row in rows:
        try:
            values.append(float(row.get(key) or "nan"))
        except ValueError:
            values.append(math.nan)
    return values


def read_history(path: Path) -> list[dict]:
    """The rows of a run's history.csv; none when it does not exist yet."""
    if not Path(path).is_file():
        return []
    with Path(path).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def plot_history(history: Path, image: Path) -> Path:
    """Draw losses, presence and severity F1, and the learning rate per epoch; write `image` atomically."""
    plt = pyplot()
    if not Path(history).is_file():
        raise Cov3dError(f"'{history}' does not exist; a run directory has one after its first epoch")
    rows = read_history(history)
    if not rows:
        raise Cov3dError(f"'{history}' holds no epochs yet")
    epochs = [int(row["epoch"]) for row in rows]
    fig, (losses, scores, rates) = plt.subplots(1, 3, figsize=(13, 3.6))
    losses.plot(epochs, _column(rows, "train_loss"), "o-", label="train")
    losses.plot(epochs, _column(rows, "valid_loss"), "o-", label="validation")
    losses.set(xlabel="epoch", ylabel="loss", title="Loss", yscale="log")
    losses.legend()
    scores.plot(epochs, _column(rows, "presence_f1"), "o-", label="presence macro F1")
    scores.plot(epochs, _column(rows, "severity_f1"), "o-", label="severity macro F1")
    scores.plot(epochs, _column(rows, "presence_accuracy"), ":", color="grey", label="presence accuracy")
    scores.set(xlabel="epoch", ylabel="validation score", title="Validation", ylim=(0, 1.02))
    scores.legend(loc="lower right", fontsize="small")
    rates.plot(epochs, _column(rows, "lr"), "o-", color="tab:green")
    rates.set(xlabel="epoch", ylabel="learning rate", title="Learning rate (last batch of the epoch)")
    rates.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for axis in (losses, scores, rates):
        axis.grid(alpha=0.3)
        if len(epochs) <= 20:
            axis.set_xticks(epochs)
    fig.suptitle(Path(history).parent.name)
    fig.tight_layout()
    return save(fig, image, dpi=110)
