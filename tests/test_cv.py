"""Cross-validation: the folds (stratified, seeded), each fold's data tree, the plan, and one tiny study end to end."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import write_slices
from cov3d.cli import app
from cov3d.data.catalog import catalog
from cov3d.errors import Cov3dError
from cov3d.training import cv
from cov3d.training.config import TrainConfig

runner = CliRunner()


def make_study(root: Path, per_class: int = 4) -> Path:
    """train and validation splits with covid (severities 1–4 in turn) and non-covid scans; names repeat across
    splits and classes."""
    rng = np.random.default_rng(0)
    for split, csv_name in (("train", "train_partition_covid_categories.csv"),
                            ("validation", "val_partition_covid_categories.csv")):
        rows = []
        for label in ("covid", "non-covid"):
            for i in range(per_class):
                write_slices(root / split / label / f"ct_scan_{i}", rng.integers(0, 255, (6, 20, 20), dtype=np.uint8))
                if label == "covid":
                    rows.append(f"ct_scan_{i};{i % 4 + 1}")
        (root / csv_name).write_text("Name;Category\n" + "\n".join(rows) + "\n")
    return root


def test_folds_are_stratified_balanced_and_seeded():
    strata = ["a"] * 10 + ["b"] * 7 + ["c"] * 3
    folds = cv.assign_folds(strata, 3, seed=1)
    assert (folds == cv.assign_folds(strata, 3, seed=1)).all()
    assert (folds != cv.assign_folds(strata, 3, seed=2)).any()
    sizes = np.bincount(folds, minlength=3)
    assert sizes.max() - sizes.min() <= 1
    for stratum in "abc":
        per_fold = np.bincount(folds[np.array(strata) == stratum], minlength=3)
        assert per_fold.max() - per_fold.min() <= 1, stratum


def test_fewer_than_two_folds_is_an_error():
    with pytest.raises(Cov3dError, match="--folds 1 must be at least 2"):
        cv.assign_folds([0, 1], 1, 0)


def test_the_plan_pools_train_and_validation_and_stratifies_by_severity(tmp_path):
    data = make_study(tmp_path / "data")
    scans = cv.plan_folds(data, 2, seed=0)
    assert len(scans) == 16 and {s.split for s in scans} == {"train", "validation"}
    for fold in (0, 1):
        held = [s for s in scans if s.fold == fold]
        assert Counter(s.label for s in held) == {"covid": 4, "non-covid": 4}
        assert sorted(s.severity for s in held if s.severity) == [1, 2, 3, 4]  # each severity twice in all
    only_train = cv.plan_folds(data, 2, seed=0, pool="train")
    assert {s.split for s in only_train} == {"train"} and len(only_train) == 8


def test_the_plan_stratifies_by_a_group_column(tmp_path):
    data = make_study(tmp_path / "data")
    records = [r for r in catalog(data) if r.label]
    groups = tmp_path / "groups.csv"
    groups.write_text("scan,site\n" + "".join(f"{r.path},{'A' if i % 2 else 'B'}\n" for i, r in enumerate(records)))
    scans = cv.plan_folds(data, 2, seed=0, groups=groups, group_by="site")
    site = {r.path: ("A" if i % 2 else "B") for i, r in enumerate(records)}
    for fold in (0, 1):
        assert Counter(site[s.path] for s in scans if s.fold == fold) == {"A": 4, "B": 4}


@pytest.mark.parametrize("kwargs, message", [
    ({"pool": "everything"}, "--cv-pool everything is not one of train\\+validation, train"),
    ({"group_by": "site"}, "--cv-groups FILE and --cv-group-by COLUMN go together"),
    ({"k": 9}, "16 labelled scans are too few for 9 folds; give --folds of at most 8"),
])
def test_plan_errors(tmp_path, kwargs, message):
    data = make_study(tmp_path / "data")
    k = kwargs.pop("k", 2)
    with pytest.raises(Cov3dError, match=message):
        cv.plan_folds(data, k, 0, **kwargs)


def plan_for(tmp_path: Path, k: int = 2) -> tuple[dict, Path, TrainConfig]:
    data = make_study(tmp_path / "data")
    config = TrainConfig(data=str(data), output=str(tmp_path / "run"), epochs=1, batch_size=2, lr=1e-3,
                         dropout=0.0)
    plan = cv.write_plan(tmp_path / "run", cv.plan_folds(data, k, 0), k, 0, "train+validation", config, None, None)
    return plan, tmp_path / "run", config


def test_a_fold_tree_holds_the_other_folds_for_training_and_its_own_for_validation(tmp_path):
    plan, run, _ = plan_for(tmp_path)
    cv.build_fold_data(run, plan, 1)
    root = cv.build_fold_data(run, plan, 1)  # rebuilt: the old links go, the scans they pointed to stay
    assert all((Path(plan["data"]) / s["path"] / "0.jpg").is_file() for s in plan["scans"])
    records = catalog(root)
    held = {s["split"] + "-" + s["path"].rsplit("/", 1)[-1]: s for s in plan["scans"] if s["fold"] == 1}
    validation = [r for r in records if r.split == "validation"]
    assert {r.path.rsplit("/", 1)[-1] for r in validation} == set(held)
    assert len([r for r in records if r.split == "train"]) == 8
    for record in records:  # labels and severities come through the links and the fold's severity CSVs
        name = record.path.rsplit("/", 1)[-1]
        original = next(s for s in plan["scans"] if s["split"] + "-" + s["path"].rsplit("/", 1)[-1] == name
                        and s["label"] == record.label)
        assert record.severity == original["severity"]


def test_a_plan_with_other_settings_is_refused(tmp_path):
    plan, run, config = plan_for(tmp_path)
    again = cv.write_plan(run, cv.plan_folds(Path(config.data), 2, 0), 2, 0, "train+validation", config, None, None)
    assert again["scans"] == plan["scans"]
    with pytest.raises(Cov3dError, match="holds a cross-validation with folds 2, not 3"):
        cv.write_plan(run, cv.plan_folds(Path(config.data), 3, 0), 3, 0, "train+validation", config, None, None)


def test_a_fold_outside_the_plan_is_an_error(tmp_path):
    plan, run, config = plan_for(tmp_path)
    with pytest.raises(Cov3dError, match="--fold 5 is not among the folds 0…1"):
        cv.train_fold(config, run, plan, 5)


def test_fold_without_folds_and_no_plan_is_an_error(tmp_path):
    data = make_study(tmp_path / "data")
    result = runner.invoke(app, ["train", str(data), "--output", str(tmp_path / "run"), "--fold", "0",
                                 "--no-pretrained"])
    assert result.exit_code == 1 and "--fold 0 needs --folds K" in result.output


def test_a_tiny_cross_validation_end_to_end(tmp_path):
    """Two folds of one epoch at 8x16x16: fold runs, out-of-fold predictions, the summary, predict's ensemble,
    compare's row, and a second call that trains nothing."""
    data = make_study(tmp_path / "data", per_class=3)
    run = tmp_path / "run"
    common = ["--output", str(run), "--folds", "2", "--no-pretrained", "--depth", "8", "--width", "16",
              "--epochs", "1", "--batch-size", "2", "--bn-scans", "0", "--loader-workers", "0", "--penultimate",
              "16", "--cache", str(tmp_path / "cache"), "--device", "cpu"]
    first = runner.invoke(app, ["train", str(data), *common, "--fold", "1"])
    assert first.exit_code == 0, first.output
    assert (run / "fold-1" / "presence.pt").is_file() and not (run / "fold-0").exists()
    assert "still to train" in first.output
    result = runner.invoke(app, ["train", str(data), *common])
    assert result.exit_code == 0, result.output
    assert "Fold 1 has trained its 1 epochs already." in result.output
    oof = list(csv.DictReader((run / "oof.csv").open(encoding="utf-8")))
    assert len(oof) == 12 and {r["fold"] for r in oof} == {"0", "1"}
    assert len({r["path"] for r in oof}) == 12  # every labelled scan once, by its original path
    summary = json.loads((run / "cv.json").read_text(encoding="utf-8"))["summary"]
    assert [f["scans"] for f in summary["folds"]] == [6, 6]
    pooled = summary["pooled"]["presence_macro_f1"]
    assert pooled["low"] <= pooled["estimate"] <= pooled["high"]
    assert "Pooled out-of-fold (12 scans" in result.output
    # predict --model RUN ensembles the folds: presence.pt and severity.pt of each
    from cov3d.inference.predict import load_ensemble

    members = load_ensemble([run])
    assert sorted(str(m.path.relative_to(run)) for m in members) == [
        "fold-0/presence.pt", "fold-0/severity.pt", "fold-1/presence.pt", "fold-1/severity.pt"]
    compared = runner.invoke(app, ["compare", str(run), "--output-dir", str(tmp_path / "cmp")])
    assert compared.exit_code == 0, compared.output
    row = next(csv.DictReader((tmp_path / "cmp" / "comparison.csv").open(encoding="utf-8")))
    assert row["epochs"] == "1 x 2 folds" and float(row["presence_f1_evaluated"]) == pooled["estimate"]


