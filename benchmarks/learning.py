"""Does training from scratch learn without collapsing? Variants of one run on the demo's data and seed.

    python benchmarks/learning.py [--variant NAME ...] [--epochs 12] [--output DIR]

Data: `cov3d synth` (160 phantoms, seed 0) preprocessed to 16x32x32, as `cov3d demo` makes it. Every
variant trains r3d_18 from scratch with the from-scratch recipe (one-cycle to 1e-3, batch 8, dropout 0),
seed 0, 12 epochs, and differs from `precise-bn` (today's default) in one setting:

- running-bn: BatchNorm statistics as fastai's running averages (`--bn-scans 0`), the behaviour before;
- precise-bn: statistics re-estimated on the training split before each validation (the default);
- inverse-severity: `--severity-weights inverse`;
- bf16: `--precision bf16` on the CPU.

For each: per-epoch validation presence and severity F1, losses, the best F1 of each task, the epochs
whose presence predictions were all one class (presence F1 at or below that of a constant prediction),
and the wall time. Writes results.json and curves.png (presence F1 and validation loss per epoch)
into --output.
"""

from __future__ import annotations

import argparse
import sys
import json
import tempfile
import time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine  # noqa: E402  (the CPU and peak every figure is printed beside)

VARIANTS = {
    "running-bn": {"bn_scans": 0},
    "precise-bn": {},
    "inverse-severity": {"severity_weights": "inverse"},
    "bf16": {"precision": "bf16"},
}


def one_class_f1(covid: int, non_covid: int) -> float:
    """Macro F1 of predicting every scan as the larger class: the level of a collapsed model."""
    major = max(covid, non_covid)
    return (2 * major / (major + covid + non_covid)) / 2


def run(variant: str, data: Path, cache: Path, epochs: int) -> dict:
    from cov3d.training.trainer import TrainConfig, train

    options = dict(precision="fp32") | VARIANTS[variant]
    with tempfile.TemporaryDirectory() as output:
        config = TrainConfig(data=str(data), output=output, pretrained=False, depth=16, width=32, epochs=epochs,
                             seed=0, device="cpu", loader_workers=0, cache=str(cache), **options)
        start = time.perf_counter()
        result = train(config)
        seconds = time.perf_counter() - start
        counts = json.loads((Path(output) / "config.json").read_text(encoding="utf-8"))["resolved"]["counts"]
    collapsed_level = one_class_f1(counts["validation"]["covid"], counts["validation"]["non-covid"])
    rows = [{k: float(v) if k != "epoch" else int(v) for k, v in row.items()} for row in result.history]
    return {"variant": variant, "options": options, "seconds": seconds, "best": result.best,
            "collapsed_epochs": [r["epoch"] for r in rows if r["presence_f1"] <= collapsed_level + 1e-6],
            "history": rows}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (f1, loss) = plt.subplots(1, 2, figsize=(11, 3.8))
    for result in results:
        epochs = [r["epoch"] for r in result["history"]]
        f1.plot(epochs, [r["presence_f1"] for r in result["history"]], "o-", label=result["variant"])
        loss.plot(epochs, [r["valid_loss"] for r in result["history"]], "o-", label=result["variant"])
    f1.set(xlabel="epoch", ylabel="validation presence macro F1", ylim=(0, 1.02), title="Presence F1")
    loss.set(xlabel="epoch", ylabel="validation loss", yscale="log", title="Validation loss")
    for axis in (f1, loss):
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", choices=list(VARIANTS), help="Variants (default: all).")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--output", type=Path, default=Path("learning-results"))
    args = parser.parse_args()
    print(describe_machine(), flush=True)

    from cov3d.data.preprocess import Size, preprocess_dataset
    from cov3d.data.synth import synthesize

    args.output.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        data, cache = Path(scratch) / "data", Path(scratch) / "cache"
        synthesize(data, scans=160, seed=0)
        preprocess_dataset(data, Size(16, 32), cache, workers=1)
        for variant in args.variant or list(VARIANTS):
            result = run(variant, data, cache, args.epochs)
            results.append(result)
            f1 = " ".join(f"{r['presence_f1']:.2f}" for r in result["history"])
            print(f"{variant}: best presence F1 {result['best']['presence_f1']:.3f}, severity F1 "
                  f"{result['best'].get('severity_f1', float('nan')):.3f}, one-class epochs "
                  f"{result['collapsed_epochs']}, {result['seconds']:.0f} s; presence F1 by epoch {f1}", flush=True)
            (args.output / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(results, args.output / "curves.png")


if __name__ == "__main__":
    main()
