"""Where the demo model's Grad-CAM maps fall: inside the phantoms' lungs, and on their lesions.

    cov3d demo --output cov3d-demo
    python benchmarks/saliency.py cov3d-demo [--stages 2 3 4] [--split validation]

The demo's phantoms are regenerated from their seed (cov3d.data.synth.phantoms), so
each scan's lung and lesion masks are known. For every scan of the split, and
for each backbone stage, `explain_scan` (with TTA) gives the presence map on the
original slices; the script reports, per stage and class, the median share of
map mass inside the lungs and on the lesions, next to the share of the volume
they fill (what a map spread evenly would give), and writes results.json.
"""

from __future__ import annotations

import argparse
import sys
import json
import statistics
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine  # noqa: E402  (the CPU and peak every figure is printed beside)

def main() -> None:
    from cov3d.demo import STATE
    from cov3d.inference.explain import explain_scan, mass_share
    from cov3d.inference.predict import load_ensemble
    from cov3d.data.synth import phantoms

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo", type=Path, help="the output folder of `cov3d demo`")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--split", default="validation")
    parser.add_argument("--output", type=Path, default=Path("benchmark-saliency"))
    args = parser.parse_args()
    print(describe_machine(), flush=True)
    settings = json.loads((args.demo / STATE).read_text())["settings"]
    members = load_ensemble([args.demo / "run" / "presence.pt"])
    rows = []
    start = time.perf_counter()
    for entry, phantom in phantoms(settings["scans"], settings["seed"]):
        if entry.split != args.split:
            continue
        for stage in args.stages:
            explanation = explain_scan(args.demo / "data" / entry.path, members, stage=stage)
            heat = explanation.maps["presence"]
            rows.append({"scan": entry.path, "label": entry.label, "severity": entry.severity, "stage": stage,
                         "probability": explanation.probability,
                         "lung_share": mass_share(heat, phantom.lungs), "lung_volume": float(phantom.lungs.mean()),
                         "lesion_share": mass_share(heat, phantom.lesions),
                         "lesion_volume": float(phantom.lesions.mean())})
    summary = []
    for stage in args.stages:
        for label in ("covid", "non-covid"):
            chosen = [r for r in rows if r["stage"] == stage and r["label"] == label]
            line = {"stage": stage, "label": label, "scans": len(chosen)}
            for key in ("lung_share", "lung_volume", "lesion_share", "lesion_volume"):
                line[key] = statistics.median(r[key] for r in chosen)
            summary.append(line)
            print(f"stage {stage} {label:<9} ({len(chosen)} scans): median map mass in lungs "
                  f"{line['lung_share']:.2f} (lungs fill {line['lung_volume']:.2f} of the volume), on lesions "
                  f"{line['lesion_share']:.3f} (lesions fill {line['lesion_volume']:.3f})", flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "saliency", "settings": settings, "seconds": time.perf_counter() - start,
              "summary": summary, "scans": rows}
    (args.output / "saliency.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
