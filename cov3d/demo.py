"""The whole job offline: synthetic data → preprocess → train → evaluate → predict.

Trains from scratch (no pretrained weights, no network) on CPU at a small size,
so a newcomer sees cov3d learn on a fresh machine in minutes. It uses the
from-scratch recipe that `--no-pretrained` gives any run (one-cycle maximum LR
1e-3, batch size 8, no dropout; see docs/training.md), for 12 epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import Cov3dError
from .evaluate import Evaluation, evaluate, write_outputs
from .predict import find_inputs, load_ensemble, predict_scans, prediction_rows, write_csv, write_submission
from .preprocess import Size, preprocess_dataset
from .synth import synthesize
from .train import TrainConfig, TrainResult, train


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
    if output.exists() and any(output.iterdir()):
        raise Cov3dError(f"'{output}' is not empty; give the demo a new --output folder")
    announce = stage or (lambda name: None)
    data, cache, run = output / "data", output / "cache", output / "run"

    announce(f"Generating {scans} synthetic chest CT phantoms")
    synthesize(data, scans=scans, seed=seed, progress=progress)
    size = Size(depth, width)
    announce(f"Preprocessing to {size.name}")
    report = preprocess_dataset(data, size, cache, workers=1, progress=progress)
    if report.failures:
        raise Cov3dError(f"preprocessing the synthetic data failed: {report.failures[0]}")
    announce(f"Training from scratch for {epochs} epochs on CPU")
    config = TrainConfig(data=str(data), output=str(run), pretrained=False, depth=depth, width=width,
                         epochs=epochs, seed=seed, device="cpu", precision="fp32", loader_workers=0,
                         cache=str(cache))
    training = train(config, on_epoch=on_epoch)
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
    return DemoResult(data, run, training, evaluation, evaluation_dir, predictions_csv, submission, len(rows))
