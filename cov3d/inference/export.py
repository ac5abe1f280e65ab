"""`cov3d export`: checkpoints → one ONNX or TorchScript graph (or one per member) with its JSON spec.

The graph computes what `cov3d predict` computes from preprocessed volumes:
each member's probabilities (:func:`cov3d.training.loss.probabilities` of its
λ), averaged with those of the sagittal reflection (a flip of the last axis)
when TTA is inside the graph, then P(covid) as the mean over the presence
members and P(mild…critical | covid) as the mean over the severity members.
Its outputs are ``probability`` (batch,) and, when a member answers for
severity, ``severity`` (batch, 4); the batch axis is dynamic. Members of
different input sizes or windows read separate inputs (``volume_1``, …).

Beside each graph ``X.onnx`` (or ``X.torchscript``) lies ``X.json``: what a
runtime needs without cov3d (inputs, the preprocessing rule, outputs and
their decoding, the threshold, the cov3d version, each checkpoint's sha256).
:func:`verify` runs the written files and cov3d's own predict path on the same
tensors and reports the largest difference. ONNX graphs are written by torch's
TorchScript-based exporter at opset :data:`OPSET`, which exports every
architecture of the registry; ONNX Runtime runs them (:mod:`cov3d.inference.onnx_predict`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cov3d import __version__, labels
from cov3d.atomic import check_writable, replacing
from cov3d.data.dataset import reflect
from cov3d.data.preprocess import Size, load_cached, preprocess_volume
from cov3d.errors import Cov3dError
from cov3d.inference.onnx_predict import (
    PROBABILITY, SEVERITY, SPEC_FORMAT, SUFFIXES, Exported, is_spec, open_session, spec_path,
)
from cov3d.inference.predict import Member, _run, _Runner, inference_runner, load_ensemble
from cov3d.labels import SEVERITY_NAMES
from cov3d.models.checkpoint import PRESENCE
from cov3d.training.loss import probabilities

log = logging.getLogger(__name__)

FORMATS = tuple(SUFFIXES)  # onnx, torchscript
ENSEMBLES = ("fold", "members")  # one graph averaging the members, or one file per member
OPSET = 17  # ONNX opset of the exported graphs (ONNX Runtime ≥ 1.12 runs it)
TOLERANCE = 1e-4  # largest |difference| from cov3d predict that --verify accepts (fp32 probabilities)
EXAMPLE_BATCH = 1  # the batch the graph is traced with
VERIFY_BATCH = 2  # random volumes --verify runs when no scan is given: not the traced batch, to check the axis

PREPROCESSING = {
    "reference": "cov3d.data.preprocess.preprocess_volume (what cov3d predict does to every scan)",
    "orientation": "volumes and DICOM series reoriented with SimpleITK DICOMOrient(image, 'LPI'): array axes "
                   "(slice, row, column) run head to feet, anterior to posterior, patient right to left",
    "intensity": "Hounsfield units mapped by the input's window [low, high] to (hu - low) / (high - low), "
                 "clipped to [0, 1]; 8-bit images (JPEG/PNG slices, uint8 volumes) are divided by 255 instead",
    "in_plane": "each slice resized to width x width with Pillow's antialiased bicubic filter "
                "(Image.resize(..., BICUBIC) on the float32 slice: a separable cubic convolution, a = -0.5, its "
                "support widened by the reduction factor), then clipped to [0, 1]",
    "depth": "slices interpolated to depth along the slice axis by a cubic not-a-knot spline over evenly spaced "
             "positions, first and last slices at the ends (scipy make_interp_spline, k = min(3, slices - 1)), "
             "then clipped to [0, 1]; voxel spacing is not used",
    "layout": "float32 (batch, 1, depth, width, width) in [0, 1]",
}


def sha256(path: Path) -> str:
    """The hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


Group = tuple[Size, tuple[float, float]]  # the input size and window a member reads


def input_groups(members: Sequence[Member]) -> list[Group]:
    """The distinct (size, window) the members read, in the order predict groups them."""
    groups: list[Group] = []
    for member in members:
        if (member.size, member.window) not in groups:
            groups.append((member.size, member.window))
    return groups


