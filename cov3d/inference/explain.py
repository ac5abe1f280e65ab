"""Where a model looks: Grad-CAM maps of a scan for presence and for the predicted severity.

Grad-CAM (Selvaraju et al., ICCV 2017) weights each channel of a convolutional
stage's output by the mean gradient of the class score over that output, sums
the channels and keeps the positive part. It needs no change to the network and
no retraining, so it works for every cov3d architecture; it takes one forward
and one backward pass per model; it is class-discriminative (a presence map
and a severity map differ); and its maps pass the model-randomisation sanity
check (Adebayo et al., 2018), where plain gradients and guided backpropagation
fail it. MONAI ships the same method for 3D networks.

The class scores are logits: for presence, the logit of P(covid) as cov3d
computes it (the presence output, or for λ = 1 the log-odds of the four covid
severity classes); for severity, the logit of the severity class that the
ensemble predicts. 3D models give one map over the stage's (d, h, w) grid. The
2D slice models give one map per slice, from the gradient of the scan's score
(the mean of its slices' probabilities) over that slice's feature map, so a
slice that counts for more in the scan's decision gets more weight.

Each map is upsampled to the model's preprocessed volume (trilinear), and then
mapped back onto the scan's original slices: linearly along depth, end slice to
end slice as preprocessing placed them, and bilinearly in-plane. Linear
interpolation of a non-negative map stays non-negative. With TTA the map of the
reflected scan is reflected back before the two are averaged; an ensemble's map
is the mean of its members' maps. Values keep Grad-CAM's own scale (not
normalised per scan), so a scan with little evidence for a class has a faint map.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cov3d.data.dataset import reflect
from cov3d.errors import Cov3dError
from cov3d.data.io import DEFAULT_WINDOW, ScanMeta, read_scan
from cov3d.training.loss import MILD, SEVERITY_NAMES, probabilities
from cov3d.inference.predict import Member
from cov3d.data.preprocess import preprocess_volume

log = logging.getLogger(__name__)

PRESENCE, SEVERITY = "presence", "severity"
STAGES = 4  # every cov3d backbone has four stages; Grad-CAM's usual choice is the last


def stage_modules(model: nn.Module, stage: int = STAGES) -> list[nn.Module]:
    """The module(s) whose output is the given backbone stage (1…4) of a cov3d network.

    The last stage is what the head pools. A model with two backbones
    (res-dense) has one module per backbone at stages 1–3, whose maps are
    averaged, and the fused output at stage 4.
    """
    from cov3d.models.video import Cov3dNet
    from cov3d.models.regnet import RegNet3d
    from cov3d.models.slices import ResDense, SliceNet

    if not 1 <= stage <= STAGES:
        raise Cov3dError(f"stage {stage} is not one of 1 to {STAGES}; 4 is the last convolutional stage")
    if isinstance(model, Cov3dNet):
        return [getattr(model, f"layer{stage}")]
    if isinstance(model, RegNet3d):
        return [model.stages[stage - 1]]
    if isinstance(model, SliceNet):
        backbone = model.backbone
        if stage == STAGES:
            return [backbone]  # what the head pools: for DenseNet, after its final ReLU
        if isinstance(backbone, ResDense):
            return [_resnet_stage(backbone.resnet, stage), _densenet_stage(backbone.densenet, stage)]
        if _is_densenet(backbone):
            return [_densenet_stage(backbone, stage)]
        return [_resnet_stage(backbone, stage)]
    raise Cov3dError(f"cannot explain a {type(model).__name__}: it is not a cov3d architecture")


def _is_densenet(body: nn.Module) -> bool:
    return isinstance(body, nn.Sequential) and hasattr(body[0], "denseblock1")


def _resnet_stage(body: nn.Sequential, stage: int) -> nn.Module:
    return body[3 + stage]  # conv1, bn1, relu, maxpool, then layer1…layer4


def _densenet_stage(body: nn.Sequential, stage: int) -> nn.Module:
    return getattr(body[0], f"denseblock{stage}")


def presence_score(logits: torch.Tensor, lam: float) -> torch.Tensor:
    """The logit of P(covid) as :func:`cov3d.training.loss.probabilities` computes it."""
    if lam >= 1.0:  # P(covid) is the sum of the covid severity probabilities: its log-odds
        return torch.logsumexp(logits[:, 1 + MILD:6], dim=1) - logits[:, 1]
    return logits[:, 0]


def severity_score(logits: torch.Tensor, severity: int) -> torch.Tensor:
    """The logit of one severity class (1 mild … 4 critical)."""
    return logits[:, 1 + severity]


def grad_cam(model: nn.Module, volumes: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor],
             stage: int = STAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of (B, 1, D, H, W) volumes: (B, D, H, W) non-negative maps and the (B, 6) logits.

    `score(logits)` gives one score per volume; each volume's map comes from the
    gradient of its own score (in evaluation mode the volumes of a batch do not
    interact).
    """
    modules = stage_modules(model, stage)
    activations: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _module, _input, output: activations.append(output)) for m in modules]
    try:
        with torch.enable_grad():
            # An input that needs gradients keeps a graph even if the weights were frozen.
            logits = model(volumes.detach().requires_grad_(True)).float()
            gradients = torch.autograd.grad(score(logits).sum(), activations)
    finally:
        for hook in hooks:
            hook.remove()
    maps = [_cam(a.detach().float(), g.float(), volumes.shape) for a, g in zip(activations, gradients)]
    return torch.stack(maps).mean(dim=0), logits.detach()


