"""Does looking at the lungs help? Train from scratch with --lungs off, crop and split on one synthetic data set.

    python benchmarks/lungs_accuracy.py [--scans 60] [--width 96] [--epochs 8] [--seeds 0 1]

Same data, same budget (epochs, batch, size, seed) for every setting: r3d_18 from scratch (no pretrained
weights can be had here) at 16×32×32, the size where the lungs' share of the input matters most. Prints the
best validation presence and severity macro F1 of each run, and the mean per setting, beside the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine  # noqa: E402
from cov3d.data.synth import synthesize  # noqa: E402
from cov3d.training.trainer import TrainConfig, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=60)
    parser.add_argument("--width", type=int, default=96, help="phantom width (segmentation needs ≥ 64)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--modes", nargs="+", default=["off", "crop", "split"])
    args = parser.parse_args()
    print(describe_machine())
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "data"
        synthesize(data, scans=args.scans, seed=7, width=args.width)
        print(f"\n{args.scans} phantoms at {args.width}², r3d_18 from scratch at 16×32×32, {args.epochs} epochs, "
              "batch 4, λ 0.1")
        print("| lungs | seed | best presence F1 | best severity F1 | seconds |")
        print("|---|---|---|---|---|")
        scores: dict[str, list[tuple[float, float]]] = {}
        for mode in args.modes:
            for seed in args.seeds:
                start = time.perf_counter()
                config = TrainConfig(data=str(data), output=f"{scratch}/run-{mode}-{seed}", pretrained=False,
                                     depth=16, width=32, epochs=args.epochs, batch_size=4, seed=seed, lungs=mode,
                                     loader_workers=0, cache=f"{scratch}/cache", bn_scans=0)
                result = train(config.with_recipe())
                presence = max(float(row["presence_f1"]) for row in result.history)
                severity = max(float(row["severity_f1"]) for row in result.history)
                scores.setdefault(mode, []).append((presence, severity))
                print(f"| {mode} | {seed} | {presence:.3f} | {severity:.3f} | {time.perf_counter() - start:.0f} |",
                      flush=True)
        print("\n| lungs | mean presence F1 | mean severity F1 |")
        print("|---|---|---|")
        for mode, pairs in scores.items():
            print(f"| {mode} | {statistics.mean(p for p, _ in pairs):.3f} | {statistics.mean(s for _, s in pairs):.3f} |")


if __name__ == "__main__":
    main()
