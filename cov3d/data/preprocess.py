"""Turning scans into cached fixed-size tensors (paper §3.1).

Each scan becomes ``<cache>/<D>x<W>x<W>/<relative path>.pt`` holding one float16
tensor of shape (1, D, W, W) in [0, 1], and each size folder has a
``manifest.csv`` describing every cached scan. With ``--lungs crop`` the folder is
``<D>x<W>x<W>-lungs-crop`` and the tensor shows the lungs' box; with ``--lungs
split`` (``…-lungs-split``) it is (2, D, W, W), the right lung and the mirrored
left lung. Under both, the lung labels on the same grid lie beside each tensor
in ``<relative path>.lungs.npz`` (uint8: 0 outside, 1 right, 2 left lung). Writes go to a temporary file
renamed into place, so an interrupted run never leaves a partial tensor, and a
rerun skips scans whose cache is up to date.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cov3d.atomic import WriteFailed, remove_stale_temporaries, replacing, save_torch, write_csv
from cov3d.data.catalog import ScanRecord, catalog
from cov3d.errors import Cov3dError, describe_error
from cov3d.data.readers import DEFAULT_WINDOW, READERS, get_reader, read_scan
from cov3d.data.lungs import LUNG_MODES, LungViews, box_text, lung_views, resample_labels
from cov3d.data.resample import SIZES, finish, resample_volume

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ["path", "cache", "split", "label", "severity", "slices", "source",
                    "height", "width", "spacing", "window", "stamp", "bytes", "root",
                    # the DICOM series read, and the --series that chose it ('' for the series rule)
                    "series", "series_rule",
                    # --lungs crop/split: the mask file, what segmentation found, and the box(es) cut out
                    "lungs", "mask", "lung_quality", "lung_ml", "right_lung_ml", "left_lung_ml", "lung_box"]
CACHE_DTYPE = torch.float16  # 2 bytes a voxel; ample for values in [0, 1]


@dataclass(frozen=True)
class Size:
    """Preprocessed scan size: depth × width × width."""

    depth: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.depth}x{self.width}x{self.width}"


def resolve_size(size: str | None = "small", depth: int | None = None, width: int | None = None) -> Size:
    """A named size ('small', 'medium', 'large'), overridden by explicit depth and/or width."""
    if size is not None and size not in SIZES:
        raise Cov3dError(f"size '{size}' is not one of {', '.join(SIZES)}; or give --depth and --width")
    named_depth, named_width = SIZES[size or "small"]
    depth = named_depth if depth is None else depth
    width = named_width if width is None else width
    if depth < 1 or width < 1:
        raise Cov3dError(f"depth {depth} and width {width} must both be at least 1")
    return Size(depth, width)


def cache_root() -> Path:
    """Where caches live by default: $COV3D_CACHE, else $XDG_CACHE_HOME/cov3d, else ~/.cache/cov3d."""
    if os.environ.get("COV3D_CACHE"):
        return Path(os.environ["COV3D_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cov3d"


def default_cache_dir(data: Path) -> Path:
    """The default cache of a data path: its name plus a hash of its absolute path, under :func:`cache_root`."""
    resolved = Path(data).resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    return cache_root() / f"{resolved.name or 'data'}-{digest}"


def size_dir(cache: Path, size: Size, lungs: str = "off") -> Path:
    """The folder of a cache holding scans at `size` under a --lungs mode: '64x128x128', '64x128x128-lungs-crop'."""
    return Path(cache) / (size.name if lungs == "off" else f"{size.name}-lungs-{lungs}")


def _check_cache_dir(cache: Path, data: Path) -> None:
    cache, data = Path(cache).resolve(), Path(data).resolve()
    source_dir = data if data.is_dir() else data.parent
    if cache == source_dir or source_dir in cache.parents:
        raise Cov3dError(f"cache '{cache}' is inside the data '{source_dir}'; choose a --cache outside it")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = cache / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise Cov3dError(f"cache '{cache}' is not writable ({error.strerror}); choose another with --cache") from None


def source_stamp(path: Path) -> str:
    """A cheap fingerprint of a scan's files: count, bytes and newest modification time."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()]
    stats = [p.stat() for p in files]
    return f"{len(stats)}:{sum(s.st_size for s in stats)}:{max((s.st_mtime_ns for s in stats), default=0)}"


