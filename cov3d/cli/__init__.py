"""The `cov3d` command line: parse options, call the library, report. Nothing else lives here."""

from cov3d.cli.core import app

# Each module registers its commands on `app` as it is imported, in the order `cov3d --help` lists them.
from cov3d.cli import preprocess, train, inference, research, export, scans, demo  # noqa: E402, F401, I001

__all__ = ["app"]
