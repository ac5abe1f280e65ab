"""Pictures of an evaluation: the presence ROC curve and the confusion matrices."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cov3d.labels import PRESENCE_NAMES, SEVERITY_NAMES
from cov3d.reports.figures import pyplot, save

if TYPE_CHECKING:  # for annotations only
    from cov3d.inference.evaluate import Evaluation


def plot_evaluation(evaluation: Evaluation, directory: Path) -> list[Path]:
    """roc.png (both classes present), presence_confusion.png and, with severity labels, severity_confusion.png."""
    plt = pyplot()
    written = []
    if evaluation.roc is not None:
        fpr, tpr = evaluation.roc
        auc = evaluation.metrics["presence"]["roc_auc"]
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(fpr, tpr, label=f"ROC (AUC {auc:.3f})")
        ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="COVID-19 presence",
               xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right")
        fig.tight_layout()
        written.append(save(fig, directory / "roc.png", dpi=120))
    matrices = [("presence_confusion.png", evaluation.presence_confusion, PRESENCE_NAMES, "Presence")]
    if evaluation.severity_confusion is not None:
        matrices.append(("severity_confusion.png", evaluation.severity_confusion, SEVERITY_NAMES, "Severity"))
    for name, matrix, names, title in matrices:
        fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 1.3 * len(names) + 1.5))
        ax.imshow(matrix, cmap="Blues")
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, str(value), ha="center", va="center",
                    color="white" if value > matrix.max() / 2 else "black")
        ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names,
               xlabel="predicted", ylabel="true", title=f"{title} confusion matrix")
        fig.tight_layout()
        written.append(save(fig, directory / name, dpi=120))
    return written
