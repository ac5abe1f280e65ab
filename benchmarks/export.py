"""ONNX Runtime against PyTorch on this CPU: one exported model, the same preprocessed volumes, TTA in both.

    python benchmarks/export.py [--arch r3d_18] [--size small] [--scans 4] [--model RUN]

Exports the model (random initialisation with a fixed seed, or --model RUN)
with `cov3d export` into a temporary folder, then times, per scan with the
sagittal-reflection TTA (two volumes through the network), best of three
after a warm-up, the three in turn on each scan: PyTorch eager in fp32,
cov3d predict's own CPU path (fp32, BatchNorm folded into the convolutions)
and the ONNX graph in ONNX Runtime (CPU provider, default graph
optimisations), each with this machine's default thread count. Prints the
largest |difference| in P(covid) between the graph and cov3d predict.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine  # noqa: E402  (the CPU and peak every figure is printed beside)

from cov3d.data.preprocess import resolve_size  # noqa: E402
from cov3d.inference.export import export_models  # noqa: E402
from cov3d.inference.onnx_predict import load_exported  # noqa: E402
from cov3d.inference.predict import _run, _Runner, inference_runner, load_ensemble  # noqa: E402
from cov3d.models.checkpoint import model_config, save_checkpoint  # noqa: E402
from cov3d.models.registry import build_model  # noqa: E402
from cov3d.training.precision import best_seconds  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="r3d_18")
    parser.add_argument("--size", default="small")
    parser.add_argument("--scans", type=int, default=4, help="random volumes timed one at a time")
    parser.add_argument("--model", type=Path, help="a cov3d run directory or checkpoint (default: random init)")
    args = parser.parse_args()
    print(describe_machine(), flush=True)
    import onnxruntime

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            size = resolve_size(args.size)
            torch.manual_seed(0)
            config = model_config(arch=args.arch, depth=size.depth, width=size.width, lam=0.1,
                                  window=(-1350.0, 150.0), penultimate=512, dropout=0.5, pool="avg", final_bias=True)
            args.model = Path(tmp) / "model.pt"
            save_checkpoint(args.model, build_model(args.arch, pretrained=False), config)
        member = load_ensemble([args.model])[0]  # a run's presence checkpoint
        export = export_models([member.path], Path(tmp) / "exported")
        graph = load_exported([export.files[0].path])[0]
        name = graph.inputs[0]["name"]
        data = [v[None] for v in torch.rand(args.scans, 1, member.size.depth, member.size.width,
                                            member.size.width, generator=torch.Generator().manual_seed(1))]
        print(f"{member.config['arch']} at {member.size.name}, TTA on (2 volumes a scan); torch "
              f"{torch.get_num_threads()} threads, onnxruntime {onnxruntime.__version__} "
              f"({graph.session.get_providers()[0]}), ONNX opset {export.files[0].spec['opset']}", flush=True)
        cpu = torch.device("cpu")
        eager = _Runner(member.model, "fp32", False)
        folded = _Runner(inference_runner(member.model, cpu, "fp32"), "fp32", False)  # once, as predict does
        modes = {
            "PyTorch eager fp32": lambda x: _run([member], [eager], x, True, cpu)[0],
            "cov3d predict (fp32, BN folded)": lambda x: _run([member], [folded], x, True, cpu)[0],
            "ONNX Runtime": lambda x: graph.run({name: x.numpy()}),
        }
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for x in data:  # the modes in turn on each scan, so that a busy spell of the machine hits them alike
            for mode, run in modes.items():
                times[mode].append(best_seconds(lambda: run(x)))
        seconds = {mode: float(np.median(t)) for mode, t in times.items()}
        for mode, value in seconds.items():
            print(f"{mode:<32} {value:.3f} s per scan (median over {len(data)} scans of the best of 3)")
        base = seconds["cov3d predict (fp32, BN folded)"]
        print(f"ONNX Runtime: {base / seconds['ONNX Runtime']:.2f}x the speed of cov3d predict's CPU path")
        worst = 0.0
        for x in data:
            want = modes["cov3d predict (fp32, BN folded)"](x)[:, 0].numpy()
            worst = max(worst, float(np.abs(graph.run({name: x.numpy()})["probability"] - want).max()))
        print(f"largest |ΔP(covid)| between the graph and cov3d predict: {worst:.2e}")


if __name__ == "__main__":
    main()
