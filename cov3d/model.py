"""The Cov3d network (paper §3.2): a Kinetics-400 video ResNet adapted to one-channel CT volumes.

One general piece, :class:`Cov3dNet`, wraps any torchvision video ResNet; the
architecture and its weights come from torchvision's weights API. Adaptations:
the stem's RGB kernels are summed into one input channel, dropout follows each
of the four residual layers, and the 400-way Kinetics classifier is replaced by
Linear(512 → penultimate) → ReLU → Dropout → Linear(penultimate → 6).

The six outputs are one presence logit, then five severity logits in the
order non-covid, mild, moderate, severe, critical.
"""

from __future__ import annotations

import logging
import urllib.error
from pathlib import Path

import torch
from torch import nn

from ._torchvision import import_torchvision
from .errors import Cov3dError

log = logging.getLogger(__name__)

OUTPUTS = 6  # presence logit + 5 severity logits
SEVERITY_CLASSES = ("non-covid", "mild", "moderate", "severe", "critical")
ARCHS = ("r3d_18", "mc3_18", "r2plus1d_18")


def _architecture(arch: str):
    """The torchvision builder and its Kinetics-400 weights enum for `arch`."""
    import_torchvision()
    from torchvision.models import video

    builders = {
        "r3d_18": (video.r3d_18, video.R3D_18_Weights.KINETICS400_V1),
        "mc3_18": (video.mc3_18, video.MC3_18_Weights.KINETICS400_V1),
        "r2plus1d_18": (video.r2plus1d_18, video.R2Plus1D_18_Weights.KINETICS400_V1),
    }
    if arch not in builders:
        raise Cov3dError(f"architecture '{arch}' is not one of {', '.join(ARCHS)}")
    return builders[arch]


def _one_channel_stem(conv: nn.Conv3d) -> nn.Conv3d:
    """A copy of the first convolution taking one channel: the RGB kernels summed (paper §3.2)."""
    single = nn.Conv3d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       bias=conv.bias is not None)
    with torch.no_grad():
        single.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            single.bias.copy_(conv.bias)
    return single


class Cov3dNet(nn.Module):
    """A torchvision VideoResNet adapted to (B, 1, D, H, W) CT volumes with a two-layer head."""

    def __init__(self, backbone: nn.Module, penultimate: int = 512, dropout: float = 0.5, outputs: int = OUTPUTS):
        super().__init__()
        stem = backbone.stem
        stem[0] = _one_channel_stem(stem[0])
        self.stem = stem
        self.layer1 = nn.Sequential(backbone.layer1, nn.Dropout(dropout))
        self.layer2 = nn.Sequential(backbone.layer2, nn.Dropout(dropout))
        self.layer3 = nn.Sequential(backbone.layer3, nn.Dropout(dropout))
        self.layer4 = nn.Sequential(backbone.layer4, nn.Dropout(dropout))
        self.pool = nn.AdaptiveAvgPool3d(1)
        features = backbone.fc.in_features
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(features, penultimate), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(penultimate, outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(self.pool(x))


def _kinetics_state(arch: str, weights_path: Path | None) -> dict[str, torch.Tensor]:
    """The Kinetics-400 state dict: from a local file, else through torchvision's weights API."""
    _, weights = _architecture(arch)
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise Cov3dError(f"weights file '{path}' does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # any unpickling or format failure means the same to the user
            raise Cov3dError(f"weights file '{path}' is not a torch state dict ({type(error).__name__}); "
                             f"use the Kinetics-400 checkpoint {weights.url}") from None
        return state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        # Downloads into the torch hub cache the first time, then reads it from there.
        return weights.get_state_dict(progress=True)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        raise Cov3dError(
            f"pretrained {arch} Kinetics-400 weights could not be loaded ({error}); download "
            f"{weights.url} and pass it with --weights PATH, or train from scratch with --no-pretrained"
        ) from None


def build_model(
    arch: str = "r3d_18",
    *,
    pretrained: bool = True,
    weights_path: Path | None = None,
    penultimate: int = 512,
    dropout: float = 0.5,
) -> Cov3dNet:
    """Build the Cov3d network; with `pretrained`, start from Kinetics-400 weights (never silently random)."""
    builder, _ = _architecture(arch)
    backbone = builder(weights=None)
    if pretrained:
        state = _kinetics_state(arch, weights_path)
        try:
            backbone.load_state_dict(state)
        except RuntimeError as error:
            raise Cov3dError(f"weights do not fit {arch}: {str(error).splitlines()[0]}; "
                             f"give the Kinetics-400 checkpoint of {arch}") from None
        log.info("loaded Kinetics-400 weights into %s", arch)
    elif weights_path is not None:
        raise Cov3dError("--weights was given with --no-pretrained; drop one of them")
    return Cov3dNet(backbone, penultimate=penultimate, dropout=dropout)
