"""Exported models (`cov3d export --format onnx`) run with ONNX Runtime: `cov3d predict --model model.onnx`.

Every graph file ``X.onnx`` has its spec ``X.json`` beside it (written by
:mod:`cov3d.inference.export`): its inputs with the size and window each was
preprocessed at, its outputs, whether the sagittal-reflection TTA is inside
the graph, the threshold and the checkpoints it came from. Scans are read and
preprocessed by cov3d's own preprocessing (from an up-to-date cache where
there is one), exactly as for checkpoints, and the rows are the same CSV.
Neither fastai nor cov3d's networks are loaded on this path; torch is, for
reading scans.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from cov3d.data.preprocess import Size
from cov3d.errors import Cov3dError
from cov3d.inference.predict import Prediction, Steps, _batches, _CachedOrFresh

log = logging.getLogger(__name__)

SPEC_FORMAT = 1  # the "cov3d_export" value of a spec this cov3d reads
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript"}  # the graph file of each export format
PROBABILITY, SEVERITY = "probability", "severity"  # the graphs' output names
INSTALL = "pip install 'cov3d[onnx]' (or pip install onnxruntime)"


def spec_path(graph: Path) -> Path:
    """The spec beside a graph file: X.onnx → X.json."""
    return Path(graph).with_suffix(".json")


def is_spec(path: Path) -> bool:
    """True for a JSON file written by `cov3d export`."""
    try:
        return isinstance(json.loads(Path(path).read_text(encoding="utf-8")).get("cov3d_export"), int)
    except (OSError, ValueError, AttributeError):
        return False


def read_spec(graph: Path) -> dict:
    """The spec of an exported graph; a missing, foreign or newer spec is a Cov3dError that says what to do."""
    path = spec_path(graph)
    if not path.is_file():
        raise Cov3dError(f"'{graph}' has no spec beside it ('{path.name}' is missing); keep the JSON file "
                         "`cov3d export` wrote next to the graph, or export again")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise Cov3dError(f"spec '{path}' is not valid JSON ({error}); export again") from None
    version = spec.get("cov3d_export") if isinstance(spec, dict) else None
    if not isinstance(version, int):
        raise Cov3dError(f"'{path}' is not the spec of a cov3d export (no cov3d_export key); export again")
    if version > SPEC_FORMAT:
        raise Cov3dError(f"spec '{path}' has format {version}, newer than this cov3d reads ({SPEC_FORMAT}); "
                         "upgrade cov3d")
    return spec


def _looks_like_onnx(path: Path) -> bool:
    # An ONNX file is a protobuf ModelProto: field 1 (ir_version) first, then the producer's name.
    try:
        with path.open("rb") as handle:
            head = handle.read(64)
    except OSError:
        return False
    return head[:1] == b"\x08" and (b"pytorch" in head or b"onnx" in head)


def _graphs_in(folder: Path) -> list[Path]:
    """The graph files a folder of exports holds, as their specs name them."""
    graphs = []
    for spec in sorted(folder.glob("*.json")):
        if is_spec(spec):
            graphs.append(folder / json.loads(spec.read_text(encoding="utf-8")).get("file", spec.stem + ".onnx"))
    return graphs


def exported_graphs(models: Sequence[Path]) -> list[Path]:
    """The exported ONNX graphs that the --model values name, or [] when they are checkpoints and runs.

    A folder of exports stands for every graph in it. TorchScript exports,
    specs given in place of their graph, an exported graph renamed away from
    .onnx and a mix of exports and checkpoints are Cov3dErrors that say what
    to pass instead.
    """
    graphs: list[Path] = []
    others: list[str] = []
    for value in models:
        path = Path(value)
        if not path.exists() and path.suffix in SUFFIXES.values():
            raise Cov3dError(f"exported model '{path}' does not exist; pass the {path.suffix} file that "
                             "`cov3d export` wrote (its spec .json beside it)")
        if str(value).startswith("wandb:") or not path.exists():
            others.append(str(value))  # load_ensemble reports a missing path in its own words
            continue
        found = _graphs_in(path) if path.is_dir() else [path]
        if path.is_dir() and not found:
            loose = sorted(p.name for p in path.glob("*.onnx"))
            if loose:
                raise Cov3dError(f"'{path}' holds {', '.join(loose)} without the spec .json that `cov3d export` "
                                 "writes beside each; copy the specs along, or export again")
            others.append(str(value))
            continue
        for graph in found:
            if graph.suffix == SUFFIXES["torchscript"]:
                raise Cov3dError(f"'{graph}' is a TorchScript export; cov3d predict runs ONNX exports and "
                                 "checkpoints: export with --format onnx, or load this file with torch.jit.load")
            if graph.suffix == SUFFIXES["onnx"]:
                graphs.append(graph)
            elif graph.suffix == ".json" and is_spec(graph):
                raise Cov3dError(f"'{graph}' is the spec of an exported model, not the model; pass the graph "
                                 f"beside it: --model {graph.with_suffix(SUFFIXES['onnx'])}")
            elif is_spec(spec_path(graph)) or _looks_like_onnx(graph):
                raise Cov3dError(f"'{graph}' is an exported ONNX model but its name does not end in .onnx; "
                                 f"rename it to {graph.with_suffix(SUFFIXES['onnx']).name} (its spec "
                                 f"{spec_path(graph).name} beside it)")
            else:
                others.append(str(graph))
    if graphs and others:
        raise Cov3dError(f"exported graphs ({', '.join(map(str, graphs))}) and checkpoints ({', '.join(others)}) "
                         "cannot be mixed in one --model list; export the checkpoints together "
                         "(`cov3d export RUN1 RUN2 ...`) or predict with checkpoints only")
    return graphs


def onnxruntime():
    """The onnxruntime module, or a Cov3dError saying how to install it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise Cov3dError(f"ONNX Runtime is not installed; {INSTALL}") from None
    return ort


