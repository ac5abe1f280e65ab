"""2D slice models (seeds 000 and 003): an ImageNet CNN applied to every axial slice of a cached volume.

They read the same (B, 1, D, H, W) volumes as the 3D models; each of the D
slices is one 2D image. In training, every slice carries its scan's target and
the loss is applied per slice (the model returns (B, S, 6) per-slice logits,
S = D or the `slices` sampled per scan). In evaluation the model returns
(B, 6) logits whose probabilities are the mean of its slices' probabilities
(seed 000 §4), so TTA, ensembles, metrics and checkpoints treat it like any
3D model. Like torchvision's Inception, the output differs by mode.
"""

from __future__ import annotations

import logging
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from cov3d import labels
from cov3d._torchvision import import_torchvision
from cov3d.models.defaults import DROPOUT, PENULTIMATE
from cov3d.models.video import OUTPUTS, cov3d_head, global_pool, load_component, one_channel_stem

log = logging.getLogger(__name__)

# torchvision's published DenseNet weights name some layers 'norm.1' where the module has 'norm1'.
_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\.([^.]+)$")


def slice_mean_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, S, 6) per-slice logits → (B, 6) logits whose probabilities are the mean of the slices' (seed 000 §4).

    The presence logit is log(mean σ) − log(mean (1 − σ)) and the severity
    logits are log(mean softmax), computed in log space so that no probability
    is clipped: :func:`cov3d.training.loss.probabilities` of the result equals the
    mean of those of the slices, whatever λ.
    """
    logits = logits.float()
    slices = logits.shape[1]
    z = labels.presence(logits)
    presence = torch.logsumexp(F.logsigmoid(z), dim=1) - torch.logsumexp(F.logsigmoid(-z), dim=1)
    severity = torch.logsumexp(F.log_softmax(labels.severity(logits), dim=-1), dim=1) - math.log(slices)
    return labels.join(presence, severity)


class SliceNet(nn.Module):
    """A 2D backbone (N, 1, H, W) → (N, C, h, w) per slice, global pooling and the Cov3d head."""

    def __init__(self, backbone: nn.Module, features: int, *, penultimate: int = PENULTIMATE, dropout: float = DROPOUT,
                 pool: str = "avg", final_bias: bool = True, slices: int = 0, outputs: int = OUTPUTS):
        super().__init__()
        self.backbone = backbone
        self.pool = global_pool(pool, 2)
        self.head = cov3d_head(features, penultimate, dropout, final_bias, outputs)
        self.slices = slices  # slices sampled per scan in a training step; 0: all

    def slice_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, H, W) volumes → (B, S, 6) logits, one row per slice."""
        batch, channels, slices, height, width = x.shape
        flat = x.transpose(1, 2).reshape(batch * slices, channels, height, width)
        if x.is_contiguous(memory_format=torch.channels_last_3d) and x.dim() == 5 and channels == 1:
            flat = flat.contiguous(memory_format=torch.channels_last)  # the caller asked for the fast layout
        return self.head(self.pool(self.backbone(flat))).view(batch, slices, -1)

    def sample_slices(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) → (B, C, K, H, W): `slices` = K random slices of each scan (all when 0 or ≥ D)."""
        depth = x.shape[2]
        if 0 < self.slices < depth:  # K random slices of each scan bound the cost of a step
            chosen = torch.rand(x.shape[0], depth, device=x.device).argsort(dim=1)[:, : self.slices]
            x = x.transpose(1, 2)[torch.arange(x.shape[0], device=x.device)[:, None], chosen].transpose(1, 2)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return slice_mean_logits(self.slice_logits(x))
        return self.slice_logits(self.sample_slices(x))

    def batchnorm_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward pass that precise BatchNorm measures: the slices a training step sees (`sample_slices`),
        so that its memory, like a step's, is bounded by `slices`."""
        return self.slice_logits(self.sample_slices(x))


def _resnet_features(builder, state: dict | None, name: str) -> tuple[nn.Module, int]:
    net = builder(weights=None)
    if state is not None:
        load_component(net, state, name)
        log.info("loaded ImageNet weights into %s", name)
    net.conv1 = one_channel_stem(net.conv1)
    body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    return body, net.fc.in_features


def _densenet_features(state: dict | None) -> tuple[nn.Module, int]:
    import_torchvision()
    from torchvision.models import densenet121

    net = densenet121(weights=None)
    if state is not None:
        state = {_DENSENET_OLD_KEY.sub(r"\1\2.\3", key): value for key, value in state.items()}
        load_component(net, state, "densenet121")
        log.info("loaded ImageNet weights into densenet121")
    net.features.conv0 = one_channel_stem(net.features.conv0)
    # torchvision applies this ReLU in DenseNet.forward, after the features.
    return nn.Sequential(net.features, nn.ReLU(inplace=True)), net.classifier.in_features


class ResDense(nn.Module):
    """Res-Dense Net (seed 000): ResNet101 and DenseNet121 feature maps, each projected by a 1×1 convolution
    to the same channels, then added.

    The two maps have the same size where the slice width is a multiple of 32. Otherwise they differ by a
    pixel (ResNet's strided convolutions round up, DenseNet's average pools round down: 4×4 and 3×3 at
    width 100), and the larger is average-pooled to the smaller before the sum, so any width works.
    """

    def __init__(self, resnet: nn.Module, resnet_features: int, densenet: nn.Module, densenet_features: int,
                 channels: int):
        super().__init__()
        self.resnet, self.densenet = resnet, densenet
        self.resnet_projection = nn.Conv2d(resnet_features, channels, 1)
        self.densenet_projection = nn.Conv2d(densenet_features, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        resnet = self.resnet_projection(self.resnet(x))
        densenet = self.densenet_projection(self.densenet(x))
        if resnet.shape[-2:] != densenet.shape[-2:]:
            size = tuple(min(a, b) for a, b in zip(resnet.shape[-2:], densenet.shape[-2:]))
            resnet, densenet = (F.adaptive_avg_pool2d(m, size) if m.shape[-2:] != size else m
                                for m in (resnet, densenet))
        return resnet + densenet


RES_DENSE_CHANNELS = 1024  # DenseNet121's own feature width


def resnet_slices(depth: int, state: dict | None, **options) -> SliceNet:
    """ResNet-50 or -101 per slice (seed 003 found ResNet50 best)."""
    import_torchvision()
    from torchvision import models

    builder = {50: models.resnet50, 101: models.resnet101}[depth]
    body, features = _resnet_features(builder, state, f"resnet{depth}")
    return SliceNet(body, features, **options)


def densenet_slices(state: dict | None, **options) -> SliceNet:
    body, features = _densenet_features(state)
    return SliceNet(body, features, **options)


def res_dense_slices(resnet_state: dict | None, densenet_state: dict | None, **options) -> SliceNet:
    import_torchvision()
    from torchvision.models import resnet101

    resnet, resnet_width = _resnet_features(resnet101, resnet_state, "resnet101")
    densenet, densenet_width = _densenet_features(densenet_state)
    fused = ResDense(resnet, resnet_width, densenet, densenet_width, RES_DENSE_CHANNELS)
    return SliceNet(fused, RES_DENSE_CHANNELS, **options)
