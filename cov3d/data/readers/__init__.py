"""Reading scans: one boundary, :func:`read_scan`, and a registry of readers, one per kind of scan.

Each :class:`Reader` says whether it can read a path and reads it; :data:`READERS`
holds them by kind, asked in order (the first that can read a path names its
kind). Three are registered:

* ``slices``: a folder of 2D image files named by number (``0.jpg`` … ``N.jpg``,
  also ``.jpeg``/``.png``), the COV19-CT-DB layout. Already windowed by the
  data set's authors, so grey values map straight to [0, 1].
* ``dicom``: a folder holding one DICOM series, any file names.
* ``volume``: one file (NIfTI, NRRD, MetaImage, or a multi-frame DICOM file) read
  by SimpleITK.

DICOM and volumes hold Hounsfield units, mapped to [0, 1] by an intensity window
(``Reader.windowed``). Every reader returns float32 (depth, height, width) in
[0, 1] with depth running head to feet, plus :class:`ScanMeta`. A new format is
one reader module plus its :func:`register_reader` call below; finding scans,
reading them and caching them then take it with no other change.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cov3d.errors import Cov3dError
from cov3d.data.readers.base import (
    DEFAULT_WINDOW, SHORT_SCAN, Reader, Scan, ScanMeta, natural_key, parse_window, visible_files,
)
from cov3d.data.readers.dicom import DICOM_SUFFIXES, DicomReader
from cov3d.data.readers.slices import SLICE_SUFFIXES, SliceReader, is_image_file
from cov3d.data.readers.volume import VOLUME_SUFFIXES, VolumeReader, is_volume_file

__all__ = [
    "DEFAULT_WINDOW", "DICOM_SUFFIXES", "READERS", "SHORT_SCAN", "SLICE_SUFFIXES", "VOLUME_SUFFIXES",
    "Reader", "Scan", "ScanMeta", "get_reader", "is_image_file", "is_volume_file", "natural_key",
    "parse_window", "read_scan", "register_reader", "scan_kind", "subfolders_inside", "visible_files",
]

log = logging.getLogger(__name__)

# Kind → reader, in precedence order: a folder with both images and DICOM files is a slice folder.
READERS: dict[str, Reader] = {}


def register_reader(reader: Reader) -> Reader:
    """Add `reader` to the registry, asked after those registered before it; return it.

    Registered in this process only: spawned preprocess workers (``workers`` > 1)
    know the readers registered here, on import, and not ones registered later.
    """
    kind = getattr(reader, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise Cov3dError(f"reader {reader!r} has no kind; give its class a `kind` string such as 'numpy'")
    if kind in READERS:
        raise Cov3dError(f"a reader of scan kind '{kind}' is already registered ({type(READERS[kind]).__name__}); "
                         "give the new reader another kind")
    READERS[kind] = reader
    return reader


def get_reader(kind: str) -> Reader:
    """The registered reader of scan kind `kind` ('slices', 'dicom', 'volume', …)."""
    try:
        return READERS[kind]
    except KeyError:
        raise Cov3dError(f"no reader for scan kind '{kind}'; known kinds: {', '.join(READERS)} "
                         "(register one with cov3d.data.readers.register_reader)") from None


register_reader(SliceReader())
register_reader(DicomReader())
register_reader(VolumeReader())


def _parts_below(folder: Path, at_least: int | None = None) -> int:
    """The most scan files (slices, DICOM files, volumes) any one folder below `folder` holds.

    With `at_least`, stops as soon as one folder holds that many.
    """
    readers = list(READERS.values())
    most = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if Path(root) == folder:
            continue
        count = sum(1 for name in files if not name.startswith(".")
                    and any(reader.is_part(Path(root) / name) for reader in readers))
        most = max(most, count)
        if at_least is not None and most >= at_least:
            break
    return most


def _own_parts(folder: Path, reader: Reader) -> int:
    return sum(1 for file in visible_files(folder) if reader.is_part(file))


def subfolders_inside(path: Path) -> list[Path]:
    """The visible folders inside a scan folder: not searched for scans (thumbnails, a scout series)."""
    return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: natural_key(p.name)) if path.is_dir() else []


def scan_kind(path: Path) -> str | None:
    """The kind of the first registered reader that can read `path` ('slices', 'dicom', 'volume', …), else None.

    A folder holding files of a scan is one scan, its subfolders (thumbnails,
    a scout series) part of it, when it holds at least SHORT_SCAN such files
    and more than any folder below it. Otherwise, when folders below it hold
    scans, it is a folder of scans, and its own few images (an overview.png
    beside the scan folders) are not slices. A lone image file is a 1-slice scan.
    """
    path = Path(path)
    for reader in READERS.values():
        if reader.can_read(path):
            if not path.is_dir() or not subfolders_inside(path):
                return reader.kind
            own = _own_parts(path, reader)
            if own >= SHORT_SCAN:
                return reader.kind if _parts_below(path, at_least=own) < own else None
            return None if _parts_below(path, at_least=1) else reader.kind
    return None


def read_scan(
    path: str | os.PathLike,
    *,
    window: tuple[float, float] = DEFAULT_WINDOW,
    slice_width: int | None = None,
    threads: int | None = None,
    series: str | None = None,
) -> Scan:
    """Read a scan folder or file as float32 (depth, height, width) in [0, 1].

    `window` (LOW, HIGH in HU) maps DICOM and volume intensities to [0, 1].
    `slice_width`, when given, resizes every slice to that width×width with
    antialiased bicubic interpolation as it is read, so that a full-resolution
    float copy of a long scan never exists; otherwise slices keep their size.
    `threads` decodes that many slices at once (default: all cores).
    `series` (a SeriesInstanceUID or SeriesNumber) picks the DICOM series to
    read where a folder holds several; readers of other kinds ignore it.
    """
    path = Path(path)
    if not path.exists():
        raise Cov3dError(f"scan '{path}' does not exist")
    threads = threads or os.cpu_count() or 1
    scan = _read(path, window, slice_width, threads, series)
    if scan.meta.slices < SHORT_SCAN:
        log.warning("%s has only %d slice(s); it is read, but a chest CT usually has dozens", path, scan.meta.slices)
    return scan


def _read(path: Path, window: tuple[float, float], slice_width: int | None, threads: int,
          series: str | None) -> Scan:
    kind = scan_kind(path)
    if kind is not None:
        reader = READERS[kind]
        if series is not None and reader.selects_series:
            return reader.read(path, window, slice_width, threads, series=series)
        return reader.read(path, window, slice_width, threads)
    if path.is_file():
        raise Cov3dError(
            f"'{path}' has an unsupported file type; cov3d reads folders of numbered "
            f".jpg/.jpeg/.png slices, DICOM series folders, and {', '.join(VOLUME_SUFFIXES)} files"
        )
    if not any(path.iterdir()):
        raise Cov3dError(f"scan folder '{path}' is empty")
    if _parts_below(path, at_least=1):
        raise Cov3dError(f"'{path}' is a folder of scans, not one scan; give one of the scan folders in it")
    raise Cov3dError(
        f"'{path}' holds no slices: expected numbered .jpg/.jpeg/.png images or DICOM files in it"
    )


def __getattr__(name: str):
    # cov3d.io (0.1–0.3), which now names this package, also held write_volume; old imports still find it.
    if name == "write_volume":
        from cov3d.data.writers import write_volume

        return write_volume
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
