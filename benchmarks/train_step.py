"""Training step time and peak memory of the Cov3d model, fp32 against mixed precision.

    python benchmarks/train_step.py [--sizes small,medium,large] [--device cpu|cuda] [--steps 3]

For each size: seconds per optimizer step (batch size 2, r3d_18, combined loss,
Adam) in fp32 and in mixed precision (bf16 autocast on CPU; fp16 autocast with
loss scaling and channels_last_3d on CUDA), the peak memory, and how many
batches per second a DataLoader reads from float16 cache files. Targets
(issue 3, GPU): mixed precision ≥ 2× the fp32 step rate; loader ≥ 3× the step rate.
"""

from __future__ import annotations

import argparse
import sys
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine  # noqa: E402  (the CPU and peak every figure is printed beside)
from cov3d.data.dataset import ScanDataset
from cov3d.training.loss import Cov3dLoss
from cov3d.models.registry import build_model
from cov3d.atomic import save_torch
from cov3d.data.preprocess import resolve_size


def step_time(size, device: torch.device, mixed: bool, steps: int, batch: int) -> tuple[float, float]:
    """Median seconds per step and peak memory in GB (GPU: allocated; CPU: process RSS)."""
    torch.manual_seed(0)
    model = build_model("r3d_18", pretrained=False).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last_3d)
        torch.cuda.reset_peak_memory_stats()
    loss_fn = Cov3dLoss(0.1, (1.0, 1.0)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-5)
    dtype = torch.float16 if cuda else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and mixed)
    x = torch.rand(batch, 1, size.depth, size.width, size.width, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    y = torch.tensor([0, 2] * (batch // 2) + [5] * (batch % 2), device=device)
    times = []
    for index in range(steps + 1):  # the first step warms up kernels and allocators
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=mixed):
            out = model(x)
        loss = loss_fn(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if cuda:
            torch.cuda.synchronize()
        if index:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return statistics.median(times), peak


def loader_rate(size, batch: int, workers: int, batches: int) -> float:
    """Batches per second a DataLoader delivers from float16 cache files (random reflection on)."""
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for index in range(batch * batches):
            path = Path(tmp) / f"{index}.pt"
            save_torch(torch.rand(1, size.depth, size.width, size.width).half(), path)
            files.append(path)
        loader = DataLoader(ScanDataset(files, [0, 1] * (len(files) // 2), flip=True), batch_size=batch,
                            num_workers=workers, shuffle=True)
        start = time.perf_counter()
        count = sum(1 for _ in loader)
        return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help="comma-separated: small,medium,large (default: small on "
                                                      "CPU, all three on CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--loader-workers", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args()
    print(describe_machine(), flush=True)
    device = torch.device(args.device)
    sizes = (args.sizes or ("small,medium,large" if device.type == "cuda" else "small")).split(",")
    mixed_name = "fp16+channels_last_3d" if device.type == "cuda" else "bf16 autocast"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; torch {torch.__version__}; batch size {args.batch_size}")
    for size_name in sizes:
        size = resolve_size(size_name)
        fp32, fp32_peak = step_time(size, device, False, args.steps, args.batch_size)
        mixed, mixed_peak = step_time(size, device, True, args.steps, args.batch_size)
        rate = loader_rate(size, args.batch_size, args.loader_workers, batches=8)
        print(f"{size.name:<12} fp32 {fp32:7.3f} s/step (peak {fp32_peak:5.2f} GB)  "
              f"{mixed_name} {mixed:7.3f} s/step (peak {mixed_peak:5.2f} GB)  speed-up {fp32 / mixed:4.2f}x  "
              f"loader {rate:7.2f} batches/s = {rate * mixed:5.1f}x the mixed step rate "
              f"({args.loader_workers} workers)")


if __name__ == "__main__":
    main()
