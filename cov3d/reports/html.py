"""One self-contained HTML report of an evaluation: every picture inside the file as a base64 PNG.

It is drawn from plain data (the metrics dict of `cov3d evaluate`, per-scan
arrays, history files, slices as arrays), so that the page opens anywhere,
offline, and can be mailed as one file. It has no script.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cov3d.atomic import write_text
from cov3d.labels import PRESENCE_NAMES, SEVERITY_NAMES
from cov3d.reports.figures import pyplot

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1.5em; max-width: 1100px; color: #222;
       background: #fff; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; } td, th { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #f0f3f7; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; } img { max-width: 100%; }
.mistake { display: inline-block; margin: .4em; text-align: center; font-size: .85em; }
.note { color: #555; font-size: .9em; }
"""

METRIC_LABELS = {"presence_macro_f1": ("presence", "macro_f1", "Presence macro F1"),
                 "presence_accuracy": ("presence", "accuracy", "Presence accuracy"),
                 "presence_roc_auc": ("presence", "roc_auc", "Presence ROC AUC"),
                 "severity_macro_f1": ("severity", "macro_f1", "Severity macro F1")}


def _png(fig, dpi: int = 100) -> str:
    """A figure as a data: URI of a PNG (and the figure closed)."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def file_uri(path: Path) -> str:
    """A PNG file as a data: URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _img(uri: str, alt: str, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img src="{uri}" alt="{html.escape(alt)}"{size}>'


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _interval(entry: dict | None) -> str:
    if not entry or entry.get("low") is None:
        return "–"
    return f"[{entry['low']:.3f}, {entry['high']:.3f}]"


def confusion_figure(matrix: Sequence[Sequence[int]], names: Sequence[str], title: str) -> str:
    plt = pyplot()
    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 1.1 * len(names) + 1.4))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > matrix.max() / 2 else "black")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names,
           xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return _png(fig)


def curve_figures(truth: np.ndarray, scores: np.ndarray) -> list[tuple[str, str]]:
    """ROC and precision-recall curves of presence; none with one class."""
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    truth, scores = np.asarray(truth), np.asarray(scores, dtype=float)
    if len(set(truth.tolist())) < 2:
        return []
    plt = pyplot()
    fpr, tpr, _ = roc_curve(truth, scores)
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.plot(fpr, tpr, label=f"AUC {auc(fpr, tpr):.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, presence", xlim=(0, 1),
           ylim=(0, 1.01))
    ax.legend(loc="lower right")
    fig.tight_layout()
    roc = _png(fig)
    precision, recall, _ = precision_recall_curve(truth, scores)
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.step(recall, precision, where="post", label=f"AP-like area {auc(recall, precision):.3f}")
    ax.axhline(truth.mean(), linestyle="--", color="grey", linewidth=0.8, label=f"prevalence {truth.mean():.2f}")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall, presence", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left")
    fig.tight_layout()
    return [("ROC curve", roc), ("Precision-recall curve", _png(fig))]


def slice_figure(image: np.ndarray) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(2.2, 2.2))
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    fig.tight_layout(pad=0.1)
    return _png(fig, dpi=80)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = [f'<td class="n">{html.escape(str(c))}</td>' if i >= numeric_from else f"<td>{html.escape(str(c))}</td>"
                 for i, c in enumerate(row)]
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def _metrics_section(metrics: dict) -> str:
    ci = metrics.get("ci") or {}
    rows = []
    for section, key, label in METRIC_LABELS.values():
        if not metrics.get(section):
            continue
        rows.append([label, _number(metrics[section].get(key)), _interval((ci.get(section) or {}).get(key))])
    boot = metrics.get("bootstrap")
    note = (f'<p class="note">{boot["level"]:.0%} intervals: {boot["resamples"]} bootstrap resamples stratified by '
            f'true class, seed {boot["seed"]}, percentile method.</p>' if boot else "")
    per_class = [[f"F1 {name}", _number(v), ""] for name, v in (metrics["presence"].get("f1") or {}).items()]
    if metrics.get("severity"):
        per_class += [[f"F1 {name}", _number(v), ""] for name, v in metrics["severity"]["f1"].items()]
    fitted = " (fitted on these scans: in-sample scores)" if metrics.get("threshold_in_sample") else ""
    head = (f"<p>{metrics.get('split', '')}: {metrics.get('scans')} scans, {metrics.get('failed', 0)} failed; "
            f"threshold {metrics.get('threshold', 0.5):.4f} ({html.escape(str(metrics.get('threshold_method', '')))}"
            f"{fitted}); models: {html.escape(', '.join(map(str, metrics.get('models', []))))}</p>")
    return ("<h2>Scores</h2>" + head + _table(["metric", "score", "95% CI"], rows + per_class) + note)


def _comparison_section(comparison: dict) -> str:
    rows = []
    for name, (_, _, label) in METRIC_LABELS.items():
        d = comparison["differences"].get(name) or {}
        if d.get("estimate") is None:
            continue
        rows.append([label, _number(d["first"]), _number(d["second"]), f"{d['estimate']:+.3f}",
                     "–" if d["low"] is None else f"[{d['low']:+.3f}, {d['high']:+.3f}]"])
    test = comparison["mcnemar_presence_accuracy"]
    return (f"<h2>Against {html.escape(comparison['baseline'])}</h2><p>{comparison['scans']} shared scans; "
            "paired bootstrap of each difference (this − baseline).</p>"
            + _table(["metric", "this", "baseline", "difference", "95% CI"], rows)
            + f"<p>McNemar's test ({html.escape(test['method'])}) of presence accuracy: {test['first_only_right']} "
              f"scans right only here, {test['second_only_right']} only in the baseline, "
              f"p = {test['p_value']:.4g}.</p>")


