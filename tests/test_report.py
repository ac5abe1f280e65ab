"""The HTML report of `cov3d evaluate --report`: one self-contained file, checked as text and in a real browser."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cov3d.cli import app
from cov3d.inference import stats
from cov3d.inference.stats import Scored
from cov3d.reports.html import write_report

runner = CliRunner()
IMAGE = re.compile(r'<img src="([^"]*)"')


def synthetic_metrics(n: int = 120) -> tuple[dict, Scored]:
    rng = np.random.default_rng(0)
    covid = (rng.random(n) < 0.5).astype(int)
    probability = np.clip(covid * 0.4 + rng.random(n) * 0.6, 0, 1)
    severity = np.where(covid == 1, rng.integers(1, 5, n), 0)
    scored = Scored([f"validation/s{i}" for i in range(n)], covid, probability, (probability >= 0.5).astype(int),
                    severity, np.where(covid == 1, rng.integers(1, 5, n), 0))
    points = stats.point_scores(scored)
    metrics = {"split": "validation", "scans": n, "failed": 0, "threshold": 0.5, "threshold_method": "given",
               "models": ["runs/a"],
               "presence": {"macro_f1": points["presence_macro_f1"], "accuracy": points["presence_accuracy"],
                            "roc_auc": points["presence_roc_auc"], "f1": {"non-covid": 0.5, "covid": 0.6},
                            "confusion_matrix": [[30, 10], [5, 75]]},
               "severity": {"scans": 60, "macro_f1": points["severity_macro_f1"],
                            "f1": {"mild": 0.1, "moderate": 0.2, "severe": 0.3, "critical": 0.4},
                            "confusion_matrix": np.eye(4, dtype=int).tolist()}}
    stats.add_intervals(metrics, scored, 200)
    metrics["groups"] = {"file": "groups.csv", "column": "site",
                         **stats.group_scores(scored, np.where(np.arange(n) % 2, "A", "B"), 100)}
    metrics["comparison"] = {"baseline": "runs/b", **stats.paired_comparison(scored, scored, 100)}
    return metrics, scored


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    metrics, scored = synthetic_metrics()
    path = tmp_path_factory.mktemp("report") / "report.html"
    mistakes = [{"scan": "validation/s1", "truth": "covid", "probability": 0.01},
                {"scan": "validation/s2", "truth": "non-covid", "probability": 0.97}]
    slices = [np.linspace(0, 1, 64 * 64).reshape(64, 64), None]
    return write_report(path, metrics, scored.covid, scored.probability, mistakes=mistakes, slices=slices)


def test_the_report_is_one_file_with_every_picture_inside(report):
    text = report.read_text(encoding="utf-8")
    sources = IMAGE.findall(text)
    assert len(sources) == 5  # 2 confusion matrices, ROC, PR, 1 mid-slice (the other has none)
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
            assert image.width > 50 and image.height > 50
    assert "http" not in text.replace("http-equiv", "")  # nothing is fetched
    for heading in ("Scores", "Against runs/b", "Confusion matrices", "Curves", "By site", "Most confident mistakes"):
        assert f">{heading}<" in text, heading
    assert "95% CI" in text and "(no slice)" in text and "McNemar" in text


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


# Counts decoded pictures into the title once the page has loaded, for --dump-dom to read back.
PROBE = ("<script>window.addEventListener('load', () => { const all = [...document.images]; document.title = "
         "'decoded ' + all.filter(i => i.complete && i.naturalWidth > 0).length + ' of ' + all.length; });</script>")


def _open(browser: str, page: Path, tmp_path: Path, *mode: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-extensions", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
               "--virtual-time-budget=3000", "--window-size=1200,1600", *mode, page.as_uri()]
    env = {**os.environ, "HOME": str(tmp_path)}
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)


def _console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "Uncaught" in line or "ERROR:CONSOLE" in line
            or ("CONSOLE" in line and "error" in line.lower())]


def _probed(page: Path, tmp_path: Path) -> Path:
    copy = tmp_path / f"probed-{page.name}"
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    return copy


def test_the_report_opens_in_a_headless_browser(report, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium found (apt-get install chromium)")
    dom = _open(browser, _probed(report, tmp_path), tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<title>decoded 5 of 5</title>" in dom.stdout, re.findall(r"<title>.*?</title>", dom.stdout)
    assert not _console_errors(dom.stderr), _console_errors(dom.stderr)
    shot = tmp_path / "shot.png"
    taken = _open(browser, report, tmp_path, f"--screenshot={shot}")
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    assert not _console_errors(taken.stderr)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 10  # text, tables and figures on white: not a blank page


def test_the_browser_check_sees_a_broken_picture_and_a_script_error(tmp_path):
    # the control of the test above: the same probe and log check fail on a page that is broken
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium found (apt-get install chromium)")
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><html><head><title>x</title></head><body><img src=\"data:image/png;base64,"
                      "AAAA\"><script>undefinedFunction();</script></body></html>", encoding="utf-8")
    dom = _open(browser, _probed(broken, tmp_path), tmp_path, "--dump-dom")
    assert "<title>decoded 0 of 1</title>" in dom.stdout
    assert _console_errors(dom.stderr)


def test_evaluate_writes_the_report(trained_run, dataset, tmp_path):
    groups = tmp_path / "groups.csv"
    groups.write_text("scan,site\nct_scan_2,A\nct_scan_3,B\n", encoding="utf-8")
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["evaluate", str(dataset), "--model", str(trained_run), "--output-dir",
                                 str(tmp_path / "eval"), "--workers", "0", "--no-tta", "--device", "cpu",
                                 "--resamples", "50", "--groups", str(groups), "--group-by", "site",
                                 "--report", str(out), "--report-gradcam"])
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8")
    assert ">By site<" in text and ">Training<" in text  # the run's curves: --model is a run directory
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    wrong = sum(metrics["presence"]["confusion_matrix"][i][1 - i] for i in range(2))
    assert wrong > 0  # the tiny model errs on one of its two scans: the mistake sections are drawn
    assert text.count('alt="mid-slice of') == wrong
    assert text.count('alt="Grad-CAM of') == wrong
    assert f"Report: {out}" in " ".join(result.output.split())


def test_a_report_that_is_not_html_is_an_error(trained_run, dataset, tmp_path):
    result = runner.invoke(app, ["evaluate", str(dataset), "--model", str(trained_run), "--output-dir",
                                 str(tmp_path / "eval"), "--report", str(tmp_path / "report.pdf")])
    assert result.exit_code == 1 and "must end in .html" in result.output


def test_gradcam_without_a_report_is_an_error(trained_run, dataset, tmp_path):
    result = runner.invoke(app, ["evaluate", str(dataset), "--model", str(trained_run), "--output-dir",
                                 str(tmp_path / "eval"), "--report-gradcam"])
    assert result.exit_code == 1 and "--report-gradcam adds Grad-CAM maps to the report" in result.output
