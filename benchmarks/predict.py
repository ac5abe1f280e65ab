"""Inference speed per scan and per TTA pass, and how closely bf16 agrees with fp32.

    python benchmarks/predict.py [--scans 12] [--size small] [--model RUN]

Runs the r3d_18 Cov3d network (random initialisation with a fixed seed, or the
presence checkpoint of --model RUN) over synthetic chest-like volumes, in fp32
eager, in cov3d's fp32 CPU path (BatchNorm folded) and, where this CPU has
native bf16 (or with --bf16), in bf16 autocast with channels_last_3d, batch
size 1 and 2, and compares each with fp32 eager: share of scans with the same
label at threshold 0.5 and the largest difference in P(covid). Target (issue 4, 2 CPU cores, 64x128x128):
≤ 1.0 s per scan per TTA pass, same label on ≥ 99% of scans, probabilities
within 0.02. Then times `predict_scans` end to end on JPEG scans (reading and
preprocessing in background workers, TTA on).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine  # noqa: E402  (the CPU and peak every figure is printed beside)
from preprocess import make_scan  # noqa: E402  (the synthetic JPEG scan of the preprocessing benchmark)

from cov3d.training.loss import probabilities  # noqa: E402
from cov3d.models.registry import build_model  # noqa: E402
from cov3d.training.precision import cpu_bf16  # noqa: E402
from cov3d.inference.predict import Member, inference_runner, load_ensemble, predict_scans  # noqa: E402
from cov3d.data.preprocess import resolve_size  # noqa: E402


def volumes(count: int, depth: int, width: int, seed: int = 0) -> list[torch.Tensor]:
    """Smooth random volumes with a body-like ellipse and dark lungs, in [0, 1]."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[-1:1:depth * 1j, -1:1:width * 1j, -1:1:width * 1j]
    out = []
    for _ in range(count):
        body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
        lungs = ((np.abs(x) - 0.38) / 0.25) ** 2 + (y / 0.4) ** 2 + (z / rng.uniform(0.8, 1.2)) ** 2 < 1
        volume = np.where(body, 0.6, 0.1) - np.where(lungs, 0.4, 0) + rng.normal(0, 0.05, x.shape)
        blobs = rng.integers(0, 6)
        for _ in range(blobs):
            c = rng.uniform(-0.5, 0.5, 3)
            volume += 0.3 * (((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) < 0.02)
        out.append(torch.from_numpy(volume.clip(0, 1).astype(np.float32))[None])
    return out


def run(model: torch.nn.Module, batch: torch.Tensor, mode: str, lam: float) -> torch.Tensor:
    if mode == "bf16":
        batch = batch.contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
        return probabilities(model(batch).float(), lam)[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=12)
    parser.add_argument("--size", default="small")
    parser.add_argument("--model", type=Path, help="a cov3d run directory (default: random initialisation)")
    parser.add_argument("--end-to-end", type=int, default=4, help="JPEG scans for the predict_scans timing (0 skips)")
    parser.add_argument("--bf16", action="store_true", help="time bf16 even where this CPU emulates it (slow)")
    args = parser.parse_args()
    print(describe_machine(), flush=True)
    size = resolve_size(args.size)
    torch.manual_seed(0)
    if args.model:
        member = load_ensemble([args.model])[0]
        model, lam = member.model, float(member.config["lambda"])
        size = member.size
    else:
        model, lam = build_model("r3d_18", pretrained=False).eval(), 0.1
    print(f"size {size.name}, {torch.get_num_threads()} threads, model: {args.model or 'random init (seed 0)'}")
    data = volumes(args.scans, size.depth, size.width)
    native, _ = cpu_bf16()
    modes = {"fp32 eager": model, "fp32 cov3d": inference_runner(model, torch.device("cpu"), "fp32")}
    if native or args.bf16:
        modes["bf16"] = model
    results = {}
    for mode, module in modes.items():
        module.to(memory_format=torch.channels_last_3d if mode == "bf16" else torch.contiguous_format)
        kind = "bf16" if mode == "bf16" else "fp32"
        for batch_size in (1, 2):
            run(module, torch.stack(data[:batch_size]), kind, lam)  # warm-up
            times, probs = [], []
            for start in range(0, len(data), batch_size):
                batch = torch.stack(data[start:start + batch_size])
                tic = time.perf_counter()
                probs.append(run(module, batch, kind, lam))
                times.append((time.perf_counter() - tic) / len(batch))
            results[mode] = torch.cat(probs)
            print(f"{mode:<10} batch {batch_size}: {statistics.median(times):.3f} s per scan per pass "
                  f"(median over {len(times)} batches)", flush=True)
    reference = results["fp32 eager"]
    for mode in [m for m in results if m != "fp32 eager"]:
        other = results[mode]
        same = float(((reference >= 0.5) == (other >= 0.5)).float().mean())
        print(f"{mode} vs fp32 eager: same label on {same:.1%} of {len(other)} scans; largest |ΔP(covid)| "
              f"{float((reference - other).abs().max()):.2e}; P(covid) range "
              f"{float(reference.min()):.3f}..{float(reference.max()):.3f}")

    if args.end_to_end:
        with tempfile.TemporaryDirectory() as tmp:
            scans = [make_scan(Path(tmp) / f"scan{i}", 120, seed=i) for i in range(args.end_to_end)]
            member = Member(Path("benchmark"), model, {"arch": "r3d_18", "depth": size.depth, "width": size.width, "lambda": lam,
                                                       "outputs": []}, presence=True, severity=True)
            for precision in ["auto", "fp32"] + (["bf16"] if "bf16" in modes else []):
                tic = time.perf_counter()
                predict_scans(scans, [member], tta=True, precision=precision, batch_size=2)
                elapsed = time.perf_counter() - tic
                print(f"predict_scans, {precision}, TTA: {elapsed / len(scans):.2f} s per scan end to end "
                      f"({len(scans)} scans of 120 JPEG slices 512x512, reading and preprocessing included)")


if __name__ == "__main__":
    main()