def cache_name(record_path: str, data: Path) -> str:
    """Relative cache file for a scan: its path under DATA plus '.pt' (DATA's own name when it is the scan)."""
    relative = Path(data).resolve().name if record_path == "." else record_path
    return f"{relative}.pt"


def load_cached(path: Path) -> torch.Tensor:
    """A cached scan tensor (C, D, H, W), C = 1 (2 under --lungs split); loads no pickled code.

    A damaged or foreign file is a Cov3dError.
    """
    try:
        tensor = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise Cov3dError(f"cache file '{path}' is missing; run `cov3d preprocess` on the data again") from None
    except Exception as error:  # truncated zip, foreign pickle, anything: the file is not usable
        raise Cov3dError(f"cache file '{path}' is damaged ({type(error).__name__}); run `cov3d preprocess` on the "
                         "data again to rebuild it") from None
    if not (isinstance(tensor, torch.Tensor) and tensor.dim() == 4 and tensor.shape[0] in (1, 2)
            and tensor.is_floating_point()):
        raise Cov3dError(f"cache file '{path}' does not hold a cov3d scan tensor; run `cov3d preprocess` on the "
                         "data again to rebuild it")
    return tensor


def _cache_is_whole(path: Path, row: dict) -> bool:
    """The cache file exists with the size the manifest recorded (manifests without a size: it loads)."""
    if not path.is_file():
        return False
    if row.get("bytes"):
        return str(path.stat().st_size) == row["bytes"]
    try:
        load_cached(path)
    except Cov3dError:
        return False
    return True


def preprocess_volume(
    source: Path, size: Size, window: tuple[float, float] = DEFAULT_WINDOW, threads: int | None = None, *,
    lungs: str = "off", series: str | None = None,
) -> tuple[torch.Tensor, dict]:
    """Read and resample one scan; return the (C, D, W, W) float16 tensor and its metadata.

    `lungs` 'off' resamples the whole volume (C = 1); 'crop' the lungs' box (C = 1);
    'split' each lung's box, the left one mirrored (C = 2): see cov3d.data.lungs.
    The metadata holds the manifest's fields, plus `views` (where each channel was
    cut from the scan's grid, for maps laid back on it) and, under crop and split,
    `labels`: the lung labels on the tensor's grid.
    """
    if lungs == "off":
        scan = read_scan(source, window=window, slice_width=size.width, threads=threads, series=series)
        volume = finish(scan.volume, size.depth)[None]
        depth, rows, columns = scan.meta.slices, scan.meta.height, scan.meta.width
        extra = {"views": [((0, depth), (0, rows), (0, columns))], "lungs": "off"}
    else:
        # The lungs are found at full resolution, then only their box is resampled: the model sees them sharper.
        scan = read_scan(source, window=window, threads=threads, series=series)
        views = lung_views(scan.volume, lungs, name=source)
        volume = np.stack([resample_volume(np.ascontiguousarray(v), size.depth, size.width) for v in views.volumes])
        labels = np.stack([resample_labels(v, size.depth, size.width) for v in views.labels])
        extra = {"views": views.boxes, "labels": labels, "lungs": lungs, **_lung_fields(views, scan.meta.spacing)}
    meta = scan.meta
    return torch.from_numpy(volume).to(CACHE_DTYPE), {
        "slices": meta.slices,
        "source": meta.source,
        "height": meta.height,
        "width": meta.width,
        "spacing": "" if meta.spacing is None else "x".join(f"{s:g}" for s in meta.spacing),
        "series": meta.series or "",
        "series_rule": series or "",
        **extra,
    }


def _lung_fields(views: LungViews, spacing: tuple[float, float, float] | None) -> dict:
    """The manifest's description of a lung segmentation: quality, volumes (ml, when spacing is known), boxes."""
    mask = views.mask
    volumes = mask.volumes_ml(spacing) if mask is not None and mask.ok else None
    ml = lambda value: f"{value:.0f}"  # noqa: E731
    return {"lung_quality": views.fallback or "ok",
            "lung_ml": ml(sum(volumes)) if volumes else "",
            "right_lung_ml": ml(volumes[0]) if volumes else "",
            "left_lung_ml": ml(volumes[1]) if volumes else "",
            "lung_box": ";".join(box_text(box) for box in views.boxes)}


