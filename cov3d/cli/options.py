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
Lungs = choices("Lungs", ("off", "crop", "split"))  # cov3d.data.lungs.LUNG_MODES
# The size `train` reads by default, so that `preprocess` fills the cache it will read.
DEFAULT_SIZE = SizeName(TRAIN_DEFAULTS["size"])

LungsOption = Annotated[
    Lungs, typer.Option(help="What the model sees: off, the whole volume; crop, the lungs' box (segmented, plus "
                             "a margin) at full resolution; split, each lung on its own, the left mirrored "
                             "(docs/data.md#lungs).")
]
SeriesOption = Annotated[
    Optional[str], typer.Option(help="The DICOM series to read where a folder holds several: a SeriesInstanceUID "
                                     "or SeriesNumber (default: the series rule of docs/data.md).")
]
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


def scan_output_name(scan: Path) -> str:
    """The name a scan's default outputs take: the whole folder or file name, a volume file's suffix dropped.

    Kept whole, since scan folders are often named by DICOM UIDs: '1.2.840.113619.1' and '1.2.840.113619.2'
    must not both become '1'. Only the suffix of a file cov3d reads is dropped ('chest.nii.gz' → 'chest').
    """
    name = scan.name or scan.resolve().name  # '.' or '..' is named after the folder it stands for
    if scan.is_file():
        lower = name.lower()
        # cov3d.data.readers' volume and image suffixes, restated so that the CLI stays light; tests check them.
        for suffix in SCAN_FILE_SUFFIXES:
            if lower.endswith(suffix) and len(name) > len(suffix):
                return name[: -len(suffix)]
    return name or "scan"


# Suffixes of files that are scans (cov3d.data.readers.VOLUME_SUFFIXES and SLICE_SUFFIXES).
SCAN_FILE_SUFFIXES = (".nii.gz", ".nhdr", ".nrrd", ".jpeg", ".nii", ".mha", ".mhd", ".dcm", ".jpg", ".png")
