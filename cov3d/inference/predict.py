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
import time
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
from cov3d.data.readers import DEFAULT_WINDOW, natural_key, scan_kind
from cov3d.models.registry import memory_format
from cov3d.models.pair import LungPair
from cov3d.models.checkpoint import PRESENCE, SEVERITY, load_model
from cov3d import labels
from cov3d.labels import SEVERITY_NAMES
from cov3d.training.loss import probabilities
from cov3d.data.preprocess import (
    MANIFEST, ManifestError, Size, default_cache_dir, load_cached, preprocess_volume, read_manifest, series_rule,
    size_dir, source_stamp,
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

    @property
    def lungs(self) -> str:
        """What the model sees: 'off' (the whole volume), 'crop' or 'split' (cov3d.data.lungs)."""
        return str(self.config.get("lungs", "off"))


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
            if not (path / PRESENCE).is_file() and (path / "cv.json").is_file():
                from cov3d.training.cv import fold_runs  # a cross-validation: its fold models, ensembled

                members.extend(load_ensemble(fold_runs(path)))
                continue
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
    """Every scan at or below the given paths, once each, and (path, reason) for arguments that hold none.

    A file that is not a scan (a README.txt among `test/*`) is such an argument;
    a scan reached twice (by a relative and an absolute path, say) is listed
    once, as first given.
    """
    scans: list[Path] = []
    missing: list[tuple[str, str]] = []
    first: dict[Path, Path] = {}  # real path -> the path it was first given as
    for path in map(Path, paths):
        if not path.exists():
            missing.append((str(path), "does not exist"))
            continue
        if not path.is_dir() and scan_kind(path) is None:
            missing.append((str(path), "is not a scan: no reader takes this kind of file (volume files, DICOM "
                                       "files, images and folders of them are scans)"))
            continue
        try:
            found = [p for p, _ in find_scans(path)]
        except OSError as error:
            missing.append((str(path), f"cannot be searched: {error.strerror or error}"))
            continue
        if not found:
            missing.append((str(path), "holds no scans (numbered slices, DICOM series, or volume files)"))
        for scan in found:
            real = scan.resolve()
            if real not in first:
                first[real] = scan
                scans.append(scan)
            elif first[real] != scan:
                log.warning("%s and %s are the same scan; it is predicted once", first[real], scan)
    return scans, missing


def _non_finite(tensor: torch.Tensor) -> int:
    """How many values of `tensor` are NaN or infinite."""
    return int((~torch.isfinite(tensor)).sum())


class _CachedOrFresh(Dataset):
    """Scans as one (C, D, W, W) float32 tensor per input shape (size, window, lungs) the members need, each
    from an up-to-date cache entry or preprocessed in memory. A scan that holds NaN or inf voxels fails.

    C is 1, or 2 under --lungs split. `series` is the --series that picks a DICOM series.
    """

    def __init__(self, scans: list[Path], shapes: list[tuple[Size, tuple[float, float], str]], roots: list[Path],
                 series: str | None = None):
        self.scans, self.shapes, self.series = scans, shapes, series
        self.cached = [_cache_index(scans, size, window, roots, lungs, series) for size, window, lungs in self.shapes]

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, index: int) -> tuple[int, list[torch.Tensor], str]:
        scan = self.scans[index]
        try:
            return index, [self._volume(scan, shape) for shape in range(len(self.shapes))], ""
        except Exception as error:  # reported per scan; the other scans go on
            return index, [], describe_error(error)

    def _volume(self, scan: Path, shape: int) -> torch.Tensor:
        size, window, lungs = self.shapes[shape]
        channels = 2 if lungs == "split" else 1
        cached = self.cached[shape].get(scan)
        if cached is not None:
            try:
                tensor = load_cached(cached).float()
                if tuple(tensor.shape) != (channels, size.depth, size.width, size.width):
                    log.warning("cache file '%s' holds a %s tensor, not %s; preprocessing %s instead", cached,
                                "x".join(map(str, tensor.shape)), size.name, scan)
                elif _non_finite(tensor):  # written by an older cov3d from a scan with NaN voxels, say
                    log.warning("cache file '%s' holds %d NaN or infinite value(s); preprocessing %s instead",
                                cached, _non_finite(tensor), scan)
                else:
                    return tensor
            except Cov3dError as error:  # a damaged cache entry: read the scan itself instead
                log.warning("%s; preprocessing %s instead", error, scan)
        tensor = preprocess_volume(scan, size, window, threads=1, lungs=lungs, series=self.series)[0].float()
        bad = _non_finite(tensor)
        if bad:
            raise Cov3dError(f"'{scan}' holds {bad} NaN or infinite voxel(s) after preprocessing; the model "
                             "cannot score it")
        return tensor