def input_names(groups: Sequence[Group]) -> list[str]:
    return ["volume"] if len(groups) == 1 else [f"volume_{i + 1}" for i in range(len(groups))]


class DeployedModel(nn.Module):
    """Members → (P(covid),) or (P(covid), P(mild…critical | covid)), as `cov3d predict` computes them."""

    def __init__(self, members: Sequence[Member], tta: bool):
        super().__init__()
        groups = input_groups(members)
        self.models = nn.ModuleList([m.model for m in members])
        self.lambdas = [float(m.config["lambda"]) for m in members]
        self.reads = [groups.index((m.size, m.window)) for m in members]
        self.presence = [m.presence for m in members]
        self.severity = [m.severity for m in members]
        self.tta = tta

    @property
    def outputs(self) -> list[str]:
        """What it answers for: an ensemble always gives P(covid), a member exported on its own its tasks."""
        return [name for name, answers in ((PROBABILITY, self.presence), (SEVERITY, self.severity)) if any(answers)]

    def forward(self, *volumes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        presence, severity = [], []
        for model, lam, read, answers_presence, answers_severity in zip(
                self.models, self.lambdas, self.reads, self.presence, self.severity):
            x = volumes[read]
            if self.tta:  # as predict: the scan and its sagittal reflection in one batch, probabilities averaged
                x = torch.cat([x, reflect(x)])
            probs = probabilities(model(x), lam)
            if self.tta:
                pair = probs.reshape(2, -1, probs.shape[-1])
                probs = (pair[0] + pair[1]) / 2
            if answers_presence:
                presence.append(labels.presence(probs))
            if answers_severity:
                severity.append(labels.severity_given_covid(probs))
        return tuple(torch.stack(part).mean(dim=0) for part in (presence, severity) if part)


@dataclass
class ExportedFile:
    """One written graph: its file, its spec (and where it lies) and the members it holds."""

    path: Path
    spec_path: Path
    spec: dict
    members: list[Member]


@dataclass
class Export:
    """What `export_models` wrote."""

    format: str
    tta: bool
    members: list[Member]
    files: list[ExportedFile] = field(default_factory=list)


def check_sources(models: Sequence[Path]) -> None:
    """Refuse, with the fix, a --model value that is an export already or a folder without checkpoints."""
    for value in models:
        path = Path(value)
        if str(value).startswith("wandb:") or not path.exists():
            continue  # load_ensemble downloads artifacts and names a missing path
        if path.is_file() and (path.suffix in SUFFIXES.values() or is_spec(path) or is_spec(spec_path(path))):
            raise Cov3dError(f"'{path}' is an exported model already; export from the run directory or the .pt "
                             "checkpoint it came from (its spec .json lists the checkpoints)")
        if path.is_dir() and not (path / PRESENCE).is_file():
            if any(is_spec(p) for p in path.glob("*.json")):
                raise Cov3dError(f"'{path}' is a folder of exported models; export from the run directory or "
                                 "the .pt checkpoints they came from (their spec .json lists them)")
            checkpoints = sorted(p.name for p in path.glob("*.pt"))
            if checkpoints:
                raise Cov3dError(f"'{path}' is not a cov3d run directory (no {PRESENCE}); pass one of its "
                                 f"checkpoints instead: {', '.join(str(path / n) for n in checkpoints[:3])}")
            raise Cov3dError(f"'{path}' holds no cov3d checkpoint (no {PRESENCE}, no .pt file); pass a run "
                             "directory that `cov3d train` wrote, or a .pt checkpoint file")


def _spec(graph: Path, format: str, members: list[Member], module: DeployedModel, threshold: float,
          opset: int, ensemble: dict) -> dict:
    groups = input_groups(members)
    inputs = [{"name": name, "shape": ["batch", 1, size.depth, size.width, size.width], "dtype": "float32",
               "depth": size.depth, "width": size.width, "window": list(window), "range": [0.0, 1.0]}
              for name, (size, window) in zip(input_names(groups), groups)]
    outputs = [{"name": PROBABILITY, "shape": ["batch"], "meaning": "P(covid)"}] if PROBABILITY in module.outputs \
        else []
    if SEVERITY in module.outputs:
        outputs.append({"name": SEVERITY, "shape": ["batch", len(SEVERITY_NAMES)], "classes": list(SEVERITY_NAMES),
                        "meaning": "P(class | covid) for mild, moderate, severe, critical; sums to 1"})
    runtime = ({"runtime": "onnxruntime", "opset": opset,
                "exporter": f"torch.onnx.export (TorchScript-based), torch {torch.__version__}"}
               if format == "onnx" else
               {"runtime": "torch.jit.load", "exporter": f"torch.jit.trace, torch {torch.__version__}"})
    return {
        "cov3d_export": SPEC_FORMAT,
        "cov3d_version": __version__,
        "format": format,
        "file": graph.name,
        **runtime,
        "inputs": inputs,
        "preprocessing": PREPROCESSING,
        "tta": module.tta,
        "tta_rule": ("inside the graph: each member's probabilities are the mean over the volume and its reflection "
                     "through the sagittal plane (the last axis flipped), as cov3d predict --tta"
                     if module.tta else "none: the graph equals cov3d predict --no-tta"),
        "outputs": outputs,
        "decoding": {"prediction": "covid when probability >= threshold, else non-covid",
                     "severity": "the class of the largest severity probability, for every scan (as cov3d "
                                 "predict writes it)"},
        "threshold": threshold,
        "ensemble": ensemble,
        "members": [{"checkpoint": str(m.path), "sha256": sha256(m.path), "arch": m.config["arch"],
                     "kind": m.config["input"], "lambda": float(m.config["lambda"]),
                     "presence": m.presence, "severity": m.severity,
                     "input": input_names(groups)[groups.index((m.size, m.window))]} for m in members],
    }


def _example(members: Sequence[Member], batch: int = VERIFY_BATCH, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 1, size.depth, size.width, size.width, generator=generator)
            for size, _ in input_groups(members)]


