"""Folders holding DICOM series (any file names), read slice by slice through SimpleITK/GDCM.

A folder may hold several series (reconstruction kernels, localizers, dose
reports); one is chosen by a rule that depends only on the headers, never on
file names or listing order (:func:`choose_series`):

1. series made only of localizer images (ImageType LOCALIZER) are skipped;
2. ORIGINAL/PRIMARY images before derived ones;
3. axial before sagittal, coronal and oblique;
4. more slices first;
5. thinner slices first (SliceThickness, else the spacing of positions);
6. the lowest SeriesNumber, then the lowest SeriesInstanceUID.

``series=`` (``--series``) picks one by SeriesInstanceUID or SeriesNumber instead.
Within the series, localizer images and images of another orientation are
dropped with a warning, slices repeated at one position with identical pixels
are kept once with a warning, and different pixels at one position refuse the
scan. The series is then put in cov3d's one orientation (depth head to feet,
rows anterior to posterior, columns patient right to left; see
:mod:`cov3d.data.readers.orientation`) from its direction cosines, exactly as
volume files are.
"""

from __future__ import annotations

import logging
import math
import struct
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cov3d.errors import Cov3dError
from cov3d.data.integrity import describe_itk_error
from cov3d.data.readers.base import (
    Reader, Scan, ScanMeta, _assemble, _window, check_finite, natural_key, visible_files,
)
from cov3d.data.readers.orientation import to_canonical, warn_if_oblique
from cov3d.data.resample import resize_slice

log = logging.getLogger(__name__)

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".ima"})

# Images whose slice normal is further than this (degrees) from their series' majority are of another
# orientation (a localizer filed under the series' UID, say) and dropped.
ORIENTATION_TOLERANCE = 5.0

# Transfer syntaxes by UID, to name the one a file uses when GDCM cannot decode it.
TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.51": "JPEG Extended",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless, first-order prediction",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.100": "MPEG2 Main Profile",
    "1.2.840.10008.1.2.4.102": "MPEG-4 AVC/H.264",
    "1.2.840.10008.1.2.4.201": "High-Throughput JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.202": "High-Throughput JPEG 2000 (RPCL) Lossless",
    "1.2.840.10008.1.2.4.203": "High-Throughput JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}

_UNCOMPRESSED = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})


