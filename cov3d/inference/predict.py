"""Inference: trained checkpoints → probabilities per scan, with reflection TTA and ensembles.

A model is a run directory (presence from ``presence.pt``, severity from
``severity.pt``) or one checkpoint file. Each checkpoint carries its own config,
so the network and its input size are rebuilt from the file alone; ensemble
members may differ in size and architecture. Scans are read and preprocessed
in background workers (or taken from an up-to-date cache) while the model runs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cov3d import atomic
from cov3d.data.catalog import find_scans
from cov3d.data.dataset import reflect
from cov3d.errors import Cov3dError, describe_error
from cov3d.data.readers import DEFAULT_WINDOW, natural_key
from cov3d.models.registry import memory_format
from cov3d.models.checkpoint import PRESENCE, SEVERITY, load_model
from cov3d import labels
from cov3d.labels import SEVERITY_NAMES
from cov3d.training.loss import probabilities
from cov3d.data.preprocess import (
    MANIFEST, Size, default_cache_dir, load_cached, preprocess_volume, read_manifest, size_dir, source_stamp,
)
from cov3d.training.precision import (
    DTYPES, Choice, best_seconds, faster_of_fp32_and_bf16, fold_batchnorm, resolve_precision,
)
from cov3d.training.runtime import resolve_device

log = logging.getLogger(__name__)

CSV_COLUMNS = ["scan", "path", "probability", "prediction", "severity", *SEVERITY_NAMES]
SUBMISSION_FILES = ("covid", "non-covid", *SEVERITY_NAMES)


@dataclass
class Member:
    """One checkpoint of an ensemble and the tasks it answers for."""

    path: Path
    model: torch.nn.Module
    config: dict
    presence: bool
    severity: bool
    precision: Choice | None = None  # set by predict_scans: the precision this member ran in, and why

    @property
    def size(self) -> Size:
        return Size(int(self.config["depth"]), int(self.config["width"]))

    @property
    def window(self) -> tuple[float, float]:
        low, high = self.config.get("window", DEFAULT_WINDOW)
        return float(low), float(high)


def _member(path: Path, presence: bool, severity: bool) -> Member:
    model, config = load_model(path)
    return Member(path, model, config, presence, severity)


def load_ensemble(paths: Sequence[Path]) -> list[Member]:
    """Members from run directories and checkpoint files (each config is checked as it loads)."""
    if not paths:
        raise Cov3dError("no model given; pass --model RUN (a run directory or a checkpoint file)")
    members: list[Member] = []
    for path in paths:
        if str(path).startswith("wandb:"):  # wandb:ENTITY/PROJECT/NAME:ALIAS, downloaded to W&B's cache
            from cov3d.training.tracking import download_model

            path = download_model(str(path))
        path = Path(path)
        if path.is_dir():
            if not (path / PRESENCE).is_file():
                raise Cov3dError(f"'{path}' is not a cov3d run directory (no {PRESENCE} in it)")
            members.append(_member(path / PRESENCE, presence=True, severity=False))
            if (path / SEVERITY).is_file():
                members.append(_member(path / SEVERITY, presence=False, severity=True))
        elif path.is_file():
            if path.name in (PRESENCE, SEVERITY):  # a run's best checkpoint answers for its own task
                members.append(_member(path, presence=path.name == PRESENCE, severity=path.name == SEVERITY))
            else:  # any other checkpoint answers for every task it was trained on
                member = _member(path, presence=True, severity=False)
                member.severity = float(member.config["lambda"]) > 0.0
                members.append(member)
        else:
            raise Cov3dError(f"model '{path}' does not exist; pass a run directory or a .pt checkpoint")
    if not any(m.presence for m in members):
        # Only severity checkpoints: P(covid) comes from them (for λ = 1, the sum of the four covid
        # severity probabilities, paper §3.3), rather than from nothing.
        log.warning("no presence model given; P(covid) comes from the severity checkpoint(s)")
        for member in members:
            member.presence = True
    return members


def parse_threshold(value: str | float) -> float:
    """A presence threshold: a number in [0, 1], or a metrics.json written by `cov3d evaluate`."""
    try:
        threshold = float(value)
    except ValueError:
        path = Path(str(value))
        if not path.is_file():
            raise Cov3dError(f"threshold '{value}' is neither a number nor a metrics.json file") from None
        try:
            threshold = float(json.loads(path.read_text(encoding="utf-8"))["threshold"])
        except (ValueError, KeyError, TypeError):
            raise Cov3dError(f"'{path}' holds no threshold; write it with `cov3d evaluate`") from None
    if not 0.0 <= threshold <= 1.0:
        raise Cov3dError(f"threshold {threshold} is outside [0, 1]")
    return threshold


def find_inputs(paths: Sequence[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every scan at or below the given paths, and (path, reason) for arguments that hold none."""
    scans: list[Path] = []
    missing: list[tuple[str, str]] = []
    for path in map(Path, paths):
        if not path.exists():
            missing.append((str(path), "does not exist"))
            continue
        found = [p for p, _ in find_scans(path)]
        if not found:
            missing.append((str(path), "holds no scans (numbered slices, DICOM series, or volume files)"))
        scans.extend(found)
    unique = list(dict.fromkeys(scans))
    return unique, missing


