"""The Cov3d network (paper §3.2) and the pieces every cov3d architecture shares.

:class:`Cov3dNet` wraps any torchvision video ResNet (r3d_18, mc3_18,
r2plus1d_18). Adaptations: the stem's RGB kernels are summed into one input
channel, dropout follows each of the four residual layers, and the 400-way
Kinetics classifier is replaced by the Cov3d head
Linear(features → penultimate) → ReLU → Dropout → Linear(penultimate → 6).

Every architecture (see :mod:`cov3d.models.registry`) ends in the same pooling and head,
built here, so they all give the same six outputs: one presence logit, then
five severity logits in the order non-covid, mild, moderate, severe, critical.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from cov3d.labels import OUTPUTS
from cov3d.models.defaults import DROPOUT, PENULTIMATE

log = logging.getLogger(__name__)

POOLS = ("avg", "max")


def one_channel_stem(conv: nn.Conv2d | nn.Conv3d) -> nn.Conv2d | nn.Conv3d:
    """A copy of a first convolution (2D or 3D) taking one channel: its RGB kernels summed (paper §3.2)."""
    single = type(conv)(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        bias=conv.bias is not None)
    with torch.no_grad():
        single.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            single.bias.copy_(conv.bias)
    return single


def global_pool(kind: str, dims: int) -> nn.Module:
    """Global average (the paper's text) or max pooling (the paper author's code) over 2 or 3 dims."""
    if kind not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got '{kind}'")
    pools = {("avg", 2): nn.AdaptiveAvgPool2d, ("avg", 3): nn.AdaptiveAvgPool3d,
             ("max", 2): nn.AdaptiveMaxPool2d, ("max", 3): nn.AdaptiveMaxPool3d}
    return pools[kind, dims](1)


def cov3d_head(features: int, penultimate: int = PENULTIMATE, dropout: float = DROPOUT, final_bias: bool = True,
               outputs: int = OUTPUTS) -> nn.Sequential:
    """Flatten → Linear(features → penultimate) → ReLU → Dropout → Linear(penultimate → outputs)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(features, penultimate), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(penultimate, outputs, bias=final_bias),
    )


def load_component(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load pretrained weights into one backbone; a mismatch is the user's wrong file, said plainly."""
    from cov3d.errors import Cov3dError

    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        # torch's message is a header line, then one line per kind of mismatch: show the first kind.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else type(error).__name__
        if len(detail) > 200:
            detail = detail[:200] + "…"
        raise Cov3dError(f"weights do not fit {what} ({detail}); give the pretrained checkpoint of {what}") from None


def precise_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Reset every BatchNorm's running statistics and measure them again on `batches`; return the batch count.

    The statistics become the plain mean over the batches of each batch's
    statistics, with BatchNorm in training mode and every other layer (dropout)
    as in evaluation; no gradients. The model is left in evaluation mode. A
    model with a `batchnorm_forward` (a 2D slice model: the slices a training
    step samples) is measured through it, its plain forward otherwise.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
        m.train()
    count = 0
    forward = getattr(model, "batchnorm_forward", model)
    try:
        with torch.no_grad():
            for batch in batches:
                forward(batch)
                count += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            m.eval()
    return count


class Cov3dNet(nn.Module):
    """A torchvision VideoResNet adapted to (B, 1, D, H, W) CT volumes with the Cov3d head."""

    def __init__(self, backbone: nn.Module, penultimate: int = PENULTIMATE, dropout: float = DROPOUT, pool: str = "avg",
                 final_bias: bool = True, outputs: int = OUTPUTS):
        super().__init__()
        stem = backbone.stem
        stem[0] = one_channel_stem(stem[0])
        self.stem = stem
        self.layer1 = nn.Sequential(backbone.layer1, nn.Dropout(dropout))
        self.layer2 = nn.Sequential(backbone.layer2, nn.Dropout(dropout))
        self.layer3 = nn.Sequential(backbone.layer3, nn.Dropout(dropout))
        self.layer4 = nn.Sequential(backbone.layer4, nn.Dropout(dropout))
        self.pool = global_pool(pool, 3)
        self.head = cov3d_head(backbone.fc.in_features, penultimate, dropout, final_bias, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(self.pool(x))


def video_resnet(builder, state: dict[str, torch.Tensor] | None, name: str, *, penultimate: int = PENULTIMATE,
                 dropout: float = DROPOUT, pool: str = "avg", final_bias: bool = True) -> Cov3dNet:
    """A Cov3dNet over torchvision's `builder`, starting from `state` (Kinetics-400) when given."""
    backbone = builder(weights=None)
    if state is not None:
        load_component(backbone, state, name)
        log.info("loaded Kinetics-400 weights into %s", name)
    return Cov3dNet(backbone, penultimate=penultimate, dropout=dropout, pool=pool, final_bias=final_bias)
