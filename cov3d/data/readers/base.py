"""What every reader shares: the Reader interface, Scan and ScanMeta, the window, slice assembly."""

from __future__ import annotations

import logging
import math
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cov3d.errors import Cov3dError
from cov3d.data.integrity import nonfinite_message

log = logging.getLogger(__name__)

# Lung window (level −600 HU, width 1500 HU): parenchyma, ground-glass opacities
# and consolidation all stay inside the range; bone and air saturate.
DEFAULT_WINDOW: tuple[float, float] = (-1350.0, 150.0)

# Fewer slices than this cannot be interpolated cubically along depth; such scans are read with a warning.
SHORT_SCAN = 4


@dataclass(frozen=True)
class ScanMeta:
    """What a reader learned about a scan besides its voxels."""

    source: str  # the reader's kind: "slices", "dicom", "volume" or a registered one
    slices: int  # original number of slices
    height: int  # original slice height in pixels
    width: int  # original slice width in pixels
    spacing: tuple[float, float, float] | None = None  # mm: (slice, row, column), when known
    # Where the voxels lie in patient (LPS) space, as ITK gives it, when known: the first voxel's
    # position in mm, and the 3x3 direction cosines row by row, whose columns are the column, row and
    # slice axes. With `spacing`, enough to write a map that overlays the original in a viewer.
    origin: tuple[float, float, float] | None = None
    direction: tuple[float, ...] | None = None
    series: str | None = None  # the DICOM SeriesInstanceUID read, for DICOM series


@dataclass
class Scan:
    """A scan as float32 (depth, height, width) in [0, 1], with its metadata."""

    volume: np.ndarray
    meta: ScanMeta


class Reader(ABC):
    """Reads one kind of scan: says whether a path is of its kind, and reads it.

    Subclasses set `kind` (what scan_kind returns and the manifest records) and
    `windowed` (True when values are Hounsfield units mapped to [0, 1] by the
    intensity window; False for grey images windowed already).
    """

    kind: str
    windowed: bool
    # True when `read` takes `series=` (a SeriesInstanceUID or SeriesNumber) to pick one of several series.
    selects_series: bool = False

    @abstractmethod
    def can_read(self, path: Path) -> bool:
        """True when `path` is of this kind: one file of it, or a folder holding its files.

        Whether folders below a folder hold scans, making it a folder of scans
        rather than one scan, is for :func:`cov3d.data.readers.scan_kind` to judge.
        """

    @abstractmethod
    def read(self, path: Path, window: tuple[float, float], slice_width: int | None, threads: int) -> Scan:
        """Read `path` as float32 (depth, height, width) in [0, 1], depth running head to feet.

        `window` (LOW, HIGH in HU) applies when `windowed`; `slice_width`, when
        given, resizes every slice to width×width as it is read; `threads`
        slices may be decoded at once.
        """

    def is_part(self, file: Path) -> bool:
        """True when `file` is a scan of this kind or part of one (a slice, a file of a series)."""
        return self.can_read(file)

    def scan_name(self, name: str) -> str:
        """The name label files give the scan whose file or folder is called `name`."""
        return name


def natural_key(name: str) -> list[int | str]:
    """Sort key that orders embedded numbers by value: '2.jpg' before '10.jpg'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


# The HU range a window may span: air is -1000 and padding values reach -3024; dense metal implants read up
# to some 30000 on extended-scale scanners. Beyond, a window is a typing error (-3e38 made every voxel 0).
WINDOW_LIMITS: tuple[float, float] = (-10000.0, 40000.0)
MIN_WINDOW_WIDTH = 1.0  # HU: a narrower window is a threshold that float16 caches cannot tell from one


def parse_window(text: str | Sequence[float]) -> tuple[float, float]:
    """Parse 'LOW,HIGH' (Hounsfield units), or check a (LOW, HIGH) pair, into a window.

    Both ends finite and within :data:`WINDOW_LIMITS`, LOW < HIGH, and at least
    :data:`MIN_WINDOW_WIDTH` apart; anything else is a Cov3dError naming the value.
    """
    parts = text.split(",") if isinstance(text, str) else list(text)
    shown = text if isinstance(text, str) else ",".join(f"{p:g}" if isinstance(p, float) else str(p) for p in parts)
    try:
        low, high = (float(p) for p in parts)
    except (ValueError, TypeError):
        raise Cov3dError(f"window '{shown}' is not LOW,HIGH in Hounsfield units, e.g. --window=-1350,150") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise Cov3dError(f"window '{shown}' must be finite numbers of Hounsfield units, e.g. --window=-1350,150")
    if not low < high:
        raise Cov3dError(f"window '{shown}' needs LOW < HIGH, e.g. --window=-1350,150")
    bottom, top = WINDOW_LIMITS
    if low < bottom or high > top:
        raise Cov3dError(f"window '{shown}' reaches outside {bottom:g} … {top:g} HU, the range of CT values; "
                         "e.g. --window=-1350,150 (the lung window)")
    if high - low < MIN_WINDOW_WIDTH:
        raise Cov3dError(f"window '{shown}' is {high - low:g} HU wide; give one at least {MIN_WINDOW_WIDTH:g} HU wide, "
                         "e.g. --window=-1350,150")
    return low, high


def visible_files(folder: Path) -> list[Path]:
    """The files directly in `folder`, hidden ones left out."""
    return [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]


def _assemble(
    items: Sequence,
    load: Callable[[object], tuple[np.ndarray, tuple[int, int]]],
    slice_width: int | None,
    threads: int,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Load slices in parallel; return the stacked volume and the majority original (h, w).

    `load(item)` returns one slice (resized already when `slice_width` is set)
    and its original (height, width). Without `slice_width`, slices whose size
    differs from the majority are resized to it.
    """
    if threads > 1 and len(items) > 1:
        with ThreadPoolExecutor(threads) as pool:
            loaded = list(pool.map(load, items))
    else:
        loaded = [load(item) for item in items]
    sizes = Counter(size for _, size in loaded)
    (height, width), _ = sizes.most_common(1)[0]
    if slice_width is None and len(sizes) > 1:
        log.warning("%d slices differ from the majority size %dx%d and are resized to it",
                    sum(n for s, n in sizes.items() if s != (height, width)), height, width)
    arrays = []
    for array, size in loaded:
        if slice_width is None and array.shape != (height, width):
            array = np.asarray(Image.fromarray(array).resize((width, height), Image.Resampling.BICUBIC))
        arrays.append(array)
    volume = np.stack(arrays).astype(np.float32, copy=False)
    return volume, (height, width)


def check_finite(values: np.ndarray, path: Path) -> None:
    """Refuse voxel values that are NaN or infinite, naming the file and how many there are."""
    if np.issubdtype(values.dtype, np.floating):
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if bad:
            raise Cov3dError(nonfinite_message(path, bad))


def _window(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    low, high = window
    out = (hu.astype(np.float32, copy=False) - np.float32(low)) / np.float32(high - low)
    return np.clip(out, 0.0, 1.0, out=out)