def _write_graph(module: DeployedModel, path: Path, format: str, example: list[torch.Tensor], names: list[str],
                 opset: int, what: str, target: Path) -> None:
    """Trace `module` into `path` (the temporary file of `target`); an architecture the exporter cannot take is a
    Cov3dError naming it."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # Expected here: torch's deprecation notes for both exporters, and the tracer's note that a slice
            # model's slice count becomes a constant (it is: the input size is fixed).
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", module=r"torch\.")
            if format == "onnx":
                axes = {name: {0: "batch"} for name in names + module.outputs}
                torch.onnx.export(module, tuple(example), str(path), input_names=names,
                                  output_names=module.outputs, dynamic_axes=axes, opset_version=opset,
                                  dynamo=False)
            else:
                torch.jit.trace(module, tuple(example), check_trace=False).save(str(path))
    except OSError as error:
        raise Cov3dError(f"cannot write '{target}': {error.strerror or error}") from None
    except Exception as error:  # any exporter failure: an operator or construct it cannot translate
        text = str(error).strip()
        first = text.splitlines()[0] if text else type(error).__name__
        other = "torchscript" if format == "onnx" else "onnx"
        raise Cov3dError(f"{what} cannot be exported to {format} ({first}); try --format {other}, or run the "
                         "checkpoint with cov3d predict") from None


def load_members(models: Sequence[Path]) -> list[Member]:
    """The ensemble members of run directories, checkpoints and W&B artifacts, refusing exports and empty folders."""
    check_sources(models)
    members = load_ensemble(models)
    for member in members:
        if member.lungs != "off":
            # The graph holds the network only; the lung segmentation that made its input is cov3d's code.
            raise Cov3dError(f"'{member.path}' was trained with --lungs {member.lungs}, whose input is cut by "
                             "cov3d's lung segmentation, which an exported graph cannot hold; export a model "
                             "trained with --lungs off, or run this one with `cov3d predict`")
    return members


def _check_choices(format: str, ensemble: str) -> None:
    if format not in FORMATS:
        raise Cov3dError(f"export format '{format}' is not one of {', '.join(FORMATS)}")
    if ensemble not in ENSEMBLES:
        raise Cov3dError(f"ensemble mode '{ensemble}' is not one of {', '.join(ENSEMBLES)}")


def export_models(models: Sequence[Path], output: Path, **options) -> Export:
    """Export run directories and checkpoints into `output`; the options are :func:`export_members`'."""
    _check_choices(options.get("format", "onnx"), options.get("ensemble", "fold"))
    check_writable(output, folder=True)
    return export_members(load_members(models), output, **options)