class _CachedOrFresh(Dataset):
    """Scans as (1, D, W, W) float32 tensors, from an up-to-date cache entry or preprocessed in memory."""

    def __init__(self, scans: list[Path], size: Size, window: tuple[float, float], roots: list[Path]):
        self.scans, self.size, self.window = scans, size, window
        self.cached = _cache_index(scans, size, window, roots)

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, index: int):
        scan = self.scans[index]
        try:
            cached = self.cached.get(scan)
            if cached is not None:
                try:
                    return index, load_cached(cached).float(), ""
                except Cov3dError as error:  # a damaged cache entry: read the scan itself instead
                    log.warning("%s; preprocessing %s instead", error, scan)
            tensor, _ = preprocess_volume(scan, self.size, self.window, threads=1)
            return index, tensor.float(), ""
        except Exception as error:  # reported per scan; the other scans go on
            return index, torch.empty(0), describe_error(error)


def _cache_index(scans: list[Path], size: Size, window: tuple[float, float], roots: list[Path]) -> dict[Path, Path]:
    """Cache files written by `cov3d preprocess ROOT` that are up to date for these scans, size and window."""
    entries: dict[Path, tuple[Path, str, str]] = {}  # real scan path -> (cache file, stamp, window)
    for root in roots:
        manifest = size_dir(default_cache_dir(root), size) / MANIFEST
        for row in read_manifest(manifest):
            entries[(root / row["path"]).resolve()] = (manifest.parent / row["cache"], row.get("stamp", ""),
                                                        row.get("window", ""))
    hu_window = f"{window[0]:g},{window[1]:g}"
    index: dict[Path, Path] = {}
    for scan in scans:
        entry = entries.get(scan.resolve())
        if entry is None:
            continue
        cache_file, stamp, row_window = entry
        if row_window in ("", hu_window) and cache_file.is_file() and stamp == source_stamp(scan):
            index[scan] = cache_file
    return index


@dataclass
class Prediction:
    """One scan's ensemble output."""

    path: Path
    presence: list[float] = field(default_factory=list)  # P(covid), one per presence member
    severity: list[np.ndarray] = field(default_factory=list)  # P(mild…critical | covid), one per severity member


def _forward(model: torch.nn.Module, lam: float, batch: torch.Tensor, device: torch.device,
             precision: str) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast(device.type, dtype=DTYPES.get(precision, torch.bfloat16),
                                                enabled=precision != "fp32"):
        return probabilities(model(batch).float(), lam)


