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


def _nifti_expected_bytes(header: bytes, path: Path) -> int:
    """vox_offset + voxels × bytes per voxel, from a NIfTI-1 or NIfTI-2 header in either byte order."""
    for order in ("<", ">"):
        size = struct.unpack(order + "i", header[:4])[0]
        if size == _NIFTI1_HEADER and len(header) >= _NIFTI1_HEADER:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if size == _NIFTI2_HEADER and len(header) >= _NIFTI2_HEADER:
            dims = struct.unpack(order + "8q", header[16:80])
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        raise Cov3dError(f"volume '{path}' cannot be read: its NIfTI header is missing or damaged")
    voxels = 1
    for extent in dims[1:1 + max(0, min(int(dims[0]), 7))]:
        voxels *= max(int(extent), 1)
    return max(offset, size) + voxels * max(bitpix, 8) // 8


def _gzip_prefix_and_length(path: Path) -> tuple[bytes, int]:
    """The first bytes and the whole length of a gzip stream; a cut stream is a Cov3dError."""
    length, prefix = 0, b""
    try:
        with gzip.open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                if len(prefix) < _NIFTI2_HEADER:
                    prefix += chunk[: _NIFTI2_HEADER - len(prefix)]
                length += len(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise Cov3dError(f"volume '{path}' cannot be read: its gzip data is truncated or damaged ({error})") from None
    return prefix, length


def check_nifti_complete(path: Path) -> None:
    """Raise a Cov3dError naming `path` unless it holds every voxel its NIfTI header announces."""
    path = Path(path)
    if path.name.lower().endswith(".nii.gz"):
        header, length = _gzip_prefix_and_length(path)
    else:
        with path.open("rb") as handle:
            header = handle.read(_NIFTI2_HEADER)
        length = path.stat().st_size
    expected = _nifti_expected_bytes(header, path)
    if length < expected:
        raise Cov3dError(f"volume '{path}' cannot be read: it is truncated, holding {length} of the {expected} bytes "
                         "its header announces; copy the file again")


def describe_itk_error(error: RuntimeError) -> str:
    """The informative part of an ITK exception: its first line that says what failed."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for key in ("not read completely", "expected", "itk::ERROR", "Error", "error"):
        for line in lines:
            if key in line:
                return line.split("itk::ERROR:")[-1].strip()
    return lines[-1] if lines else type(error).__name__