def _cam(activation: torch.Tensor, gradient: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    batch, _, depth, height, width = shape
    if activation.dim() == 5:  # a 3D stage: (B, C, d, h, w)
        weights = gradient.mean(dim=(2, 3, 4), keepdim=True)
        cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
        return F.interpolate(cam, size=(depth, height, width), mode="trilinear", align_corners=False)[:, 0]
    # A 2D slice model: (B·S, C, h, w), every slice of every volume (S = D in evaluation).
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=(height, width), mode="bilinear", align_corners=False)
    return cam.view(batch, depth, height, width)


def to_original(volume_map: torch.Tensor, slices: int, height: int, width: int) -> np.ndarray:
    """A (D, W, W) map on the preprocessed grid → (slices, height, width) float32 on the original slices.

    Preprocessing placed its first and last depth samples on the first and last
    slice and resized each slice with pixel centres aligned, so the inverse is
    linear along depth with the ends aligned, then bilinear in-plane with the
    centres aligned.
    """
    depth, rows, columns = volume_map.shape
    flat = volume_map.float().reshape(1, depth, rows * columns).transpose(1, 2)  # (1, W·W, D)
    if slices == 1:  # a 1-slice scan was repeated along depth: its map is the mean over depth
        along = flat.mean(dim=2, keepdim=True)
    elif depth == 1:
        along = flat.expand(-1, -1, slices)
    else:
        along = F.interpolate(flat, size=slices, mode="linear", align_corners=True)
    along = along.transpose(1, 2).reshape(slices, 1, rows, columns)
    out = np.empty((slices, height, width), dtype=np.float32)
    for start in range(0, slices, 32):  # in chunks: a 500-slice 512×512 map is 0.5 GB already
        chunk = F.interpolate(along[start:start + 32], size=(height, width), mode="bilinear", align_corners=False,
                              antialias=height < rows or width < columns)
        out[start:start + 32] = chunk[:, 0].clamp_min_(0.0).numpy()
    return out


@dataclass
class Explanation:
    """One scan's ensemble prediction and its maps on the original slices."""

    path: Path
    scan: np.ndarray  # (slices, height, width) in [0, 1], lung window: what the pictures show
    meta: ScanMeta
    probability: float  # P(covid), mean over presence members (with TTA)
    severity: np.ndarray | None  # P(mild…critical | covid), mean over severity members; None without any
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # task → (slices, height, width) map
    aspect_depth: float = 0.5  # preprocessed depth / width: the slices' proportion when spacing is unknown

    @property
    def severity_name(self) -> str | None:
        return None if self.severity is None else SEVERITY_NAMES[int(np.argmax(self.severity))]

    def title(self) -> str:
        text = f"{self.path.name}: P(covid) = {self.probability:.2f}"
        if self.severity is not None:
            text += f", {self.severity_name} (P = {float(np.max(self.severity)):.2f})"
        return text


def _passes(volume: torch.Tensor, tta: bool) -> torch.Tensor:
    batch = volume[None]
    return torch.cat([batch, reflect(batch)]) if tta else batch


def _merge(maps: torch.Tensor, tta: bool) -> torch.Tensor:
    """The mean over the scan and its reflection, the reflected map reflected back first."""
    return (maps[0] + reflect(maps[1])) / 2 if tta else maps[0]


