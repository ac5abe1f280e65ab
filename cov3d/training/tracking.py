"""Weights & Biases: training dashboards, evaluation into the same run, model artifacts, model references.

fastai's own WandbCallback was checked with the installed fastai 2.8.12: it still
crashes in `before_fit` (TypeError from `vars()`, fastai issue #4173), so cov3d
logs through the wandb API directly. What a run holds:

- per epoch: losses, presence and severity macro F1, per-class F1, accuracy,
  learning rate, epoch time, training scans per second, and GPU memory on CUDA;
- at each epoch that improves the best presence or severity F1, and at the last
  epoch: presence and severity confusion matrices, presence ROC and
  precision-recall curves, and a predictions table of the validation scans with
  a mid-section image of each (sort by `error` to see the confident mistakes);
- at the end: the best-presence, best-severity and last checkpoints as versions
  of one model artifact, aliased `best-presence`, `best-severity` and `latest`.

The run's id is kept in the run directory (wandb.json) so that
`cov3d evaluate --wandb` logs into the same run.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cov3d import labels
from cov3d.atomic import write_text
from cov3d.labels import MILD, PRESENCE_NAMES, SEVERITY_NAMES
from cov3d.models.checkpoint import CONFIG, LAST, PRESENCE, SEVERITY
from cov3d.errors import Cov3dError

log = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")
RUN_FILE = "wandb.json"  # the W&B run of a run directory: entity, project, id
REFERENCE = "wandb:"
ALIASES = {PRESENCE: "best-presence", SEVERITY: "best-severity", LAST: "latest"}
PRESENCE_CLASSES = list(PRESENCE_NAMES)
SEVERITY_CLASSES = list(SEVERITY_NAMES)
TABLE_COLUMNS = ["scan", "label", "severity_label", "p_covid", "prediction", "error", *SEVERITY_NAMES,
                 "severity_prediction", "image"]


def resolve_mode(mode: str | None) -> str:
    mode = mode or os.environ.get("WANDB_MODE") or "online"
    if mode == "dryrun":  # wandb's old name for offline
        mode = "offline"
    if mode not in MODES:
        raise Cov3dError(f"W&B mode '{mode}' is not one of {', '.join(MODES)}")
    return mode


def _start(**options):
    import wandb

    try:
        return wandb.init(**options)
    except Exception as error:  # login, network or permission problems all mean: not logging
        raise Cov3dError(f"W&B could not start ({_first_line(error)}); "
                         "log in with `wandb login`, or use --wandb-mode offline") from None


def _first_line(error: Exception) -> str:
    """'Type: first line of the message', short enough for one line of output."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"


def artifact_name(directory: Path) -> str:
    """The model artifact of a run directory: its folder name, in the characters W&B allows."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"cov3d-{Path(directory).resolve().name}")


class WandbRun:
    """One W&B run mirroring one cov3d training run (rank 0 only)."""

    def __init__(self, config, run: Path, names: Sequence[str] = (), files: Sequence[Path] = ()):
        self.directory = Path(run)
        self.mode = resolve_mode(config.wandb_mode)
        self.lam = config.lam
        self.names, self.files = list(names), list(files)  # the validation scans, in split order
        self.images = None
        import wandb

        self.wandb = wandb
        # Inside a `wandb agent` (a sweep) wandb.init joins the sweep's run by itself, from the environment.
        self.run = _start(project=config.wandb_project, entity=config.wandb_entity, mode=self.mode,
                          dir=str(self.directory), name=self.directory.name, config=config.to_json(),
                          job_type="train")
        if self.mode != "disabled":
            write_text(self.directory / RUN_FILE, json.dumps(
                {"entity": self.run.entity, "project": self.run.project, "id": self.run.id}) + "\n")

    def log_epoch(self, row: dict, outputs=None, targets=None, panels: bool = False) -> None:
        """One epoch's scalars; with `panels`, also the plots and predictions table of this validation."""
        values = {k: v for k, v in row.items() if k not in ("epoch", "epochs") and v is not None}
        if panels and outputs is not None:
            values.update(self._panels(outputs, targets))
        self.run.log(values, step=int(row["epoch"]))

    def _panels(self, outputs, targets) -> dict:
        from cov3d.training.loss import probabilities

        probs = probabilities(outputs, self.lam).numpy()
        truth = targets.numpy()
        if self.images is None:
            self.images = [mid_section(file) for file in self.files]
        table = predictions_table(self.wandb, self.names, truth, probs, self.images)
        panels = {"validation/predictions": table,
                  **presence_plots(self.wandb, labels.is_covid(truth), labels.presence(probs))}
        panels.update(severity_plot(self.wandb, truth, probs))
        return {key if key.startswith("validation/") else f"validation/{key}": value for key, value in panels.items()}

    def finish(self, best: dict[str, float]) -> None:
        """Best scores in the summary; the checkpoints as aliased versions of the run's model artifact."""
        for name, score in best.items():
            self.run.summary[f"best_{name}"] = score
        for file, alias in ALIASES.items():
            path = self.directory / file
            if not path.is_file():
                continue
            artifact = self.wandb.Artifact(artifact_name(self.directory), type="model",
                                           description=f"cov3d checkpoint {file} of {self.directory.name}",
                                           metadata={"checkpoint": file, "best": best})
            artifact.add_file(str(path))
            if (self.directory / CONFIG).is_file():
                artifact.add_file(str(self.directory / CONFIG))
            self.run.log_artifact(artifact, aliases=[alias])

    def close(self) -> None:
        self.run.finish()


