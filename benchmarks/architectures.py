"""Every architecture of the registry, measured the same way: the figures of docs/architectures.md.

    python benchmarks/architectures.py [--arch NAME ...] [--skip-cost] [--skip-learning]
                                       [--epochs 12] [--output results.json]

Cost, at the paper's small size 64x128x128 on the CPU (each in its own process,
so that its peak memory is its own):
- parameters, and forward GFLOPs per scan (torch.utils.flop_counter: 2 per multiply-add);
- inference seconds per scan, batch 1, as `cov3d predict` runs on a CPU (bf16 autocast, channels_last);
  median of 3 after a warm-up; peak resident memory of that process;
- training-step seconds, batch 2, fp32 (the CPU default), Adam and the combined loss; median of 2 after
  a warm-up; peak resident memory of that process.

Learning: each architecture is trained from scratch on the same `cov3d synth` data set (the demo's:
160 phantoms, seed 0, preprocessed to 16x32x32) with the same budget (the demo's from-scratch recipe:
12 epochs, one-cycle to 1e-3, batch 8, dropout 0, fp32, seed 0; 2D models see every slice), and reports
the best validation presence and severity macro F1 over the epochs (what its checkpoints keep), the
last epoch's presence F1, and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine  # noqa: E402  (the CPU and peak every figure is printed beside)

SIZE = (64, 128)  # depth, width: the paper's small size
LEARN_SIZE = (16, 32)


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux


def measure_inference(arch: str) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cov3d.models.registry import build_model, memory_format

    torch.manual_seed(0)
    model = build_model(arch, pretrained=False).eval()
    params = sum(p.numel() for p in model.parameters())
    x = torch.rand(1, 1, SIZE[0], SIZE[1], SIZE[1])
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    model = model.to(memory_format=memory_format(arch))
    x = x.contiguous(memory_format=torch.channels_last_3d)
    times = []
    for _ in range(4):
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
        times.append(time.perf_counter() - start)
    return {"params_m": params / 1e6, "gflops": counter.get_total_flops() / 1e9,
            "infer_s": statistics.median(times[1:]), "infer_peak_gb": _peak_gb()}


def measure_training(arch: str) -> dict:
    import torch

    from cov3d.models.registry import build_model
    from cov3d.training.loss import Cov3dLoss

    torch.manual_seed(0)
    model = build_model(arch, pretrained=False).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = Cov3dLoss(0.1, (1.0, 1.0))
    x, y = torch.rand(2, 1, SIZE[0], SIZE[1], SIZE[1]), torch.tensor([0, 3])
    times = []
    for _ in range(3):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {"train_s": statistics.median(times[1:]), "train_peak_gb": _peak_gb()}


def measure_learning(arch: str, data: str, cache: str, epochs: int) -> dict:
    from cov3d.training.trainer import TrainConfig, train

    with tempfile.TemporaryDirectory() as run:
        config = TrainConfig(data=data, output=run, arch=arch, pretrained=False, depth=LEARN_SIZE[0],
                             width=LEARN_SIZE[1], epochs=epochs, lr=1e-3, batch_size=8, dropout=0.0, seed=0,
                             device="cpu", precision="fp32", loader_workers=0, cache=cache)
        start = time.perf_counter()
        result = train(config)
        seconds = time.perf_counter() - start
    history = result.history
    return {"presence_f1": result.best.get("presence_f1"), "severity_f1": result.best.get("severity_f1"),
            "last_presence_f1": float(history[-1]["presence_f1"]),
            "presence_f1_by_epoch": [round(float(r["presence_f1"]), 3) for r in history],
            "learn_s": seconds}


def child(task: str, arch: str, *extra: str) -> dict:
    """Run one measurement in a fresh process; its peak memory is its own."""
    command = [sys.executable, __file__, "--child", task, "--arch", arch, *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        return {f"{task}_error": tail[0]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from cov3d.models.registry import ARCHS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", choices=list(ARCHS), help="Architectures (default: all).")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-learning", action="store_true")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--output", type=Path, help="Also write the results as JSON here.")
    parser.add_argument("--child", choices=["inference", "training", "learning"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        arch = args.arch[0]
        if args.child == "inference":
            print(json.dumps(measure_inference(arch)))
        elif args.child == "training":
            print(json.dumps(measure_training(arch)))
        else:
            print(json.dumps(measure_learning(arch, args.data, args.cache, args.epochs)))
        return

    print(describe_machine(), flush=True)
    archs = args.arch or list(ARCHS)
    results: dict[str, dict] = {arch: {} for arch in archs}
    print(f"torch threads {os.cpu_count()} cores; cost at {SIZE[0]}x{SIZE[1]}x{SIZE[1]}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        if not args.skip_learning:
            from cov3d.data.preprocess import Size, preprocess_dataset
            from cov3d.data.synth import synthesize

            data, cache = Path(scratch) / "data", Path(scratch) / "cache"
            synthesize(data, scans=160, seed=0)
            preprocess_dataset(data, Size(*LEARN_SIZE), cache, workers=1)
        for arch in archs:
            if not args.skip_cost:
                results[arch].update(child("inference", arch))
                results[arch].update(child("training", arch))
            if not args.skip_learning:
                results[arch].update(child("learning", arch, "--data", str(data), "--cache", str(cache),
                                           "--epochs", str(args.epochs)))
            print(json.dumps({arch: results[arch]}), flush=True)
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    def cell(row: dict, key: str, fmt: str) -> str:
        value = row.get(key)
        return "-" if value is None else format(value, fmt)

    print("\n| arch | params (M) | GFLOPs/scan | infer s | infer peak GB | train step s | train peak GB | "
          "presence F1 | severity F1 | learn s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arch, row in results.items():
        print(f"| `{arch}` | {cell(row, 'params_m', '.1f')} | {cell(row, 'gflops', '.1f')} | "
              f"{cell(row, 'infer_s', '.2f')} | {cell(row, 'infer_peak_gb', '.2f')} | {cell(row, 'train_s', '.1f')} | "
              f"{cell(row, 'train_peak_gb', '.2f')} | {cell(row, 'presence_f1', '.3f')} | "
              f"{cell(row, 'severity_f1', '.3f')} | {cell(row, 'learn_s', '.0f')} |")


if __name__ == "__main__":
    main()