def explain_scan(
    path: Path,
    members: Sequence[Member],
    *,
    tta: bool = True,
    stage: int = STAGES,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Explanation:
    """Grad-CAM maps of one scan for presence and, when a member predicts it, the predicted severity."""
    device = torch.device(device)
    path = Path(path)
    display = read_scan(path, window=DEFAULT_WINDOW)  # the original slices, in the lung window
    slices, height, width = display.volume.shape
    inputs: dict[tuple, torch.Tensor] = {}

    def volume_of(member: Member) -> torch.Tensor:
        key = (member.size, member.window)
        if key not in inputs:
            tensor, _ = preprocess_volume(path, member.size, member.window)
            inputs[key] = tensor.float()
        return inputs[key]

    presence_members = [m for m in members if m.presence]
    severity_members = [m for m in members if m.severity]
    total = len(presence_members) + 2 * len(severity_members)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    if progress:
        progress(0, total)
    presence_sum = np.zeros((slices, height, width), dtype=np.float32)
    member_probabilities: dict[int, torch.Tensor] = {}  # id(member) -> its (6,) probabilities, TTA mean
    for member in presence_members:
        lam = float(member.config["lambda"])
        volume_map, logits = _member_map(member, volume_of(member), partial(presence_score, lam=lam), tta, stage,
                                         device)
        presence_sum += to_original(volume_map, slices, height, width)
        member_probabilities[id(member)] = probabilities(logits, lam).mean(dim=0)
        step()
    presence_probabilities = [float(member_probabilities[id(m)][0]) for m in presence_members]
    explanation = Explanation(path, display.volume, display.meta, float(np.mean(presence_probabilities)), None,
                              {PRESENCE: presence_sum / len(presence_members)},
                              aspect_depth=presence_members[0].size.depth / presence_members[0].size.width)
    if not severity_members:
        return explanation
    # Every severity member explains the same class: the one the ensemble predicts.
    fours = []
    for member in severity_members:
        probs = member_probabilities.get(id(member))  # a member that answers both tasks ran already
        if probs is None:
            with torch.inference_mode():
                batch = _passes(volume_of(member), tta).to(device)
                probs = probabilities(member.model.to(device)(batch).float(), float(member.config["lambda"]))
            probs = probs.mean(dim=0)
        four = probs[2:6].cpu().numpy()
        fours.append(four / max(float(four.sum()), 1e-12))
        step()
    explanation.severity = np.mean(fours, axis=0)
    severity = int(np.argmax(explanation.severity)) + MILD
    severity_sum = np.zeros((slices, height, width), dtype=np.float32)
    for member in severity_members:
        volume_map, _ = _member_map(member, volume_of(member), partial(severity_score, severity=severity), tta,
                                    stage, device)
        severity_sum += to_original(volume_map, slices, height, width)
        step()
    explanation.maps[SEVERITY] = severity_sum / len(severity_members)
    return explanation


def _member_map(member: Member, volume: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor], tta: bool,
                stage: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    model = member.model.to(device).eval()
    maps, logits = grad_cam(model, _passes(volume, tta).to(device), score, stage)
    if not torch.isfinite(maps).all():
        raise Cov3dError(f"the Grad-CAM map of {member.path} is not finite (the model's output overflows); "
                         "check the checkpoint with `cov3d evaluate`")
    return _merge(maps.cpu(), tta), logits.cpu()


def peak(volume_map: np.ndarray) -> tuple[int, int, int]:
    """(slice, row, column) of a map's maximum."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(volume_map)), volume_map.shape))


def top_slices(volume_map: np.ndarray, count: int = 12) -> list[int]:
    """The `count` slices holding the most map mass, in slice order.

    Slices closer than slices/(3·count) to one already chosen are passed over,
    so that a thin-slice scan shows several regions rather than one region
    twelve times over.
    """
    mass = volume_map.reshape(volume_map.shape[0], -1).sum(axis=1)
    gap = max(1, math.ceil(len(mass) / (3 * count))) if len(mass) > count else 1
    chosen: list[int] = []
    for index in np.argsort(-mass, kind="stable"):
        if len(chosen) == count:
            break
        if all(abs(int(index) - c) >= gap for c in chosen):
            chosen.append(int(index))
    return sorted(chosen)


def mass_share(volume_map: np.ndarray, mask: np.ndarray) -> float:
    """The share of a map's total mass inside a boolean mask of the same shape (0 for an all-zero map)."""
    if volume_map.shape != mask.shape:
        raise ValueError(f"map {volume_map.shape} and mask {mask.shape} differ in shape")
    total = float(volume_map.sum(dtype=np.float64))
    return float(volume_map[mask].sum(dtype=np.float64)) / total if total > 0 else 0.0


def write_explanation(explanation: Explanation, output: Path) -> list[Path]:
    """Pictures, NIfTI maps and explain.json for each task into `output`; returns the files written.

    `<task>.png` (three sections through the map's maximum), `<task>-montage.png`
    (the most attended axial slices) and `<task>.nii.gz` (the map on the original
    slices, with the scan's geometry). A scan without geometry (JPEG/PNG slices)
    gets its slices written too, as `scan.nii.gz` on the same grid, to lay the map over.
    """
    import json

    from cov3d.atomic import write_text
    from cov3d.data.io import write_volume
    from cov3d.reports.show import render_montage, render_saliency

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    summary: dict = {"scan": str(explanation.path), "probability": explanation.probability,
                     "severity": explanation.severity_name,
                     "severity_probabilities": None if explanation.severity is None else
                     {name: float(p) for name, p in zip(SEVERITY_NAMES, explanation.severity)},
                     "shape": list(explanation.scan.shape), "maps": {}}
    for task, volume_map in explanation.maps.items():
        written.append(write_volume(output / f"{task}.nii.gz", volume_map, explanation.meta))
        written.append(render_saliency(explanation, task, output / f"{task}.png"))
        written.append(render_montage(explanation, task, output / f"{task}-montage.png"))
        summary["maps"][task] = {"peak": list(peak(volume_map)), "max": float(volume_map.max()),
                                 "mean": float(volume_map.mean()), "top_slices": top_slices(volume_map)}
    if explanation.meta.origin is None:
        grey = np.round(explanation.scan * 255).astype(np.uint8)
        written.append(write_volume(output / "scan.nii.gz", grey, explanation.meta))
    written.append(output / "explain.json")
    write_text(output / "explain.json", json.dumps(summary, indent=2) + "\n")
    return written
