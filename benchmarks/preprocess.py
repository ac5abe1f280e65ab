"""Preprocessing speed and memory on a synthetic 512×512 JPEG scan.

    python benchmarks/preprocess.py [--slices 300] [--repeats 3] [--long-slices 1201]

Prints seconds per scan for decoding alone (one thread, and with the reader's
thread pool) and for full preprocessing to each size, scans per second through
`preprocess_dataset` with 1 and 2 workers, and the peak resident memory of a
fresh process preprocessing a long scan to 160×320×320. Targets (issue 2):
large ≤ 1.3 × decode time; peak memory for 1201 slices ≤ 1.5 GB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine  # noqa: E402  (the CPU and peak every figure is printed beside)
from cov3d.data.readers import SLICE_SUFFIXES, natural_key
from cov3d.data.preprocess import Size, preprocess_dataset, preprocess_volume, resolve_size


def make_scan(folder: Path, slices: int, seed: int = 0) -> Path:
    """A chest-like phantom: a body ellipse, two dark lungs, texture noise, JPEG quality 90."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1:1:512j, -1:1:512j]
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
    for index in range(slices):
        t = index / max(slices - 1, 1)
        lung_r = 0.25 + 0.15 * np.sin(np.pi * t)
        lungs = ((x - 0.38) ** 2 + (y / 1.3) ** 2 < lung_r**2) | ((x + 0.38) ** 2 + (y / 1.3) ** 2 < lung_r**2)
        image = np.where(body, 150.0, 10.0) - np.where(lungs, 110.0, 0.0) + rng.normal(0, 12, x.shape)
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{index}.jpg", quality=90)
    return folder


def decode(folder: Path, threads: int) -> list[np.ndarray]:
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in SLICE_SUFFIXES), key=lambda p: natural_key(p.name))

    def one(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            return np.asarray(image.convert("L"))

    if threads == 1:
        return [one(p) for p in files]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, files))


def timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_gb(scan: Path, size: Size) -> float:
    """Peak RSS of a fresh Python process that preprocesses `scan` once."""
    code = (
        "import resource, sys; from pathlib import Path; from cov3d.data.preprocess import Size, preprocess_volume;"
        f"preprocess_volume(Path({str(scan)!r}), Size({size.depth}, {size.width}));"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024**2  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-slices", type=int, default=1201, help="slices of the memory test scan (0 skips it)")
    args = parser.parse_args()
    print(describe_machine(), flush=True)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        scan = make_scan(root / "data" / "scan0", args.slices)
        print(f"synthetic scan: {args.slices} slices of 512x512 JPEG, {cores} cores")
        decode_1 = timed(lambda: decode(scan, 1), args.repeats)
        decode_n = timed(lambda: decode(scan, cores), args.repeats)
        print(f"decode only, 1 thread            {decode_1:6.3f} s/scan")
        print(f"decode only, {cores} threads           {decode_n:6.3f} s/scan")
        for name in ("small", "medium", "large"):
            size = resolve_size(name)
            seconds = timed(lambda: preprocess_volume(scan, size), args.repeats)
            print(f"preprocess to {size.name:<12}      {seconds:6.3f} s/scan  "
                  f"({seconds / decode_1:4.2f}x 1-thread decode, {seconds / decode_n:4.2f}x {cores}-thread decode)")

        for copy in range(1, 4):
            shutil.copytree(scan, root / "data" / f"scan{copy}")
        for workers in (1, 2):
            cache = root / f"cache{workers}"
            start = time.perf_counter()
            report = preprocess_dataset(root / "data", resolve_size("large"), cache, workers=workers)
            elapsed = time.perf_counter() - start
            print(f"throughput, {workers} worker(s), large     {report.processed / elapsed:6.3f} scans/s "
                  f"({report.processed} scans in {elapsed:.2f} s, worker start-up included)")

        if args.long_slices:
            long_scan = make_scan(root / "long", args.long_slices, seed=1)
            peak = peak_memory_gb(long_scan, resolve_size("large"))
            print(f"peak memory, {args.long_slices} slices to large  {peak:6.3f} GB (whole process)")


if __name__ == "__main__":
    main()
