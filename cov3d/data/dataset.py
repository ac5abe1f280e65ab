"""Datasets over the preprocessed cache: labelled splits, targets, and training augmentation.

Augmentation (training split only): the paper's random sagittal reflection, and
seed 004's random crop, off by default so that the paper's recipe is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cov3d.errors import Cov3dError
from cov3d import labels
from cov3d.labels import PRESENCE_NAMES, class_weights, severity_class_weights, target_of
from cov3d.data.preprocess import load_cached, read_manifest


def reflect(volume: torch.Tensor) -> torch.Tensor:
    """Mirror a scan through the sagittal plane: the patient's left ↔ right.

    A (…, 1, D, H, W) volume or a (D, H, W) map is flipped along its width. Under
    ``--lungs split`` a scan is (…, 2, D, H, W), the right lung and the mirrored
    left lung: its reflection is exactly those two swapped.
    """
    if volume.dim() >= 4 and volume.shape[-4] == 2:
        return volume.flip(-4)
    return volume.flip(-1)


def random_crop(volume: torch.Tensor, scale: float) -> torch.Tensor:
    """A random box of a (C, D, H, W) volume, resized back to its shape by trilinear interpolation (seed 004).

    Each axis keeps a fraction drawn uniformly from [scale, 1], independently for
    depth, height and width, and the box sits anywhere inside the volume with
    equal chance. scale = 1 returns the volume unchanged.
    """
    if scale >= 1.0:
        return volume
    shape = volume.shape[1:]
    box = []
    for length in shape:
        keep = max(1, round(length * (scale + (1.0 - scale) * float(torch.rand(())))))
        start = int(torch.randint(0, length - keep + 1, ()))
        box.append(slice(start, start + keep))
    cropped = volume[:, box[0], box[1], box[2]]
    return F.interpolate(cropped[None], size=tuple(shape), mode="trilinear", align_corners=False)[0]


class ScanDataset(Dataset):
    """Cached scans with integer targets; optionally cropped and reflected at random (training only)."""

    def __init__(self, files: list[Path], targets: list[int], flip: bool = False, crop: float = 1.0,
                 names: list[str] | None = None):
        self.files = list(files)
        self.names = list(names) if names is not None else [Path(f).stem for f in self.files]  # the scans' paths
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.flip, self.crop = flip, crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        volume = random_crop(load_cached(self.files[index]).float(), self.crop)
        if self.flip and torch.rand(()) < 0.5:
            volume = reflect(volume)
        return volume, self.targets[index]


@dataclass
class Splits:
    """Training and validation scans from a manifest."""

    train: ScanDataset
    valid: ScanDataset
    weights: tuple[float, float]  # class weights (non-covid, covid) from the training split
    severity_weights: tuple[float, ...]  # inverse-frequency weights of the six target categories, likewise
    counts: dict[str, dict[str, int]]  # split -> {non-covid, covid, with severity}


def _labelled(rows: list[dict], split: str, folder: Path) -> tuple[list[Path], list[int], list[str]]:
    files, targets, names = [], [], []
    for row in rows:
        if row["split"] == split and row["label"] in PRESENCE_NAMES:
            severity = int(row["severity"]) if row["severity"] else None
            files.append(folder / row["cache"])
            targets.append(target_of(row["label"], severity))
            names.append(row["path"])
    return files, targets, names


def _count(targets: list[int]) -> dict[str, int]:
    targets = torch.as_tensor(targets)
    return {
        "non-covid": int((~labels.is_covid(targets)).sum()),
        "covid": int(labels.is_covid(targets).sum()),
        "with severity": int(labels.has_severity(targets).sum()),
    }


def load_splits(manifest: Path, flip: bool = True, crop: float = 1.0) -> Splits:
    """Training (reflected at random when `flip`, cropped when `crop` < 1) and validation datasets."""
    manifest = Path(manifest)
    rows = read_manifest(manifest)
    train_files, train_targets, train_names = _labelled(rows, "train", manifest.parent)
    valid_files, valid_targets, valid_names = _labelled(rows, "validation", manifest.parent)
    if not valid_files:
        raise Cov3dError(f"no labelled validation scans in {manifest}; training needs "
                         "DATA/validation/{covid,non-covid}/<scan> folders")
    if not train_files:
        raise Cov3dError(f"no labelled training scans in {manifest}; training needs "
                         "DATA/train/{covid,non-covid}/<scan> folders")
    counts = {"train": _count(train_targets), "validation": _count(valid_targets)}
    for split, count in counts.items():
        for label in reversed(PRESENCE_NAMES):
            if count[label] == 0:
                raise Cov3dError(f"the {split} split has no {label} scans; both classes are needed "
                                 f"in {split}/covid and {split}/non-covid")
    return Splits(
        train=ScanDataset(train_files, train_targets, flip=flip, crop=crop, names=train_names),
        valid=ScanDataset(valid_files, valid_targets, flip=False, names=valid_names),
        weights=class_weights(train_targets),
        severity_weights=severity_class_weights(train_targets),
        counts=counts,
    )
