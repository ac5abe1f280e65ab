"""Folders holding one DICOM series (any file names), read slice by slice through SimpleITK/GDCM."""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cov3d.errors import Cov3dError
from cov3d.data.integrity import describe_itk_error
from cov3d.data.readers.base import Reader, Scan, ScanMeta, _assemble, _window, natural_key, visible_files
from cov3d.data.resample import resize_slice

log = logging.getLogger(__name__)

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".ima"})


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


class DicomReader(Reader):
    """A folder of single-slice DICOM files in Hounsfield units; the largest series when it holds several."""

    kind = "dicom"
    windowed = True

    def can_read(self, path: Path) -> bool:
        # One DICOM file on its own is a volume (multi-frame) for the volume reader, not a series.
        return path.is_dir() and any(_is_dicom_file(p) for p in visible_files(path))

    def is_part(self, file: Path) -> bool:
        return _is_dicom_file(file)

    def read(self, path: Path, window: tuple[float, float], slice_width: int | None, threads: int) -> Scan:
        return _read_dicom_series(path, window, slice_width, threads)


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
