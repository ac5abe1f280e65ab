"""cov3d: presence and severity of COVID-19 in chest CT scans with 3D ResNets.

Subpackages by stage, data flowing one way: :mod:`cov3d.data` (scans in,
tensors out) → :mod:`cov3d.models` (networks, registry, checkpoints) →
:mod:`cov3d.training` → :mod:`cov3d.inference`; :mod:`cov3d.reports` draws
pictures from plain arrays and files for any of them; :mod:`cov3d.cli` sits on
top. :mod:`cov3d.labels` is the label schema every stage shares.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cov3d")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

# Where the modules of cov3d 0.1–0.3 (one flat package) live now. `import cov3d.predict` and
# `from cov3d.train import TrainConfig` keep working: the old name is the new module itself. (The old
# `cov3d.data` module is the package `cov3d.data` now, whose names ScanDataset, load_splits… still import.)
MOVED = {
    "archs": "cov3d.models.registry", "model": "cov3d.models.video", "regnet": "cov3d.models.regnet",
    "slices": "cov3d.models.slices", "checkpoint": "cov3d.models.checkpoint",
    "catalog": "cov3d.data.catalog", "io": "cov3d.data.readers", "integrity": "cov3d.data.integrity",
    "resample": "cov3d.data.resample", "preprocess": "cov3d.data.preprocess",
    "synth": "cov3d.data.synth",
    "loss": "cov3d.training.loss", "metrics": "cov3d.training.metrics", "callbacks": "cov3d.training.callbacks",
    "train": "cov3d.training.trainer", "distributed": "cov3d.training.distributed",
    "runtime": "cov3d.training.runtime", "precision": "cov3d.training.precision",
    "tracking": "cov3d.training.tracking",
    "predict": "cov3d.inference.predict", "evaluate": "cov3d.inference.evaluate",
    "explain": "cov3d.inference.explain",
    "show": "cov3d.reports.show", "curves": "cov3d.reports.curves",
}


def moved_names(module: str, homes: dict[str, str]):
    """A module `__getattr__` that answers names which moved out of `module` with them from their new homes."""

    def __getattr__(name: str):
        if name in homes:
            return getattr(importlib.import_module(homes[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers the old flat module names with the modules that now hold their code."""

    def find_spec(self, fullname, path=None, target=None):
        old = fullname.rpartition(".")[2]
        if fullname == f"{__name__}.{old}" and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name.rpartition(".")[2]])
        self._spec = module.__spec__  # importlib stamps the old name's spec on it; exec_module puts this back
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec  # the module already ran when it was imported under its new name


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())
