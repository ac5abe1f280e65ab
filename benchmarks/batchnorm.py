"""How many training scans precise BatchNorm needs: validation scores and cost against the scan count.

    python benchmarks/batchnorm.py --model RUN [--counts 8 16 32 64 0] [--draws 3]

Takes the final weights of a trained run (RUN/last.pt) and its cached splits,
re-estimates every BatchNorm's statistics on N training scans drawn at random
(0: all of them, the reference), and scores the validation split with them:
presence macro F1, validation loss and the largest |ΔP(covid)| against the
reference. Each N is drawn --draws times with different seeds; the spread over
draws is what the scan count buys. Also times the statistics pass per scan.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine  # noqa: E402

from cov3d.models.checkpoint import LAST, load_model  # noqa: E402
from cov3d.data.dataset import load_splits  # noqa: E402
from cov3d.training.loss import Cov3dLoss, probabilities  # noqa: E402
from cov3d.training.metrics import validation_scores  # noqa: E402
from cov3d.models.video import precise_batchnorm  # noqa: E402


def batches(dataset, indices: list[int], size: int):
    for start in range(0, len(indices), size):
        items = [dataset[i] for i in indices[start:start + size]]
        yield torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a cov3d run directory")
    parser.add_argument("--counts", type=int, nargs="+", default=[8, 16, 32, 64, 0])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    print(describe_machine(), flush=True)
    config = json.loads((args.model / "config.json").read_text(encoding="utf-8"))
    splits = load_splits(Path(config["resolved"]["manifest"]), flip=False)
    model, checkpoint_config = load_model(args.model / LAST)
    lam = float(checkpoint_config["lambda"])
    loss_fn = Cov3dLoss(lam, splits.weights)
    valid = list(batches(splits.valid, list(range(len(splits.valid))), args.batch_size))

    def score(count: int, seed: int) -> dict:
        order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(seed)).tolist()
        chosen = order[:count] if count else order
        start = time.perf_counter()
        precise_batchnorm(model, (x for x, _ in batches(splits.train, chosen, args.batch_size)))
        seconds = time.perf_counter() - start
        with torch.inference_mode():
            logits = torch.cat([model(x) for x, _ in valid])
        targets = torch.cat([y for _, y in valid])
        scores = validation_scores(logits, targets, lam)
        return {"scans": len(chosen), "seconds_per_scan": seconds / len(chosen),
                "presence_f1": scores["presence_f1"], "loss": float(loss_fn(logits, targets)),
                "p_covid": probabilities(logits, lam)[:, 0]}

    reference = score(0, 0)
    print(f"run {args.model}: {len(splits.train)} training, {len(splits.valid)} validation scans; "
          f"precise BN pass {reference['seconds_per_scan']:.3f} s per scan")
    print("| scans | presence F1 (min–max over draws) | validation loss | max abs dP(covid) vs all |")
    print("| --- | --- | --- | --- |")
    for count in args.counts:
        draws = [score(count, seed) for seed in range(args.draws if count else 1)]
        f1 = [d["presence_f1"] for d in draws]
        loss = [d["loss"] for d in draws]
        delta = max(float((d["p_covid"] - reference["p_covid"]).abs().max()) for d in draws)
        print(f"| {draws[0]['scans']} | {statistics.mean(f1):.3f} ({min(f1):.3f}–{max(f1):.3f}) | "
              f"{statistics.mean(loss):.3f} ({min(loss):.3f}–{max(loss):.3f}) | {delta:.3f} |", flush=True)


if __name__ == "__main__":
    main()