def mid_section(file: Path) -> np.ndarray:
    """The middle axial slice of a cached (1, D, H, W) volume in [0, 1], as 8-bit grey."""
    from cov3d.data.preprocess import load_cached

    volume = load_cached(Path(file)).float()
    middle = volume[0, volume.shape[1] // 2].clamp(0, 1).numpy()
    return (middle * 255).round().astype(np.uint8)


def predictions_table(wandb, names: Sequence[str], truth: np.ndarray, probs: np.ndarray, images=None):
    """One row per scan: labels, P(covid), severity probabilities, predictions, |error| and an image."""
    table = wandb.Table(columns=TABLE_COLUMNS)
    for index, name in enumerate(names):
        target = int(truth[index])
        covid = float(labels.presence(probs[index]))
        severity = labels.severity_given_covid(probs[index])
        table.add_data(
            name, PRESENCE_CLASSES[int(labels.is_covid(target))],
            labels.severity_name(target) if labels.has_severity(target) else "",
            covid, PRESENCE_CLASSES[int(covid >= 0.5)], abs(float(labels.is_covid(target)) - covid),
            *map(float, severity), labels.severity_name(labels.severity_index(severity)),
            wandb.Image(images[index], caption=name) if images is not None else None)
    return table


def presence_plots(wandb, truth: np.ndarray, p_covid: np.ndarray, threshold: float = 0.5) -> dict:
    """Confusion matrix, ROC and precision-recall curves of presence (the curves need both classes)."""
    truth = np.asarray(truth).astype(int)
    p_covid = np.asarray(p_covid, dtype=float)
    plots = {"presence_confusion": wandb.plot.confusion_matrix(
        y_true=truth.tolist(), preds=(p_covid >= threshold).astype(int).tolist(), class_names=PRESENCE_CLASSES,
        title="Presence confusion matrix")}
    if len(set(truth.tolist())) == 2:
        scores = np.stack([1 - p_covid, p_covid], axis=1)
        plots["presence_roc"] = wandb.plot.roc_curve(truth, scores, labels=PRESENCE_CLASSES, classes_to_plot=[1],
                                                     title="Presence ROC")
        plots["presence_pr"] = wandb.plot.pr_curve(truth, scores, labels=PRESENCE_CLASSES, classes_to_plot=[1],
                                                   title="Presence precision-recall")
    return plots


def severity_plot(wandb, truth: np.ndarray, probs: np.ndarray) -> dict:
    """The severity confusion matrix over scans with a severity label; none without such scans."""
    labelled = labels.has_severity(truth)
    if not labelled.any():
        return {}
    predicted = labels.covid_severity(probs[labelled]).argmax(axis=1)  # 0 mild … 3 critical, as class_names
    return {"severity_confusion": wandb.plot.confusion_matrix(
        y_true=(truth[labelled] - MILD).tolist(), preds=predicted.tolist(), class_names=SEVERITY_CLASSES,
        title="Severity confusion matrix")}


def log_evaluation(evaluation, models: Sequence[Path], *, mode: str | None = None, project: str = "cov3d",
                   entity: str | None = None) -> str:
    """Log `cov3d evaluate`'s metrics, plots and table: into the training run of the first model that is a
    run directory with a W&B run, else into a new run. Returns the run's path (entity/project/id)."""
    import wandb

    mode = resolve_mode(mode)
    previous = next((json.loads((Path(m) / RUN_FILE).read_text(encoding="utf-8")) for m in models
                     if Path(m).is_dir() and (Path(m) / RUN_FILE).is_file()), None)
    if previous:
        run = _start(id=previous["id"], project=previous["project"], entity=previous["entity"], mode=mode,
                     resume="allow", dir=str(Path(models[0])))
    else:
        run = _start(project=project, entity=entity, mode=mode, job_type="evaluate",
                     config={"models": [str(m) for m in models]})
    try:
        metrics = evaluation.metrics
        split = metrics["split"]
        values = {f"evaluate/{split}/{key}": value for key, value in _flat(metrics).items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool)}
        rows = evaluation.rows
        truth = np.array([row["label"] == "covid" for row in rows])
        p_covid = np.array([float(row["probability"]) for row in rows])
        plots = presence_plots(wandb, truth, p_covid, threshold=float(metrics["threshold"]))
        table = wandb.Table(columns=["scan", "path", "label", "true_severity", "p_covid", "prediction", "error",
                                     "severity_prediction"])
        for row, covid, p in zip(rows, truth, p_covid):
            table.add_data(row["scan"], row["path"], row["label"], row["true_severity"], float(p), row["prediction"],
                           abs(float(covid) - float(p)), row["severity"])
        plots["predictions"] = table
        values.update({f"evaluate/{split}/{key}": value for key, value in plots.items()})
        run.log(values)
        for key, value in values.items():
            if not isinstance(value, (int, float)):
                continue
            run.summary[key] = value
        return run.path if mode != "disabled" else ""
    finally:
        run.finish()


