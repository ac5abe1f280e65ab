"""The checkpoint format, shared by training (writes) and inference (reads).

A run directory holds ``presence.pt`` and ``severity.pt`` (best validation macro
F1 of each task), ``last.pt`` (the latest epoch with optimizer state, for
``--resume``), ``config.json`` and ``history.csv``. A checkpoint is a dict of
tensors and plain values, ``{"model": state_dict, "config": model config, …}``,
loaded with ``torch.load(weights_only=True)`` so that no pickled code runs. Its
model config holds everything needed to rebuild the network from the file alone.

Format 1 (cov3d 0.1) had no ``pool``, ``final_bias`` or ``input`` keys; they
default to the paper's average pooling and final bias, and a 3D input.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from cov3d import labels
from cov3d.models.registry import ARCHS, build_model, get_arch
from cov3d.atomic import save_torch
from cov3d.errors import Cov3dError
from cov3d.data.lungs import LUNG_MODES
from cov3d.models.defaults import DROPOUT, PENULTIMATE
from cov3d.models.video import POOLS

PRESENCE, SEVERITY, LAST = "presence.pt", "severity.pt", "last.pt"
CONFIG, HISTORY, HISTORY_PLOT = "config.json", "history.csv", "history.png"
FORMAT = 2
OUTPUT_NAMES = list(labels.OUTPUT_NAMES)  # as config.json and checkpoints store it
REQUIRED = ("arch", "depth", "width", "lambda", "outputs")


def model_config(*, arch: str, depth: int, width: int, lam: float, window: tuple[float, float],
                 penultimate: int, dropout: float, pool: str, final_bias: bool, lungs: str = "off") -> dict:
    """What `predict` needs to rebuild the model, prepare its input (size, window, lungs) and read its outputs."""
    return {"format": FORMAT, "arch": arch, "input": get_arch(arch).input, "penultimate": penultimate,
            "dropout": dropout, "pool": pool, "final_bias": final_bias, "depth": depth, "width": width,
            "lambda": lam, "window": list(window), "lungs": lungs, "outputs": list(OUTPUT_NAMES)}


def plain(value):
    """Tensors on the CPU and plain Python containers and numbers: what weights_only loading accepts."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):  # fastai keeps some hyper-parameters as NumPy scalars
        return value.item()
    return value


def nonfinite(state: dict) -> str | None:
    """The name of the first floating-point tensor of a state dict holding NaN or inf; None when all are finite."""
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def save_checkpoint(path: Path, model: torch.nn.Module, config: dict, **extra) -> None:
    """Write a checkpoint whole (or not at all); weights with NaN or inf are never written."""
    state = model.state_dict()
    bad = nonfinite(state)
    if bad is not None:
        raise Cov3dError(f"not saving '{path}': the weights hold NaN or inf (first in '{bad}')")
    save_torch(plain({"model": state, "config": config, **extra}), path)


def load_checkpoint(path: Path) -> dict:
    """A cov3d checkpoint as a dict: model state, config and bookkeeping; no pickled code is run."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a wrong or damaged file of any kind
        raise Cov3dError(f"'{path}' is not a cov3d checkpoint ({_load_failure(path, error)})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise Cov3dError(f"'{path}' is not a cov3d checkpoint (no model and config inside)")
    return checkpoint


def _load_failure(path: Path, error: Exception) -> str:
    """Why torch could not load `path`: an empty or cut-off file said so, else the exception's type."""
    try:
        size = Path(path).stat().st_size
    except OSError:
        return type(error).__name__
    if size == 0:
        return "the file is empty"
    if isinstance(error, RuntimeError) and ("central directory" in str(error) or "zip archive" in str(error)):
        return f"the file is cut off or damaged at {size} bytes"
    return type(error).__name__


def check_finite(checkpoint: dict, path: Path) -> None:
    """Refuse a checkpoint whose weights hold NaN or inf (a run whose training diverged), naming the file."""
    bad = nonfinite(checkpoint["model"]) if isinstance(checkpoint.get("model"), dict) else None
    if bad is not None:
        raise Cov3dError(f"'{path}' holds weights that are NaN or inf (first in '{bad}'): its training diverged, "
                         "and it cannot predict; use another checkpoint, or train again with a lower --lr")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# key → (what it must be, test); the defaults fill what format 1 lacked.
_CONFIG_RULES = {
    "arch": ("an architecture name", lambda v: isinstance(v, str) and v in ARCHS),
    "depth": ("a whole number ≥ 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "width": ("a whole number ≥ 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "lambda": ("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1),
    "outputs": (f"the list {OUTPUT_NAMES}", lambda v: isinstance(v, (list, tuple)) and list(v) == OUTPUT_NAMES),
    "penultimate": ("a whole number ≥ 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "dropout": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "pool": ("avg or max", lambda v: v in POOLS),
    "final_bias": ("true or false", lambda v: isinstance(v, bool)),
    "window": ("two numbers LOW < HIGH", lambda v: isinstance(v, (list, tuple)) and len(v) == 2
               and all(_is_number(x) for x in v) and v[0] < v[1]),
    "lungs": (f"one of {', '.join(LUNG_MODES)}", lambda v: v in LUNG_MODES),
}
# What checkpoints of older cov3d lack: format 1 the first five, 0.3 and before "lungs" (the whole volume).
_FORMAT_1_DEFAULTS = {"pool": "avg", "final_bias": True, "penultimate": PENULTIMATE, "dropout": DROPOUT,
                      "window": [-1350.0, 150.0], "lungs": "off"}


def checked_config(config, path: Path) -> dict:
    """A checkpoint's model config with format-1 defaults filled in; a missing or wrong key is named."""
    if not isinstance(config, dict):
        raise Cov3dError(f"'{path}' is not a cov3d checkpoint (its config is not a mapping)")
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise Cov3dError(f"'{path}' is not a cov3d checkpoint (its config lacks {', '.join(missing)})")
    config = {**_FORMAT_1_DEFAULTS, **config}
    for key, (expected, valid) in _CONFIG_RULES.items():
        if not valid(config[key]):
            raise Cov3dError(f"'{path}': config key '{key}' is {config[key]!r}, not {expected}; the checkpoint "
                             "is damaged or was edited by hand")
    config["input"] = get_arch(config["arch"]).input
    return config


def load_model(path: Path) -> tuple[torch.nn.Module, dict]:
    """The network of a checkpoint, in eval mode, and its model config (format 1 and 2)."""
    checkpoint = load_checkpoint(path)
    config = checked_config(checkpoint["config"], path)
    check_finite(checkpoint, path)
    model = build_model(config["arch"], pretrained=False, penultimate=int(config["penultimate"]),
                        dropout=float(config["dropout"]), pool=str(config["pool"]),
                        final_bias=bool(config["final_bias"]), lungs=str(config["lungs"]))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise Cov3dError(f"'{path}' does not match its own config: {str(error).splitlines()[0]}") from None
    return model.eval(), config

