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
2D slice models give one map per slice, from the gradient over that slice's
feature map of the mean over the slices of each slice's own score (its
presence log-odds, or its logit of the severity class). The scan's probability
is the mean of its slices' probabilities, but its logit, log(mean p) −
log(mean (1 − p)), is not a target to differentiate: a slice's gradient there
carries a factor p(1 − p), so the slices the model is surest about (p = 0.999)
would get a small fraction of the map of a borderline one (p = 0.5). The mean of
the slice logits gives each slice its own evidence, undamped: a slice that counts
for more in the decision gets more of the map.

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
from cov3d.data.readers import DEFAULT_WINDOW, ScanMeta, read_scan
from cov3d import labels, moved_names
from cov3d.labels import NON_COVID
from cov3d.training.loss import probabilities
from cov3d.inference.predict import Member, Steps
from cov3d.models.registry import ARCH_ATTRIBUTE, STAGES, get_arch
from cov3d.models.slices import SliceNet, slice_mean_logits
from cov3d.data.preprocess import preprocess_volume
from cov3d.data.lungs import Box, segment_lungs
from cov3d.models.pair import LungPair

log = logging.getLogger(__name__)

# Names this module held in cov3d 0.3, still importable from here.
__getattr__ = moved_names(__name__, dict.fromkeys(("write_explanation", "peak", "top_slices"),
                                                  "cov3d.reports.explanation"))

PRESENCE, SEVERITY = "presence", "severity"


def stage_modules(model: nn.Module, stage: int = STAGES, arch: str | None = None) -> list[nn.Module]:
    """The module(s) whose output is the given backbone stage (1…4) of a cov3d network.

    The registry entry of `arch` (default: the name `build_model` stored on the
    model) names them. The last stage is what the head pools. A model with two
    backbones (res-dense) has one module per backbone at stages 1–3, whose maps
    are averaged, and the fused output at stage 4.
    """
    if not 1 <= stage <= STAGES:
        raise Cov3dError(f"stage {stage} is not one of 1 to {STAGES}; 4 is the last convolutional stage")
    name = arch or getattr(model, ARCH_ATTRIBUTE, None)
    if not isinstance(name, str):
        raise Cov3dError(f"cannot explain a {type(model).__name__}: it is not a cov3d architecture (build it with "
                         "cov3d.models.registry.build_model, or pass arch=NAME)")
    spec = get_arch(name)
    modules = []
    for path in spec.stage_names(stage):
        try:
            modules.append(model.get_submodule(path))
        except AttributeError:
            raise Cov3dError(f"architecture '{name}' names '{path}' as its Grad-CAM stage {stage}, but its model "
                             "has no such module; fix that entry's stages in cov3d/models/registry.py") from None
    return modules


def presence_score(logits: torch.Tensor, lam: float) -> torch.Tensor:
    """The logit of P(covid) as :func:`cov3d.training.loss.probabilities` computes it."""
    if lam >= 1.0:  # P(covid) is the sum of the covid severity probabilities: its log-odds
        five = labels.severity(logits)
        return torch.logsumexp(labels.covid_classes(five), dim=1) - five[:, NON_COVID]
    return labels.presence(logits)


def severity_score(logits: torch.Tensor, severity: int) -> torch.Tensor:
    """The logit of one severity class (MILD … CRITICAL, i.e. 1 mild … 4 critical)."""
    return labels.severity(logits)[:, severity]


