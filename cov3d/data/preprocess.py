"""Turning scans into cached fixed-size tensors (paper §3.1).

Each scan becomes ``<cache>/<D>x<W>x<W>/<relative path>.pt`` holding one float16
tensor of shape (1, D, W, W) in [0, 1], and each size folder has a
``manifest.csv`` describing every cached scan. Writes go to a temporary file
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
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cov3d.atomic import remove_stale_temporaries, save_torch, write_csv
from cov3d.data.catalog import ScanRecord, catalog
from cov3d.errors import Cov3dError, describe_error
from cov3d.data.readers import DEFAULT_WINDOW, get_reader, read_scan
from cov3d.data.resample import SIZES, finish

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ["path", "cache", "split", "label", "severity", "slices", "source",
                    "height", "width", "spacing", "window", "stamp", "bytes"]
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


def size_dir(cache: Path, size: Size) -> Path:
    return Path(cache) / size.name


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
    """A cached scan tensor (1, D, H, W); loads no pickled code. A damaged or foreign file is a Cov3dError."""
    try:
        tensor = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise Cov3dError(f"cache file '{path}' is missing; run `cov3d preprocess` on the data again") from None
    except Exception as error:  # truncated zip, foreign pickle, anything: the file is not usable
        raise Cov3dError(f"cache file '{path}' is damaged ({type(error).__name__}); run `cov3d preprocess` on the "
                         "data again to rebuild it") from None
    if not (isinstance(tensor, torch.Tensor) and tensor.dim() == 4 and tensor.shape[0] == 1
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
    source: Path, size: Size, window: tuple[float, float] = DEFAULT_WINDOW, threads: int | None = None
) -> tuple[torch.Tensor, dict]:
    """Read and resample one scan; return the (1, D, W, W) float16 tensor and its metadata."""
    scan = read_scan(source, window=window, slice_width=size.width, threads=threads)
    volume = finish(scan.volume, size.depth)
    meta = scan.meta
    return torch.from_numpy(volume).to(CACHE_DTYPE).unsqueeze(0), {
        "slices": meta.slices,
        "source": meta.source,
        "height": meta.height,
        "width": meta.width,
        "spacing": "" if meta.spacing is None else "x".join(f"{s:g}" for s in meta.spacing),
    }


@dataclass
class PreprocessReport:
    """What a preprocess run did."""

    manifest: Path
    total: int = 0
    processed: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (scan path, reason)


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Rows of a manifest.csv (empty when the file does not exist)."""
    if not Path(path).is_file():
        return []
    with Path(path).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _write_manifest(path: Path, rows: Iterable[dict]) -> None:
    write_csv(path, MANIFEST_COLUMNS, rows)


def _window_text(record: ScanRecord, window: tuple[float, float]) -> str:
    # Kinds already windowed (JPEG/PNG slices) ignore the HU window, so their cache does not depend on it.
    return f"{window[0]:g},{window[1]:g}" if get_reader(record.kind).windowed else ""


def _row(record: ScanRecord, cache_file: str, meta: dict, window: str, stamp: str) -> dict:
    return {"path": record.path, "cache": cache_file, "split": record.split, "label": record.label,
            "severity": "" if record.severity is None else record.severity, **meta,
            "window": window, "stamp": stamp}


def _work(source: str, destination: str, size: Size, window: tuple[float, float], threads: int) -> dict:
    """One scan, in a worker process: preprocess and save; return its metadata."""
    torch.set_num_threads(threads)
    tensor, meta = preprocess_volume(Path(source), size, window, threads)
    save_torch(tensor, Path(destination))
    return meta


_Job = tuple[ScanRecord, str, str, str]  # record, cache file name, window text, source stamp


def preprocess_dataset(
    data: Path,
    size: Size,
    cache: Path | None = None,
    *,
    window: tuple[float, float] = DEFAULT_WINDOW,
    workers: int | None = None,
    overwrite: bool = False,
    severity_files: dict[str, Path | None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PreprocessReport:
    """Cache every scan under `data` at `size`; return what was done.

    Scans whose cache is up to date (same source files, same window) are
    skipped unless `overwrite`. A failing scan is recorded in the report and
    left out of the manifest; the others are still processed. `progress(done,
    total)` is called as scans finish.
    """
    data = Path(data)
    records = catalog(data, severity_files)
    cache = Path(cache) if cache is not None else default_cache_dir(data)
    _check_cache_dir(cache, data)
    folder = size_dir(cache, size)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    run = _Run(records, folder, folder / MANIFEST, progress)
    jobs = run.plan(data, window, overwrite)
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    threads = max(1, (os.cpu_count() or 1) // workers)
    try:
        for job, result in _results(jobs, data, folder, size, window, workers, threads):
            run.finished(job, result)
    finally:
        run.write_manifest()  # also on Ctrl-C: every scan finished so far is recorded, so a rerun resumes
    return run.report


class _Run:
    """One preprocessing run's bookkeeping: manifest rows by scan, the report, progress, periodic saves."""

    def __init__(self, records: list[ScanRecord], folder: Path, manifest: Path,
                 progress: Callable[[int, int], None] | None):
        self.records, self.folder, self.manifest, self.progress = records, folder, manifest, progress
        self.report = PreprocessReport(manifest=manifest, total=len(records))
        self.rows: dict[str, dict] = {}
        self.done, self.last_write = 0, time.monotonic()

    def plan(self, data: Path, window: tuple[float, float], overwrite: bool) -> list[_Job]:
        """Keep the rows of scans whose cache is up to date; return the jobs for the others."""
        previous = {row["path"]: row for row in read_manifest(self.manifest)}
        jobs = []
        for record in self.records:
            cache_file = cache_name(record.path, data)
            window_text = _window_text(record, window)
            stamp = source_stamp(data / record.path)
            old = previous.get(record.path)
            if (not overwrite and old and old.get("stamp") == stamp and old.get("window") == window_text
                    and _cache_is_whole(self.folder / cache_file, old)):
                meta = {k: old.get(k, "") for k in ("slices", "source", "height", "width", "spacing")}
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
            self.rows[record.path] = _row(record, cache_file, result, window_text, stamp)
            self.report.processed += 1
        self.done += 1
        if self.progress:
            self.progress(self.done, self.report.total)
        if time.monotonic() - self.last_write > 5:  # a long run keeps a recent manifest on disk
            self.write_manifest()

    def write_manifest(self) -> None:
        _write_manifest(self.manifest, [self.rows[r.path] for r in self.records if r.path in self.rows])
        self.last_write = time.monotonic()


def _results(jobs: list[_Job], data: Path, folder: Path, size: Size, window: tuple[float, float], workers: int,
             threads: int) -> Iterator[tuple[_Job, dict | BaseException]]:
    """(job, manifest fields or the error) as each job finishes: in this process, or in `workers` processes."""
    def arguments(job: _Job) -> tuple:
        return str(data / job[0].path), str(folder / job[1]), size, window, threads

    if workers == 1:
        for job in jobs:
            try:
                yield job, _work(*arguments(job))
            except Exception as error:  # one bad scan must not stop the others
                yield job, error
        return
    # 'spawn' keeps workers independent of the parent's torch thread pools.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        queue = iter(jobs)
        pending: dict[Future, _Job] = {}
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
