"""Where and how a run executes: the device, seeding, library versions."""

from __future__ import annotations

import platform
import random

import numpy as np
import torch

from . import __version__
from .errors import Cov3dError


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when torch sees a GPU, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Cov3dError(f"--device {name} asked for CUDA, but torch sees no GPU; use --device cpu")
    return device


def versions() -> dict[str, str]:
    """The versions that shaped a training run, for its config.json."""
    import fastai
    import sklearn

    from ._torchvision import import_torchvision

    return {"cov3d": __version__, "torch": torch.__version__, "torchvision": import_torchvision().__version__,
            "fastai": fastai.__version__, "scikit-learn": sklearn.__version__, "numpy": np.__version__,
            "python": platform.python_version()}
