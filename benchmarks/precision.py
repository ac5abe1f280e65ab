"""Does bf16 autocast on CPU cost validation F1? Train the same run in fp32 and bf16 and compare.

    python benchmarks/precision.py [--scans 64] [--epochs 8]

Synthetic, learnable data: every scan is a noisy ellipsoid "body" with two dark
"lungs"; covid scans add bright blob-shaped opacities inside the lungs, their
number growing with severity. Both runs use the same seed, data and schedule
(from scratch, 16x32x32, one-cycle max LR 1e-3, dropout 0: with the paper's 0.5 after every
residual stage a model trained from scratch on so few scans did not learn within 12 epochs).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine  # noqa: E402  (the CPU and peak every figure is printed beside)
from cov3d.errors import Cov3dError
from cov3d.training.trainer import TrainConfig, train


def phantom(rng: np.random.Generator, covid: bool, severity: int, slices: int = 20, size: int = 48) -> np.ndarray:
    z, y, x = np.mgrid[-1:1:slices * 1j, -1:1:size * 1j, -1:1:size * 1j]
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1
    lungs = (((x - 0.4) / 0.3) ** 2 + (y / 0.5) ** 2 + (z / 1.2) ** 2 < 1) | \
            (((x + 0.4) / 0.3) ** 2 + (y / 0.5) ** 2 + (z / 1.2) ** 2 < 1)
    volume = np.where(body, 0.6, 0.05) - np.where(lungs, 0.45, 0.0)
    if covid:
        for _ in range(2 * severity):
            cz, cy, cx = rng.uniform(-0.6, 0.6), rng.uniform(-0.3, 0.3), rng.choice([-0.4, 0.4]) + rng.uniform(-0.1, 0.1)
            blob = ((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) < rng.uniform(0.01, 0.03)
            volume = np.where(blob & lungs, volume + 0.3, volume)
    volume = volume + rng.normal(0, 0.05, volume.shape)
    return (volume.clip(0, 1) * 255).astype(np.uint8)


def make_dataset(root: Path, scans: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, count in (("train", scans), ("validation", scans // 4)):
        for index in range(count):
            covid = index % 2 == 0
            severity = int(rng.integers(1, 5)) if covid else 0
            folder = root / split / ("covid" if covid else "non-covid") / f"ct_scan_{index}"
            folder.mkdir(parents=True)
            for number, plane in enumerate(phantom(rng, covid, severity)):
                Image.fromarray(plane).save(folder / f"{number}.jpg", quality=95)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=64, help="training scans (validation gets a quarter)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(describe_machine(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_dataset(data, args.scans, args.seed)
        for precision in ("fp32", "bf16"):
            config = TrainConfig(data=str(data), output=str(Path(tmp) / precision), pretrained=False, depth=16,
                                 width=32, epochs=args.epochs, lr=1e-3, batch_size=4, precision=precision, dropout=0.0,
                                 loader_workers=0, seed=args.seed, cache=str(Path(tmp) / "cache"), device="cpu")
            start = time.perf_counter()
            try:
                result = train(config)
            except Cov3dError as error:  # bf16 on CPU can turn the loss NaN; that is a result too
                print(f"{precision}: failed: {error}", flush=True)
                continue
            elapsed = time.perf_counter() - start
            final = result.history[-1]
            print(f"{precision}: best presence F1 {result.best['presence_f1']:.4f}, final presence F1 "
                  f"{float(final['presence_f1']):.4f}, final valid loss {float(final['valid_loss']):.4f}, "
                  f"{elapsed:.1f} s for {args.epochs} epochs", flush=True)


if __name__ == "__main__":
    main()
