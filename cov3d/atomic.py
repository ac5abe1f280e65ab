"""Writing files whole or not at all: a temporary file beside the target, then a rename.

An interrupted or failing write leaves the old file (or none), never half a file.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# The temporary name `replacing` gives: .<stem>.<pid>.tmp<suffix>
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp(\.[^/]*)?$")


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden, per process, and keeping the suffix (some writers choose the format by it), a compressed
    # one whole: ITK writes scan.nii.gz only to a name ending in .nii.gz.
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
    temporary = path.with_name(f".{path.name[: len(path.name) - len(suffix)]}.{os.getpid()}.tmp{suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with replacing(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_csv(path: Path, columns: list[str], rows: Iterable[dict]) -> None:
    """A CSV with a header of `columns`; keys of a row that are not columns are left out."""
    with replacing(path) as temporary:
        with temporary.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


def save_torch(obj, path: Path) -> None:
    """torch.save via a temporary file and rename: the destination is whole or absent."""
    import torch  # here, so that plain-file writers need not load torch

    with replacing(path) as temporary:
        torch.save(obj, temporary)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporary files that writers killed mid-write left under `folder`; return how many.

    A temporary file whose writing process is still running is kept.
    """
    removed = 0
    for root, dirs, files in os.walk(folder):
        for name in files:
            match = _TEMPORARY.match(name)
            if match and not _running(int(match.group(1))):
                (Path(root) / name).unlink(missing_ok=True)
                removed += 1
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run under %s", removed, folder)
    return removed


def check_writable(path: Path, folder: bool = False) -> None:
    """Raise a Cov3dError unless `path` (a file, or a folder when `folder`) can be written; costs no work.

    Called before slow work, so that an unwritable output fails at once rather
    than after it. Probes by creating (and removing) a file in the nearest
    existing folder, which also catches read-only file systems.
    """
    import tempfile

    from cov3d.errors import Cov3dError

    path = Path(path)
    if path.exists() and folder and not path.is_dir():
        raise Cov3dError(f"'{path}' is a file, not a folder; give a folder for it")
    if path.is_dir() and not folder:
        raise Cov3dError(f"'{path}' is a folder; give a file name")
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise Cov3dError(f"cannot write '{path}': '{existing}' is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".cov3d-probe-"):
            pass
    except OSError as error:
        raise Cov3dError(f"cannot write '{path}': {error.strerror} in '{existing}'") from None
