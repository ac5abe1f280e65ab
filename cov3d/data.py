"""Datasets over the preprocessed cache: labelled splits, targets, and the sagittal reflection."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .errors import Cov3dError
from .loss import MILD, NON_COVID, class_weights, target_of
from .preprocess import load_cached, read_manifest


def reflect(volume: torch.Tensor) -> torch.Tensor:
    """Mirror a (…, D, H, W) volume through the sagittal plane: patient left ↔ right (the width axis)."""
    return volume.flip(-1)


class ScanDataset(Dataset):
    """Cached scans with integer targets; optionally reflected at random (training only)."""

    def __init__(self, files: list[Path], targets: list[int], flip: bool = False):
        self.files = list(files)
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.flip = flip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        volume = load_cached(self.files[index]).float()
        if self.flip and torch.rand(()) < 0.5:
            volume = reflect(volume)
        return volume, self.targets[index]


@dataclass
class Splits:
    """Training and validation scans from a manifest."""

    train: ScanDataset
    valid: ScanDataset
    weights: tuple[float, float]  # class weights (non-covid, covid) from the training split
    counts: dict[str, dict[str, int]]  # split -> {non-covid, covid, with severity}


def _labelled(rows: list[dict], split: str, folder: Path) -> tuple[list[Path], list[int]]:
    files, targets = [], []
    for row in rows:
        if row["split"] == split and row["label"] in ("covid", "non-covid"):
            severity = int(row["severity"]) if row["severity"] else None
            files.append(folder / row["cache"])
            targets.append(target_of(row["label"], severity))
    return files, targets


def _count(targets: list[int]) -> dict[str, int]:
    return {
        "non-covid": sum(t == NON_COVID for t in targets),
        "covid": sum(t >= MILD for t in targets),
        "with severity": sum(1 <= t <= 4 for t in targets),
    }


def load_splits(manifest: Path, flip: bool = True) -> Splits:
    """Training (reflected at random when `flip`) and validation datasets from a manifest.csv."""
    manifest = Path(manifest)
    rows = read_manifest(manifest)
    train_files, train_targets = _labelled(rows, "train", manifest.parent)
    valid_files, valid_targets = _labelled(rows, "validation", manifest.parent)
    if not valid_files:
        raise Cov3dError(f"no labelled validation scans in {manifest}; training needs "
                         "DATA/validation/{covid,non-covid}/<scan> folders")
    if not train_files:
        raise Cov3dError(f"no labelled training scans in {manifest}; training needs "
                         "DATA/train/{covid,non-covid}/<scan> folders")
    counts = {"train": _count(train_targets), "validation": _count(valid_targets)}
    for split, count in counts.items():
        for label in ("covid", "non-covid"):
            if count[label] == 0:
                raise Cov3dError(f"the {split} split has no {label} scans; both classes are needed "
                                 f"in {split}/covid and {split}/non-covid")
    return Splits(
        train=ScanDataset(train_files, train_targets, flip=flip),
        valid=ScanDataset(valid_files, valid_targets, flip=False),
        weights=class_weights(train_targets),
        counts=counts,
    )
