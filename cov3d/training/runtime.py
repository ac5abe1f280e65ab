"""Where and how a run executes: the device, seeding, library versions."""

from __future__ import annotations

import platform
import random
import re

import numpy as np
import torch

from cov3d import __version__
from cov3d.errors import Cov3dError


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices).

    NumPy's seeding takes 0 … 2**32 - 1: a seed derived from one (the seed plus a rank) wraps around.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed % 2**64)


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when torch sees a GPU, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise Cov3dError(f"--device {name} is not a device; use auto, cpu, cuda or cuda:N (N the GPU's index)")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise Cov3dError(f"--device {name} asked for CUDA, but torch sees no GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise Cov3dError(f"--device {name}: torch sees {torch.cuda.device_count()} GPU(s), numbered from 0")
    return device


def versions() -> dict[str, str]:
    """The versions that shaped a training run, for its config.json."""
    import fastai
    import sklearn

    from cov3d._torchvision import import_torchvision

    return {"cov3d": __version__, "torch": torch.__version__, "torchvision": import_torchvision().__version__,
            "fastai": fastai.__version__, "scikit-learn": sklearn.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _fp32_on_depth_two(module: torch.nn.Conv3d, args: tuple):
    x = args[0]
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and x.dim() == 5 and x.shape[2] == 2:
        module._cov3d_fp32 = torch.autocast("cpu", enabled=False)
        module._cov3d_fp32.__enter__()
        return (x.float(), *args[1:])
    return None


def _leave_fp32(module: torch.nn.Conv3d, args: tuple, output: torch.Tensor) -> None:
    context = getattr(module, "_cov3d_fp32", None)
    if context is not None:
        module._cov3d_fp32 = None
        context.__exit__(None, None, None)


def guard_cpu_bf16_conv3d(model: torch.nn.Module) -> int:
    """Run each 3D convolution whose input has depth 2 in fp32 under CPU bf16 autocast; return how many convs.

    torch 2.13's CPU bf16 convolution backward reads uninitialised memory when a
    Conv3d with a temporal kernel > 1 gets an input of depth exactly 2 (r3d_18's
    last stage at 16×32×32, r2plus1d_18's (3,1,1) convolutions): its gradients
    then hold NaN whenever that memory does. Depth 1, 3, 4 and 8 are clean, as are
    (1,3,3) and grouped kernels; docs/performance.md has the reproduction. Such
    layers are tiny, so fp32 for them costs little. Other precisions and devices
    are untouched.
    """
    guarded = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Conv3d) and module.kernel_size[0] > 1:
            module.register_forward_pre_hook(_fp32_on_depth_two)
            module.register_forward_hook(_leave_fp32)
            guarded += 1
    return guarded
