"""cov3d: presence and severity of COVID-19 in chest CT scans with 3D ResNets."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cov3d")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
