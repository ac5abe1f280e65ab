"""Writing files whole or not at all: a temporary file beside the target, then a rename.

An interrupted or failing write leaves the old file (or none), never half a file.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterable, Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden, per process, and keeping the suffix (some writers choose the format by it).
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
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