def export_members(
    members: list[Member],
    output: Path,
    *,
    format: str = "onnx",
    ensemble: str = "fold",
    tta: bool = True,
    threshold: float = 0.5,
    opset: int = OPSET,
) -> Export:
    """Write `members` into `output`: one graph (fold), or one per member (members), each with its spec."""
    _check_choices(format, ensemble)
    output = Path(output)
    check_writable(output, folder=True)
    suffix = SUFFIXES[format]
    if ensemble == "fold" or len(members) == 1:
        plan = [(output / f"model{suffix}", members)]
    else:
        plan = [(output / f"member-{i + 1}{suffix}", [m]) for i, m in enumerate(members)]
    files = [path.name for path, _ in plan]
    _refuse_stale(output, {name for path, _ in plan for name in (path.name, spec_path(path).name)})
    mode = "fold" if len(plan) == 1 else "members"
    rule = ("one graph averages its members: probability = mean P(covid) of the presence members, severity = "
            "mean P(class | covid) of the severity members" if mode == "fold" else
            "one file per member: probability = mean of `probability` over the files that output it, severity = "
            "mean of `severity` over the files that output it")
    result = Export(format, tta, members)
    output.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:  # every file is written whole before any replaces an older one
        for path, group in plan:
            module = DeployedModel(group, tta).eval()
            what = ", ".join(sorted({f"architecture '{m.config['arch']}'" for m in group}))
            _write_graph(module, stack.enter_context(replacing(path)), format, _example(group, EXAMPLE_BATCH),
                         input_names(input_groups(group)), opset, what, path)
            spec = _spec(path, format, group, module, threshold, opset, {"mode": mode, "files": files, "rule": rule})
            stack.enter_context(replacing(spec_path(path))).write_text(json.dumps(spec, indent=2) + "\n",
                                                                        encoding="utf-8")
            result.files.append(ExportedFile(path, spec_path(path), spec, group))
    log.info("exported %d checkpoint(s) to %s", len(members), ", ".join(files))
    return result


def _refuse_stale(output: Path, writing: set[str]) -> None:
    """A folder holding another export's files that this one would not replace is refused, not mixed."""
    if not output.is_dir():
        return
    stale = sorted(p.name for p in output.iterdir() if p.name not in writing and p.is_file()
                   and (p.suffix in SUFFIXES.values() or (p.suffix == ".json" and is_spec(p))))
    if stale:
        raise Cov3dError(f"'{output}' holds another export ({', '.join(stale)}) that this one would not replace; "
                         "choose an empty --output folder, or delete those files and their graphs")


def member_probabilities(member: Member, volumes: torch.Tensor, tta: bool) -> torch.Tensor:
    """One member's (B, 6) probabilities of a batch, as cov3d predict computes them (fp32 on the CPU)."""
    cpu = torch.device("cpu")
    runner = _Runner(inference_runner(member.model, cpu, "fp32"), "fp32", False)
    [probs] = _run([member], [runner], volumes, tta, cpu)
    return probs


