"""Writing files whole or not at all: a temporary file beside the target, then a rename.

An interrupted or failing write leaves the old file (or none), never half a file.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from cov3d.errors import Cov3dError

log = logging.getLogger(__name__)

# Errors of the device rather than of one file: whatever is written next there fails the same way.
DEVICE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


class WriteFailed(Cov3dError, OSError):
    """A file could not be written (a full disk, say); whatever it replaced is untouched.

    Both a Cov3dError (the CLI shows it as one line, naming the file and the
    reason: "cannot write 'x.csv': no space left on device") and an OSError
    with the original errno. Built as OSError(errno, strerror, filename), so it
    pickles across worker processes.
    """

    def __str__(self) -> str:
        return f"cannot write '{self.filename}': {write_reason(self)}"

    @property
    def device(self) -> bool:
        """The failure is the device's (full, read-only, failing), not this one file's."""
        return self.errno in DEVICE_ERRORS


def write_reason(error: OSError) -> str:
    """The OS's reason for a failed write, in lower case: 'no space left on device'."""
    if error.errno == errno.ENOSPC:
        return "no space left on device"
    return (error.strerror or str(error) or type(error).__name__).lower()


def write_failed(error: OSError, path: Path) -> WriteFailed:
    """`error`, raised writing `path`, as a WriteFailed naming `path` (one already named is kept as it is)."""
    if isinstance(error, WriteFailed):
        return error
    return WriteFailed(error.errno, error.strerror or str(error), str(path))

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
    except OSError as error:  # a full disk, say: one error naming the file, the old one left as it was
        if isinstance(error, WriteFailed):
            raise
        raise write_failed(error, path) from error
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
        with open(temporary, "wb") as handle:
            recording = _Recording(handle)
            try:
                torch.save(obj, recording)
            except RuntimeError:
                # torch's zip writer reports a failed write (a full disk) only as "RuntimeError: [enforce fail at
                # inline_container.cc:672] . unexpected pos 704 vs 598": raise the OSError behind it instead.
                if recording.error is not None:
                    raise recording.error from None
                raise


class _Recording:
    """A file's write and flush for torch.save, keeping the OSError of a failed write that torch hides."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        try:
            self.handle.flush()
        except OSError as error:
            self.error = error
            raise


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


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where not supported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # no exchange on this system or file system
        return False
    raise OSError(error, os.strerror(error), str(second))


@contextlib.contextmanager
def replacing_folder(path: Path, keep: Callable[[str], bool] = lambda name: False) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it takes the place of folder `path` as a whole.

    The new folder is written beside `path` (hidden, per process), so that
    a failure or a kill leaves the old folder untouched; the two are then
    swapped in one step where the system can (Linux), else by two renames.
    Entries of the old folder for which `keep(name)` is true (files that are
    not the caller's, such as the user's notes) are carried into the new one,
    as hard links where possible. Leftovers of killed writers are removed.
    """
    import shutil

    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    leftover = re.compile(rf"^{re.escape(prefix)}(\d+)(\.old)?\.tmp$")
    for stale in path.parent.glob(f"{prefix}*.tmp"):
        match = leftover.match(stale.name)
        if match and stale.is_dir() and not _running(int(match.group(1))):
            shutil.rmtree(stale, ignore_errors=True)
    temporary = path.with_name(f"{prefix}{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
        if path.is_dir():
            for entry in path.iterdir():
                if keep(entry.name) and not (temporary / entry.name).exists():
                    _carry(entry, temporary / entry.name)
            if not _exchange(temporary, path):
                old = path.with_name(f"{prefix}{os.getpid()}.old.tmp")
                os.replace(path, old)
                os.replace(temporary, path)
                temporary = old
        else:
            os.replace(temporary, path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _carry(source: Path, target: Path) -> None:
    """A hard-linked copy of a file or folder (a plain copy where links cannot be made), symlinks as links."""
    import shutil

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)

    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_dir():
        shutil.copytree(source, target, symlinks=True, copy_function=link)
    else:
        link(str(source), str(target))
