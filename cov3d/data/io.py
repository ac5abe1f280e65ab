"""Reading scans: one boundary, :func:`read_scan`, picking a reader by what the path holds.

Three kinds of scan are understood:

* ``slices``: a folder of 2D image files named by number (``0.jpg`` … ``N.jpg``,
  also ``.jpeg``/``.png``), the COV19-CT-DB layout. Already windowed by the
  data set's authors, so grey values map straight to [0, 1].
* ``dicom``: a folder holding one DICOM series, any file names.
* ``volume``: one file (NIfTI, NRRD, MetaImage, or a multi-frame DICOM file) read
  by SimpleITK.

DICOM and volumes hold Hounsfield units, mapped to [0, 1] by an intensity window.
Every reader returns float32 (depth, height, width) in [0, 1] with depth running
head to feet, plus :class:`ScanMeta`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cov3d.errors import Cov3dError
from cov3d.data.integrity import check_nifti_complete, describe_itk_error
from cov3d.data.resample import resize_slice

log = logging.getLogger(__name__)

SLICE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".ima"})
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")

# Lung window (level −600 HU, width 1500 HU): parenchyma, ground-glass opacities
# and consolidation all stay inside the range; bone and air saturate.
DEFAULT_WINDOW: tuple[float, float] = (-1350.0, 150.0)

# Fewer slices than this cannot be interpolated cubically along depth; such scans are read with a warning.
SHORT_SCAN = 4


@dataclass(frozen=True)
class ScanMeta:
    """What a reader learned about a scan besides its voxels."""

    source: str  # "slices", "dicom" or "volume"
    slices: int  # original number of slices
    height: int  # original slice height in pixels
    width: int  # original slice width in pixels
    spacing: tuple[float, float, float] | None = None  # mm: (slice, row, column), when known
    # Where the voxels lie in patient (LPS) space, as ITK gives it, when known: the first voxel's
    # position in mm, and the 3x3 direction cosines row by row, whose columns are the column, row and
    # slice axes. With `spacing`, enough to write a map that overlays the original in a viewer.
    origin: tuple[float, float, float] | None = None
    direction: tuple[float, ...] | None = None


@dataclass
class Scan:
    """A scan as float32 (depth, height, width) in [0, 1], with its metadata."""

    volume: np.ndarray
    meta: ScanMeta


def natural_key(name: str) -> list[int | str]:
    """Sort key that orders embedded numbers by value: '2.jpg' before '10.jpg'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def parse_window(text: str) -> tuple[float, float]:
    """Parse 'LOW,HIGH' (Hounsfield units) into a window."""
    parts = text.split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise Cov3dError(f"window '{text}' is not LOW,HIGH in Hounsfield units, e.g. --window=-1350,150") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise Cov3dError(f"window '{text}' must be finite numbers of Hounsfield units, e.g. --window=-1350,150")
    if not low < high:
        raise Cov3dError(f"window '{text}' needs LOW < HIGH, e.g. --window=-1350,150")
    return low, high


def is_volume_file(path: Path) -> bool:
    """True for a file SimpleITK reads as a whole volume."""
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)


def _is_dicom_file(path: Path) -> bool:
    # DICOM Part 10 files carry 'DICM' after a 128-byte preamble; older files
    # without it are still recognised by their suffix.
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_image_file(path: Path) -> bool:
    """True for one .jpg/.jpeg/.png file: a slice in a scan folder, or a 1-slice scan given on its own."""
    return path.is_file() and path.suffix.lower() in SLICE_SUFFIXES


