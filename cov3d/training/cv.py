"""K-fold cross-validation: split the labelled scans into folds and train one run per fold with :func:`train`.

The labelled scans of the pooled splits (train and validation, or train alone)
are dealt into K folds stratified by their target (non-covid, mild…critical,
covid of unknown severity) and, given a groups file, by a group column too;
the deal is deterministic from the seed. Fold I trains on the other folds and
validates on fold I: its data is a tree of symbolic links,
``RUN/splits/fold-I/{train,validation}/{covid,non-covid}/<split>-<name>``
with its severity CSVs, so the ordinary trainer, cache and checkpoints serve
unchanged, and the run goes to ``RUN/fold-I/``. ``RUN/cv.json`` holds the plan
(every scan's fold and the settings); each fold resumes from its last.pt, is
skipped once it has trained all its epochs, and can run on its own machine
(``--fold I``) against the same RUN on shared storage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cov3d import labels
from cov3d.atomic import write_text
from cov3d.data.catalog import SEVERITY_FILES, catalog
from cov3d.data.groups import group_table, groups_of
from cov3d.errors import Cov3dError
from cov3d.models.checkpoint import LAST, PRESENCE, load_checkpoint
from cov3d.training.config import TrainConfig

if TYPE_CHECKING:  # for annotations only: fastai loads with the trainer, and predict reads plans without it
    from cov3d.training.trainer import TrainResult

log = logging.getLogger(__name__)

PLAN = "cv.json"
POOLS = {"train+validation": ("train", "validation"), "train": ("train",)}


@dataclass(frozen=True)
class FoldScan:
    """One labelled scan of the study and its fold."""

    path: str  # relative to DATA, as the catalog keys it
    split: str  # the split it came from
    label: str
    severity: int | None
    fold: int

    @property
    def link_name(self) -> str:
        """Its name in a fold's tree: unique, since names repeat across splits."""
        return f"{self.split}-{self.path.rsplit('/', 1)[-1]}"


def assign_folds(strata: list, k: int, seed: int) -> np.ndarray:
    """A fold 0…k-1 for each item: each stratum shuffled (seeded) and dealt round the folds, each stratum
    starting where the last one stopped, so that fold sizes differ by at most one."""
    if k < 2:
        raise Cov3dError(f"--folds {k} must be at least 2")
    rng = np.random.default_rng(seed)
    folds = np.empty(len(strata), dtype=int)
    keys = [repr(s) for s in strata]
    start = 0
    for key in sorted(set(keys)):
        members = np.flatnonzero(np.array(keys) == key)
        rng.shuffle(members)
        folds[members] = (start + np.arange(len(members))) % k
        start = (start + len(members)) % k
    return folds


def plan_folds(data: Path, k: int, seed: int, pool: str = "train+validation",
               severity_files: dict[str, Path | None] | None = None, groups: Path | None = None,
               group_by: str | None = None) -> list[FoldScan]:
    """Every labelled scan of the pooled splits with its fold."""
    if pool not in POOLS:
        raise Cov3dError(f"--cv-pool {pool} is not one of {', '.join(POOLS)}")
    if (groups is None) != (group_by is None):
        raise Cov3dError("--cv-groups FILE and --cv-group-by COLUMN go together: give both, or neither")
    records = [r for r in catalog(Path(data), severity_files) if r.split in POOLS[pool] and r.label]
    if not records:
        raise Cov3dError(f"no labelled scans in the {' and '.join(POOLS[pool])} split(s) of '{data}'")
    if len(records) < 2 * k:
        raise Cov3dError(f"{len(records)} labelled scans are too few for {k} folds; give --folds of at most "
                         f"{max(2, len(records) // 2)}")
    targets = [labels.target_of(r.label, r.severity) for r in records]
    strata: list = list(targets)
    if groups is not None:
        table = group_table(groups, group_by)
        strata = list(zip(targets, groups_of([r.path for r in records], table, groups, what="labelled")))
    folds = assign_folds(strata, k, seed)
    covid = sum(t >= labels.MILD for t in targets)
    if min(covid, len(records) - covid) < k:
        log.warning("only %d covid and %d non-covid scans for %d folds: some folds validate without both classes",
                    covid, len(records) - covid, k)
    return [FoldScan(r.path, r.split, r.label, r.severity, int(f)) for r, f in zip(records, folds)]


def fold_run(run: Path, fold: int) -> Path:
    return Path(run) / f"fold-{fold}"


def fold_runs(run: Path) -> list[Path]:
    """The fold run directories of a cross-validation that have a best presence checkpoint: what
    `cov3d predict --model RUN` ensembles."""
    plan = read_plan(run)
    found = [fold_run(run, i) for i in range(plan["folds"]) if (fold_run(run, i) / PRESENCE).is_file()]
    if not found:
        raise Cov3dError(f"'{run}' is a cross-validation whose folds have not trained yet (no fold-I/{PRESENCE}); "
                         "train them with `cov3d train DATA --folds K --output RUN`")
    if len(found) < plan["folds"]:
        log.warning("%s: %d of its %d folds have trained; predicting with those", run, len(found), plan["folds"])
    return found


