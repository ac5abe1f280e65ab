"""The one matplotlib set-up of cov3d: a file-only backend, and atomic PNG writes."""

from __future__ import annotations

from pathlib import Path

from cov3d.atomic import replacing


def pyplot():
    """matplotlib.pyplot on the Agg backend: pictures go to files, never to a window (nor need a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, output: Path, dpi: int = 100) -> Path:
    """Write `fig` as a PNG through a temporary file and rename (whole or absent), then close it."""
    with replacing(Path(output)) as temporary:
        fig.savefig(temporary, dpi=dpi, format="png")
    pyplot().close(fig)
    return Path(output)
