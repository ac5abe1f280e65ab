"""Distributed training: throughput with 1 and N processes, and per-process vs global BatchNorm.

    python benchmarks/distributed.py throughput [--processes 1 2] [--device cpu|cuda] [--size 32x64x64]
    python benchmarks/distributed.py batchnorm [--epochs 12] [--seeds 0 1]

throughput: `torchrun --standalone --nproc-per-node N -m cov3d train` on `cov3d synth` phantoms, from
scratch, fixed batch per process, precise BN off, for --epochs epochs. Reads each run's history.csv
(scans per second over all ranks in each epoch's training phase) and reports the median over the
epochs after the first, with the scaling efficiency: throughput(N) / (N × throughput(1)). On CPU each
process gets cores / N threads, so 1 process with all cores is the baseline.

batchnorm: what SyncBatchNorm would change at batch 2 per process. torch's SyncBatchNorm has no CPU
version, but its effect can be measured exactly on CPU: 2 processes × batch 2 normalise each
BatchNorm over 2 scans (per-process statistics), while 1 process × batch 4 normalises
over the same 4 scans that SyncBatchNorm would pool, with the same global batch, learning rate and
number of steps. Both train r3d_18 from scratch on the demo's data (160 phantoms of data seed 0, 16x32x32)
with the demo's recipe apart from the batch, once per training seed. Reports per-epoch validation
presence F1, the best F1 of each task and the final validation loss.

Writes results.json into --output.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine  # noqa: E402  (the CPU and peak every figure is printed beside)

def torchrun(processes: int, threads: int, args: list[str]) -> float:
    environ = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "cov3d", "train", *args]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=environ, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def history(run: Path) -> list[dict]:
    with (run / "history.csv").open(newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(handle)]


def synth(root: Path, scans: int, width: int) -> Path:
    from cov3d.data.synth import synthesize

    synthesize(root, scans=scans, seed=0, width=width)
    return root


def throughput(args: argparse.Namespace, scratch: Path) -> dict:
    depth, height, width = (int(v) for v in args.size.split("x"))
    data = synth(scratch / "data", args.scans, max(32, width))
    cores = os.cpu_count() or 1
    results = []
    for processes in args.processes:
        run = scratch / f"run-{processes}"
        threads = max(1, cores // processes) if args.device == "cpu" else 1
        seconds = torchrun(processes, threads, [
            str(data), "--output", str(run), "--cache", str(scratch / "cache"), "--no-pretrained",
            "--depth", str(depth), "--width", str(width), "--batch-size", str(args.batch_size),
            "--epochs", str(args.epochs), "--bn-scans", "0", "--device", args.device, "--loader-workers", "1",
            "--arch", args.arch])
        rows = history(run)
        rates = [row["scans_per_second"] for row in rows[1:]] or [rows[0]["scans_per_second"]]
        results.append({"processes": processes, "threads_per_process": threads, "wall_seconds": seconds,
                        "scans_per_second": statistics.median(rates),
                        "epoch_seconds": statistics.median(row["epoch_seconds"] for row in rows[1:] or rows)})
        print(f"{processes} process(es): {results[-1]['scans_per_second']:.2f} scans/s", flush=True)
    base = results[0]["scans_per_second"] / results[0]["processes"]
    for result in results:
        result["scaling_efficiency"] = result["scans_per_second"] / (result["processes"] * base)
    return {"benchmark": "throughput", "device": args.device, "arch": args.arch, "size": args.size,
            "batch_per_process": args.batch_size, "cores": cores, "results": results}


def batchnorm(args: argparse.Namespace, scratch: Path) -> dict:
    data = synth(scratch / "data", 160, 128)
    cores = os.cpu_count() or 1
    variants = {"per-process BN (2 x batch 2)": (2, 2), "global BN = SyncBatchNorm (1 x batch 4)": (1, 4)}
    results = []
    for seed in args.seeds:
        for name, (processes, batch) in variants.items():
            run = scratch / f"run-{processes}x{batch}-seed{seed}"
            seconds = torchrun(processes, max(1, cores // processes), [
                str(data), "--output", str(run), "--cache", str(scratch / "cache"), "--no-pretrained",
                "--depth", "16", "--width", "32", "--batch-size", str(batch), "--epochs", str(args.epochs),
                "--seed", str(seed), "--device", "cpu", "--loader-workers", "0"])
            rows = history(run)
            results.append({"variant": name, "seed": seed, "processes": processes, "batch_per_process": batch,
                            "seconds": seconds,
                            "presence_f1": [row["presence_f1"] for row in rows],
                            "severity_f1": [row.get("severity_f1") for row in rows],
                            "final_valid_loss": rows[-1]["valid_loss"],
                            "best_presence_f1": max(row["presence_f1"] for row in rows),
                            "best_severity_f1": max(row.get("severity_f1", 0.0) for row in rows)})
            print(f"{name}, seed {seed}: best presence F1 {results[-1]['best_presence_f1']:.3f} (final "
                  f"{rows[-1]['presence_f1']:.3f}), severity F1 {results[-1]['best_severity_f1']:.3f}, final "
                  f"valid loss {rows[-1]['valid_loss']:.3f}, {seconds:.0f} s", flush=True)
    return {"benchmark": "batchnorm", "epochs": args.epochs, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=["throughput", "batchnorm"])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="r3d_18")
    parser.add_argument("--size", default="32x64x64", help="DEPTHxHEIGHTxWIDTH")
    parser.add_argument("--scans", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="batchnorm: training seeds")
    parser.add_argument("--output", type=Path, default=Path("benchmark-distributed"))
    args = parser.parse_args()
    print(describe_machine(), flush=True)
    args.epochs = args.epochs or (3 if args.benchmark == "throughput" else 12)
    with tempfile.TemporaryDirectory() as scratch:
        result = (throughput if args.benchmark == "throughput" else batchnorm)(args, Path(scratch))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{args.benchmark}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
