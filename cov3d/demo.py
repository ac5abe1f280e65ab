"""The whole job offline: synthetic data → preprocess → train → evaluate → predict.

Trains from scratch (no pretrained weights, no network) on CPU at a small size,
so a newcomer sees cov3d learn on a fresh machine in minutes. It uses the
from-scratch recipe that `--no-pretrained` gives any run (one-cycle maximum LR
1e-3, batch size 8, no dropout; see docs/training.md), for 12 epochs. Run again
with the same --output, an interrupted demo goes on where it stopped.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cov3d.atomic import check_writable, write_text
from cov3d.models.checkpoint import LAST
from cov3d.errors import Cov3dError
from cov3d.inference.evaluate import Evaluation, evaluate, write_outputs
from cov3d.inference.predict import find_inputs, load_ensemble, predict_scans, prediction_rows, write_csv, write_submission
from cov3d.data.preprocess import Size, preprocess_dataset, read_manifest
from cov3d.data.synth import synthesize
from cov3d.training.config import check_seed
from cov3d.training.trainer import RECIPES, TrainConfig, TrainResult, train


STATE = ".cov3d-demo.json"  # the demo's settings and progress, so that an interrupted demo can go on


def _load_state(output: Path) -> dict:
    try:
        return json.loads((output / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _save_state(output: Path, state: dict) -> None:
    write_text(output / STATE, json.dumps(state) + "\n")


def _resume_state(output: Path, settings: dict) -> dict:
    """A new demo folder's state, or the state of the interrupted demo in `output` to go on with."""
    if output.exists() and any(output.iterdir()):
        state = _load_state(output)
        if not state:
            raise Cov3dError(f"'{output}' is not empty; give the demo a new --output folder")
        if state.get("settings") != settings:
            raise Cov3dError(f"'{output}' holds a demo with other settings ({state.get('settings')}); run it with "
                             "those, or give a new --output folder")
        if state.get("finished"):
            raise Cov3dError(f"'{output}' holds a finished demo; give the demo a new --output folder")
        return state
    state = {"settings": settings}
    _save_state(output, state)
    return state


@dataclass
class DemoResult:
    data: Path
    run: Path
    training: TrainResult
    evaluation: Evaluation
    evaluation_dir: Path
    predictions: Path
    submission: Path
    test_scans: int


def run_demo(
    output: Path,
    *,
    scans: int = 160,
    epochs: int = 12,
    depth: int = 16,
    width: int = 32,
    seed: int = 0,
    stage: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> DemoResult:
    """Run every step into `output`; `stage(name)` announces each step, `progress` counts within it."""
    output = Path(output)
    check_seed(seed)
    check_writable(output, folder=True)  # a file, or a read-only disk: one line, before anything is made
    settings = {"scans": scans, "epochs": epochs, "depth": depth, "width": width, "seed": seed}
    state = _resume_state(output, settings)
    announce = stage or (lambda name: None)
    data, cache, run = output / "data", output / "cache", output / "run"

    if not state.get("synthesized"):
        if data.exists():  # an interrupted generation: start it again
            shutil.rmtree(data)
        announce(f"Generating {scans} synthetic chest CT phantoms")
        synthesize(data, scans=scans, seed=seed, progress=progress)
        _save_state(output, {**state, "synthesized": True})
    size = Size(depth, width)
    announce(f"Preprocessing to {size.name}")
    report = preprocess_dataset(data, size, cache, workers=1, progress=progress)
    if report.failures:
        raise Cov3dError(f"preprocessing the synthetic data failed: {report.failures[0]}")
    announce(f"Training from scratch for {epochs} epochs on CPU")
    training_scans = sum(row["split"] == "train" for row in read_manifest(report.manifest))
    config = TrainConfig(data=str(data), output=str(run), pretrained=False, depth=depth, width=width,
                         epochs=epochs, seed=seed, device="cpu", precision="fp32", loader_workers=0,
                         cache=str(cache), batch_size=min(RECIPES["scratch"]["batch_size"], training_scans))
    training = train(config, resume=(run / LAST).is_file(), on_epoch=on_epoch)
    announce("Evaluating on the validation split")
    evaluation = evaluate(data, [run], split="validation", workers=0, device="cpu", progress=progress)
    evaluation_dir = output / "evaluation"
    write_outputs(evaluation, evaluation_dir)
    announce("Predicting the test split")
    test_scans, _ = find_inputs([data / "test"])
    predictions, failures = predict_scans(test_scans, load_ensemble([run]), workers=0, device="cpu",
                                          roots=[data / "test"], progress=progress)
    if failures:
        raise Cov3dError(f"predicting the synthetic test scans failed: {failures[0]}")
    rows = prediction_rows(predictions)
    predictions_csv, submission = output / "predictions.csv", output / "submission"
    write_csv(predictions_csv, rows)
    write_submission(submission, rows)
    _save_state(output, {**_load_state(output), "finished": True})
    return DemoResult(data, run, training, evaluation, evaluation_dir, predictions_csv, submission, len(rows))
