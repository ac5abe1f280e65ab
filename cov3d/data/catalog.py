"""Finding scans under a data path and attaching their labels.

The COV19-CT-DB layout is ``DATA/{train,validation}/{covid,non-covid}/<scan>``
plus unlabelled ``DATA/test/<scan>``; severity comes from two CSV files of
``Name;Category`` rows. Any other folder of scans works too: scans are found
recursively and take a split and label only from folder names that say so.
Scans are keyed by their path relative to DATA, since names repeat across
folders (``covid/ct_scan_0`` and ``non-covid/ct_scan_0`` are different scans).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

from cov3d.errors import Cov3dError
from cov3d.data.readers import get_reader, is_image_file, natural_key, scan_kind, subfolders_inside
from cov3d.data.readers.dicom import is_dicom_slice

log = logging.getLogger(__name__)

SPLITS = {"train": "train", "training": "train", "validation": "validation", "val": "validation",
          "valid": "validation", "test": "test"}
LABELS = {"covid": "covid", "non-covid": "non-covid", "non_covid": "non-covid", "noncovid": "non-covid"}
SEVERITY_NAMES = {1: "mild", 2: "moderate", 3: "severe", 4: "critical"}
SEVERITY_FILES = {"train": "train_partition_covid_categories.csv",
                  "validation": "val_partition_covid_categories.csv"}


@dataclass(frozen=True)
class ScanRecord:
    """One scan found under DATA: where it is and what is known about it."""

    path: str  # relative to DATA, '/'-separated; '.' when DATA is itself the scan
    kind: str  # its reader's kind: 'slices', 'dicom', 'volume' or a registered one
    split: str = ""  # 'train', 'validation', 'test' or ''
    label: str = ""  # 'covid', 'non-covid' or ''
    severity: int | None = None  # 1 mild … 4 critical


def find_scans(root: Path) -> list[tuple[Path, str]]:
    """Every scan at or below `root` as (path, kind), in natural order; scans are not searched inside.

    Symbolic links are followed, but each real folder is searched once, so link
    loops end and a scan reached twice is listed once. An image file lying
    beside scans is not a scan (warned and skipped); `root` itself may be one
    image, a 1-slice scan.
    """
    root = Path(root)
    kind = scan_kind(root)
    if kind:
        _warn_inside(root)
        return [(root, kind)]
    found: list[tuple[Path, str]] = []
    _search(root, found, seen=set())
    return found


def _warn_inside(scan: Path) -> None:
    inside = subfolders_inside(scan)
    if inside:
        log.warning("%s: a scan; the folder(s) inside it (%s) belong to it, are not scans of their own, and are "
                    "not read", scan, ", ".join(p.name + "/" for p in inside[:5]))


def _search(folder: Path, found: list[tuple[Path, str]], seen: set[Path]) -> None:
    real = folder.resolve()
    if real in seen:
        log.warning("%s: already searched (a symbolic link to it, or a loop); skipped", folder)
        return
    seen.add(real)

    def add(scan: Path, kind: str) -> None:
        if scan.resolve() in seen:
            log.warning("%s: the same scan as one already found; skipped", scan)
        else:
            seen.add(scan.resolve())
            found.append((scan, kind))
            _warn_inside(scan)

    strays = []
    for child in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            kind = scan_kind(child)
            if kind is None:
                _search(child, found, seen)
            else:
                add(child, kind)
        elif is_image_file(child) or is_dicom_slice(child):
            # A lone image, or one single-slice DICOM file (a dose report, a scout) beside scans, is not a scan.
            strays.append(child.name)
        else:
            kind = scan_kind(child)
            if kind is not None:  # a file that is a whole scan, a volume say
                add(child, kind)
    if strays:
        log.warning("%s: ignoring %d image or DICOM file(s) beside scan folders, not in one: %s", folder, len(strays),
                    ", ".join(strays[:5]))


def _classify(relative: Path) -> tuple[str, str]:
    split = label = ""
    for part in relative.parts[:-1] if relative.parts else ():
        lowered = part.lower()
        if not split and lowered in SPLITS:
            split = SPLITS[lowered]
        elif split and not label and lowered in LABELS:
            label = LABELS[lowered]
    return split, label


def read_severity_csv(path: Path) -> dict[str, tuple[int, int]]:
    """Read a ``Name;Category`` file (';' or ',' separated) into {name: (category, line)}."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise Cov3dError(f"severity file '{path}' cannot be read: {error.strerror}") from None
    except UnicodeDecodeError:
        raise Cov3dError(f"severity file '{path}' is not UTF-8 text (UTF-16, say); save it as UTF-8 "
                         "or plain ASCII") from None
    lines = text.splitlines()
    # The first line that is not blank decides the separator and may be the header (blank lines may lead).
    first = next((line for line in lines if line.strip()), "")
    delimiter = ";" if ";" in first else ","
    rows: dict[str, tuple[int, int]] = {}
    seen_row = False
    for number, row in enumerate(csv.reader(lines, delimiter=delimiter), start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        header = not seen_row and len(cells) >= 2 and cells[1].lower() == "category"
        seen_row = True
        if header:
            continue
        if len(cells) < 2 or not cells[0]:
            raise Cov3dError(f"{path}, line {number}: expected 'Name;Category', got '{';'.join(row)}'")
        name, category = cells[0], cells[1]
        if category not in {"1", "2", "3", "4"}:
            raise Cov3dError(f"{path}, line {number}: unknown severity category '{category}' for '{name}' "
                             "(use 1 mild, 2 moderate, 3 severe, 4 critical)")
        if name in rows:
            earlier, line = rows[name]
            if earlier != int(category):
                raise Cov3dError(f"{path}: '{name}' is listed twice with different categories, {earlier} on "
                                 f"line {line} and {category} on line {number}; keep the right one")
            log.warning("%s: '%s' is listed twice (lines %d and %d), with the same category", path, name, line,
                        number)
            continue
        rows[name] = (int(category), number)
    if not rows:
        log.warning("severity file '%s' lists no scans; no scan gets a severity label from it", path)
    return rows


def catalog(data: Path, severity_files: dict[str, Path | None] | None = None) -> list[ScanRecord]:
    """All scans under `data` with split, label and severity.

    `severity_files` maps 'train'/'validation' to a CSV; a split left out (or
    None) uses the official file name at DATA's root when it exists.
    """
    data = Path(data)
    if not data.exists():
        raise Cov3dError(f"data path '{data}' does not exist")
    if data.is_dir() and not any(p for p in data.iterdir() if not p.name.startswith(".")):
        raise Cov3dError(f"data folder '{data}' is empty")
    if data.is_file() and not scan_kind(data):
        raise Cov3dError(f"'{data}' has an unsupported file type; give a scan folder, a folder of scans, "
                         "or a .nii/.nii.gz/.nrrd/.mha/.mhd/.dcm file")
    found = find_scans(data)
    if not found:
        raise Cov3dError(f"no scans found under '{data}': expected folders of numbered .jpg/.png slices, "
                         "DICOM series folders, or NIfTI/NRRD/MetaImage files")
    records: dict[str, ScanRecord] = {}
    for path, kind in found:
        relative = path.relative_to(data) if path != data else Path(".")
        split, label = _classify(relative)
        records[relative.as_posix()] = ScanRecord(relative.as_posix(), kind, split, label)

    covid_scans = _covid_scans_by_name(records)
    severity_files = dict(severity_files or {})
    for split, official in SEVERITY_FILES.items():
        csv_path = severity_files.get(split)
        if csv_path is None and data.is_dir() and (data / official).is_file():
            csv_path = data / official
        if csv_path is None:
            continue
        for name, (category, line) in read_severity_csv(Path(csv_path)).items():
            key = covid_scans.get((split, name))
            if key is None:
                raise Cov3dError(f"{csv_path}, line {line}: scan '{name}' is not in the {split} split's "
                                 "covid folder; check the name or pass the right file with "
                                 f"--{split}-severity")
            record = records[key]
            records[key] = ScanRecord(record.path, record.kind, record.split, record.label, category)
    return list(records.values())


def _covid_scans_by_name(records: dict[str, ScanRecord]) -> dict[tuple[str, str], str]:
    """Index covid scans by (split, name): the folder or file name, and the name its reader gives the scan.

    A volume file's reader names it without suffix ('ct_scan_3' for 'ct_scan_3.nii.gz').
    """
    index: dict[tuple[str, str], str] = {}
    for key, record in records.items():
        if record.label == "covid":
            leaf = key.rsplit("/", 1)[-1]
            index[(record.split, leaf)] = key
            index.setdefault((record.split, get_reader(record.kind).scan_name(leaf)), key)
    return index
