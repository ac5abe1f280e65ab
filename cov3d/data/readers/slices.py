"""Folders of numbered 2D images (the COV19-CT-DB layout), and one image given on its own."""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from cov3d.errors import Cov3dError
from cov3d.data.readers.base import SHORT_SCAN, Reader, Scan, ScanMeta, _assemble, natural_key, visible_files
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


def slice_number(stem: str) -> tuple[str, int] | None:
    """(pattern, number) of a slice file's stem: its last run of digits is the number.

    '42' → ('#', 42), '-3' → ('#', -3), 'IM-0001-0042' → ('IM-0001-#', 42);
    None without a digit. Files of one series share the pattern.
    """
    whole = re.fullmatch(r"(-?)(\d+)", stem)
    if whole:
        return "#", int(stem)
    runs = list(re.finditer(r"\d+", stem))
    if not runs:
        return None
    last = runs[-1]
    return stem[:last.start()] + "#" + stem[last.end():], int(last.group())


def _read_slice_folder(folder: Path, slice_width: int | None, threads: int) -> Scan:
    return _read_slices(folder_slices(folder), folder, slice_width, threads)


def folder_slices(folder: Path) -> list[Path]:
    """The slices of a slice folder in order, by the rules of docs/data.md; warns about what it leaves out.

    * hidden files (``._0.jpg``, ``.DS_Store``) and other kinds of file are left out;
    * slices are numbered: the last number in a name is its slice number,
      negative numbers included ('-3.png'), ordered by value;
    * names that differ only in their number form one series ('IM-0001-0042.png');
      two series of SHORT_SCAN or more images refuse the folder, a few odd
      numbered images beside one series (a 'preview_256.png') are left out;
    * one slice number given twice ('3.png' and '0003.png', '3.jpg' and '3.png') refuses the folder;
    * images of another size or mode than most are left out, naming them;
    * gaps in the numbering are warned about.
    """
    files = sorted(visible_files(folder), key=lambda p: natural_key(p.name))
    images = [p for p in files if p.suffix.lower() in SLICE_SUFFIXES]
    others = [p.name for p in files if p not in images]
    if others:
        log.warning("%s: ignoring %d file(s) that are not slices: %s", folder, len(others), ", ".join(others[:5]))
    series: dict[str, list[tuple[int, Path]]] = {}
    unnumbered = []
    for image in images:
        number = slice_number(image.stem)
        if number is None:
            unnumbered.append(image)
        else:
            series.setdefault(number[0], []).append((number[1], image))
    if not series:  # no image carries a number: read them in name order
        return images
    if unnumbered:
        # Among numbered images, one without a number (thumbnail.jpg, preview.png) is not a slice.
        log.warning("%s: ignoring %d image(s) without a slice number: %s", folder, len(unnumbered),
                    ", ".join(p.name for p in unnumbered[:5]))
    ranked = sorted(series.items(), key=lambda item: (-len(item[1]), item[0]))
    full = [(pattern, members) for pattern, members in ranked if len(members) >= SHORT_SCAN]
    if len(full) > 1:
        listing = ", ".join(f"{pattern.replace('#', '<N>')} ({len(members)} images)" for pattern, members in full)
        raise Cov3dError(f"'{folder}' holds {len(full)} numbered series of images: {listing}; move each into "
                         "its own folder, one scan per folder")
    pattern, members = ranked[0]
    left_out = [p for other, group in ranked[1:] for _, p in group]
    if left_out:
        log.warning("%s: ignoring %d numbered image(s) named unlike the %d slices '%s': %s", folder, len(left_out),
                    len(members), pattern.replace("#", "<N>"), ", ".join(p.name for p in left_out[:5]))
    members.sort(key=lambda item: (item[0], natural_key(item[1].name)))
    repeats = [(a, b) for (n, a), (m, b) in zip(members, members[1:]) if n == m]
    if repeats:
        named = "; ".join(f"'{a.name}' and '{b.name}'" for a, b in repeats[:3])
        raise Cov3dError(f"'{folder}' has {len(repeats)} slice number(s) given twice: {named}{' …' if len(repeats) > 3 else ''}; "
                         "keep one file per slice number")
    numbers = [n for n, _ in members]
    gaps = [(n, m) for n, m in zip(numbers, numbers[1:]) if m - n > 1]
    if gaps:
        log.warning("%s: slice numbers have %d gap(s), e.g. %d → %d (missing slices?)", folder, len(gaps), *gaps[0])
    return _majority_format([p for _, p in members], folder)


def _majority_format(slices: list[Path], folder: Path) -> list[Path]:
    """Leave out images whose size or mode differs from most slices' (a preview, an RGB snapshot)."""
    formats: dict[Path, tuple[tuple[int, int], str]] = {}
    for file in slices:
        try:
            with Image.open(file) as image:  # reads the header only
                formats[file] = (image.size, image.mode)
        except OSError as error:  # truncated or corrupt files, Pillow's UnidentifiedImageError
            raise Cov3dError(f"slice '{file}' cannot be read: {error}") from None
    common, _ = Counter(formats.values()).most_common(1)[0]
    odd = [f for f in slices if formats[f] != common]
    if odd:
        (width, height), mode = common
        log.warning("%s: leaving out %d image(s) of another size or mode than the %dx%d %s slices: %s", folder,
                    len(odd), width, height, mode,
                    ", ".join(f"{f.name} ({formats[f][0][0]}x{formats[f][0][1]} {formats[f][1]})" for f in odd[:5]))
    return [f for f in slices if formats[f] == common]


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