def grad_cam(model: nn.Module, volumes: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor],
             stage: int = STAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of (B, 1, D, H, W) volumes: (B, D, H, W) non-negative maps and the (B, 6) logits.

    Under ``--lungs split`` the volumes are (B, 2, D, H, W) and the maps (B, 2, D, H, W), one per lung.

    `score(logits)` gives one score per row of logits; each volume's map comes
    from the gradient of its own score (in evaluation mode the volumes of a batch
    do not interact). For a 2D slice model the target is the mean over the
    slices of `score` of each slice's logits (see the module's docstring); the
    logits returned are the scan's all the same.
    """
    pair = isinstance(model, LungPair)
    # Under --lungs split both lungs run through the one inner network as a batch of 2B: its stages are hooked.
    modules = stage_modules(model.model if pair else model, stage, getattr(model, ARCH_ATTRIBUTE, None))
    activations: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _module, _input, output: activations.append(output)) for m in modules]
    try:
        with torch.enable_grad():
            # An input that needs gradients keeps a graph even if the weights were frozen.
            inputs = volumes.detach().requires_grad_(True)
            if isinstance(model, SliceNet):
                per_slice = model.slice_logits(inputs).float()  # (B, S, 6)
                batch, slices, outputs = per_slice.shape
                target = score(per_slice.reshape(batch * slices, outputs)).view(batch, slices).mean(dim=1)
                logits = slice_mean_logits(per_slice)  # what the model answers in evaluation
            else:
                logits = model(inputs).float()
                target = score(logits)
            gradients = torch.autograd.grad(target.sum(), activations)
    finally:
        for hook in hooks:
            hook.remove()
    shape = volumes.shape
    if pair:  # the inner network saw (2B, 1, …), right lungs first: its maps become (B, 2, D, H, W)
        shape = torch.Size((shape[0] * shape[1], 1, *shape[2:]))
    maps = torch.stack([_cam(a.detach().float(), g.float(), shape) for a, g in zip(activations, gradients)]).mean(0)
    if pair:
        maps = maps.view(volumes.shape[1], volumes.shape[0], *maps.shape[1:]).transpose(0, 1)
    return maps, logits.detach()


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
    # Share of each map's mass inside the segmented lungs (task → share), a sanity check on real scans; None
    # when segmentation failed (`lungs_quality` says why).
    lung_share: dict[str, float] | None = None
    lungs_quality: str = ""

    @property
    def severity_name(self) -> str | None:
        return None if self.severity is None else labels.severity_name(labels.severity_index(self.severity))

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


class _Inputs:
    """A scan preprocessed once per (size, window, lungs) that members need: ensemble members may differ in all.

    Keeps, per setting, where each view lies on the original grid (:meth:`boxes`).
    """

    def __init__(self, path: Path, series: str | None = None):
        self.path, self.series, self.cache, self.placed = path, series, {}, {}

    @staticmethod
    def _key(member: Member) -> tuple:
        return member.size, member.window, member.config.get("lungs", "off")

    def boxes(self, member: Member) -> list[Box]:
        self(member)
        return self.placed[self._key(member)]

    def __call__(self, member: Member) -> torch.Tensor:
        key = self._key(member)
        if key not in self.cache:
            tensor, meta = preprocess_volume(self.path, member.size, member.window, lungs=key[2],
                                             series=self.series)
            self.placed[key] = meta["views"]
            tensor = tensor.float()
            bad = int(tensor.numel() - torch.isfinite(tensor).sum())
            if bad:  # the scan's fault, not the model's: said before any map is computed
                raise Cov3dError(f"scan '{self.path}' holds NaN or infinite values ({bad} of the {tensor.numel()} "
                                 "values of its preprocessed volume), so it cannot be explained; fix or re-export "
                                 "the scan")
            self.cache[key] = tensor
        return self.cache[key]


def explain_scan(
    path: Path,
    members: Sequence[Member],
    *,
    tta: bool = True,
    stage: int = STAGES,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    series: str | None = None,
) -> Explanation:
    """Grad-CAM maps of one scan for presence and, when a member predicts it, the predicted severity.

    Also measures how much of each map lies inside the lungs (segmented on the
    original slices): :attr:`Explanation.lung_share`.
    """
    device = torch.device(device)
    path = Path(path)
    display = read_scan(path, window=DEFAULT_WINDOW, series=series)  # the original slices, in the lung window
    inputs = _Inputs(path, series)
    presence_members = [m for m in members if m.presence]
    severity_members = [m for m in members if m.severity]
    steps = Steps(len(presence_members) + 2 * len(severity_members), progress)
    explanation, probabilities_of = _explain_presence(path, display, presence_members, inputs, tta, stage, device,
                                                      steps)
    if severity_members:
        _explain_severity(explanation, severity_members, probabilities_of, inputs, tta, stage, device, steps)
    mask = segment_lungs(display.volume)
    explanation.lungs_quality = mask.quality
    if mask.ok:
        inside = mask.labels > 0
        explanation.lung_share = {task: mass_share(m, inside) for task, m in explanation.maps.items()}
    return explanation


def _explain_presence(path: Path, display, members: list[Member], inputs: _Inputs, tta: bool, stage: int,
                      device: torch.device, steps: Steps) -> tuple[Explanation, dict[int, torch.Tensor]]:
    """The presence map (mean over members) and P(covid); each member's (6,) probabilities by id(member)."""
    slices, height, width = display.volume.shape
    total = np.zeros((slices, height, width), dtype=np.float32)
    member_probabilities: dict[int, torch.Tensor] = {}  # TTA means
    for member in members:
        lam = float(member.config["lambda"])
        volume_map, logits = _member_map(member, inputs(member), partial(presence_score, lam=lam), tta, stage,
                                         device)
        total += on_original(volume_map, inputs.boxes(member), (slices, height, width))
        member_probabilities[id(member)] = probabilities(logits, lam).mean(dim=0)
        steps.step()
    p_covid = [float(labels.presence(member_probabilities[id(m)])) for m in members]
    explanation = Explanation(path, display.volume, display.meta, float(np.mean(p_covid)), None,
                              {PRESENCE: total / len(members)},
                              aspect_depth=members[0].size.depth / members[0].size.width)
    return explanation, member_probabilities


