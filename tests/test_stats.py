"""Bootstrap intervals, paired comparisons, McNemar's test and group scores, on synthetic answers with known truths."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from cov3d.errors import Cov3dError
from cov3d.inference import stats
from cov3d.inference.stats import Scored
from cov3d.training.metrics import macro_f1


def synthetic(n: int = 500, seed: int = 1, skill: float = 1.5) -> Scored:
    """n scans, ~40% covid, a quarter of those with a severity label; scores that separate with `skill`."""
    rng = np.random.default_rng(seed)
    covid = (rng.random(n) < 0.4).astype(int)
    probability = 1 / (1 + np.exp(-(skill * (2 * covid - 1) + rng.normal(size=n))))
    severity = np.where(covid & (rng.random(n) < 0.25), rng.integers(1, 5, n), 0)
    guessed = np.where(rng.random(n) < 0.6, severity, rng.integers(1, 5, n))
    return Scored([f"validation/s{i}" for i in range(n)], covid, probability, (probability >= 0.5).astype(int),
                  severity, np.where(covid == 1, guessed, 0))


def test_bootstrap_indices_keep_each_stratum_and_are_seeded():
    strata = np.array([0, 0, 0, 1, 1, 2])
    a = stats.bootstrap_indices(strata, 300, seed=4)
    assert a.shape == (300, 6)
    assert (strata[a] == strata).all()  # every column draws from its own stratum
    assert (a == stats.bootstrap_indices(strata, 300, seed=4)).all()
    assert (a != stats.bootstrap_indices(strata, 300, seed=5)).any()
    assert set(a[:, :3].ravel()) == {0, 1, 2}  # with replacement, over the whole stratum


def test_vectorised_macro_f1_equals_cov3d_macro_f1_on_every_resample():
    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(1, 5, (50, 30)), rng.integers(1, 5, (50, 30))
    predicted[0] = 1  # one row predicting a single class
    fixed = stats.macro_f1_rows(truth, predicted, [1, 2, 3, 4])
    free = stats.macro_f1_rows(truth, predicted)
    for row in range(50):
        assert fixed[row] == pytest.approx(macro_f1(truth[row], predicted[row], [1, 2, 3, 4]))
        assert free[row] == pytest.approx(macro_f1(truth[row], predicted[row]))


def test_vectorised_auc_equals_sklearn_with_ties():
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 2, (20, 40))
    scores = rng.integers(0, 5, (20, 40)) / 4  # many ties
    got = stats.auc_rows(truth, scores)
    assert got == pytest.approx([roc_auc_score(t, s) for t, s in zip(truth, scores)])
    assert np.isnan(stats.auc_rows(np.ones((1, 5)), np.zeros((1, 5))))[0]


def test_a_perfect_classifier_has_intervals_of_one():
    s = synthetic()
    perfect = Scored(s.scans, s.covid, s.covid.astype(float), s.covid, s.severity_truth, s.severity_truth)
    for name, interval in stats.intervals(perfect, 200).items():
        assert (interval.estimate, interval.low, interval.high) == (1.0, 1.0, 1.0), name


def test_intervals_hold_the_estimate_and_are_seeded():
    s = synthetic()
    first = stats.intervals(s, 2000, seed=3)
    again = stats.intervals(s, 2000, seed=3)
    for name in stats.METRICS:
        i = first[name]
        assert i.low <= i.estimate <= i.high, name
        assert 0 < i.high - i.low < 0.5, name
        assert (i.low, i.high) == (again[name].low, again[name].high)
    assert first["presence_macro_f1"].estimate == macro_f1(s.covid, s.predicted, [0, 1])
    assert first["presence_roc_auc"].estimate == pytest.approx(roc_auc_score(s.covid, s.probability))


def test_a_bigger_sample_gives_a_narrower_interval():
    small, large = stats.intervals(synthetic(100), 1000), stats.intervals(synthetic(2000), 1000)
    width = lambda i: i.high - i.low  # noqa: E731
    assert width(large["presence_macro_f1"]) < width(small["presence_macro_f1"])


def test_no_severity_label_gives_no_severity_score():
    s = synthetic(60)
    s = Scored(s.scans, s.covid, s.probability, s.predicted, np.zeros(60), np.zeros(60))
    interval = stats.intervals(s, 100)["severity_macro_f1"]
    assert (interval.estimate, interval.low, interval.high) == (None, None, None)
    assert interval.describe() == "-"


def test_mcnemar_exact_equals_scipy_binomtest():
    first = np.array([True] * 7 + [False] * 2 + [True] * 30)
    second = np.array([False] * 7 + [True] * 2 + [True] * 30)
    result = stats.mcnemar(first, second)
    assert (result["first_only_right"], result["second_only_right"], result["method"]) == (7, 2, "exact")
    assert result["p_value"] == pytest.approx(binomtest(7, 9, 0.5).pvalue)


def test_mcnemar_chi_square_for_many_discordant_pairs():
    first = np.array([True] * 40 + [False] * 20)
    result = stats.mcnemar(first, ~first)
    assert result["statistic"] == pytest.approx((abs(40 - 20) - 1) ** 2 / 60)
    assert 0 < result["p_value"] < 0.05
    assert stats.mcnemar(first, first)["p_value"] == 1.0


def test_paired_difference_of_a_model_with_itself_is_zero_and_a_better_model_is_positive():
    s = synthetic(300)
    same = stats.paired_comparison(s, s, 500)
    assert all(d["estimate"] == d["low"] == d["high"] == 0 for d in same["differences"].values())
    weaker = synthetic(300, skill=0.3)
    weaker = Scored(s.scans, s.covid, weaker.probability, weaker.predicted, s.severity_truth, s.severity_predicted)
    better = stats.paired_comparison(s, weaker, 1000)["differences"]["presence_roc_auc"]
    assert better["estimate"] == pytest.approx(better["first"] - better["second"])
    assert better["low"] > 0


def test_paired_comparison_aligns_scans_by_name():
    s = synthetic(80)
    reversed_ = s.subset(np.ones(80, bool))
    order = np.arange(80)[::-1]
    reversed_ = Scored([s.scans[i] for i in order], s.covid[order], s.probability[order], s.predicted[order],
                       s.severity_truth[order], s.severity_predicted[order])
    result = stats.paired_comparison(s, reversed_, 200)
    assert result["scans"] == 80 and result["differences"]["presence_accuracy"]["high"] == 0


def test_paired_comparison_with_no_shared_scan_is_an_error():
    s = synthetic(20)
    other = Scored([f"other/{i}" for i in range(20)], s.covid, s.probability, s.predicted, s.severity_truth,
                   s.severity_predicted)
    with pytest.raises(Cov3dError, match="share no scored scan"):
        stats.paired_comparison(s, other, 10)


def test_paired_comparison_of_differently_labelled_scans_is_an_error():
    s = synthetic(20)
    other = Scored(s.scans, 1 - s.covid, s.probability, s.predicted, np.zeros(20), np.zeros(20))
    with pytest.raises(Cov3dError, match="label 20 shared scan"):
        stats.paired_comparison(s, other, 10)


def test_group_scores_find_the_worst_group_and_the_gap():
    s = synthetic(400)
    groups = np.where(np.arange(400) < 200, "A", "B")
    # group B is scored by a coin: its accuracy is the worst
    coin = np.random.default_rng(9).integers(0, 2, 400)
    s.predicted = np.where(groups == "B", coin, s.predicted)
    result = stats.group_scores(s, groups, 300)
    accuracy = result["summary"]["presence_accuracy"]
    assert accuracy["worst_group"] == "B" and accuracy["best_group"] == "A"
    assert accuracy["gap"] == pytest.approx(result["groups"]["A"]["presence_accuracy"]["estimate"]
                                            - result["groups"]["B"]["presence_accuracy"]["estimate"])
    assert result["groups"]["A"]["scans"] == 200


def test_resamples_below_one_is_an_error():
    with pytest.raises(Cov3dError, match="--resamples must be at least 1, got 0"):
        stats.bootstrap_indices([0, 1], 0)


def test_scored_from_rows_keys_scans_by_path_under_the_root(tmp_path):
    rows = [{"scan": "ct_scan_0", "path": str(tmp_path / "validation/covid/ct_scan_0"), "probability": "0.9",
             "prediction": "covid", "severity": "mild", "label": "covid", "true_severity": "severe"},
            {"scan": "ct_scan_0", "path": str(tmp_path / "validation/non-covid/ct_scan_0"), "probability": "0.2",
             "prediction": "non-covid", "severity": "", "label": "non-covid", "true_severity": ""}]
    s = stats.scored_from_rows(rows, tmp_path)
    assert s.scans == ["validation/covid/ct_scan_0", "validation/non-covid/ct_scan_0"]
    assert s.severity_truth.tolist() == [3, 0] and s.severity_predicted.tolist() == [1, 0]
    assert s.strata.tolist() == [3, 0]


def test_scored_from_rows_without_labels_is_an_error():
    with pytest.raises(Cov3dError, match="written by `cov3d evaluate`"):
        stats.scored_from_rows([{"scan": "a", "path": "a", "probability": "0.5", "prediction": "covid"}])


# ---- `cov3d evaluate` with intervals, groups and a baseline (the conftest's tiny run and dataset) ----

import json  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

from cov3d.cli import app  # noqa: E402

runner = CliRunner()


def evaluate_cli(dataset, run, out, *extra):
    return runner.invoke(app, ["evaluate", str(dataset), "--model", str(run), "--output-dir", str(out),
                               "--workers", "0", "--no-tta", "--device", "cpu", *extra])


def test_the_cli_resamples_default_is_the_library_one():
    import inspect

    from cov3d.cli.inference import evaluate

    assert inspect.signature(evaluate).parameters["resamples"].default == stats.RESAMPLES


def test_evaluate_writes_and_prints_intervals(trained_run, dataset, tmp_path):
    result = evaluate_cli(dataset, trained_run, tmp_path / "eval", "--resamples", "300", "--seed", "2")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["bootstrap"]["resamples"] == 300 and metrics["bootstrap"]["seed"] == 2
    ci = metrics["ci"]
    assert ci["presence"]["macro_f1"]["estimate"] == metrics["presence"]["macro_f1"]
    assert ci["presence"]["accuracy"]["estimate"] == metrics["presence"]["accuracy"]
    assert ci["presence"]["roc_auc"]["estimate"] == pytest.approx(metrics["presence"]["roc_auc"])
    assert ci["severity"]["macro_f1"]["estimate"] == metrics["severity"]["macro_f1"]
    # one scan per class: every resample is the split itself, so each interval is the point
    for entry in (*ci["presence"].values(), *ci["severity"].values()):
        assert entry["low"] == entry["estimate"] == entry["high"]
    assert "95% CI (300 stratified bootstrap resamples, seed 2)" in result.output


def write_groups(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_evaluate_scores_each_group(trained_run, dataset, tmp_path):
    groups = write_groups(tmp_path / "groups.csv", "scan,site,sex\nvalidation/covid/ct_scan_2,A,F\n"
                                                    "ct_scan_3,B,F\ntrain/covid/ct_scan_0,C,M\n")
    # --resamples 0: scores without intervals, for the split and for each group
    result = evaluate_cli(dataset, trained_run, tmp_path / "eval", "--groups", str(groups), "--group-by", "site",
                          "--resamples", "0")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert "ci" not in metrics and "95% CI" not in result.output
    grouped = metrics["groups"]
    assert grouped["column"] == "site" and set(grouped["groups"]) == {"A", "B"}  # train scans are not scored
    assert grouped["groups"]["A"]["scans"] == 1
    assert grouped["groups"]["A"]["presence_accuracy"]["low"] is None
    accuracy = grouped["summary"]["presence_accuracy"]
    assert accuracy["gap"] == pytest.approx(accuracy["best"] - accuracy["worst"])
    lines = (tmp_path / "eval" / "groups.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("group,scans,presence_macro_f1,presence_macro_f1_low") and len(lines) == 3
    assert "By site" in result.output and "worst group" in result.output


@pytest.mark.parametrize("text, options, message", [
    (None, ["--group-by", "site"], "--group-by site needs --groups FILE.csv"),
    ("scan,site\n", ["--groups", "{file}"], "needs --group-by COLUMN"),
    ("scan,site\n", ["--groups", "{missing}", "--group-by", "site"], "does not exist; give a CSV with a 'scan'"),
    ("name,site\nct_scan_2,A\n", ["--groups", "{file}", "--group-by", "site"], "has no 'scan' column (its columns: "
                                                                              "name, site)"),
    ("scan,site\nct_scan_2,A\n", ["--groups", "{file}", "--group-by", "sex"], "has no column 'sex'; --group-by "
                                                                             "one of: site"),
    ("scan,site\nct_scan_2,\n", ["--groups", "{file}", "--group-by", "site"], "gives scan 'ct_scan_2' no value"),
    ("scan,site\nct_scan_2,A\nct_scan_2,B\n", ["--groups", "{file}", "--group-by", "site"],
     "lists scan 'ct_scan_2' twice, in groups 'A' and 'B'"),
    ("scan,site\nct_scan_2,A\n", ["--groups", "{file}", "--group-by", "site"],
     "1 of the 2 scored scan(s) are not in groups file"),
])
def test_evaluate_group_errors(trained_run, dataset, tmp_path, text, options, message):
    file = write_groups(tmp_path / "groups.csv", text) if text is not None else tmp_path / "groups.csv"
    options = [o.format(file=file, missing=tmp_path / "nope.csv") for o in options]
    result = evaluate_cli(dataset, trained_run, tmp_path / "eval", *options)
    assert result.exit_code == 1
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


def test_a_bare_name_shared_by_two_scored_scans_is_an_error(tmp_path):
    from cov3d.data.groups import groups_of

    with pytest.raises(Cov3dError, match="names scan 'ct_scan_0', the name of 2 scored scans"):
        groups_of(["train/covid/ct_scan_0", "train/non-covid/ct_scan_0"], {"ct_scan_0": "A"},
                        tmp_path / "g.csv")


def test_evaluate_compares_with_a_baseline_model_and_an_earlier_evaluation(trained_run, dataset, tmp_path):
    first = evaluate_cli(dataset, trained_run, tmp_path / "a", "--resamples", "50")
    assert first.exit_code == 0, first.output
    for baseline in (trained_run / "presence.pt", tmp_path / "a"):
        result = evaluate_cli(dataset, trained_run, tmp_path / "b", "--resamples", "50", "--baseline", str(baseline))
        assert result.exit_code == 0, result.output
        comparison = json.loads((tmp_path / "b" / "metrics.json").read_text(encoding="utf-8"))["comparison"]
        assert comparison["scans"] == 2
        assert comparison["differences"]["presence_accuracy"]["estimate"] == pytest.approx(0, abs=1e-9)
        assert comparison["mcnemar_presence_accuracy"]["p_value"] == 1.0
        assert "McNemar (exact)" in result.output


def test_a_missing_baseline_is_an_error(trained_run, dataset, tmp_path):
    result = evaluate_cli(dataset, trained_run, tmp_path / "b", "--baseline", str(tmp_path / "nope"))
    assert result.exit_code == 1 and "baseline" in result.output and "does not exist" in result.output


def test_zero_resamples_give_scores_without_intervals():
    s = synthetic(50)
    assert all(i.low is None and i.estimate is not None for n, i in stats.intervals(s, 0).items()
               if n != "severity_macro_f1" or s.severity_mask.any())
    paired = stats.paired_comparison(s, s, 0)["differences"]["presence_accuracy"]
    assert (paired["estimate"], paired["low"]) == (0, None)
    grouped = stats.group_scores(s, ["A"] * 50, 0)
    assert grouped["groups"]["A"]["presence_accuracy"]["low"] is None


def test_an_empty_baseline_csv_is_an_error(tmp_path):
    from cov3d.inference.research import read_evaluation

    (tmp_path / "predictions.csv").write_text("scan,path,probability,prediction,label\n")
    with pytest.raises(Cov3dError, match="hold no scan"):
        read_evaluation(tmp_path / "predictions.csv", tmp_path)


def test_an_unreadable_baseline_csv_is_an_error(tmp_path):
    from cov3d.inference.research import read_evaluation

    (tmp_path / "predictions.csv").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(Cov3dError, match="cannot read baseline predictions"):
        read_evaluation(tmp_path / "predictions.csv", tmp_path)
