"""Training curves of a run directory: history.csv → history.png."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from cov3d.errors import Cov3dError
from cov3d.reports.figures import image_format, pyplot, save


def _column(rows: list[dict], key: str) -> list[float]:
    values = []
    for row in rows:
        try:
            values.append(float(row.get(key) or "nan"))
        except ValueError:
            values.append(math.nan)
    return values


def read_history(path: Path) -> list[dict]:
    """The rows of a run's history.csv; none when it does not exist yet.

    A damaged file (not text, no epoch column, an epoch that is not a whole
    number) is a Cov3dError naming it, not a traceback.
    """
    if not Path(path).is_file():
        return []
    try:
        with Path(path).open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as error:
        raise _damaged(path, f"not a CSV text file: {type(error).__name__}") from None
    if rows and "epoch" not in rows[0]:
        raise _damaged(path, "its header has no 'epoch' column")
    for line, row in enumerate(rows, start=2):
        try:
            int(row["epoch"])
        except (TypeError, ValueError):
            raise _damaged(path, f"line {line}: epoch {row['epoch']!r} is not a whole number") from None
    return rows


def _damaged(path: Path, why: str) -> Cov3dError:
    return Cov3dError(f"'{path}' is damaged ({why}); a training run writes it, one row per epoch: restore it "
                      "from a copy, or delete it to draw no curves (a resumed run starts a new one)")


def plot_history(history: Path, image: Path) -> Path:
    """Draw losses, presence and severity F1, and the learning rate per epoch; write `image` atomically."""
    plt = pyplot()
    image_format(image)  # a suffix it cannot write is refused before any work
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