def _is_dicom_file(path: Path) -> bool:
    # DICOM Part 10 files carry 'DICM' after a 128-byte preamble; older files
    # without it are still recognised by their suffix.
    if path.name.upper() == "DICOMDIR":  # the media's index of files, not an image
        return False
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def transfer_syntax(path: Path) -> str | None:
    """The TransferSyntaxUID of a DICOM Part 10 file, read from its file meta group; None when absent."""
    try:
        with path.open("rb") as handle:
            head = handle.read(132 + 4096)
    except OSError:
        return None
    if head[128:132] != b"DICM":
        return None
    offset = 132
    # The file meta group is always explicit VR little endian.
    while offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        if group != 0x0002:
            return None
        vr = head[offset + 4:offset + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (length,) = struct.unpack_from("<I", head, offset + 8)
            start = offset + 12
        else:
            (length,) = struct.unpack_from("<H", head, offset + 6)
            start = offset + 8
        if element == 0x0010:
            return head[start:start + length].decode("ascii", "replace").strip("\0 ")
        offset = start + length
    return None


def describe_transfer_syntax(uid: str | None) -> str:
    """'1.2.840.10008.1.2.4.90 (JPEG 2000 Lossless)', or 'unknown' without a UID."""
    if not uid:
        return "unknown"
    name = TRANSFER_SYNTAXES.get(uid)
    return f"{uid} ({name})" if name else uid


class DicomReader(Reader):
    """A folder of single-slice DICOM files in Hounsfield units; one series chosen by a header rule."""

    kind = "dicom"
    windowed = True
    selects_series = True

    def can_read(self, path: Path) -> bool:
        # One DICOM file on its own is a volume (multi-frame) for the volume reader, not a series; so is a
        # folder of multi-frame files, a folder of volumes (one scan per file).
        if not path.is_dir():
            return False
        files = sorted((p for p in visible_files(path) if _is_dicom_file(p)), key=lambda p: natural_key(p.name))
        return bool(files) and not all(_frames(p) > 1 for p in files[:3])

    def is_part(self, file: Path) -> bool:
        return _is_dicom_file(file)

    def read(self, path: Path, window: tuple[float, float], slice_width: int | None, threads: int,
             series: str | None = None) -> Scan:
        return _read_dicom_series(path, window, slice_width, threads, series)


def is_dicom_slice(path: Path) -> bool:
    """True for one DICOM file that is not a multi-frame volume: a slice of a series, a scout, a report."""
    return path.is_file() and _is_dicom_file(path) and _frames(path) == 1


def _frames(path: Path) -> int:
    header = _read_dicom_header(path)
    return header.frames if header is not None else 1


def _floats(text: str) -> list[float] | None:
    try:
        return [float(v) for v in text.strip().split("\\")]
    except ValueError:
        return None


def _integer(text: str | None) -> int | None:
    text = (text or "").strip()
    return int(text) if text.lstrip("-").isdigit() else None


@dataclass
class _DicomHeader:
    path: Path
    series: str
    position: list[float] | None
    orientation: list[float] | None
    instance: int | None
    image_type: tuple[str, ...] = ()
    series_number: int | None = None
    description: str = ""
    thickness: float | None = None
    frames: int = 1

    @property
    def localizer(self) -> bool:
        return "LOCALIZER" in self.image_type

    @property
    def original(self) -> bool:
        # Without ImageType (many exports drop it) an image counts as original.
        return not self.image_type or self.image_type[:2] == ("ORIGINAL", "PRIMARY")

    @property
    def normal(self) -> np.ndarray | None:
        if self.orientation is None:
            return None
        normal = np.cross(np.array(self.orientation[:3]), np.array(self.orientation[3:]))
        length = np.linalg.norm(normal)
        return normal / length if length > 0 else None


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
    thickness = _floats(tag("0018|0050") or "")
    frames = _integer(tag("0028|0008"))
    return _DicomHeader(
        path=path,
        series=(tag("0020|000e") or "").strip(),
        position=position if position and len(position) == 3 else None,
        orientation=orientation if orientation and len(orientation) == 6 else None,
        instance=_integer(tag("0020|0013")),
        image_type=tuple(part.strip().upper() for part in (tag("0008|0008") or "").split("\\") if part.strip()),
        series_number=_integer(tag("0020|0011")),
        description=(tag("0008|103e") or "").strip(),
        thickness=thickness[0] if thickness and len(thickness) == 1 and thickness[0] > 0 else None,
        frames=max(1, frames or 1),
    )


@dataclass
class Series:
    """One series of a folder, as the series rule sees it."""

    uid: str
    headers: list[_DicomHeader]
    dropped: list[str] = field(default_factory=list)  # why images were left out

    @property
    def number(self) -> int | None:
        return next((h.series_number for h in self.headers if h.series_number is not None), None)

    @property
    def description(self) -> str:
        return next((h.description for h in self.headers if h.description), "")

    @property
    def localizer(self) -> bool:
        return all(h.localizer for h in self.headers)

    @property
    def original(self) -> bool:
        return all(h.original for h in self.headers)

    @property
    def axial(self) -> bool:
        normal = self.headers[0].normal
        return normal is not None and int(np.argmax(np.abs(normal))) == 2

    @property
    def thickness(self) -> float:
        values = [h.thickness for h in self.headers if h.thickness is not None]
        if values:
            return float(np.median(values))
        distances = _distances(self.headers)
        if distances is not None and len(distances) > 1:
            steps = np.abs(np.diff(np.sort(distances)))
            steps = steps[steps > 1e-3]
            if len(steps):
                return float(np.median(steps))
        return math.inf

    @property
    def slices(self) -> int:
        """Slices at distinct positions (a slice repeated by a re-export counts once)."""
        distances = _distances(self.headers)
        return len(self.headers) if distances is None else len(np.unique(np.round(distances, 3)))

    def label(self) -> str:
        number = "?" if self.number is None else str(self.number)
        description = f" '{self.description}'" if self.description else ""
        return f"series {number}{description} ({self.slices} slices, UID {self.uid or '?'})"

    def rank(self) -> tuple:
        """The series rule as a sort key: the first series in order is read."""
        return (self.localizer, not self.original, not self.axial, -self.slices, self.thickness,
                math.inf if self.number is None else self.number, self.uid)


def _distances(headers: list[_DicomHeader]) -> np.ndarray | None:
    if not all(h.position and h.orientation for h in headers):
        return None
    normal = headers[0].normal
    if normal is None:
        return None
    return np.array([float(np.dot(h.position, normal)) for h in headers])


def choose_series(groups: list[Series], folder: Path, wanted: str | None = None) -> Series:
    """The series of `folder` to read: `wanted` (a SeriesInstanceUID or SeriesNumber), else by the series rule."""
    if wanted is not None:
        wanted = wanted.strip()
        matches = [s for s in groups if s.uid == wanted or (s.number is not None and str(s.number) == wanted)]
        if len(matches) == 1:
            return matches[0]
        listing = "; ".join(s.label() for s in sorted(groups, key=Series.rank))
        if not matches:
            raise Cov3dError(f"'{folder}' holds no DICOM series '{wanted}'; it holds {listing}. Give one of "
                             "their SeriesInstanceUIDs or SeriesNumbers to --series")
        raise Cov3dError(f"--series {wanted} matches {len(matches)} series in '{folder}' ({listing}); "
                         "give the SeriesInstanceUID instead")
    ordered = sorted(groups, key=Series.rank)
    usable = [s for s in ordered if not s.localizer]
    if not usable:
        raise Cov3dError(f"'{folder}' holds only localizer (scout) images, no CT series: {ordered[0].label()}")
    chosen = usable[0]
    skipped = [s for s in ordered if s is not chosen]
    if skipped:
        log.warning("%s holds %d DICOM series; reading %s and skipping %s (choose another with --series)",
                    folder, len(groups), chosen.label(), "; ".join(s.label() for s in skipped))
    return chosen


def _drop_other_orientations(series: Series, folder: Path) -> Series:
    """Leave out localizer images and images whose plane differs from the series' majority."""
    kept = [h for h in series.headers if not h.localizer]
    localizers = len(series.headers) - len(kept)
    if localizers and kept:
        log.warning("%s: dropping %d localizer image(s) filed in %s", folder, localizers, series.label())
    else:
        kept = series.headers
    normals = [h.normal for h in kept]
    if all(n is not None for n in normals) and len(kept) > 1:
        # The majority plane: the normal most images agree with (sign ignored).
        keys = Counter(tuple(np.round(np.abs(n), 2)) for n in normals)
        majority = np.array(keys.most_common(1)[0][0])
        majority = majority / np.linalg.norm(majority)
        cosine = math.cos(math.radians(ORIENTATION_TOLERANCE))
        same = [h for h in kept if abs(float(np.dot(np.abs(h.normal), majority))) >= cosine]
        if len(same) < len(kept):
            log.warning("%s: dropping %d image(s) of another orientation than the rest of %s (localizers?): %s",
                        folder, len(kept) - len(same), series.label(),
                        ", ".join(h.path.name for h in kept if h not in same)[:300])
            kept = same
    return Series(series.uid, kept)


def _deduplicate(headers: list[_DicomHeader], folder: Path) -> list[_DicomHeader]:
    """Keep one of each set of slices at the same position with identical pixels; refuse differing ones."""
    distances = _distances(headers)
    if distances is None or len(headers) < 2:
        return headers
    order = sorted(range(len(headers)), key=lambda i: (round(float(distances[i]), 3), natural_key(headers[i].path.name)))
    groups: list[list[int]] = []
    for index in order:
        if groups and abs(distances[index] - distances[groups[-1][0]]) < 1e-3:
            groups[-1].append(int(index))
        else:
            groups.append([int(index)])
    if all(len(g) == 1 for g in groups):
        return headers
    kept: list[_DicomHeader] = []
    conflicts: list[str] = []
    repeats = 0
    for group in groups:
        first = headers[group[0]]
        kept.append(first)
        if len(group) == 1:
            continue
        pixels = _pixels(first.path)
        for other in group[1:]:
            if np.array_equal(pixels, _pixels(headers[other].path)):
                repeats += 1
            else:
                conflicts.append(f"{distances[group[0]]:.4g} mm ('{first.path.name}', '{headers[other].path.name}')")
    if conflicts:
        raise Cov3dError(f"DICOM series in '{folder}' has different images at one position: "
                         f"{'; '.join(conflicts[:3])}{' …' if len(conflicts) > 3 else ''}. Two series share one "
                         "SeriesInstanceUID; separate them into their own folders")
    log.warning("%s: %d slice(s) repeat another at the same position with identical pixels (a re-export?); "
                "each position is read once", folder, repeats)
    return kept


def _pixels(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path), imageIO="GDCMImageIO"))
    except RuntimeError as error:
        raise _unreadable(path, error) from None


