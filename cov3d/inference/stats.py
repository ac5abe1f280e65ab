"""Uncertainty of scores: stratified bootstrap confidence intervals, paired comparisons and McNemar's test.

Every resample draws each scan's stratum (its true class) with replacement,
so a resample holds as many scans of each class as the split does: a class
with five scans (critical, say) is in every resample, five times. The
resampled scores are computed for all resamples at once from index arrays
(a (B, n) matrix of scan indices), so 2,000 resamples of a few hundred scans
take milliseconds. The per-resample macro F1 is the same sum as
:func:`cov3d.training.metrics.macro_f1` (scikit-learn's, zero_division 0), in
array form; tests check the two agree on every resample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import binomtest, chi2

from cov3d.errors import Cov3dError
from cov3d.labels import SEVERITY_CODES, SEVERITY_NAMES
from cov3d.training.metrics import macro_f1

RESAMPLES = 2000  # bootstrap resamples unless told otherwise
LEVEL = 0.95  # the confidence level of every interval
SEED = 0
MCNEMAR_EXACT_BELOW = 25  # discordant pairs under which McNemar's test is the exact binomial one
SMALL_STRATUM = 5  # classes with fewer scans than this are flagged: their resamples barely vary


def bootstrap_indices(strata: Sequence[int], resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """A (resamples, n) matrix of scan indices: column j draws, with replacement, from the scans of j's stratum.

    Deterministic from `seed`. Stratifying keeps every class's count fixed, so
    no resample lacks a class that the split has.
    """
    strata = np.asarray(strata)
    if resamples < 1:
        raise Cov3dError(f"--resamples must be at least 1, got {resamples}")
    rng = np.random.default_rng(seed)
    indices = np.empty((resamples, len(strata)), dtype=np.int64)
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        indices[:, members] = members[rng.integers(0, len(members), size=(resamples, len(members)))]
    return indices


def macro_f1_rows(truth: np.ndarray, predicted: np.ndarray, classes: Sequence[int] | None = None) -> np.ndarray:
    """Macro F1 of each row of (B, n) label arrays, as :func:`cov3d.training.metrics.macro_f1` computes it.

    With `classes`, the mean over those classes; with None, over the classes
    true or predicted in that row. A class's F1 is 2·TP / (2·TP + FP + FN), 0
    where it is neither true nor predicted (zero_division 0).
    """
    truth, predicted = np.atleast_2d(truth), np.atleast_2d(predicted)
    labels = np.asarray(sorted(set(np.unique(truth)) | set(np.unique(predicted))) if classes is None else classes)
    return _f1_of_slots(_slot(truth, labels), _slot(predicted, labels), len(labels), classes is not None)


def _slot(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each value's index in `labels`, len(labels) for values not among them."""
    order = np.argsort(labels)
    found = np.searchsorted(labels[order], values).clip(0, len(labels) - 1)
    slot = order[found]
    return np.where(labels[slot] == values, slot, len(labels))


def _f1_of_slots(truth: np.ndarray, predicted: np.ndarray, k: int, fixed: bool) -> np.ndarray:
    """Macro F1 of each row of (B, n) class slots 0…k-1 (slot k: a label scored for no class, yet counted as a
    false positive or negative of the others)."""
    b = truth.shape[0]
    rows = np.arange(b)[:, None]
    # every row's confusion counts by one bincount over (row, true, predicted)
    counts = np.bincount(((rows * (k + 1) + truth) * (k + 1) + predicted).ravel(), minlength=b * (k + 1) ** 2)
    confusion = counts.reshape(b, k + 1, k + 1)
    tp = np.diagonal(confusion, axis1=1, axis2=2)[:, :k]
    denominator = confusion.sum(axis=2)[:, :k] + confusion.sum(axis=1)[:, :k]  # support + predicted: 2·TP+FP+FN
    f1 = np.divide(2 * tp, denominator, out=np.zeros(tp.shape, dtype=float), where=denominator > 0)
    if fixed:
        return f1.mean(axis=1)
    return f1.sum(axis=1) / np.maximum((denominator > 0).sum(axis=1), 1)


