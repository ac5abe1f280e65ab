import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from cov3d.data.catalog import catalog
from cov3d.cli import app
from cov3d.errors import Cov3dError
from cov3d.data.readers import read_scan
from cov3d.data.synth import LESION_FRACTION, make_phantom, synthesize

runner = CliRunner()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "data"
    return root, synthesize(root, scans=20, seed=3, width=48)


def test_layout_and_labels(synthetic):
    root, made = synthetic
    assert sorted(p.name for p in root.iterdir()) == [
        "test", "train", "train_partition_covid_categories.csv", "val_partition_covid_categories.csv", "validation"]
    records = {r.path: r for r in catalog(root)}
    assert set(records) == {s.path for s in made}
    for scan in made:
        record = records[scan.path]
        assert (record.split, record.label) == (scan.split, scan.label)
        assert record.severity == (scan.severity if scan.severity_listed else None)
    for split in ("train", "validation"):
        labels = [s.label for s in made if s.split == split]
        assert labels.count("covid") >= 2 and labels.count("non-covid") >= 2
    assert [s.label for s in made if s.split == "test"] == ["", ""]


def test_severity_csvs(synthetic):
    root, made = synthetic
    with (root / "train_partition_covid_categories.csv").open(encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter=";"))
    assert rows[0] == ["Name", "Category"]
    listed = {name: int(category) for name, category in rows[1:]}
    train_covid = [s for s in made if s.split == "train" and s.label == "covid"]
    assert listed == {s.path.rsplit("/", 1)[-1]: s.severity for s in train_covid if s.severity_listed}
    # about a third of the positives carry no severity label
    unlisted = sum(not s.severity_listed for s in made if s.label == "covid")
    assert 0 < unlisted < sum(s.label == "covid" for s in made)


def test_slices_vary_and_read_as_scans(synthetic):
    root, made = synthetic
    counts = {read_scan(root / s.path).meta.slices for s in made[:6]}
    assert len(counts) > 1 and all(40 <= c < 100 for c in counts)
    scan = read_scan(root / made[0].path)
    assert scan.volume.shape[1:] == (48, 48)


def test_deterministic_for_a_seed(tmp_path):
    a = synthesize(tmp_path / "a", scans=10, seed=5, width=32)
    b = synthesize(tmp_path / "b", scans=10, seed=5, width=32)
    assert a == b
    for scan in a:
        first = sorted((tmp_path / "a" / scan.path).iterdir())
        second = sorted((tmp_path / "b" / scan.path).iterdir())
        assert [f.read_bytes() for f in first] == [f.read_bytes() for f in second]
    c = synthesize(tmp_path / "c", scans=10, seed=6, width=32)
    assert [s.lesion_fraction for s in c] != [s.lesion_fraction for s in a]


def test_lesion_fraction_grows_with_severity():
    rng = np.random.default_rng(0)
    fractions = {severity: [make_phantom(rng, severity, slices=40, width=64).lesion_fraction for _ in range(3)]
                 for severity in (0, 1, 2, 3, 4)}
    assert fractions[0] == [0.0, 0.0, 0.0]
    for severity in (1, 2, 3, 4):
        low, high = LESION_FRACTION[severity]
        assert all(low <= f <= high + 0.06 for f in fractions[severity]), (severity, fractions[severity])
    assert max(fractions[1]) < min(fractions[2]) < max(fractions[2]) < min(fractions[3])
    assert max(fractions[3]) < min(fractions[4])


def test_lesions_are_denser_than_lung_and_mostly_peripheral():
    from scipy.ndimage import binary_erosion

    phantom = make_phantom(np.random.default_rng(1), 3, slices=40, width=64)
    healthy = phantom.lungs & ~phantom.lesions
    assert phantom.hu[phantom.lesions].mean() > phantom.hu[healthy].mean() + 200
    core = binary_erosion(phantom.lungs, iterations=6)
    assert (phantom.lesions & ~core).sum() > (phantom.lesions & core).sum()  # more at the rim than inside


def test_negatives_may_carry_a_nodule():
    rng = np.random.default_rng(2)
    with_nodule = make_phantom(rng, 0, slices=40, width=64, nodule=True)
    assert with_nodule.nodule and with_nodule.lesion_fraction == 0.0


def test_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("x", encoding="utf-8")
    with pytest.raises(Cov3dError, match="is not empty"):
        synthesize(tmp_path / "x", scans=10)


def test_synth_cli(tmp_path):
    result = runner.invoke(app, ["synth", str(tmp_path / "d"), "--scans", "10", "--width", "32"])
    assert result.exit_code == 0, result.output
    assert "Wrote 10 scans" in result.output


def test_demo_end_to_end_at_a_tiny_size(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--output", str(out), "--scans", "12", "--epochs", "1", "--depth", "8",
                                 "--width", "16"])
    assert result.exit_code == 0, result.output
    assert "presence macro F1" in result.output
    for path in ("data/train", "run/presence.pt", "run/severity.pt", "evaluation/metrics.json",
                 "evaluation/roc.png", "predictions.csv", "submission/covid.csv"):
        assert (out / path).exists(), path
    with (out / "predictions.csv").open(encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == 2  # the test split
    again = runner.invoke(app, ["demo", "--output", str(out), "--scans", "12", "--epochs", "1", "--depth", "8",
                                "--width", "16"])
    assert again.exit_code == 1 and "holds a finished demo" in again.output
    (out.parent / "other").mkdir()
    (out.parent / "other" / "file.txt").write_text("x", encoding="utf-8")
    foreign = runner.invoke(app, ["demo", "--output", str(out.parent / "other")])
    assert foreign.exit_code == 1 and "is not empty" in foreign.output


def test_an_interrupted_demo_goes_on_when_run_again(tmp_path, monkeypatch):
    import cov3d.demo

    out = tmp_path / "demo"
    args = ["demo", "--output", str(out), "--scans", "12", "--epochs", "2", "--depth", "8", "--width", "16"]
    real_evaluate = cov3d.demo.evaluate

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cov3d.demo, "evaluate", interrupted)
    first = runner.invoke(app, args)
    assert first.exit_code == 130 and "run the same command again to go on" in first.output
    monkeypatch.setattr(cov3d.demo, "evaluate", real_evaluate)
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "Generating" not in second.output  # the data set was already complete
    with (out / "run" / "history.csv").open(encoding="utf-8") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2"]  # trained once, not twice