def _explain_severity(explanation: Explanation, members: list[Member], known: dict[int, torch.Tensor],
                      inputs: _Inputs, tta: bool, stage: int, device: torch.device, steps: Steps) -> None:
    """P(severity | covid) into `explanation`, and the map of the class the ensemble predicts (every member
    explains that same class). Members that answered presence reuse their probabilities from `known`."""
    slices, height, width = explanation.scan.shape
    fours = []
    for member in members:
        probs = known.get(id(member))
        if probs is None:
            with torch.inference_mode():
                batch = _passes(inputs(member), tta).to(device)
                probs = probabilities(member.model.to(device)(batch).float(), float(member.config["lambda"]))
            probs = probs.mean(dim=0)
        fours.append(labels.severity_given_covid(probs.cpu().numpy()))
        steps.step()
    explanation.severity = np.mean(fours, axis=0)
    severity = int(labels.severity_index(explanation.severity))
    total = np.zeros((slices, height, width), dtype=np.float32)
    for member in members:
        volume_map, _ = _member_map(member, inputs(member), partial(severity_score, severity=severity), tta,
                                    stage, device)
        total += on_original(volume_map, inputs.boxes(member), (slices, height, width))
        steps.step()
    explanation.maps[SEVERITY] = total / len(members)


def _member_map(member: Member, volume: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor], tta: bool,
                stage: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    model = member.model.to(device).eval()
    maps, logits = grad_cam(model, _passes(volume, tta).to(device), score, stage)
    if not torch.isfinite(maps).all():
        raise Cov3dError(f"the Grad-CAM map of {member.path} is not finite (the model's output overflows); "
                         "check the checkpoint with `cov3d evaluate`")
    return _merge(maps.cpu(), tta), logits.cpu()


def on_original(volume_map: torch.Tensor, boxes: Sequence[Box], shape: tuple[int, int, int]) -> np.ndarray:
    """A map on the preprocessed grid placed on the original (slices, height, width) grid.

    `volume_map` is (D, W, W), or (2, D, W, W) under --lungs split; `boxes` are
    where each view was cut from the original (the whole volume with --lungs
    off). Outside the boxes the map is 0; the split's left view, mirrored for
    the model, is mirrored back.
    """
    views = [volume_map] if volume_map.dim() == 3 else list(volume_map)
    if len(views) != len(boxes):
        raise ValueError(f"{len(views)} map(s) for {len(boxes)} box(es)")
    out = np.zeros(shape, dtype=np.float32)
    for index, (view, ((z0, z1), (y0, y1), (x0, x1))) in enumerate(zip(views, boxes)):
        part = to_original(view, z1 - z0, y1 - y0, x1 - x0)
        if index == 1:  # the left lung's view was mirrored
            part = part[:, :, ::-1]
        out[z0:z1, y0:y1, x0:x1] += part
    return out


def mass_share(volume_map: np.ndarray, mask: np.ndarray) -> float:
    """The share of a map's total mass inside a boolean mask of the same shape (0 for an all-zero map)."""
    if volume_map.shape != mask.shape:
        raise ValueError(f"map {volume_map.shape} and mask {mask.shape} differ in shape")
    total = float(volume_map.sum(dtype=np.float64))
    return float(volume_map[mask].sum(dtype=np.float64)) / total if total > 0 else 0.0