def _groups_section(grouped: dict) -> str:
    head = [grouped["column"], "scans", *(label for _, _, label in METRIC_LABELS.values())]
    rows = []
    for name, scores in grouped["groups"].items():
        cells = []
        for metric in METRIC_LABELS:
            entry = scores[metric]
            cells.append("–" if entry["estimate"] is None else f"{entry['estimate']:.3f} {_interval(entry)}")
        rows.append([name, scores["scans"], *cells])
    summary = []
    for metric, (_, _, label) in METRIC_LABELS.items():
        s = grouped["summary"][metric]
        if s["worst_group"] is not None:
            summary.append([label, s["worst_group"], _number(s["worst"]), s["best_group"], _number(s["best"]),
                            _number(s["gap"])])
    return (f"<h2>By {html.escape(grouped['column'])}</h2><p class=\"note\">From {html.escape(grouped['file'])}; "
            "each group bootstrapped on its own.</p>" + _table(head, rows)
            + _table(["metric", "worst group", "worst", "best group", "best", "gap"], summary))


def write_report(
    path: Path,
    metrics: dict,
    truth: np.ndarray,
    scores: np.ndarray,
    *,
    title: str = "cov3d evaluation",
    histories: Sequence[tuple[str, str]] = (),
    mistakes: Sequence[dict] = (),
    slices: Sequence[np.ndarray | None] = (),
    gradcams: Sequence[str | None] = (),
) -> Path:
    """Write the report to `path` (whole or not at all).

    `metrics` is evaluate's metrics.json; `truth` (1 covid) and `scores`
    (P(covid)) draw the ROC and PR curves; `histories` are (run name, PNG data
    URI) of training curves; `mistakes` the most confident errors (scan, truth,
    probability) with `slices`, each one's mid-slice in 0…1 or None, and `gradcams`, PNG data URIs of their
    Grad-CAM montages (or None).
    """
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class=\"note\">Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by cov3d.</p>",
             _metrics_section(metrics)]
    if metrics.get("comparison"):
        parts.append(_comparison_section(metrics["comparison"]))
    figures = [_img(confusion_figure(metrics["presence"]["confusion_matrix"], PRESENCE_NAMES,
                                     "Presence confusion matrix"), "presence confusion matrix")]
    if metrics.get("severity"):
        figures.append(_img(confusion_figure(metrics["severity"]["confusion_matrix"], SEVERITY_NAMES,
                                             "Severity confusion matrix"), "severity confusion matrix"))
    parts.append("<h2>Confusion matrices</h2><div class=\"figures\">" + "".join(figures) + "</div>")
    curves = curve_figures(truth, scores)
    if curves:
        parts.append("<h2>Curves</h2><div class=\"figures\">" + "".join(_img(uri, alt) for alt, uri in curves)
                     + "</div>")
    if metrics.get("groups"):
        parts.append(_groups_section(metrics["groups"]))
    if histories:
        parts.append("<h2>Training</h2>" + "".join(f"<h3>{html.escape(name)}</h3>{_img(uri, name + ' history')}"
                                                   for name, uri in histories))
    if mistakes:
        cards = []
        for mistake, image in zip(mistakes, list(slices) + [None] * (len(mistakes) - len(slices))):
            picture = _img(slice_figure(image), f"mid-slice of {mistake['scan']}") if image is not None else \
                "<p>(no slice)</p>"
            cards.append(f"<div class=\"mistake\">{picture}<br>{html.escape(mistake['scan'])}<br>true "
                         f"{html.escape(mistake['truth'])}, P(covid) {mistake['probability']:.3f}</div>")
        parts.append("<h2>Most confident mistakes</h2><p class=\"note\">Presence errors with P(covid) farthest "
                     "from 0.5; the middle axial slice of each.</p>" + "".join(cards))
        maps = [(m, uri) for m, uri in zip(mistakes, gradcams) if uri]
        if maps:
            parts.append("<h2>Grad-CAM of the mistakes</h2><p class=\"note\">Presence maps (as <code>cov3d explain</code> "
                         "draws them) on the four most attended slices.</p>"
                         + "".join(f"<h3>{html.escape(m['scan'])}</h3>{_img(uri, 'Grad-CAM of ' + m['scan'])}"
                                   for m, uri in maps))
    elif len(truth):
        parts.append("<h2>Most confident mistakes</h2><p>No presence mistake.</p>")
    parts.append("</body></html>\n")
    write_text(Path(path), "\n".join(parts))
    return Path(path)


def history_uri(history: Path, workdir: Path) -> str:
    """A run's training curves as a PNG data URI (drawn by :func:`cov3d.reports.curves.plot_history`)."""
    from cov3d.reports.curves import plot_history

    image = plot_history(history, Path(workdir) / "history.png")
    return file_uri(image)
