"""The picture of `cov3d compare`: each run's best presence and severity macro F1, with intervals where known."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cov3d.reports.figures import pyplot, save


def plot_comparison(rows: list[dict], image: Path) -> Path:
    """Bars of presence and severity F1 per run (evaluated scores with their 95% intervals where a run has
    them, else the best validation score of its history)."""
    plt = pyplot()
    names = [row.get("name") or Path(row["run"]).name for row in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(rows) + 2), 3.8))
    for offset, (prefix, label, colour) in enumerate((("presence_f1", "presence macro F1", "tab:blue"),
                                                      ("severity_f1", "severity macro F1", "tab:orange"))):
        values, low, high = [], [], []
        for row in rows:
            evaluated = row.get(f"{prefix}_evaluated")
            value = evaluated if evaluated is not None else row.get(prefix)
            values.append(np.nan if value is None else value)
            has_ci = evaluated is not None and row.get(f"{prefix}_low") is not None
            low.append(value - row[f"{prefix}_low"] if has_ci else 0)
            high.append(row[f"{prefix}_high"] - value if has_ci else 0)
        ax.bar(x + (offset - 0.5) * 0.38, values, 0.38, yerr=[low, high], capsize=3, label=label, color=colour)
    ax.set(xticks=x, ylabel="macro F1", ylim=(0, 1.05), title="Runs compared (bars: 95% CI where evaluated)")
    ax.set_xticklabels(names, rotation=20, ha="right")
    ax.legend(loc="upper right", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save(fig, image, dpi=110)
