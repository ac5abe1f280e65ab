"""The one matplotlib set-up of cov3d: a file-only backend, and atomic picture writes in the format of the suffix."""

from __future__ import annotations

from pathlib import Path

from cov3d.atomic import replacing
from cov3d.errors import Cov3dError

# A picture's file suffix → the format matplotlib writes it in.
FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf", ".svg": "svg"}


def pyplot():
    """matplotlib.pyplot on the Agg backend: pictures go to files, never to a window (nor need a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_format(path: Path) -> str:
    """The format a picture named `path` is written in (by its suffix); a Cov3dError for any other suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        named = f"'{Path(path).suffix}'" if Path(path).suffix else "no suffix"
        raise Cov3dError(f"'{path}' has {named}; a picture is written as .png, .jpg (or .jpeg), .pdf or .svg")
    return FORMATS[suffix]


def save(fig, output: Path, dpi: int = 100) -> Path:
    """Write `fig` in the format its suffix names (PNG, JPEG, PDF, SVG) through a temporary file and rename
    (whole or absent), then close it."""
    kind = image_format(output)
    try:
        with replacing(Path(output)) as temporary:
            fig.savefig(temporary, dpi=dpi, format=kind)
    finally:
        pyplot().close(fig)
    return Path(output)