def _unreadable(path: Path, error: RuntimeError) -> Cov3dError:
    syntax = transfer_syntax(path)
    if syntax and syntax not in _UNCOMPRESSED:
        return Cov3dError(f"DICOM file '{path}' cannot be decoded: its transfer syntax is "
                          f"{describe_transfer_syntax(syntax)}, which this GDCM cannot decode ({describe_itk_error(error)}); "
                          "convert the series to uncompressed DICOM first, e.g. `gdcmconv --raw IN OUT` or "
                          "`dcmdjpeg`/`dcmdjp2k`")
    return Cov3dError(f"DICOM file '{path}' cannot be read: {describe_itk_error(error)}")


def _order_dicom(headers: list[_DicomHeader]) -> tuple[list[_DicomHeader], float | None]:
    """Order slices along their normal; return them and the slice spacing when positions are known."""
    distances = _distances(headers)
    if distances is not None:
        normal = headers[0].normal
        sign = -1.0 if normal[2] < 0 else 1.0  # the normal pointing to the head where it can (+z in LPS)
        order = np.argsort(-sign * distances, kind="stable")
        keyed = [headers[i] for i in order]
        steps = np.abs(np.diff(distances[order]))
        spacing = float(np.median(steps)) if len(keyed) > 1 else None
        if spacing:
            gaps = int((steps > 1.5 * spacing).sum())
            if gaps:
                log.warning("%s: slice positions have %d gap(s) wider than 1.5 x the spacing of %.3g mm "
                            "(missing slices?)", keyed[0].path.parent, gaps, spacing)
        return keyed, spacing or None
    if all(h.instance is not None for h in headers):
        log.warning("%s: DICOM slices lack ImagePositionPatient or ImageOrientationPatient; ordering by "
                    "InstanceNumber, orientation unknown", headers[0].path.parent)
        return sorted(headers, key=lambda h: (h.instance, natural_key(h.path.name))), None
    log.warning("%s: DICOM slices lack position and instance number; ordering by file name, orientation unknown",
                headers[0].path.parent)
    return sorted(headers, key=lambda h: natural_key(h.path.name)), None