def open_session(graph: Path, device: str = "cpu"):
    """An ONNX Runtime session for `graph`: CUDA where asked for and available, else the CPU."""
    ort = onnxruntime()
    providers = ["CPUExecutionProvider"]
    if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    elif device.startswith("cuda"):
        log.warning("this ONNX Runtime has no CUDA provider (pip install onnxruntime-gpu for it); %s runs on the "
                    "CPU", graph)
    try:
        return ort.InferenceSession(str(graph), providers=providers)
    except Exception as error:  # ONNX Runtime raises its own exception types for any unreadable model
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise Cov3dError(f"'{graph}' cannot be loaded by ONNX Runtime ({first}); export it again") from None


@dataclass
class Exported:
    """One exported graph, its spec and its ONNX Runtime session."""

    path: Path
    spec: dict
    session: Any

    @property
    def inputs(self) -> list[dict]:
        return self.spec["inputs"]

    @property
    def outputs(self) -> list[str]:
        return [output["name"] for output in self.spec["outputs"]]

    @property
    def presence(self) -> bool:  # what it answers for, as a checkpoint Member says it
        return PROBABILITY in self.outputs

    @property
    def severity(self) -> bool:
        return SEVERITY in self.outputs

    def run(self, volumes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The graph's outputs by name for float32 (B, 1, D, W, W) volumes by input name."""
        values = self.session.run(self.outputs, {name: np.ascontiguousarray(v, dtype=np.float32)
                                                 for name, v in volumes.items()})
        return dict(zip(self.outputs, values))


def input_key(entry: dict) -> tuple[Size, tuple[float, float], str]:
    """The (size, window, lungs mode) a spec's input was preprocessed at (exports are of --lungs off models)."""
    low, high = entry["window"]
    return Size(int(entry["depth"]), int(entry["width"])), (float(low), float(high)), "off"


def load_exported(graphs: Sequence[Path], device: str = "cpu", threshold: float | None = None) -> list[Exported]:
    """Sessions for exported graphs; warns when `threshold` is not the one a spec was exported with."""
    exported = []
    for graph in graphs:
        if not Path(graph).is_file():
            raise Cov3dError(f"exported model '{graph}' does not exist; its spec names it: export again")
        spec = read_spec(graph)
        exported.append(Exported(Path(graph), spec, open_session(graph, device)))
        if threshold is not None and spec.get("threshold") is not None and \
                abs(float(spec["threshold"]) - threshold) > 1e-12:
            log.warning("%s was exported with threshold %g; predicting with --threshold %g", graph,
                        float(spec["threshold"]), threshold)
    return exported


def predict_exported(
    scans: list[Path],
    exported: list[Exported],
    *,
    tta: bool | None = None,
    batch_size: int = 2,
    workers: int | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    roots: Sequence[Path] = (),
    progress: Callable[[int, int], None] | None = None,
    on_batch: Callable[[list[Prediction]], None] | None = None,
) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Probabilities for every scan from exported graphs; (path, reason) for scans that could not be read or scored.

    Takes :func:`cov3d.inference.predict.predict_scans`'s arguments. Each graph
    answers with its outputs: P(covid) from those that give `probability`,
    severity from those that give `severity`, so an ensemble exported one file
    per member is averaged as its checkpoints would be. The graphs run in fp32
    on the device their sessions were opened for (`device` and `precision` are
    not used), with the TTA they were exported with: `tta=False` asked of a
    graph that has it inside is logged, as it cannot be undone.
    """
    for graph in exported:
        if tta is False and graph.spec.get("tta"):
            log.warning("%s was exported with TTA inside the graph; --no-tta does not change it", graph.path)
    shapes: list[tuple[Size, tuple[float, float], str]] = []
    for graph in exported:
        for entry in graph.inputs:
            if input_key(entry) not in shapes:
                shapes.append(input_key(entry))
    predictions = [Prediction(scan) for scan in scans]
    failures: dict[int, str] = {}
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    steps = Steps(len(scans), progress)
    dataset = _CachedOrFresh(scans, shapes, [Path(r) for r in roots])
    # batch_size=None: single items; batches are formed by _batches so a failed scan never breaks one.
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None)
    for indices, volumes in _batches(loader, batch_size, failures, steps):
        arrays = [v.numpy() for v in volumes]
        outputs = [(graph, graph.run({entry["name"]: arrays[shapes.index(input_key(entry))]
                                      for entry in graph.inputs})) for graph in exported]
        finished = []
        for row, i in enumerate(indices):
            bad = next((g for g, out in outputs if not all(np.isfinite(v[row]).all() for v in out.values())), None)
            if bad is not None:
                failures[i] = (f"the exported model '{bad.path}' gave a NaN or infinite output for it; its weights "
                               "or this scan hold values that are not finite")
                continue
            for _, out in outputs:
                if PROBABILITY in out:
                    predictions[i].presence.append(float(out[PROBABILITY][row]))
                if SEVERITY in out:
                    predictions[i].severity.append(np.asarray(out[SEVERITY][row], dtype=np.float64))
            finished.append(predictions[i])
        steps.step(len(indices))
        if on_batch is not None and finished:
            on_batch(finished)
    ok = [p for i, p in enumerate(predictions) if i not in failures]
    return ok, [(str(scans[i]), reason) for i, reason in sorted(failures.items())]
