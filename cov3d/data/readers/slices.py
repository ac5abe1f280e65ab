"""Folders of numbered 2D images (the COV19-CT-DB layout), and one image given on its own."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
from PIL import Image

from cov3d.errors import Cov3dError
from cov3d.data.readers.base import Reader, Scan, ScanMeta, _assemble, natural_key, visible_files
from cov3d.data.resample import resize_slice

log = logging.getLogger(__name__)

SLICE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})


def is_image_file(path: Path) -> bool:
    """True for one .jpg/.jpeg/.png file: a slice in a scan folder, or a 1-slice scan given on its own."""
    return path.is_file() and path.suffix.lower() in SLICE_SUFFIXES


class SliceReader(Reader):
    """``0.jpg`` … ``N.jpg`` (also .jpeg/.png), windowed already by the data set's authors: grey values map to [0, 1]."""

    kind = "slices"
    windowed = False

    def can_read(self, path: Path) -> bool:
        if path.is_file():
            return is_image_file(path)
        return path.is_dir() and any(p.suffix.lower() in SLICE_SUFFIXES for p in visible_files(path))

    def is_part(self, file: Path) -> bool:
        return file.suffix.lower() in SLICE_SUFFIXES

    def read(self, path: Path, window: tuple[float, float], slice_width: int | None, threads: int) -> Scan:
        if path.is_file():  # one image given on its own: a 1-slice scan
            return _read_slices([path], path, slice_width, threads)
        return _read_slice_folder(path, slice_width, threads)


def _read_slice_folder(folder: Path, slice_width: int | None, threads: int) -> Scan:
    files = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: natural_key(p.name))
    slices = [p for p in files if p.suffix.lower() in SLICE_SUFFIXES]
    others = [p.name for p in files if p not in slices and not p.name.startswith(".")]
    if others:
        log.warning("%s: ignoring %d file(s) that are not slices: %s", folder, len(others), ", ".join(others[:5]))
    # Slices are numbered (0.jpg, IM-0001-0042.png); among numbered images, one without a number
    # (thumbnail.jpg, preview.png) is not a slice.
    unnumbered = [p for p in slices if not re.search(r"\d", p.stem)]
    if unnumbered and len(unnumbered) < len(slices):
        log.warning("%s: ignoring %d image(s) without a slice number: %s", folder, len(unnumbered),
                    ", ".join(p.name for p in unnumbered[:5]))
        slices = [p for p in slices if p not in unnumbered]
    return _read_slices(slices, folder, slice_width, threads)


def _read_slices(slices: list[Path], source: Path, slice_width: int | None, threads: int) -> Scan:
    def load(file: Path) -> tuple[np.ndarray, tuple[int, int]]:
        try:
            with Image.open(file) as image:
                image.load()
                size = (image.height, image.width)
                if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                    # 16-bit PNG slices: keep their precision rather than squashing to 8 bits.
                    image = Image.fromarray(np.asarray(image, dtype=np.float32) / np.float32(65535.0))
                elif image.mode not in ("L", "F"):
                    image = image.convert("L")
                if slice_width is None:
                    array = np.asarray(image, dtype=np.float32)
                    return (array / np.float32(255.0) if image.mode == "L" else array), size
                return resize_slice(image, slice_width), size
        except OSError as error:  # truncated or corrupt files, Pillow's UnidentifiedImageError
            raise Cov3dError(f"slice '{file}' cannot be read: {error}") from None

    volume, (height, width) = _assemble(slices, load, slice_width, threads)
    return Scan(np.clip(volume, 0.0, 1.0, out=volume), ScanMeta("slices", len(slices), height, width))