def _read_dicom_series(folder: Path, window: tuple[float, float], slice_width: int | None, threads: int,
                       wanted: str | None = None) -> Scan:
    import SimpleITK as sitk

    # Sorted so that nothing below depends on the listing order (names only break ties in messages).
    candidates = sorted((p for p in visible_files(folder) if _is_dicom_file(p)), key=lambda p: natural_key(p.name))
    with ThreadPoolExecutor(max(1, threads)) as pool:
        headers = list(pool.map(_read_dicom_header, candidates))
    unreadable = [p for p, h in zip(candidates, headers) if h is None]
    headers = [h for h in headers if h is not None]
    if not headers:
        raise Cov3dError(f"DICOM series '{folder}' cannot be read: no file in it is a readable DICOM image")
    if unreadable:
        # As for a slice folder: a slice that cannot be read fails the scan rather than leaving a gap.
        named = ", ".join(f"'{p}'" for p in unreadable[:3]) + (" …" if len(unreadable) > 3 else "")
        syntax = transfer_syntax(unreadable[0])
        if syntax and syntax not in _UNCOMPRESSED:
            raise Cov3dError(f"{len(unreadable)} DICOM slice(s) of '{folder}' cannot be decoded: {named} use the "
                             f"transfer syntax {describe_transfer_syntax(syntax)}, which this GDCM cannot read; "
                             "convert them to uncompressed DICOM first, e.g. `gdcmconv --raw IN OUT` or `dcmdjpeg`")
        raise Cov3dError(f"{len(unreadable)} DICOM slice(s) of '{folder}' cannot be read: {named}; "
                         "replace or remove them")
    multiframe = [h for h in headers if h.frames > 1]
    if multiframe:
        if len(multiframe) == len(headers):
            raise Cov3dError(f"'{folder}' holds multi-frame DICOM files, one scan each; give the folder as a "
                             "folder of scans, or one file")
        log.warning("%s: leaving out %d multi-frame file(s) among single-slice images: %s", folder,
                    len(multiframe), ", ".join(h.path.name for h in multiframe[:5]))
        headers = [h for h in headers if h.frames == 1]
    by_uid: dict[str, list[_DicomHeader]] = {}
    for header in headers:
        by_uid.setdefault(header.series, []).append(header)
    groups = [_drop_other_orientations(Series(uid, group), folder) for uid, group in by_uid.items()]
    chosen = choose_series(groups, folder, wanted)
    chosen.headers = _deduplicate(chosen.headers, folder)
    ordered, slice_spacing = _order_dicom(chosen.headers)
    geometry = _dicom_geometry(ordered) if slice_spacing else None
    reorientation = to_canonical(geometry[1]) if geometry else None
    if reorientation is not None:
        warn_if_oblique(folder, reorientation)
    # An axial series keeps its slices as depth: each is resized (and flipped or transposed) as it is read.
    # Any other plane is read whole at full resolution, reoriented, then resized.
    in_plane = reorientation is not None and reorientation.keeps_depth
    read_width = slice_width if (reorientation is None or in_plane) else None
    pixel_spacing: list[tuple[float, float]] = []

    def load(header: _DicomHeader) -> tuple[np.ndarray, tuple[int, int]]:
        try:
            # GDCM applies RescaleSlope/RescaleIntercept, giving Hounsfield units.
            image = sitk.ReadImage(str(header.path), imageIO="GDCMImageIO")
        except RuntimeError as error:
            raise _unreadable(header.path, error) from None
        if not pixel_spacing:
            pixel_spacing.append(tuple(image.GetSpacing()[:2]))
        hu = sitk.GetArrayViewFromImage(image)
        hu = hu.reshape(hu.shape[-2:]) if hu.ndim == 3 and hu.shape[0] == 1 else hu
        if hu.ndim != 2:
            raise Cov3dError(f"DICOM file '{header.path}' is not a single slice (shape {hu.shape}); "
                             "read multi-frame files on their own")
        check_finite(hu, header.path)
        array = _window(hu, window)
        size = (array.shape[0], array.shape[1])
        if read_width is not None:
            array = resize_slice(Image.fromarray(array), read_width)
        return array, size

    volume, (height, width) = _assemble(ordered, load, read_width, threads)
    spacing = origin = direction = None
    slices = len(ordered)
    if geometry is not None and pixel_spacing:
        column_spacing, row_spacing = pixel_spacing[0]
        spacing = (slice_spacing, row_spacing, column_spacing)
        spacing, origin, direction = reorientation.geometry((slices, height, width), spacing, *geometry)
        slices, height, width = reorientation.shape((slices, height, width))
        volume = reorientation.apply(volume)
        if slice_width is not None and not in_plane:
            volume = np.stack([resize_slice(Image.fromarray(np.ascontiguousarray(s)), slice_width)
                               for s in volume])
        volume = np.ascontiguousarray(volume, dtype=np.float32)
    return Scan(np.clip(volume, 0.0, 1.0, out=volume),
                ScanMeta("dicom", slices, height, width, spacing, origin, direction, series=chosen.uid or None))


def _dicom_geometry(ordered: list[_DicomHeader]) -> tuple[tuple[float, float, float], tuple[float, ...]]:
    """Origin and direction of slices in their stored order, from their positions and orientation."""
    row, column = np.array(ordered[0].orientation[:3]), np.array(ordered[0].orientation[3:])
    # The slice axis runs from the first slice to the last; a lone slice takes the plane's normal.
    step = np.array(ordered[-1].position) - np.array(ordered[0].position)
    normal = step / np.linalg.norm(step) if np.linalg.norm(step) > 0 else np.cross(row, column)
    matrix = np.stack([row, column, normal], axis=1)  # columns: the column, row and slice axes
    return tuple(float(v) for v in ordered[0].position), tuple(float(v) for v in matrix.ravel())