def mask_name(cache_file: str) -> str:
    """The lung-label file beside a cache file: 'train/covid/ct_scan_0.pt' → '….lungs.npz'."""
    return cache_file[: -len(".pt")] + ".lungs.npz" if cache_file.endswith(".pt") else cache_file + ".lungs.npz"


def load_mask(path: Path) -> np.ndarray:
    """Lung labels saved beside a cache file: uint8 (C, D, W, W), 0 outside, 1 right, 2 left lung."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            return stored["labels"]
    except (OSError, KeyError, ValueError) as error:
        raise Cov3dError(f"lung mask '{path}' is missing or damaged ({type(error).__name__}); run `cov3d "
                         "preprocess` with --lungs again to rebuild it") from None


def save_mask(labels: np.ndarray, path: Path) -> None:
    """Lung labels as a compressed .npz, through a temporary file (whole or absent)."""
    with replacing(path) as temporary:
        with temporary.open("wb") as handle:
            np.savez_compressed(handle, labels=labels.astype(np.uint8))


@dataclass
class PreprocessReport:
    """What a preprocess run did."""

    manifest: Path
    total: int = 0
    processed: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (scan path, reason)
    lung_fallbacks: list[tuple[str, str]] = field(default_factory=list)  # (scan path, why) cached whole


class ManifestError(Cov3dError):
    """A manifest.csv that is damaged (not UTF-8, not CSV, rows cut short) or not cov3d's (other columns)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"manifest '{path}' is damaged ({reason}); run `cov3d preprocess` on the data again "
                         "to rebuild it")
        self.path, self.reason = Path(path), reason


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Rows of a manifest.csv (empty when the file does not exist); a ManifestError when it is not a whole one."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = reader.fieldnames
    except UnicodeDecodeError:
        raise ManifestError(path, "not UTF-8 text") from None
    except csv.Error as error:
        raise ManifestError(path, f"not a CSV file: {error}") from None
    except OSError as error:
        raise Cov3dError(f"manifest '{path}' cannot be read: {error.strerror}") from None
    if not columns:
        raise ManifestError(path, "an empty file")
    missing = [c for c in ("path", "cache") if c not in columns]
    if missing:
        raise ManifestError(path, f"its columns are {', '.join(map(repr, columns[:6]))}, not cov3d's: no "
                                  f"{' or '.join(map(repr, missing))} column")
    for number, row in enumerate(rows, start=2):
        if not row.get("path") or not row.get("cache") or None in row:
            raise ManifestError(path, f"line {number} is not a whole row")
    return rows


def _write_manifest(path: Path, rows: Iterable[dict]) -> None:
    write_csv(path, MANIFEST_COLUMNS, rows)


def _window_text(record: ScanRecord, window: tuple[float, float]) -> str:
    # Kinds already windowed (JPEG/PNG slices) ignore the HU window, so their cache does not depend on it.
    return f"{window[0]:g},{window[1]:g}" if get_reader(record.kind).windowed else ""


def _row(record: ScanRecord, cache_file: str, meta: dict, window: str, stamp: str) -> dict:
    return {"path": record.path, "cache": cache_file, "split": record.split, "label": record.label,
            "severity": "" if record.severity is None else record.severity, **meta,
            "window": window, "stamp": stamp}


# What a manifest row says of its scan, kept as it is when the scan's cache is up to date.
_KEPT = ("slices", "source", "height", "width", "spacing", "series", "series_rule", "lungs", "mask", "lung_quality",
         "lung_ml", "right_lung_ml", "left_lung_ml", "lung_box")


def series_rule(kind: str, series: str | None) -> str:
    """The manifest's `series_rule` of a scan of `kind` read with `--series` `series` ('' for the series rule).

    Only readers that choose among series (DICOM) depend on --series; the caches of other kinds do not.
    """
    reader = READERS.get(kind)
    return (series or "") if reader is not None and reader.selects_series else ""


def _owned_by(rows: list[dict[str, str]], data: Path) -> bool:
    """Whether a size folder's manifest rows are the cache of `data` (or of nothing yet).

    The manifest records its data root; one without (older cov3d) or with
    another root (the data was moved) belongs to `data` when a row's source
    fingerprint matches a scan there.
    """
    if not rows or rows[0].get("root") == str(Path(data).resolve()):
        return True
    for row in rows:
        source = Path(data) / row["path"]
        try:
            if source.exists() and row.get("stamp") == source_stamp(source):
                return True
        except OSError:
            continue
    return False