def _cache_index(scans: list[Path], size: Size, window: tuple[float, float], roots: list[Path], lungs: str = "off",
                 series: str | None = None) -> dict[Path, Path]:
    """Cache files written by `cov3d preprocess ROOT` that are up to date for these scans, size, window, lungs
    mode and --series."""
    entries: dict[Path, tuple[Path, str, str]] = {}  # real scan path -> (cache file, stamp, window)
    for root in roots:
        manifest = size_dir(default_cache_dir(root), size, lungs) / MANIFEST
        try:
            rows = read_manifest(manifest)
        except ManifestError as error:  # the scans are preprocessed instead; `cov3d preprocess` rebuilds it
            log.warning("%s; its cached scans are not used", error)
            continue
        for row in rows:
            if row.get("series_rule", "") != series_rule(row.get("source", ""), series):
                continue  # another DICOM series than the one asked for
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
        if isinstance(model, LungPair):  # the shared network is folded; the pair only combines its scores
            folded = fold_batchnorm(model.model)
            return LungPair(folded) if folded is not None else model
        folded = fold_batchnorm(model)
        if folded is not None:
            return folded
    return model


def _prepare(member: Member, device: torch.device, choice: Choice, auto: bool, batch: int) -> _Runner:
    """The member on `device` in the precision it runs in; auto's CPU bf16 only where it measured faster."""
    member.model.to(device)
    arch = member.config["arch"]
    if auto and device.type == "cpu" and choice.precision == "bf16":
        channels = 2 if member.lungs == "split" else 1
        shape = (batch, channels, member.size.depth, member.size.width, member.size.width)
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
             steps: Steps) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
    """(scan indices, stacked volumes of each input shape) of up to `size` scans that could be read; the others
    go to `failures`."""
    pending: list[tuple[int, list[torch.Tensor]]] = []

    def stacked() -> tuple[list[int], list[torch.Tensor]]:
        shapes = len(pending[0][1])
        return [i for i, _ in pending], [torch.stack([t[k] for _, t in pending]) for k in range(shapes)]

    for index, tensors, reason in loader:
        if reason:
            failures[index] = reason
            steps.step()
            continue
        pending.append((index, tensors))
        if len(pending) == size:
            yield stacked()
            pending = []
    if pending:
        yield stacked()


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
    on_batch: Callable[[list[Prediction]], None] | None = None,
    series: str | None = None,
) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Ensemble probabilities for every scan; (path, reason) for scans that could not be read or scored.

    Each scan is read once for every input shape (size, window, lungs mode) the
    members need (DICOM folders through `series`, a --series), and its prediction is whole after one batch: `on_batch` gets each
    batch's finished predictions as they come (to keep them, say). A scan
    whose output is NaN or infinite (in fp32 too) fails, naming the model:
    predictions hold finite probabilities only. Each member's precision is
    recorded on it (`member.precision`).
    """
    torch_device = resolve_device(device)
    choice = resolve_precision(precision, torch_device, "inference")
    batch = max(1, min(batch_size, len(scans))) * (2 if tta else 1)
    runners = [_prepare(member, torch_device, choice, precision == "auto", batch) for member in members]
    predictions = [Prediction(scan) for scan in scans]
    failures: dict[int, str] = {}
    groups: dict[tuple[Size, tuple[float, float], str], list[tuple[Member, _Runner]]] = {}
    for member, runner in zip(members, runners):
        groups.setdefault((member.size, member.window, member.lungs), []).append((member, runner))
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    steps = Steps(len(scans), progress)
    dataset = _CachedOrFresh(scans, list(groups), [Path(r) for r in roots], series)
    # batch_size=None: single items; batches are formed by _batches so a failed scan never breaks one.
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None)
    for indices, volumes in _batches(loader, batch_size, failures, steps):
        outputs: list[tuple[Member, torch.Tensor]] = []  # each member's probabilities of the batch
        for group, stack in zip(groups.values(), volumes):
            group_members = [m for m, _ in group]
            outputs.extend(zip(group_members, _run(group_members, [r for _, r in group], stack, tta, torch_device)))
        finished = []
        for row, i in enumerate(indices):
            bad = next((member for member, probs in outputs if not torch.isfinite(probs[row]).all()), None)
            if bad is not None:
                failures[i] = (f"the model '{bad.path}' gave a NaN or infinite output for it (in fp32 too); its "
                               "weights or this scan hold values that are not finite")
                continue
            for member, probs in outputs:
                if member.presence:
                    predictions[i].presence.append(float(labels.presence(probs[row])))
                if member.severity:
                    predictions[i].severity.append(labels.severity_given_covid(probs[row].numpy()))
            finished.append(predictions[i])
        steps.step(len(indices))
        if on_batch is not None and finished:
            on_batch(finished)
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


def resume_record(output: Path) -> Path:
    """The hidden file beside a predictions CSV that lets the same command resume: .NAME.resume.json."""
    output = Path(output)
    return output.with_name(f".{output.name}.resume.json")


def _file_stamp(path: Path) -> str:
    stat = Path(path).stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def prediction_settings(members: list[Member], tta: bool, threshold: float, precision: str) -> dict:
    """What a predictions CSV depends on besides its scans: the checkpoints (path, size, time), TTA, the
    threshold and the precision asked for. Rows made with other settings are never mixed into it."""
    return {"models": [{"path": str(Path(m.path).resolve()), "file": _file_stamp(m.path),
                        "tasks": [m.presence, m.severity]} for m in members],
            "tta": bool(tta), "threshold": float(threshold), "precision": precision}


def _differences(old: dict, new: dict) -> str:
    names = {"models": "other models (or checkpoints rewritten since)", "tta": "TTA {}", "threshold": "threshold {}",
             "precision": "precision {}"}
    said = [names[key].format(old.get(key)) for key in names if old.get(key) != new.get(key)]
    return ", ".join(said) or "other settings"


class PredictionFile:
    """A predictions CSV that keeps what each run finished, so that the same command resumes.

    Beside OUTPUT, a hidden record (``.NAME.resume.json``, see
    :func:`resume_record`) holds the settings (:func:`prediction_settings`) and
    every row with its scan's source stamp; it is written first, then OUTPUT,
    each whole (temporary file + rename), every few seconds while predicting
    and when the run ends, Ctrl-C included. A later run with the same settings
    keeps the rows of its scans whose files are unchanged and predicts only the
    others; with other settings, a CSV without its record, or `fresh`, every
    scan is predicted again and OUTPUT replaced. OUTPUT always lists exactly the
    run's scans, in their order.
    """

    def __init__(self, path: Path, settings: dict, fresh: bool = False, every: float = 5.0):
        self.path, self.record, self.settings, self.every = Path(path), resume_record(path), settings, every
        self.previous = {} if fresh else self._load()
        self.rows: dict[str, dict] = {}  # real scan path -> row (CSV columns and the scan's stamp)
        self.order: list[str] = []
        self.kept = self.new = self.written = 0
        self.unsaved = False  # rows not yet on disk
        self.last_write = time.monotonic()
        self.failed = False

    def _load(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        if not self.record.is_file():
            log.warning("'%s' exists without the record of the cov3d run that wrote it (%s); it is replaced, not "
                        "resumed", self.path, self.record.name)
            return {}
        try:
            saved = json.loads(self.record.read_text(encoding="utf-8"))
            rows = saved["rows"]
            if not (isinstance(rows, dict) and all(isinstance(r, dict) and set(CSV_COLUMNS) <= set(r)
                                                   for r in rows.values())):
                raise ValueError("rows")
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("the resume record '%s' of '%s' is damaged; every scan is predicted again", self.record,
                        self.path)
            return {}
        if saved.get("settings") != self.settings:
            log.warning("'%s' holds predictions made with %s; every scan is predicted again and the file "
                        "replaced (pass another --output to keep it)",
                        self.path, _differences(saved.get("settings") or {}, self.settings))
            return {}
        return rows

    def start(self, scans: list[Path]) -> list[Path]:
        """Keep the earlier rows of these scans whose files are unchanged; return the scans still to predict."""
        todo = []
        self.order = [str(Path(scan).resolve()) for scan in scans]
        for scan, key in zip(scans, self.order):
            row, stamp = self.previous.get(key), _stamp_or_none(scan)
            if row is not None and stamp is not None and row.get("stamp") == stamp:
                self.rows[key] = {**row, "scan": Path(scan).name, "path": str(scan)}  # the path as given now
            else:
                todo.append(scan)
        self.kept = len(self.rows)
        self.written = len(self.previous)  # what OUTPUT holds now, when resuming
        self.unsaved = bool(self.rows)  # the next save rewrites OUTPUT, which lists exactly this run's scans
        return todo

    def add(self, rows: list[dict]) -> None:
        """Rows just predicted; written out when the last write is `every` seconds old."""
        for row in rows:
            scan = Path(row["path"])
            self.rows[str(scan.resolve())] = {**row, "stamp": _stamp_or_none(scan)}
        self.new += len(rows)
        self.unsaved = self.unsaved or bool(rows)
        if time.monotonic() - self.last_write >= self.every:
            self.save()

    def ordered(self) -> list[dict]:
        """The rows in the order of the scans given."""
        return [self.rows[key] for key in self.order if key in self.rows]

    def save(self) -> None:
        """Write the record and OUTPUT whole, when there are rows not yet written; a Cov3dError on a full disk."""
        self.last_write = time.monotonic()
        rows = self.ordered()
        if self.failed or not rows or not self.unsaved:
            return
        try:
            atomic.write_text(self.record, json.dumps({"settings": self.settings,
                                                        "rows": {key: self.rows[key] for key in self.order
                                                                 if key in self.rows}}) + "\n")
            write_csv(self.path, rows)
        except atomic.WriteFailed as error:
            self.failed = True
            held = (f"it holds the {self.written} scan(s) written before" if self.written else
                    "it was left as it was")
            raise Cov3dError(f"cannot write '{self.path}': {atomic.write_reason(error)}; {held}. Free space and run "
                             "the same command again to go on") from None
        self.written, self.unsaved = len(rows), False


def _stamp_or_none(scan: Path) -> str | None:
    try:
        return source_stamp(scan)
    except OSError:
        return None


def write_submission(directory: Path, rows: list[dict]) -> list[Path]:
    """The challenge lists: covid.csv, non-covid.csv and one file per severity class, names in natural order.

    Every scan goes into covid or non-covid by its prediction, and, when severity
    was predicted, into the list of its most probable severity class.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lists: dict[str, list[str]] = {name: [] for name in SUBMISSION_FILES}
    paths: dict[str, str] = {}  # scan name -> the first scan's path
    for row in rows:
        earlier = paths.setdefault(row["scan"], row.get("path", ""))
        if earlier != row.get("path", ""):
            log.warning("two scans are named '%s': %s and %s; the submission lists name scans only, so both "
                        "are listed under that name", row["scan"], earlier, row.get("path", ""))
        lists[row["prediction"]].append(row["scan"])
        if row["severity"]:
            lists[row["severity"]].append(row["scan"])
    written = []
    for name, scans in lists.items():
        path = directory / f"{name}.csv"
        atomic.write_text(path, "".join(f"{s}\n" for s in sorted(scans, key=natural_key)))
        written.append(path)
    return written
