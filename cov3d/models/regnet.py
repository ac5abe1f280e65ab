"""The 3D RegNet of seed 004 (3D RegNet for COVID-19 diagnosis on chest CT), with the Cov3d head.

A stem, then stages of residual bottleneck blocks. Each block is a 1×1×1
convolution, a 3×3×3 group convolution and a final 1×1×1 convolution, each
followed by BatchNorm and ReLU (the last ReLU after the residual sum, as in
RegNet); the first block of each stage halves the resolution. A stage is set
by its number of blocks and width; every block shares the group width and the
bottleneck ratio. No pretrained weights exist for it: it trains from scratch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cov3d.models.defaults import DROPOUT, PENULTIMATE
from cov3d.models.video import OUTPUTS, cov3d_head, global_pool

STEM_WIDTH = 32  # RegNet's stem width


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm3d(cout))


class Bottleneck3d(nn.Module):
    """1×1×1 conv → 3×3×3 group conv (stride) → 1×1×1 conv, BatchNorm and ReLU after each, plus a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int, bottleneck_ratio: float):
        super().__init__()
        inner = int(round(cout / bottleneck_ratio))
        if inner % group_width:
            raise ValueError(f"block width {inner} is not a multiple of the group width {group_width}")
        self.a = nn.Sequential(*_conv_bn(cin, inner, 1), nn.ReLU(inplace=True))
        self.b = nn.Sequential(*_conv_bn(inner, inner, 3, stride, groups=inner // group_width), nn.ReLU(inplace=True))
        self.c = _conv_bn(inner, cout, 1)
        self.shortcut = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.c(self.b(self.a(x))) + self.shortcut(x))


class RegNet3d(nn.Module):
    """Stem → stages of :class:`Bottleneck3d` → global pool → Cov3d head; input (B, 1, D, H, W)."""

    def __init__(self, blocks: Sequence[int], widths: Sequence[int], group_width: int = 8,
                 bottleneck_ratio: float = 1.0, *, penultimate: int = PENULTIMATE, dropout: float = DROPOUT,
                 pool: str = "avg", final_bias: bool = True, outputs: int = OUTPUTS):
        super().__init__()
        if len(blocks) != len(widths):
            raise ValueError(f"{len(blocks)} stage depths but {len(widths)} stage widths")
        self.stem = nn.Sequential(*_conv_bn(1, STEM_WIDTH, 3, stride=2), nn.ReLU(inplace=True))
        stages, cin = [], STEM_WIDTH
        for depth, width in zip(blocks, widths):
            stage = [Bottleneck3d(cin if i == 0 else width, width, 2 if i == 0 else 1, group_width, bottleneck_ratio)
                     for i in range(depth)]
            stages.append(nn.Sequential(*stage))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.pool = global_pool(pool, 3)
        self.head = cov3d_head(cin, penultimate, dropout, final_bias, outputs)
        self._initialise()

    def _initialise(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Each residual branch starts as zero (its last BatchNorm scaled to 0), so a deep network trained
        # from scratch begins close to the identity; RegNet does the same.
        for module in self.modules():
            if isinstance(module, Bottleneck3d):
                nn.init.zeros_(module.c[1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stages(self.stem(x))))
