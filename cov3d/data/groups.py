"""Groups files: a CSV naming scans in a 'scan' column and giving each a group per column (site, sex, scanner…).

`cov3d evaluate --groups FILE --group-by COLUMN` scores each group, and
cross-validation can stratify its folds by a column. A scan is named by its
path under the dataset root (``validation/covid/ct_scan_0``), as the catalog
keys scans, or by its bare name where no other scan of those considered has it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cov3d.errors import Cov3dError

SCAN_COLUMN = "scan"


def group_table(path: Path, column: str) -> dict[str, str]:
    """The groups file: a CSV with a header holding a `scan` column and `column`; {scan: group}, as written.

    Read before any scan is predicted, so that a wrong file or column fails at once.
    """
    import csv

    path = Path(path)
    if not path.is_file():
        raise Cov3dError(f"groups file '{path}' does not exist; give a CSV with a 'scan' column and one per "
                         "grouping (site, sex, scanner…)")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or []]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise Cov3dError(f"cannot read groups file '{path}': {error}") from None
    if SCAN_COLUMN not in header:
        raise Cov3dError(f"groups file '{path}' has no '{SCAN_COLUMN}' column (its columns: "
                         f"{', '.join(header) or 'none'}); name each scan in a column headed '{SCAN_COLUMN}'")
    if column not in header:
        others = [h for h in header if h != SCAN_COLUMN]
        raise Cov3dError(f"groups file '{path}' has no column '{column}'; --group-by one of: "
                         f"{', '.join(others) or 'none (add a column)'}")
    table: dict[str, str] = {}
    for row in rows:
        scan, group = row.get(SCAN_COLUMN, ""), row.get(column, "")
        if not scan:
            continue
        if not group:
            raise Cov3dError(f"groups file '{path}' gives scan '{scan}' no value in column '{column}'; give every "
                             "scan a group (write 'unknown' where it is not known)")
        if table.get(scan, group) != group:
            raise Cov3dError(f"groups file '{path}' lists scan '{scan}' twice, in groups '{table[scan]}' and "
                             f"'{group}'; list each scan once")
        table[scan] = group
    return table


def groups_of(scans: Sequence[str], table: dict[str, str], path: Path, what: str = "scored") -> list[str]:
    """The group of each scan (keyed by path under the dataset root), from a :func:`group_table`.

    A row names a scan by its path under the dataset root
    (``validation/covid/ct_scan_0``) or by its bare name where no other scored
    scan shares it: COV19-CT-DB repeats names across covid and non-covid.
    """
    by_name: dict[str, list[str]] = {}
    for scan in scans:
        by_name.setdefault(scan.rsplit("/", 1)[-1], []).append(scan)
    for name, group in table.items():
        holders = by_name.get(name, [])
        if name not in scans and len(holders) > 1:
            raise Cov3dError(f"groups file '{path}' names scan '{name}', the name of {len(holders)} {what} scans "
                             f"({', '.join(holders[:3])}); name each by its path under the dataset root")
    found, missing = [], []
    for scan in scans:
        group = table.get(scan, table.get(scan.rsplit("/", 1)[-1]))
        if group is None:
            missing.append(scan)
        found.append(group)
    if missing:
        raise Cov3dError(f"{len(missing)} of the {len(scans)} {what} scan(s) are not in groups file '{path}' "
                         f"(first: '{missing[0]}'); list every scan, by its path under the dataset root (e.g. "
                         f"'{missing[0]}') or its name")
    return found