def _has_scan_below(folder: Path) -> bool:
    """True when some folder below `folder` holds slices or DICOM files, or a volume file lies below it."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if Path(root) == folder:
            continue
        for name in files:
            if name.startswith("."):
                continue
            file = Path(root) / name
            if file.suffix.lower() in SLICE_SUFFIXES or is_volume_file(file) or _is_dicom_file(file):
                return True
    return False


def scan_kind(path: Path) -> str | None:
    """'slices', 'dicom' or 'volume' when `path` is a scan, else None.

    A folder of images is a slice folder unless folders below it hold scans:
    then it is a folder of scans, and its own images (an overview.png beside
    the scan folders) are not slices. A lone image file is a 1-slice scan.
    """
    path = Path(path)
    if path.is_file():
        if is_volume_file(path):
            return "volume"
        return "slices" if is_image_file(path) else None
    if not path.is_dir():
        return None
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    if any(p.suffix.lower() in SLICE_SUFFIXES for p in files):
        return None if _has_scan_below(path) else "slices"
    if any(_is_dicom_file(p) for p in files):
        return None if _has_scan_below(path) else "dicom"
    return None


def read_scan(
    path: str | os.PathLike,
    *,
    window: tuple[float, float] = DEFAULT_WINDOW,
    slice_width: int | None = None,
    threads: int | None = None,
) -> Scan:
    """Read a scan folder or file as float32 (depth, height, width) in [0, 1].

    `window` (LOW, HIGH in HU) maps DICOM and volume intensities to [0, 1].
    `slice_width`, when given, resizes every slice to that width×width with
    antialiased bicubic interpolation as it is read, so that a full-resolution
    float copy of a long scan never exists; otherwise slices keep their size.
    `threads` decodes that many slices at once (default: all cores).
    """
    path = Path(path)
    if not path.exists():
        raise Cov3dError(f"scan '{path}' does not exist")
    threads = threads or os.cpu_count() or 1
    scan = _read(path, window, slice_width, threads)
    if scan.meta.slices < SHORT_SCAN:
        log.warning("%s has only %d slice(s); it is read, but a chest CT usually has dozens", path, scan.meta.slices)
    return scan


def _read(path: Path, window: tuple[float, float], slice_width: int | None, threads: int) -> Scan:
    if path.is_file():
        if is_image_file(path):  # one image given on its own: a 1-slice scan
            return _read_slices([path], path, slice_width, threads)
        if not is_volume_file(path):
            raise Cov3dError(
                f"'{path}' has an unsupported file type; cov3d reads folders of numbered "
                f".jpg/.jpeg/.png slices, DICOM series folders, and {', '.join(VOLUME_SUFFIXES)} files"
            )
        return _read_volume(path, window, slice_width)
    kind = scan_kind(path)
    if kind == "slices":
        return _read_slice_folder(path, slice_width, threads)
    if kind == "dicom":
        return _read_dicom_series(path, window, slice_width, threads)
    if not any(path.iterdir()):
        raise Cov3dError(f"scan folder '{path}' is empty")
    if _has_scan_below(path):
        raise Cov3dError(f"'{path}' is a folder of scans, not one scan; give one of the scan folders in it")
    raise Cov3dError(
        f"'{path}' holds no slices: expected numbered .jpg/.jpeg/.png images or DICOM files in it"
    )


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


def _window(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    low, high = window
    out = (hu.astype(np.float32, copy=False) - np.float32(low)) / np.float32(high - low)
    return np.clip(out, 0.0, 1.0, out=out)


def _floats(text: str) -> list[float] | None:
    try:
        return [float(v) for v in text.strip().split("\\")]
    except ValueError:
        return None


@dataclass
class _DicomHeader:
    path: Path
    series: str
    position: list[float] | None
    orientation: list[float] | None
    instance: int | None


def _read_dicom_header(path: Path) -> _DicomHeader | None:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO("GDCMImageIO")
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None

    def tag(key: str) -> str | None:
        return reader.GetMetaData(key) if reader.HasMetaDataKey(key) else None

    position = _floats(tag("0020|0032") or "")
    orientation = _floats(tag("0020|0037") or "")
    instance = tag("0020|0013")
    return _DicomHeader(
        path=path,
        series=(tag("0020|000e") or "").strip(),
        position=position if position and len(position) == 3 else None,
        orientation=orientation if orientation and len(orientation) == 6 else None,
        instance=int(instance.strip()) if instance and instance.strip().lstrip("-").isdigit() else None,
    )


def _order_dicom(headers: list[_DicomHeader]) -> tuple[list[_DicomHeader], float | None]:
    """Order slices head to feet; return them and the slice spacing when positions are known."""
    if all(h.position and h.orientation for h in headers):
        row, col = np.array(headers[0].orientation[:3]), np.array(headers[0].orientation[3:])
        normal = np.cross(row, col)
        if normal[2] < 0:  # make the normal point to the head (+z in patient LPS coordinates)
            normal = -normal
        # Distance along the normal, head first.
        keyed = sorted(headers, key=lambda h: -float(np.dot(h.position, normal)))
        distances = np.array([np.dot(h.position, normal) for h in keyed])
        steps = np.abs(np.diff(distances))
        spacing = float(np.median(steps)) if len(keyed) > 1 else None
        if spacing:
            gaps = int((steps > 1.5 * spacing).sum())
            if gaps:
                log.warning("%s: slice positions have %d gap(s) wider than 1.5 x the spacing of %.3g mm "
                            "(missing slices?)", keyed[0].path.parent, gaps, spacing)
        return keyed, spacing
    if all(h.instance is not None for h in headers):
        log.warning("DICOM slices lack ImagePositionPatient; ordering by InstanceNumber")
        return sorted(headers, key=lambda h: h.instance), None
    log.warning("DICOM slices lack position and instance number; ordering by file name")
    return sorted(headers, key=lambda h: natural_key(h.path.name)), None


def _read_dicom_series(folder: Path, window: tuple[float, float], slice_width: int | None, threads: int) -> Scan:
    import SimpleITK as sitk

    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    # DICOMDIR is the media's index of files, not an image.
    candidates = [p for p in files if _is_dicom_file(p) and p.name.upper() != "DICOMDIR"]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        headers = list(pool.map(_read_dicom_header, candidates))
    unreadable = [p for p, h in zip(candidates, headers) if h is None]
    headers = [h for h in headers if h is not None]
    if not headers:
        raise Cov3dError(f"DICOM series '{folder}' cannot be read: no file in it is a readable DICOM image")
    if unreadable:
        # As for a slice folder: a slice that cannot be read fails the scan rather than leaving a gap.
        named = ", ".join(f"'{p}'" for p in unreadable[:3]) + (" …" if len(unreadable) > 3 else "")
        raise Cov3dError(f"{len(unreadable)} DICOM slice(s) of '{folder}' cannot be read: {named}; "
                         "replace or remove them")
    series = Counter(h.series for h in headers)
    if len(series) > 1:
        chosen, count = series.most_common(1)[0]
        log.warning("%s holds %d DICOM series; reading the largest (%d slices)", folder, len(series), count)
        headers = [h for h in headers if h.series == chosen]
    ordered, slice_spacing = _order_dicom(headers)
    origin, direction = _dicom_geometry(ordered) if slice_spacing else (None, None)
    pixel_spacing: list[tuple[float, float]] = []

    def load(header: _DicomHeader) -> tuple[np.ndarray, tuple[int, int]]:
        try:
            # GDCM applies RescaleSlope/RescaleIntercept, giving Hounsfield units.
            image = sitk.ReadImage(str(header.path), imageIO="GDCMImageIO")
        except RuntimeError as error:
            raise Cov3dError(f"DICOM file '{header.path}' cannot be read: {describe_itk_error(error)}") from None
        if not pixel_spacing:
            pixel_spacing.append(tuple(image.GetSpacing()[:2]))
        hu = sitk.GetArrayViewFromImage(image)
        hu = hu.reshape(hu.shape[-2:]) if hu.ndim == 3 and hu.shape[0] == 1 else hu
        if hu.ndim != 2:
            raise Cov3dError(f"DICOM file '{header.path}' is not a single slice (shape {hu.shape}); "
                             "read multi-frame files on their own")
        array = _window(hu, window)
        size = (array.shape[0], array.shape[1])
        if slice_width is not None:
            array = resize_slice(Image.fromarray(array), slice_width)
        return array, size

    volume, (height, width) = _assemble(ordered, load, slice_width, threads)
    spacing = None
    if slice_spacing and pixel_spacing:
        column_spacing, row_spacing = pixel_spacing[0]
        spacing = (slice_spacing, row_spacing, column_spacing)
    return Scan(np.clip(volume, 0.0, 1.0, out=volume),
                ScanMeta("dicom", len(ordered), height, width, spacing, origin, direction))


def _dicom_geometry(ordered: list[_DicomHeader]) -> tuple[tuple[float, float, float], tuple[float, ...]]:
    """Origin and direction of slices ordered head to feet, from their positions and orientation."""
    row, column = np.array(ordered[0].orientation[:3]), np.array(ordered[0].orientation[3:])
    # The slice axis runs from the first slice to the last; a lone slice takes the plane's normal.
    step = np.array(ordered[-1].position) - np.array(ordered[0].position)
    normal = step / np.linalg.norm(step) if np.linalg.norm(step) > 0 else np.cross(row, column)
    matrix = np.stack([row, column, normal], axis=1)  # columns: the column, row and slice axes
    return tuple(float(v) for v in ordered[0].position), tuple(float(v) for v in matrix.ravel())


def _read_volume(path: Path, window: tuple[float, float], slice_width: int | None) -> Scan:
    import SimpleITK as sitk

    if path.name.lower().endswith((".nii", ".nii.gz")):
        check_nifti_complete(path)  # ITK would fill missing voxels with zeros
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise Cov3dError(f"volume '{path}' cannot be read: {describe_itk_error(error)}") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise Cov3dError(f"volume '{path}' has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                         "cov3d needs a single-channel CT volume")
    if image.GetDimension() == 3:
        # Depth along the cranio-caudal axis, head first; rows anterior to
        # posterior and columns patient right to left, as DICOM slices are shown.
        image = sitk.DICOMOrient(image, "LPI")
    elif image.GetDimension() != 2:
        raise Cov3dError(f"volume '{path}' has {image.GetDimension()} dimensions; cov3d needs a 3D volume")
    data = sitk.GetArrayViewFromImage(image)
    if data.ndim == 2:
        data = data[None]
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    origin = direction = None
    if len(spacing) == 2:
        spacing = (1.0, *spacing)
    else:
        origin, direction = tuple(image.GetOrigin()), tuple(image.GetDirection())
    # 8-bit volumes are already windowed grey images; anything else is taken as HU.
    if data.dtype == np.uint8:
        to_unit = lambda a: a.astype(np.float32) / np.float32(255.0)  # noqa: E731
    else:
        to_unit = lambda a: _window(a, window)  # noqa: E731
    slices, height, width = data.shape
    if slice_width is None:
        volume = to_unit(data)
    else:
        volume = np.stack([resize_slice(Image.fromarray(to_unit(s)), slice_width) for s in data])
    return Scan(np.clip(volume, 0.0, 1.0, out=volume),
                ScanMeta("volume", slices, height, width, spacing, origin, direction))


def write_volume(path: Path, array: np.ndarray, meta: ScanMeta) -> Path:
    """Save a (slices, height, width) array on a scan's voxel grid as NIfTI, NRRD or MetaImage (by suffix).

    With the scan's geometry (spacing, origin, direction) where the reader knew
    it, so a viewer lays the array over the original scan. Without it (JPEG/PNG
    slices): 1 mm voxels with the slices running head to feet.
    """
    import SimpleITK as sitk

    from cov3d.atomic import replacing

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    if meta.spacing is not None:
        image.SetSpacing(tuple(float(s) for s in reversed(meta.spacing)))
    if meta.origin is not None and meta.direction is not None:
        image.SetOrigin(meta.origin)
        image.SetDirection(meta.direction)
    else:
        image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0))  # slice index runs to the feet
    if not Path(path).name.lower().endswith((".nii", ".nii.gz", ".nrrd", ".mha")):
        raise Cov3dError(f"'{path}' is not a .nii.gz, .nii, .nrrd or .mha file name")
    with replacing(Path(path)) as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=True)
    return Path(path)
