"""Is a volume file whole? Checks that SimpleITK does not make.

ITK reads a truncated or header-only NIfTI file (``.nii`` or ``.nii.gz``)
without complaint and fills the missing voxels with zeros, which would then be
predicted like any scan. NRRD and MetaImage readers do report missing data
themselves. So the NIfTI header is read here and the file is required to hold
every voxel it announces.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

from cov3d.errors import Cov3dError

_NIFTI1_HEADER, _NIFTI2_HEADER = 348, 540


def _nifti_layout(header: bytes, path: Path) -> tuple[int, int, str | None]:
    """(vox_offset, expected bytes, numpy float dtype or None) from a NIfTI-1 or NIfTI-2 header in either byte order."""
    for order in ("<", ">"):
        size = struct.unpack(order + "i", header[:4])[0]
        if size == _NIFTI1_HEADER and len(header) >= _NIFTI1_HEADER:
            dims = struct.unpack(order + "8h", header[40:56])
            datatype = struct.unpack(order + "h", header[70:72])[0]
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if size == _NIFTI2_HEADER and len(header) >= _NIFTI2_HEADER:
            dims = struct.unpack(order + "8q", header[16:80])
            datatype = struct.unpack(order + "h", header[12:14])[0]
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        raise Cov3dError(f"volume '{path}' cannot be read: its NIfTI header is missing or damaged")
    voxels = 1
    for extent in dims[1:1 + max(0, min(int(dims[0]), 7))]:
        voxels *= max(int(extent), 1)
    start = max(offset, size)
    floats = {16: order + "f4", 64: order + "f8"}.get(int(datatype))
    return start, start + voxels * max(bitpix, 8) // 8, floats


def _stream(path: Path):
    """The bytes of a .nii or .nii.gz file in chunks; a cut gzip stream is a Cov3dError."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                yield chunk
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise Cov3dError(f"volume '{path}' cannot be read: its gzip data is truncated or damaged ({error})") from None


def check_nifti_complete(path: Path) -> None:
    """Raise a Cov3dError naming `path` unless it holds every voxel its NIfTI header announces, all finite.

    ITK reads NaN and infinite float voxels of NIfTI files as 0, so they are counted here, from the file's bytes.
    """
    import numpy as np

    path = Path(path)
    length, nonfinite, layout, pending = 0, 0, None, b""
    for chunk in _stream(path):
        if layout is None:  # the first chunk (4 MiB) holds the whole header
            layout = _nifti_layout(chunk, path)
        start, expected, floats = layout
        if floats is not None and length + len(chunk) > start:
            # Count non-finite voxel values, carrying a value split between chunks over to the next.
            data = pending + chunk[max(0, start - length):]
            usable = len(data) - len(data) % np.dtype(floats).itemsize
            values = np.frombuffer(data[:usable], dtype=floats)
            nonfinite += int(values.size - np.count_nonzero(np.isfinite(values)))
            pending = data[usable:]
        length += len(chunk)
    if layout is None:
        layout = _nifti_layout(b"", path)
    start, expected, _ = layout
    if length < expected:
        raise Cov3dError(f"volume '{path}' cannot be read: it is truncated, holding {length} of the {expected} bytes "
                         "its header announces; copy the file again")
    if nonfinite:
        raise Cov3dError(nonfinite_message(path, nonfinite))


def nonfinite_message(path: Path, count: int) -> str:
    """The error for a scan holding `count` NaN or infinite voxel values."""
    return (f"'{path}' has {count} NaN or infinite voxel value(s); cov3d refuses them rather than guess a value. "
            "Fix or re-export the scan")


def describe_itk_error(error: RuntimeError) -> str:
    """The informative part of an ITK exception: its first line that says what failed."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for key in ("not read completely", "expected", "itk::ERROR", "Error", "error"):
        for line in lines:
            if key in line:
                return line.split("itk::ERROR:")[-1].strip()
    return lines[-1] if lines else type(error).__name__


def check_detached_data(path: Path) -> None:
    """A MetaImage (.mhd) or detached NRRD (.nhdr) header whose data file is missing: a Cov3dError naming it.

    ITK's own message for this names neither file.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".mhd"):
        key, separator = "elementdatafile", "="
    elif name.endswith(".nhdr"):
        key, separator = "data file", ":"
    else:
        return
    try:
        lines = path.read_text(encoding="latin-1").splitlines()
    except OSError as error:
        raise Cov3dError(f"volume '{path}' cannot be read: {error.strerror}") from None
    for line in lines:
        field, found, value = line.partition(separator)
        if not found or field.strip().lower() not in (key, "datafile"):
            continue
        value = value.strip()
        # LOCAL (data follows the header), LIST and printf-style patterns name no single file to check.
        if not value or value.upper() in ("LOCAL", "LIST") or value.upper().startswith("LIST") or "%" in value:
            return
        data = Path(value) if Path(value).is_absolute() else path.parent / value
        if not data.is_file():
            raise Cov3dError(f"volume '{path}' names its voxel data file '{data.name}', which is missing "
                             f"(looked for '{data}'); copy it beside the header")
        return
