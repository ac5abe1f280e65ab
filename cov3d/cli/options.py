"""Options, choices and defaults that several commands share.

Defaults come from :class:`cov3d.training.config.TrainConfig` (:data:`TRAIN_DEFAULTS`). Choices whose library
constant lives in a module that loads torch are restated here, so that `import cov3d.cli` stays light;
tests/test_cli.py checks each against its constant.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import MISSING, fields
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from cov3d.training.config import TrainConfig

# TrainConfig's field defaults by name (fields without one, or with a default factory, are left out).
TRAIN_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}


def choices(name: str, values: Iterable[str]) -> type[Enum]:
    """A str Enum whose members are `values`, for a typer option that takes one of them."""
    return Enum(name, {value: value for value in values}, type=str)


SizeName = choices("SizeName", ("small", "medium", "large"))  # cov3d.data.resample.SIZES
Precision = choices("Precision", ("auto", "fp32", "bf16", "fp16"))  # cov3d.training.precision.PRECISIONS
WandbMode = choices("WandbMode", ("online", "offline", "disabled"))  # cov3d.training.tracking.MODES
# The size `train` reads by default, so that `preprocess` fills the cache it will read.
DEFAULT_SIZE = SizeName(TRAIN_DEFAULTS["size"])

WindowOption = Annotated[
    Optional[str],
    typer.Option(help="HU window LOW,HIGH mapped to [0, 1] for DICOM and volume files "
                      "(write --window=-1350,150; default: the lung window -1350,150)."),
]
SizeOption = Annotated[
    SizeName, typer.Option(help="Preprocessed size: small 64x128x128, medium 128x256x256, large 160x320x320.")
]
DepthOption = Annotated[Optional[int], typer.Option(min=1, help="Depth in slices; overrides --size.")]
WidthOption = Annotated[Optional[int], typer.Option(min=1, help="Slice width = height in pixels; overrides --size.")]
CacheOption = Annotated[
    Optional[Path],
    typer.Option(help="Cache folder (default: $COV3D_CACHE, else ~/.cache/cov3d, in a folder named after DATA). "
                      "Never inside DATA."),
]
TrainSeverityOption = Annotated[Optional[Path], typer.Option(help="Severity CSV for train.")]
ValidationSeverityOption = Annotated[Optional[Path], typer.Option(help="Severity CSV for validation.")]
WandbModeOption = Annotated[
    Optional[WandbMode], typer.Option(help="W&B mode (default: $WANDB_MODE, else online).")
]
