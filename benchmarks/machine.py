"""What every benchmark prints beside its figures: the CPU, torch's capability, threads, and the fp32 peak.

    python benchmarks/machine.py

A figure says little without the machine it holds on: CPUs differ by 20–100×
in bf16 (native or emulated) and by 2× in fp32 SIMD width. The nominal fp32
peak is cores × FMA units × SIMD lanes × 2 (multiply and add) × clock; the FMA
unit count cannot be read from the OS, so it is taken as 2 (Intel Xeon since
Skylake-SP Gold, AMD Zen 2–4); the clock is the highest the OS reports. The
measured single-precision GEMM rate (MKL, 4096²) is shown beside it as the
rate a well-tuned kernel reaches on this machine.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch

from cov3d.training.precision import cpu_bf16, cpu_info

FMA_UNITS = 2


def clock_ghz() -> tuple[float | None, str]:
    """The CPU clock in GHz and where it was read."""
    try:
        khz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text().strip())
        return khz / 1e6, "cpufreq maximum"
    except (OSError, ValueError):
        pass
    info = cpu_info()
    match = re.search(r"@\s*([\d.]+)\s*GHz", info.model)
    if match:
        return float(match.group(1)), "model name"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) / 1000, "/proc/cpuinfo cpu MHz (may be the base clock)"
    except (OSError, ValueError):
        pass
    return None, "unknown"


def simd_lanes() -> int:
    """fp32 lanes of the widest vectors torch and oneDNN may use here."""
    info = cpu_info()
    limit = info.isa_limit or ""
    if info.capability.upper().startswith("AVX512") and not limit.startswith(("AVX2", "AVX", "SSE")):
        return 16
    if info.capability.upper().startswith("AVX") or limit.startswith("AVX2"):
        return 8
    return 4


def nominal_peak() -> tuple[float | None, str]:
    """(GFLOP/s, the arithmetic) of the nominal fp32 peak of the cores torch uses."""
    ghz, source = clock_ghz()
    cores, lanes = torch.get_num_threads(), simd_lanes()
    if ghz is None:
        return None, "clock unknown"
    peak = cores * FMA_UNITS * lanes * 2 * ghz
    return peak, (f"{cores} cores × {FMA_UNITS} FMA units × {lanes} fp32 lanes × 2 × {ghz:.2f} GHz ({source}) "
                  f"= {peak:.1f} GFLOP/s")


def sgemm_gflops(n: int = 4096, repeats: int = 3) -> float:
    """The measured fp32 matrix-multiply rate (MKL or OpenBLAS, whichever torch uses)."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def describe_machine(measure: bool = False) -> str:
    """The lines every benchmark prints first."""
    info = cpu_info()
    native, reason = cpu_bf16()
    lines = [f"CPU: {info.describe()}", f"torch {torch.__version__}; bf16 native: {native} ({reason})"]
    limits = {k: v for k, v in os.environ.items() if k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
                                                            "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS")}
    if limits:
        lines.append("limits: " + ", ".join(f"{k}={v}" for k, v in sorted(limits.items())))
    peak, arithmetic = nominal_peak()
    lines.append(f"nominal fp32 peak: {arithmetic}")
    if measure:
        lines.append(f"measured fp32 GEMM (4096²): {sgemm_gflops():.1f} GFLOP/s")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe_machine(measure=True))
