"""`cov3d export`: checkpoints → an ONNX or TorchScript graph with its JSON spec, optionally verified."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cov3d.cli.core import app, console, errors, reported
from cov3d.cli.options import choices

# Restated from cov3d.inference.export (FORMATS, ENSEMBLES, OPSET, TOLERANCE), which loads torch.
ExportFormat = choices("ExportFormat", ("onnx", "torchscript"))
EnsembleMode = choices("EnsembleMode", ("fold", "members"))
OPSET, TOLERANCE = 17, 1e-4


@app.command()
def export(
    models: Annotated[
        list[Path], typer.Argument(help="Run directories or checkpoint files (or W&B artifacts "
                                        "wandb:ENTITY/PROJECT/NAME:ALIAS); several make an ensemble.")
    ],
    output: Annotated[Path, typer.Option(help="Folder for the exported file(s) and their JSON spec.")] = Path("exported"),
    format: Annotated[
        ExportFormat, typer.Option("--format", help="onnx (run with ONNX Runtime, or `cov3d predict --model "
                                                    "DIR/model.onnx`) or torchscript (torch.jit.load).")
    ] = ExportFormat.onnx,
    ensemble: Annotated[
        EnsembleMode, typer.Option(help="fold: one graph that averages the members; members: one file per "
                                        "member, averaged by the runtime as their spec says.")
    ] = EnsembleMode.fold,
    tta: Annotated[
        bool, typer.Option("--tta/--no-tta", help="Put the sagittal-reflection TTA inside the graph, as "
                                                  "`cov3d predict --tta` does.")
    ] = True,
    threshold: Annotated[
        str, typer.Option(help="P(covid) threshold to record in the spec: a number, or a metrics.json from "
                               "`cov3d evaluate`.")
    ] = "0.5",
    opset: Annotated[int, typer.Option(min=13, help="ONNX opset of the graph.")] = OPSET,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Run the export and cov3d's predict on the same tensors "
                                                        "and fail when they differ by more than --tolerance.")
    ] = False,
    verify_with: Annotated[
        Optional[list[Path]], typer.Option(help="Scans (or cached .pt tensors) to verify on; repeat for more "
                                                "(default: random volumes).")
    ] = None,
    tolerance: Annotated[
        float, typer.Option(min=0.0, help="Largest |difference| in any probability that --verify accepts.")
    ] = TOLERANCE,
) -> None:
    """Export models for deployment: ONNX or TorchScript, with the spec a runtime needs (docs/deploy.md)."""
    from cov3d.atomic import check_writable
    from cov3d.inference.export import export_members, load_members, verification_volumes
    from cov3d.inference.export import verify as verify_export
    from cov3d.inference.predict import parse_threshold

    with reported():
        cutoff = parse_threshold(threshold)
        check_writable(output, folder=True)
        members = load_members(models)
        # Scans to verify on are read before the export, so that a wrong one fails at once.
        volumes = verification_volumes(members, verify_with) if verify or verify_with else None
        result = export_members(members, output, format=format.value, ensemble=ensemble.value, tta=tta,
                                threshold=cutoff, opset=opset)
        where = "in the graph" if tta else "off"
        details = f"ONNX opset {opset}" if format.value == "onnx" else "TorchScript"
        console.print(f"Exported {len(result.members)} checkpoint(s) to {len(result.files)} file(s) ({details}, "
                      f"TTA {where}, threshold {cutoff:g}):", soft_wrap=True)
        for file in result.files:
            console.print(f"  {file.path} (spec {file.spec_path.name})", highlight=False)
        if volumes is not None:
            check = verify_export(result, tolerance=tolerance, volumes=volumes)
            figures = ", ".join(f"{name} {value:.2e}" for name, value in check.differences.items())
            line = (f"Largest |difference| from cov3d predict on {check.inputs}: {check.largest:.2e} ({figures}); "
                    f"tolerance {tolerance:g}")
            if not check.passed:
                errors.print(f"[bold red]Verification failed.[/] {line}", highlight=False)
                raise typer.Exit(1)
            console.print(f"Verified. {line}", highlight=False)
