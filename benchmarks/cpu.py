"""CPU inference: is `--precision auto` ever slower than fp32, and how close does fp32 come to the CPU's peak?

    python benchmarks/cpu.py [--arch NAME ...] [--sizes 16x32 64x128] [--batch 1] [--bf16]

For every architecture and size, times one forward pass (median of --repeats
after a warm-up; random initialisation, seed 0) in:

- fp32 eager: the plain PyTorch module;
- fp32 cov3d: what `predict` runs in fp32 on a CPU (BatchNorm folded into the convolutions);
- bf16: autocast with channels_last_3d, timed only where this CPU has native bf16 (or with --bf16:
  emulated bf16 can take minutes a pass);
- auto: what `--precision auto` runs here (bf16 only where native and timed faster than fp32), and its time.

Then r3d_18's achieved GFLOP/s at 64x128x128 (415.4 GFLOP a scan, counted from its convolutions) against
the nominal fp32 peak and the measured GEMM rate. Prints the machine first (benchmarks/machine.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine, nominal_peak, sgemm_gflops  # noqa: E402

from cov3d.models.registry import ARCHS, build_model, memory_format  # noqa: E402
from cov3d.training.precision import cpu_bf16, faster_of_fp32_and_bf16, resolve_precision  # noqa: E402
from cov3d.inference.predict import inference_runner  # noqa: E402


def conv_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward pass, counting 2 per multiply-add of every convolution and linear layer."""
    total = [0]

    def count(module, _inputs, output):
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            per_output = module.in_channels // module.groups
            for k in module.kernel_size:
                per_output *= k
            total[0] += 2 * per_output * output.numel()
        elif isinstance(module, torch.nn.Linear):
            total[0] += 2 * module.in_features * output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    with torch.inference_mode():
        model(x)
    for hook in hooks:
        hook.remove()
    return float(total[0])


def seconds(run, repeats: int) -> float:
    run()  # warm-up: oneDNN picks and builds its kernels on the first call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_modes(arch: str, depth: int, width: int, batch: int, repeats: int, bf16: bool) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(arch, pretrained=False).eval()
    x = torch.rand(batch, 1, depth, width, width)
    results = {}
    with torch.inference_mode():
        results["fp32 eager"] = seconds(lambda: model(x), repeats)
        runner = inference_runner(model, torch.device("cpu"), "fp32")
        results["fp32 cov3d"] = seconds(lambda: runner(x), repeats)
        if bf16:
            fast = build_model(arch, pretrained=False).eval().to(memory_format=memory_format(arch))
            fast.load_state_dict(model.state_dict())
            xl = x.contiguous(memory_format=torch.channels_last_3d)

            def run():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return fast(xl)
            results["bf16"] = seconds(run, repeats)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=list(ARCHS))
    parser.add_argument("--sizes", nargs="+", default=["16x32", "64x128"], help="DEPTHxWIDTH")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="time bf16 even where this CPU emulates it")
    args = parser.parse_args()
    print(describe_machine(measure=True), flush=True)
    native, _ = cpu_bf16()
    auto = resolve_precision("auto", "cpu", "inference")
    print(f"--precision auto for inference here: {auto.precision} ({auto.reason}); per model and size, predict "
          "keeps bf16 only where it times faster than fp32\n", flush=True)
    scratch = Path(tempfile.mkdtemp())
    print(f"seconds per forward pass, batch {args.batch}, median of {args.repeats}")
    print("| arch | size | fp32 eager | fp32 cov3d | bf16 | auto | auto ÷ fp32 eager |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        depth, width = (int(v) for v in size.split("x"))
        for arch in args.arch:
            times = time_modes(arch, depth, width, args.batch, args.repeats, native or args.bf16)
            chosen = auto
            if auto.precision == "bf16":  # predict's rule, applied to these timings
                chosen = faster_of_fp32_and_bf16(auto, f"{arch} {size}", lambda: (times["fp32 cov3d"], times["bf16"]),
                                                 cache=scratch)
            auto_time = times["bf16"] if chosen.precision == "bf16" else times["fp32 cov3d"]
            bf16 = f"{times['bf16']:.3f}" if "bf16" in times else "(emulated: not timed)"
            print(f"| {arch} | {depth}x{width}x{width} | {times['fp32 eager']:.3f} | {times['fp32 cov3d']:.3f} | "
                  f"{bf16} | {auto_time:.3f} ({chosen.precision}) | {auto_time / times['fp32 eager']:.2f} |",
                  flush=True)
    torch.manual_seed(0)
    model = build_model("r3d_18", pretrained=False).eval()
    x = torch.rand(1, 1, 64, 128, 128)
    flops = conv_flops(model, x)
    runner = inference_runner(model, torch.device("cpu"), "fp32")
    with torch.inference_mode():
        fp32 = seconds(lambda: runner(x), args.repeats)
    peak, arithmetic = nominal_peak()
    gemm = sgemm_gflops()
    rate = flops / fp32 / 1e9
    print(f"\nr3d_18 at 64x128x128, fp32 cov3d path: {flops / 1e9:.1f} GFLOP in {fp32:.3f} s = {rate:.1f} GFLOP/s")
    if peak:
        print(f"  {rate / peak:.0%} of the nominal peak ({arithmetic})")
    print(f"  {rate / gemm:.0%} of the measured fp32 GEMM rate ({gemm:.1f} GFLOP/s)")


if __name__ == "__main__":
    main()