@dataclass
class _Runner:
    """How one member runs here: the module, its precision and whether inputs go channels-last."""

    module: torch.nn.Module
    precision: str
    channels_last: bool


def _run(members: list[Member], runners: list[_Runner], batch: torch.Tensor, tta: bool, device: torch.device):
    if tta:
        batch = torch.cat([batch, reflect(batch)])
    batch = batch.to(device)
    outputs = []
    for member, runner in zip(members, runners):
        lam = float(member.config["lambda"])
        inputs = batch.contiguous(memory_format=torch.channels_last_3d) if runner.channels_last else batch
        probs = _forward(runner.module, lam, inputs, device, runner.precision)
        if runner.precision != "fp32" and not torch.isfinite(probs).all():
            # Reduced precision overflowed on this batch: answer it in fp32 rather than with NaN.
            log.warning("non-finite %s output from %s; recomputing the batch in fp32", runner.precision,
                        member.path)
            probs = _forward(member.model, lam, inputs, device, "fp32")
        if tta:  # the mean of the scan and its sagittal reflection
            half = probs.shape[0] // 2
            probs = (probs[:half] + probs[half:]) / 2
        outputs.append(probs.cpu())
    return outputs


def inference_runner(model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    """The module that answers for `model`: on a CPU in fp32, a copy with BatchNorm folded into the convolutions.

    Folding was measured faster or equal on every CPU tried, with probabilities
    within 1e-6 (docs/performance.md); models it cannot trace run as they are.
    """
    if device.type == "cpu" and precision == "fp32":
        folded = fold_batchnorm(model)
        if folded is not None:
            return folded
    return model


def _prepare(member: Member, device: torch.device, choice: Choice, auto: bool, batch: int) -> _Runner:
    """The member on `device` in the precision it runs in; auto's CPU bf16 only where it measured faster."""
    member.model.to(device)
    arch = member.config["arch"]
    if auto and device.type == "cpu" and choice.precision == "bf16":
        shape = (batch, 1, member.size.depth, member.size.width, member.size.width)
        choice = faster_of_fp32_and_bf16(choice, f"{arch} at {'x'.join(map(str, shape))}",
                                         lambda: _time_both(member.model, arch, shape))
    member.precision = choice
    # channels_last_3d is the fast layout for reduced precision on CPU and for any GPU work; in fp32 on a CPU
    # it was slower on AVX2 (docs/performance.md).
    channels_last = choice.precision != "fp32" or device.type == "cuda"
    member.model.to(memory_format=memory_format(arch) if channels_last else torch.contiguous_format)
    return _Runner(inference_runner(member.model, device, choice.precision), choice.precision, channels_last)


def _time_both(model: torch.nn.Module, arch: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """Best-of-3 seconds of a forward pass of `model` on a random batch of `shape`, in fp32 and bf16, each as run."""
    cpu = torch.device("cpu")
    x = torch.rand(shape)
    seconds = []
    for precision in ("fp32", "bf16"):
        layout = memory_format(arch) if precision == "bf16" else torch.contiguous_format
        module = inference_runner(model.to(memory_format=layout), cpu, precision)
        inputs = x.contiguous(memory_format=torch.channels_last_3d) if precision == "bf16" else x
        # the best of three: the verdict is cached for good, so one slow pass must not decide
        seconds.append(best_seconds(lambda: _forward(module, 0.1, inputs, cpu, precision)))
    return seconds[0], seconds[1]


class Steps:
    """Progress over a known number of steps, reported as `report(done, total)` after each advance."""

    def __init__(self, total: int, report: Callable[[int, int], None] | None):
        self.done, self.total, self.report = 0, total, report
        if report:
            report(0, total)

    def step(self, count: int = 1) -> None:
        self.done += count
        if self.report:
            self.report(self.done, self.total)


def _batches(loader: DataLoader, size: int, failures: dict[int, str],
             steps: Steps) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(scan indices, stacked volumes) of up to `size` scans that could be read; the others go to `failures`."""
    pending: list[tuple[int, torch.Tensor]] = []
    for index, tensor, reason in loader:
        if reason:
            failures[index] = reason
            steps.step()
            continue
        pending.append((index, tensor))
        if len(pending) == size:
            yield [i for i, _ in pending], torch.stack([t for _, t in pending])
            pending = []
    if pending:
        yield [i for i, _ in pending], torch.stack([t for _, t in pending])


def predict_scans(
    scans: list[Path],
    members: list[Member],
    *,
    tta: bool = True,
    batch_size: int = 2,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    roots: Sequence[Path] = (),
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Ensemble probabilities for every scan; (path, reason) for scans that could not be read.

    Each member's precision is recorded on it (`member.precision`).
    """
    torch_device = resolve_device(device)
    choice = resolve_precision(precision, torch_device, "inference")
    batch = max(1, min(batch_size, len(scans))) * (2 if tta else 1)
    runners = [_prepare(member, torch_device, choice, precision == "auto", batch) for member in members]
    predictions = [Prediction(scan) for scan in scans]
    failures: dict[int, str] = {}
    groups: dict[tuple[Size, tuple[float, float]], list[tuple[Member, _Runner]]] = {}
    for member, runner in zip(members, runners):
        groups.setdefault((member.size, member.window), []).append((member, runner))
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    steps = Steps(len(scans) * len(groups), progress)
    for (size, window), group in groups.items():
        dataset = _CachedOrFresh(scans, size, window, [Path(r) for r in roots])
        # batch_size=None: single items; batches are formed by _batches so a failed scan never breaks one.
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None)
        for indices, volumes in _batches(loader, batch_size, failures, steps):
            outputs = _run([m for m, _ in group], [r for _, r in group], volumes, tta, torch_device)
            for (member, _), probs in zip(group, outputs):
                for row, i in enumerate(indices):
                    if member.presence:
                        predictions[i].presence.append(float(labels.presence(probs[row])))
                    if member.severity:
                        predictions[i].severity.append(labels.severity_given_covid(probs[row].numpy()))
            steps.step(len(indices))
    ok = [p for i, p in enumerate(predictions) if i not in failures]
    return ok, [(str(scans[i]), reason) for i, reason in sorted(failures.items())]


def prediction_rows(predictions: list[Prediction], threshold: float = 0.5) -> list[dict]:
    """CSV rows: scan, path, probability, prediction, severity, mild…critical."""
    rows = []
    for p in predictions:
        probability = float(np.mean(p.presence)) if p.presence else float("nan")
        row = {"scan": p.path.name, "path": str(p.path), "probability": f"{probability:.6f}",
               "prediction": "covid" if probability >= threshold else "non-covid", "severity": ""}
        if p.severity:
            four = np.mean(p.severity, axis=0)
            row["severity"] = labels.severity_name(labels.severity_index(four))
            row.update({name: f"{value:.6f}" for name, value in zip(SEVERITY_NAMES, four)})
        else:
            row.update({name: "" for name in SEVERITY_NAMES})
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write prediction rows with exactly the documented columns (temp file + rename)."""
    atomic.write_csv(path, CSV_COLUMNS, rows)


def write_submission(directory: Path, rows: list[dict]) -> list[Path]:
    """The challenge lists: covid.csv, non-covid.csv and one file per severity class, names in natural order.

    Every scan goes into covid or non-covid by its prediction, and, when severity
    was predicted, into the list of its most probable severity class.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lists: dict[str, list[str]] = {name: [] for name in SUBMISSION_FILES}
    for row in rows:
        lists[row["prediction"]].append(row["scan"])
        if row["severity"]:
            lists[row["severity"]].append(row["scan"])
    written = []
    for name, scans in lists.items():
        path = directory / f"{name}.csv"
        atomic.write_text(path, "".join(f"{s}\n" for s in sorted(scans, key=natural_key)))
        written.append(path)
    return written