def combine(members: Sequence[Member], probs: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    """The ensemble's outputs from its members' probabilities, as cov3d predict averages them."""
    presence = [labels.presence(p).numpy().astype(np.float64) for m, p in zip(members, probs) if m.presence]
    severity = [labels.severity_given_covid(p).numpy().astype(np.float64) for m, p in zip(members, probs)
                if m.severity]
    return {name: np.mean(part, axis=0) for name, part in ((PROBABILITY, presence), (SEVERITY, severity)) if part}


def reference(members: Sequence[Member], volumes: Sequence[torch.Tensor], tta: bool) -> dict[str, np.ndarray]:
    """What cov3d predict computes for preprocessed volumes, one batch per input group of the members."""
    groups = input_groups(members)
    return combine(members, [member_probabilities(m, volumes[groups.index((m.size, m.window))], tta)
                             for m in members])


def run_file(file: ExportedFile, volumes: Sequence[torch.Tensor], groups: Sequence[Group]) -> dict[str, np.ndarray]:
    """The outputs of a written graph on volumes given per group of `groups`."""
    own = [volumes[groups.index(key)] for key in input_groups(file.members)]
    if file.spec["format"] == "onnx":
        graph = Exported(file.path, file.spec, open_session(file.path))
        names = [entry["name"] for entry in file.spec["inputs"]]
        return {k: v.astype(np.float64) for k, v in graph.run(dict(zip(names, (v.numpy() for v in own)))).items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        loaded = torch.jit.load(str(file.path), map_location="cpu")
    with torch.no_grad():
        values = loaded(*own)
    names = [entry["name"] for entry in file.spec["outputs"]]
    return {name: value.numpy().astype(np.float64) for name, value in zip(names, values)}


@dataclass
class Verification:
    """How far the written files are from cov3d predict on the same tensors."""

    inputs: str  # what they ran on
    differences: dict[str, float]  # per file, and "combined" for the export as its runtime combines the files
    tolerance: float
    expected: dict[str, np.ndarray]  # cov3d predict's outputs for the whole export, by output name

    @property
    def largest(self) -> float:
        return max(self.differences.values())

    @property
    def passed(self) -> bool:
        return self.largest <= self.tolerance


def verification_volumes(members: Sequence[Member], scans: Sequence[Path] = ()) -> tuple[list[torch.Tensor], str]:
    """One batch per input group: the given scans (or cache .pt tensors) preprocessed, else random volumes."""
    if not scans:
        groups = input_groups(members)
        sizes = ", ".join(size.name for size, _ in groups)
        return _example(members), f"{VERIFY_BATCH} random volume(s) of {sizes}"
    batches = []
    for size, window in input_groups(members):
        tensors = []
        for scan in map(Path, scans):
            if not scan.exists():
                raise Cov3dError(f"verification scan '{scan}' does not exist; give a scan or a cached .pt tensor")
            if scan.suffix == ".pt":
                tensor = load_cached(scan).float()
                if tuple(tensor.shape[1:]) != (size.depth, size.width, size.width):
                    raise Cov3dError(f"'{scan}' holds a {'x'.join(map(str, tensor.shape[1:]))} volume but the model "
                                     f"reads {size.name}; give the scan itself or its cache at {size.name}")
            else:
                tensor = preprocess_volume(scan, size, window, threads=1)[0].float()
            tensors.append(tensor)
        batches.append(torch.stack(tensors))
    return batches, f"{len(scans)} scan(s)"


def verify(export: Export, scans: Sequence[Path] = (), tolerance: float = TOLERANCE,
           volumes: tuple[list[torch.Tensor], str] | None = None) -> Verification:
    """Run the written files and cov3d's predict path on the same tensors; the largest |difference| per file.

    The tensors are `volumes` (from :func:`verification_volumes`), else those of `scans`, else random.
    """
    volumes, described = volumes or verification_volumes(export.members, scans)
    groups = input_groups(export.members)
    probs = [member_probabilities(m, volumes[groups.index((m.size, m.window))], export.tta) for m in export.members]
    of = {id(m): p for m, p in zip(export.members, probs)}
    differences: dict[str, float] = {}
    outputs = []
    for file in export.files:
        got = run_file(file, volumes, groups)
        differences[file.path.name] = _difference(got, combine(file.members, [of[id(m)] for m in file.members]))
        outputs.append(got)
    want = combine(export.members, probs)
    if len(export.files) > 1:  # as a runtime combines the member files, against predict on the whole ensemble
        combined = {name: np.mean([o[name] for o in outputs if name in o], axis=0)
                    for name in (PROBABILITY, SEVERITY) if any(name in o for o in outputs)}
        differences["combined"] = _difference(combined, want)
    return Verification(described, differences, tolerance, want)


def _difference(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    if set(got) != set(want):
        raise Cov3dError(f"the export gives {sorted(got)} but predict gives {sorted(want)}; export again")
    return max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