def _size_folder(cache: Path, data: Path, size: Size, lungs: str = "off") -> Path:
    """Where `data` is cached at `size` in `cache`: CACHE/<size>, or, when another data path's cache is there
    already, CACHE/<name>-<hash>/<size> (named as default caches are), so that one cache holds both."""
    folder = size_dir(cache, size, lungs)
    try:
        rows = read_manifest(folder / MANIFEST)
    except ManifestError:  # damaged: nobody's; this run rebuilds it
        return folder
    if _owned_by(rows, data):
        return folder
    own = size_dir(Path(cache) / default_cache_dir(data).name, size, lungs)
    log.warning("%s holds the cache of another data path (%s); caching %s in %s, so that the cache keeps both",
                folder, rows[0].get("root") or "an earlier one", data, own)
    return own


def _rebuilt(path: Path, reason: str, records: list[ScanRecord], data: Path, folder: Path, size: Size,
             window: tuple[float, float]) -> dict[str, dict]:
    """Manifest rows for the scans whose cache files are whole and newer than their source; `path` (damaged
    or foreign) is kept beside as manifest.csv.damaged, and the others are preprocessed again."""
    rows: dict[str, dict] = {}
    for record in records:
        cache_file = cache_name(record.path, data)
        file = folder / cache_file
        source = data / record.path
        try:
            newest = max([source.stat()] + ([p.stat() for p in source.iterdir() if p.is_file()]
                                            if source.is_dir() else []), key=lambda s: s.st_mtime_ns)
            if not file.is_file() or file.stat().st_mtime_ns < newest.st_mtime_ns:
                continue  # none, or made before the source last changed
            if tuple(load_cached(file).shape)[1:] != (size.depth, size.width, size.width):
                continue
        except (OSError, Cov3dError):
            continue
        meta = {"slices": "", "source": record.kind, "height": "", "width": "", "spacing": "",
                "bytes": str(file.stat().st_size)}
        rows[record.path] = _row(record, cache_file, meta, _window_text(record, window), source_stamp(source))
    kept = path.with_name(path.name + ".damaged")
    try:
        os.replace(path, kept)
    except OSError:  # a read-only cache, say: writing the new manifest fails later, with its own message
        kept = path
    log.warning("%s is damaged (%s); rebuilding it from the %d whole cached scan file(s) newer than their scans, "
                "taken as made with the HU window %g,%g (pass --overwrite if they were not); the old file is kept "
                "as %s", path, reason, len(rows), window[0], window[1], kept.name)
    return rows


def _pool(workers: int) -> ProcessPoolExecutor:
    """`workers` processes that ignore SIGINT: a Ctrl-C reaches the whole process group, and the parent alone
    answers it (by ending them), so that no worker prints a KeyboardInterrupt traceback."""
    # 'spawn' keeps workers independent of the parent's torch thread pools; a builtin initializer imports nothing.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=signal.signal,
                               initargs=(signal.SIGINT, signal.SIG_IGN))


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while worker processes start: they inherit it (through exec too), so a Ctrl-C while
    one is still importing torch gives it no KeyboardInterrupt traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _work(source: str, destination: str, size: Size, window: tuple[float, float], threads: int,
          lungs: str = "off", series: str | None = None) -> dict:
    """One scan, in a worker process: preprocess and save (the tensor, and the lung mask under --lungs);
    return its manifest fields."""
    torch.set_num_threads(threads)
    tensor, meta = preprocess_volume(Path(source), size, window, threads, lungs=lungs, series=series)
    meta.pop("views")
    labels = meta.pop("labels", None)
    if labels is not None:
        mask = Path(mask_name(destination))
        save_mask(labels, mask)
        meta["mask"] = mask.name
    save_torch(tensor, Path(destination))
    return meta


_Job = tuple[ScanRecord, str, str, str]  # record, cache file name, window text, source stamp


