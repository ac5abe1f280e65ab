"""Import torchvision even where its compiled extension cannot load.

The torchvision wheels on the package registry are CUDA builds. On a CPU-only
torch their C extension (`torchvision/_C.so`) fails to load, and torchvision
swallows that failure; then its own module `_meta_registrations` registers fake
kernels for `torchvision::nms` and `torchvision::qnms`, operators that were never
defined, and `import torchvision` dies with
``RuntimeError: operator torchvision::nms does not exist``.

cov3d only needs torchvision's pure-Python video models and weights API, so when
that happens we define the two operator schemas (no kernels: detection ops stay
unusable, as they would be anyway without the extension) and import again.
Nothing is compiled. Import torchvision through :func:`import_torchvision`.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

# Kept alive for the life of the process: dropping the Library would unregister
# the schemas again.
_schemas: torch.library.Library | None = None


def import_torchvision() -> ModuleType:
    """Return the torchvision module, repairing the missing-operator failure once."""
    global _schemas
    try:
        import torchvision
    except RuntimeError as error:
        if "torchvision::nms does not exist" not in str(error):
            raise
        # Forget the half-imported package so the second import starts clean.
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _schemas = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _schemas.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision
    return torchvision