def test_a_plan_over_other_scans_is_refused(tmp_path):
    plan, run, config = plan_for(tmp_path)
    write_slices(Path(config.data) / "train" / "covid" / "ct_scan_99", np.zeros((6, 20, 20), dtype=np.uint8))
    with pytest.raises(Cov3dError, match="differ from those"):
        cv.write_plan(run, cv.plan_folds(Path(config.data), 2, 0), 2, 0, "train+validation", config, None, None)


def test_an_unreadable_plan_is_an_error(tmp_path):
    (tmp_path / "cv.json").write_text("{not json")
    with pytest.raises(Cov3dError, match="cv.json' cannot be read"):
        cv.read_plan(tmp_path)


def test_no_labelled_scans_in_the_pool_is_an_error(tmp_path):
    write_slices(tmp_path / "data" / "test" / "ct_scan_0", np.zeros((6, 20, 20), dtype=np.uint8))
    with pytest.raises(Cov3dError, match="no labelled scans in the train and validation split"):
        cv.plan_folds(tmp_path / "data", 2, 0)


def test_untrained_folds_give_no_ensemble_and_no_summary(tmp_path):
    from cov3d.inference import crossval

    _, run, _ = plan_for(tmp_path)
    with pytest.raises(Cov3dError, match="whose folds have not trained yet"):
        cv.fold_runs(run)
    with pytest.raises(Cov3dError, match="fold 0 has no last.pt yet"):
        crossval.out_of_fold(run, 0)
    with pytest.raises(Cov3dError, match="fold 0 of .* has no out-of-fold predictions yet"):
        crossval.summarise(run)