def _flat(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, name + "/"))
        else:
            flat[name] = value
    return flat


def is_reference(model: str | Path) -> bool:
    return str(model).startswith(REFERENCE)


def download_model(reference: str, root: Path | None = None) -> Path:
    """The checkpoint file of `wandb:ENTITY/PROJECT/NAME:ALIAS` (ALIAS defaults to latest), downloaded."""
    spec = str(reference)[len(REFERENCE):]
    if not re.fullmatch(r"[^/:\s]+/[^/:\s]+/[^/:\s]+(:[^/:\s]+)?", spec):
        raise Cov3dError(f"--model {reference} is not a W&B model reference; write wandb:ENTITY/PROJECT/NAME:ALIAS, "
                         "for example wandb:me/cov3d/cov3d-small-l0.1:best-presence")
    if ":" not in spec:
        spec += ":latest"
    mode = os.environ.get("WANDB_MODE", "online")
    if mode in ("offline", "dryrun", "disabled"):
        raise Cov3dError(f"--model {reference} needs W&B online, but WANDB_MODE is {mode}; unset it, or download "
                         "the artifact where there is network and pass the checkpoint file")
    import wandb

    try:
        artifact = wandb.Api().artifact(spec, type="model")
        folder = Path(artifact.download(root=str(root) if root else None))
    except Exception as error:  # no network, no login, no such artifact: all mean the model is not here
        raise Cov3dError(f"could not download W&B model {spec} ({_first_line(error)}); check the "
                         "name and alias, your network and `wandb login`") from None
    checkpoints = sorted(folder.glob("*.pt"))
    if len(checkpoints) != 1:
        raise Cov3dError(f"W&B artifact {spec} holds {len(checkpoints)} checkpoints, not one; it was not written by "
                         "cov3d train")
    return checkpoints[0]