def auc_rows(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of (B, n) binary truth and scores (Mann-Whitney, ties counted half); NaN with one class."""
    truth, scores = np.atleast_2d(truth).astype(bool), np.atleast_2d(scores)
    values, position = np.unique(scores, return_inverse=True)  # each score's rank among the distinct scores
    return _auc_of_positions(truth, position.reshape(scores.shape), len(values))


def _auc_of_positions(truth: np.ndarray, position: np.ndarray, m: int) -> np.ndarray:
    """ROC AUC of each row from each scan's rank 0…m-1 among the m distinct scores."""
    b = truth.shape[0]
    flat = (np.arange(b)[:, None] * m + position).ravel()
    # per row, how many positives and how many scans hold each distinct score
    positive_counts = np.bincount(flat[truth.ravel()], minlength=b * m).reshape(b, m)
    negative_counts = np.bincount(flat, minlength=b * m).reshape(b, m) - positive_counts
    below = np.cumsum(negative_counts, axis=1) - negative_counts  # negatives scored lower
    pairs = (positive_counts * (below + negative_counts / 2)).sum(axis=1)
    positives, negatives = positive_counts.sum(axis=1), negative_counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = pairs / (positives * negatives)
    return np.where((positives > 0) & (negatives > 0), auc, np.nan)


@dataclass
class Interval:
    """A score on the scans, and its bootstrap percentile interval."""

    estimate: float | None
    low: float | None
    high: float | None

    def to_json(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}

    def describe(self, digits: int = 3) -> str:
        """'0.912 [0.881, 0.940]', or '-' for no score."""
        if self.estimate is None:
            return "-"
        if self.low is None:
            return f"{self.estimate:.{digits}f}"
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def percentile_interval(estimate: float | None, resampled: np.ndarray, level: float = LEVEL) -> Interval:
    """The central `level` interval of the finite resampled scores (None when there are none)."""
    finite = np.asarray(resampled, dtype=float)
    finite = finite[np.isfinite(finite)]
    if estimate is None or not finite.size:
        return Interval(estimate, None, None)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Interval(float(estimate), float(low), float(high))


@dataclass
class Scored:
    """One model's answers on labelled scans, as arrays: the input of every statistic here.

    `severity_truth` and `severity_predicted` are 0 where a scan has no severity
    label or no severity prediction; severity scores use the scans with both.
    """

    scans: list[str]  # each scan's key: its path relative to the dataset root, as the catalog has it
    covid: np.ndarray  # 1 covid, 0 non-covid (truth)
    probability: np.ndarray  # P(covid)
    predicted: np.ndarray  # 1 where predicted covid
    severity_truth: np.ndarray
    severity_predicted: np.ndarray

    def __post_init__(self) -> None:
        self.covid = np.asarray(self.covid, dtype=int)
        self.probability = np.asarray(self.probability, dtype=float)
        self.predicted = np.asarray(self.predicted, dtype=int)
        self.severity_truth = np.asarray(self.severity_truth, dtype=int)
        self.severity_predicted = np.asarray(self.severity_predicted, dtype=int)

    @property
    def severity_mask(self) -> np.ndarray:
        return (self.severity_truth > 0) & (self.severity_predicted > 0)

    @property
    def strata(self) -> np.ndarray:
        """Each scan's stratum: 0 non-covid, 1–4 mild…critical (scored for severity), 5 other covid scans."""
        return np.where(self.covid == 0, 0, np.where(self.severity_mask, self.severity_truth, 5))

    def subset(self, keep: np.ndarray) -> Scored:
        keep = np.asarray(keep)
        return Scored([s for s, k in zip(self.scans, keep) if k], self.covid[keep], self.probability[keep],
                      self.predicted[keep], self.severity_truth[keep], self.severity_predicted[keep])

    def __len__(self) -> int:
        return len(self.scans)


METRICS = ("presence_macro_f1", "presence_accuracy", "presence_roc_auc", "severity_macro_f1")


def _resampled(scored: Scored, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric on each resample (rows of `indices`)."""
    # class slots and score ranks are found once on the scans, then indexed: no per-resample search or sort
    truth = scored.covid[indices]
    presence = np.array([0, 1])
    values, position = np.unique(scored.probability, return_inverse=True)
    out = {
        "presence_macro_f1": _f1_of_slots(_slot(scored.covid, presence)[indices],
                                          _slot(scored.predicted, presence)[indices], 2, True),
        "presence_accuracy": (truth == scored.predicted[indices]).mean(axis=1),
        "presence_roc_auc": _auc_of_positions(truth.astype(bool), position[indices], len(values)),
    }
    # stratified resampling keeps severity-labelled scans in the columns of severity-labelled scans
    columns = np.flatnonzero(scored.severity_mask)
    if columns.size:
        picked = indices[:, columns]
        # the classes true or predicted in each resample, as macro_f1 without `classes` takes them
        true, guessed = scored.severity_truth[columns], scored.severity_predicted[columns]
        labels = np.asarray(sorted(set(true.tolist()) | set(guessed.tolist())))
        slots = np.zeros(len(scored), dtype=np.int64)
        slots[columns], guessed_slots = _slot(true, labels), np.zeros(len(scored), dtype=np.int64)
        guessed_slots[columns] = _slot(guessed, labels)
        out["severity_macro_f1"] = _f1_of_slots(slots[picked], guessed_slots[picked], len(labels), False)
    else:
        out["severity_macro_f1"] = np.full(len(indices), np.nan)
    return out


def point_scores(scored: Scored) -> dict[str, float | None]:
    """The metrics on the scans themselves, with cov3d's metric functions (None where undefined)."""
    from sklearn.metrics import roc_auc_score

    two_classes = len(set(scored.covid.tolist())) == 2
    mask = scored.severity_mask
    return {
        "presence_macro_f1": macro_f1(scored.covid, scored.predicted, [0, 1]) if len(scored) else None,
        "presence_accuracy": float(np.mean(scored.covid == scored.predicted)) if len(scored) else None,
        "presence_roc_auc": float(roc_auc_score(scored.covid, scored.probability)) if two_classes else None,
        "severity_macro_f1": macro_f1(scored.severity_truth[mask], scored.severity_predicted[mask])
        if mask.any() else None,
    }


def intervals(scored: Scored, resamples: int = RESAMPLES, seed: int = SEED,
              level: float = LEVEL) -> dict[str, Interval]:
    """Every metric of :data:`METRICS` with its stratified bootstrap interval."""
    if not len(scored):
        return {name: Interval(None, None, None) for name in METRICS}
    estimates = point_scores(scored)
    if resamples == 0:  # scores without intervals
        return {name: Interval(estimates[name], None, None) for name in METRICS}
    resampled = _resampled(scored, bootstrap_indices(scored.strata, resamples, seed))
    return {name: percentile_interval(estimates[name], resampled[name], level) for name in METRICS}


def bootstrap_record(resamples: int, seed: int, level: float = LEVEL) -> dict:
    """What metrics.json says about how its intervals were made."""
    return {"resamples": resamples, "seed": seed, "level": level, "method": "percentile",
            "stratified_by": "true class (non-covid, mild, moderate, severe, critical, covid not scored for "
                             "severity)"}


def mcnemar(first_right: np.ndarray, second_right: np.ndarray) -> dict:
    """McNemar's test of equal accuracy on paired answers: exact binomial under 25 discordant pairs, else χ²
    with continuity correction. `first_right`/`second_right` say whether each model was right on each scan."""
    first_right, second_right = np.asarray(first_right, bool), np.asarray(second_right, bool)
    b = int(np.sum(first_right & ~second_right))  # only the first model right
    c = int(np.sum(~first_right & second_right))
    discordant = b + c
    if discordant == 0:
        return {"first_only_right": b, "second_only_right": c, "method": "exact", "statistic": None, "p_value": 1.0}
    if discordant < MCNEMAR_EXACT_BELOW:
        return {"first_only_right": b, "second_only_right": c, "method": "exact", "statistic": None,
                "p_value": float(binomtest(b, discordant, 0.5).pvalue)}
    statistic = (abs(b - c) - 1) ** 2 / discordant
    return {"first_only_right": b, "second_only_right": c, "method": "chi-square, continuity-corrected",
            "statistic": float(statistic), "p_value": float(chi2.sf(statistic, 1))}


def align(first: Scored, second: Scored) -> tuple[Scored, Scored]:
    """Both models' answers on the scans they share, in the same order; a Cov3dError when the truths differ."""
    index = {scan: i for i, scan in enumerate(second.scans)}
    shared = [i for i, scan in enumerate(first.scans) if scan in index]
    if not shared:
        raise Cov3dError("the two models share no scored scan; compare them on the same split of the same data")
    a = first.subset(np.isin(np.arange(len(first)), shared))
    order = np.array([index[scan] for scan in a.scans])
    b = Scored([second.scans[i] for i in order], second.covid[order], second.probability[order],
               second.predicted[order], second.severity_truth[order], second.severity_predicted[order])
    differing = [s for s, x, y, u, v in zip(a.scans, a.covid, b.covid, a.severity_truth, b.severity_truth)
                 if (x, u) != (y, v)]
    if differing:
        raise Cov3dError(f"the two evaluations label {len(differing)} shared scan(s) differently (first: "
                         f"'{differing[0]}'); compare evaluations of the same data with the same severity files")
    return a, b


def paired_comparison(first: Scored, second: Scored, resamples: int = RESAMPLES, seed: int = SEED,
                      level: float = LEVEL) -> dict:
    """first − second on the scans both scored: each metric's difference with a paired bootstrap interval
    (the same resamples for both), and McNemar's test of presence accuracy."""
    a, b = align(first, second)
    if resamples:
        indices = bootstrap_indices(a.strata, resamples, seed)
        ra, rb = _resampled(a, indices), _resampled(b, indices)
    else:  # differences without intervals
        ra = rb = {name: np.array([]) for name in METRICS}
    pa, pb = point_scores(a), point_scores(b)
    # severity is compared only where both models scored the same scans for it (a baseline without a severity
    # model has no severity score)
    comparable = bool((a.severity_mask == b.severity_mask).all())
    differences = {}
    for name in METRICS:
        estimate = None if pa[name] is None or pb[name] is None else pa[name] - pb[name]
        if name == "severity_macro_f1" and not comparable:
            estimate = None
        interval = percentile_interval(estimate, ra[name] - rb[name], level)
        differences[name] = {"first": pa[name], "second": pb[name], **interval.to_json()}
    return {"scans": len(a), "differences": differences,
            "mcnemar_presence_accuracy": mcnemar(a.covid == a.predicted, b.covid == b.predicted),
            "bootstrap": bootstrap_record(resamples, seed, level)}


def group_scores(scored: Scored, groups: Sequence[str], resamples: int = RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> dict:
    """Every metric per group with its interval (each group bootstrapped on its own), and for each metric
    the worst group, its score and the gap best − worst over the groups where the metric is defined."""
    groups = np.asarray([str(g) for g in groups])
    per_group = {}
    for offset, name in enumerate(sorted(set(groups.tolist()))):
        part = scored.subset(groups == name)
        scores = intervals(part, resamples, seed + offset, level)
        per_group[name] = {"scans": len(part), **{metric: scores[metric].to_json() for metric in METRICS}}
    summary = {}
    for metric in METRICS:
        defined = {g: v[metric]["estimate"] for g, v in per_group.items() if v[metric]["estimate"] is not None}
        if not defined:
            summary[metric] = {"worst_group": None, "worst": None, "best_group": None, "best": None, "gap": None}
            continue
        worst, best = min(defined, key=defined.get), max(defined, key=defined.get)
        summary[metric] = {"worst_group": worst, "worst": defined[worst], "best_group": best, "best": defined[best],
                           "gap": defined[best] - defined[worst]}
    return {"groups": per_group, "summary": summary, "bootstrap": bootstrap_record(resamples, seed, level)}


def scan_key(path: str | Path, root: Path | None) -> str:
    """How scans are named across evaluations and group files: the path relative to the dataset root,
    '/'-separated (``validation/covid/ct_scan_3``), as the catalog keys them; the path itself outside it."""
    path = Path(path)
    if root is not None:
        for candidate, base in ((path, Path(root)), (path.resolve(), Path(root).resolve())):
            try:
                return candidate.relative_to(base).as_posix()
            except ValueError:
                continue
    return path.as_posix()


def scored_from_rows(rows: Sequence[dict], root: Path | None = None,
                     probabilities: Sequence[float] | None = None) -> Scored:
    """A Scored from the rows of `cov3d evaluate`'s predictions.csv (scan, path, probability, prediction,
    severity, label, true_severity); `probabilities` replaces the CSV's rounded P(covid) when given."""
    names = {name: code for name, code in zip(SEVERITY_NAMES, SEVERITY_CODES)}
    try:
        probability = [float(r["probability"]) for r in rows] if probabilities is None else list(probabilities)
        return Scored(
            scans=[scan_key(r["path"], root) for r in rows],
            covid=[int(r["label"] == "covid") for r in rows],
            probability=probability,
            predicted=[int(r["prediction"] == "covid") for r in rows],
            severity_truth=[names.get(r.get("true_severity") or "", 0) for r in rows],
            severity_predicted=[names.get(r.get("severity") or "", 0) for r in rows],
        )
    except (KeyError, ValueError) as error:
        raise Cov3dError(f"prediction rows lack what scoring needs ({error}); use a predictions.csv written by "
                         "`cov3d evaluate` (it has label and true_severity columns)") from None


# metrics.json's name of each metric: (section, key)
SECTIONS = {"presence_macro_f1": ("presence", "macro_f1"), "presence_accuracy": ("presence", "accuracy"),
            "presence_roc_auc": ("presence", "roc_auc"), "severity_macro_f1": ("severity", "macro_f1")}


def add_intervals(metrics: dict, scored: Scored, resamples: int = RESAMPLES, seed: int = SEED,
                  level: float = LEVEL) -> dict:
    """Add each score's interval to `cov3d evaluate`'s metrics: metrics["ci"][section][key] = {estimate, low,
    high} (severity only where it was scored), and how they were made under metrics["bootstrap"]."""
    found = intervals(scored, resamples, seed, level)
    metrics["ci"] = {}
    # a stratum of one scan is the same scan in every resample: it adds no spread, so intervals over few
    # scans per class understate the uncertainty; say which
    names = ("non-covid", "mild", "moderate", "severe", "critical", "covid, severity not scored")
    counts = np.bincount(scored.strata, minlength=6)
    for name, (section, key) in SECTIONS.items():
        if metrics.get(section):
            metrics["ci"].setdefault(section, {})[key] = found[name].to_json()
    metrics["bootstrap"] = bootstrap_record(resamples, seed, level)
    metrics["bootstrap"]["strata"] = {name: int(n) for name, n in zip(names, counts) if n}
    metrics["bootstrap"]["small_strata"] = [name for name, n in zip(names, counts) if 0 < n < SMALL_STRATUM]
    return metrics