def write_plan(run: Path, scans: list[FoldScan], k: int, seed: int, pool: str, config: TrainConfig,
               groups: Path | None, group_by: str | None) -> dict:
    """RUN/cv.json: the folds and their settings. An existing plan must agree (same data, K, seed, pool,
    groups); its folds are kept as they are."""
    run = Path(run)
    plan = {"folds": k, "seed": seed, "pool": pool, "data": str(Path(config.data).resolve()),
            "groups": str(groups) if groups else None, "group_by": group_by,
            "config": {**config.to_json(), "lam": config.lam},
            "scans": [dataclasses.asdict(s) for s in scans]}
    existing = read_plan(run) if (run / PLAN).is_file() else None
    if existing is not None:
        for key in ("folds", "seed", "pool", "data", "group_by"):
            if existing.get(key) != plan[key]:
                raise Cov3dError(f"'{run}' holds a cross-validation with {key} {existing.get(key)}, not "
                                 f"{plan[key]}; use the same settings to go on with it, or another --output")
        if [s["path"] for s in existing["scans"]] != [s["path"] for s in plan["scans"]]:
            raise Cov3dError(f"the labelled scans of '{config.data}' differ from those '{run / PLAN}' was planned "
                             "on; train a new cross-validation into another --output")
        return existing
    run.mkdir(parents=True, exist_ok=True)
    write_text(run / PLAN, json.dumps(plan, indent=2) + "\n")
    return plan


def read_plan(run: Path) -> dict:
    try:
        plan = json.loads((Path(run) / PLAN).read_text(encoding="utf-8"))
        if not isinstance(plan, dict) or "scans" not in plan or "folds" not in plan:
            raise ValueError("no folds")
        return plan
    except (OSError, ValueError) as error:
        raise Cov3dError(f"'{Path(run) / PLAN}' cannot be read ({error}); it is written by `cov3d train "
                         "--folds K`") from None


def fold_scans(plan: dict) -> list[FoldScan]:
    return [FoldScan(**s) for s in plan["scans"]]


def build_fold_data(run: Path, plan: dict, fold: int) -> Path:
    """RUN/splits/fold-I: links to the scans (train: the other folds; validation: fold I) and severity CSVs.
    Rebuilt whole each time, so it always matches the plan."""
    import shutil

    data = Path(plan["data"])
    root = Path(run) / "splits" / f"fold-{fold}"
    if root.exists():
        shutil.rmtree(root)
    severity: dict[str, list[str]] = {"train": [], "validation": []}
    for scan in fold_scans(plan):
        split = "validation" if scan.fold == fold else "train"
        link = root / split / scan.label / scan.link_name
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink((data / scan.path).resolve(), link, target_is_directory=(data / scan.path).is_dir())
        except OSError as error:
            raise Cov3dError(f"cannot link '{data / scan.path}' into '{root}': {error.strerror or error}; "
                             "cross-validation needs a file system with symbolic links") from None
        if scan.severity:
            severity[split].append(f"{scan.link_name};{scan.severity}")
    for split, rows in severity.items():
        write_text(root / SEVERITY_FILES[split], "Name;Category\n" + "".join(f"{r}\n" for r in rows))
    return root


def fold_epochs_done(run: Path) -> int:
    """The epochs a fold's run has finished (0 without last.pt)."""
    last = Path(run) / LAST
    if not last.is_file():
        return 0
    return int(load_checkpoint(last).get("epoch", 0))


def fold_config(config: TrainConfig, run: Path, plan: dict, fold: int) -> TrainConfig:
    """The fold's training config: its link tree as data, RUN/fold-I as output, its own cache."""
    data = build_fold_data(run, plan, fold)
    cache = str(Path(config.cache) / f"fold-{fold}") if config.cache else None
    return dataclasses.replace(config, data=str(data), output=str(fold_run(run, fold)), cache=cache,
                               train_severity=None, validation_severity=None, resolved={})


def train_fold(config: TrainConfig, run: Path, plan: dict, fold: int,
               **callbacks: Callable) -> TrainResult | None:
    """Train (or resume) fold `fold`; None when it has already trained all its epochs."""
    from cov3d.training.trainer import train

    if not 0 <= fold < plan["folds"]:
        raise Cov3dError(f"--fold {fold} is not among the folds 0…{plan['folds'] - 1}")
    target = fold_run(run, fold)
    done = fold_epochs_done(target)
    if done >= int(config.epochs):
        log.info("fold %d has trained its %d epochs; skipped", fold, done)
        return None
    return train(fold_config(config, run, plan, fold), resume=done > 0, **callbacks)