def preprocess_dataset(
    data: Path,
    size: Size,
    cache: Path | None = None,
    *,
    window: tuple[float, float] = DEFAULT_WINDOW,
    lungs: str = "off",
    series: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    severity_files: dict[str, Path | None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PreprocessReport:
    """Cache every scan under `data` at `size`; return what was done.

    Scans whose cache is up to date (same source files, same window and
    --series) are skipped unless `overwrite`. `lungs` ('off', 'crop', 'split')
    caches what the model sees under that mode, in a folder of its own. A failing scan is recorded in the report and
    left out of the manifest; the others are still processed. `progress(done,
    total)` is called as scans finish.
    """
    data = Path(data)
    records = catalog(data, severity_files)
    cache = Path(cache) if cache is not None else default_cache_dir(data)
    _check_cache_dir(cache, data)
    if lungs not in LUNG_MODES:
        raise Cov3dError(f"--lungs {lungs} is not one of {', '.join(LUNG_MODES)}")
    folder = _size_folder(cache, data, size, lungs)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    run = _Run(records, folder, folder / MANIFEST, progress, data)
    run.lungs, run.series = lungs, series
    jobs = run.plan(data, size, window, overwrite)
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    threads = max(1, (os.cpu_count() or 1) // workers)
    full: WriteFailed | None = None
    results = _results(jobs, data, folder, size, window, workers, threads, lungs, series)
    try:
        try:
            for job, result in results:
                if isinstance(result, WriteFailed) and result.device:
                    full = result  # a full or read-only cache: every other scan would fail the same way
                    break
                run.finished(job, result)
        finally:
            results.close()  # stops the workers at once, also on Ctrl-C
    except KeyboardInterrupt:
        # Every scan finished so far is recorded, so the same command resumes.
        raise PreprocessInterrupted(run.report, run.save()) from None
    except BaseException:
        run.save()
        raise
    unsaved = run.save()
    if full is not None or unsaved is not None:
        raise Cov3dError(_stopped(full, unsaved, run.report))
    return run.report


class PreprocessInterrupted(KeyboardInterrupt):
    """Ctrl-C during preprocessing, after the manifest was brought up to date (or failed to be: `unsaved`)."""

    def __init__(self, report: PreprocessReport, unsaved: WriteFailed | None):
        super().__init__()
        self.report, self.unsaved = report, unsaved

    def kept(self) -> str:
        """What the interrupted run kept, in words."""
        report = self.report
        cached = report.processed + report.skipped
        if self.unsaved is not None:
            return (f"{self.unsaved}: the scans cached in this run are not recorded, and the same command "
                    "preprocesses them again")
        return (f"{cached} of {report.total} scan(s) are cached and recorded in {report.manifest}; run the same "
                "command again to go on with the others")


def _stopped(full: WriteFailed | None, unsaved: WriteFailed | None, report: PreprocessReport) -> str:
    """The one line for a run stopped by its cache's device (full, read-only) or a manifest that cannot be written."""
    cached = report.processed + report.skipped
    if full is None:
        return (f"{unsaved}; the {report.processed} scan(s) preprocessed in this run are cached but not recorded, "
                "and the same command preprocesses them again; free space and run it again")
    if unsaved is None:
        kept = f"the {cached} scan(s) cached so far are recorded in {report.manifest}"
    else:
        kept = f"the manifest could not be updated either ({unsaved}), so its last version stands"
    return (f"{full}; preprocessing stopped: {kept}. Free space (or choose another --cache) and run the same "
            "command again to go on")


class _Run:
    """One preprocessing run's bookkeeping: manifest rows by scan, the report, progress, periodic saves."""

    def __init__(self, records: list[ScanRecord], folder: Path, manifest: Path,
                 progress: Callable[[int, int], None] | None, data: Path):
        self.records, self.folder, self.manifest, self.progress = records, folder, manifest, progress
        self.root = str(Path(data).resolve())
        self.report = PreprocessReport(manifest=manifest, total=len(records))
        self.rows: dict[str, dict] = {}
        self.done, self.last_write = 0, time.monotonic()
        self.lungs, self.series = "off", None

    def plan(self, data: Path, size: Size, window: tuple[float, float], overwrite: bool) -> list[_Job]:
        """Keep the rows of scans whose cache is up to date; return the jobs for the others."""
        try:
            previous = {row["path"]: row for row in read_manifest(self.manifest)}
        except ManifestError as error:  # garbage or foreign: what the cached files show is kept
            previous = _rebuilt(self.manifest, error.reason, self.records, data, self.folder, size, window)
        jobs = []
        for record in self.records:
            cache_file = cache_name(record.path, data)
            window_text = _window_text(record, window)
            stamp = source_stamp(data / record.path)
            old = previous.get(record.path)
            if (not overwrite and old and old.get("stamp") == stamp and old.get("window") == window_text
                    and old.get("series_rule", "") == series_rule(record.kind, self.series)
                    and _cache_is_whole(self.folder / cache_file, old)
                    and (self.lungs == "off" or (self.folder / mask_name(cache_file)).is_file())):
                meta = {k: old.get(k, "") for k in _KEPT}
                meta["bytes"] = str((self.folder / cache_file).stat().st_size)
                self.rows[record.path] = _row(record, cache_file, meta, window_text, stamp)
                self.report.skipped += 1
            else:
                jobs.append((record, cache_file, window_text, stamp))
        if self.report.skipped:
            log.info("%d of %d scans are already cached at %s", self.report.skipped, len(self.records), self.folder)
        self.done = self.report.skipped
        if self.progress:
            self.progress(self.done, self.report.total)
        return jobs

    def finished(self, job: _Job, result: dict | BaseException) -> None:
        record, cache_file, window_text, stamp = job
        if isinstance(result, BaseException):
            self.report.failures.append((record.path, describe_error(result)))
            log.debug("scan %s failed", record.path, exc_info=result)
            self.rows.pop(record.path, None)
        else:
            result = {**result, "bytes": str((self.folder / cache_file).stat().st_size)}
            if result.get("mask"):
                result["mask"] = mask_name(cache_file)  # relative to the size folder, as `cache` is
            self.rows[record.path] = _row(record, cache_file, result, window_text, stamp)
            if result.get("lung_quality") not in (None, "", "ok"):
                self.report.lung_fallbacks.append((record.path, result["lung_quality"]))
            self.report.processed += 1
        self.done += 1
        if self.progress:
            self.progress(self.done, self.report.total)
        if time.monotonic() - self.last_write > 5:  # a long run keeps a recent manifest on disk
            self.save()  # failing (a full disk): the run goes on, and the last save reports it

    def write_manifest(self) -> None:
        rows = [{**self.rows[r.path], "root": self.root} for r in self.records if r.path in self.rows]
        self.last_write = time.monotonic()
        _write_manifest(self.manifest, rows)

    def save(self) -> WriteFailed | None:
        """Write the manifest; return the error when it cannot be (the old manifest is then left whole)."""
        try:
            self.write_manifest()
        except WriteFailed as error:
            log.debug("manifest not written", exc_info=error)
            return error
        return None


def _results(jobs: list[_Job], data: Path, folder: Path, size: Size, window: tuple[float, float], workers: int,
             threads: int, lungs: str = "off", series: str | None = None,
             ) -> Iterator[tuple[_Job, dict | BaseException]]:
    """(job, manifest fields or the error) as each job finishes: in this process, or in `workers` processes."""
    def arguments(job: _Job) -> tuple:
        return (str(data / job[0].path), str(folder / job[1]), size, window, threads, lungs,
                series_rule(job[0].kind, series) or None)

    if workers == 1:
        for job in jobs:
            try:
                yield job, _work(*arguments(job))
            except Exception as error:  # one bad scan must not stop the others
                yield job, error
        return
    pool = _pool(workers)
    try:
        queue = iter(jobs)
        pending: dict[Future, _Job] = {}
        with _sigint_ignored():  # the workers start here
            for job in itertools.islice(queue, 2 * workers):  # a short queue keeps memory bounded
                pending[pool.submit(_work, *arguments(job))] = job
        while pending:
            complete, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in complete:
                job = pending.pop(future)
                error = future.exception()
                yield job, error if error is not None else future.result()
                following = next(queue, None)
                if following is not None:
                    pending[pool.submit(_work, *arguments(following))] = following
    except BaseException:  # Ctrl-C, or the caller stopped: end the workers now rather than after their scans
        _terminate(pool)
        raise
    pool.shutdown()


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Stop a pool's workers mid-scan; what they were writing is a temporary file the next run removes."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=10)
