"""CPU bf16: the Conv3d guard and agreement with fp32."""

import pytest
import torch

from cov3d.archs import build_model
from cov3d.loss import Cov3dLoss
from cov3d.model import precise_batchnorm
from cov3d.runtime import guard_cpu_bf16_conv3d


def test_guard_runs_depth_two_convolutions_in_fp32_under_cpu_autocast():
    conv = torch.nn.Conv3d(4, 4, 3, padding=1)
    assert guard_cpu_bf16_conv3d(conv) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(torch.rand(1, 4, 2, 5, 5)).dtype == torch.float32  # the kernel with the bug: fp32
        assert conv(torch.rand(1, 4, 4, 5, 5)).dtype == torch.bfloat16  # any other depth: bf16 as asked
        assert conv(torch.rand(1, 4, 2, 5, 5)).dtype == torch.float32
    assert conv(torch.rand(1, 4, 2, 5, 5)).dtype == torch.float32  # without autocast: untouched
    # the guard leaves no autocast state behind
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(torch.rand(1, 4, 2, 5, 5))
        assert torch.is_autocast_enabled("cpu")


def test_guard_skips_kernels_without_depth():
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, (1, 3, 3)), torch.nn.Conv3d(2, 2, (3, 1, 1)))
    assert guard_cpu_bf16_conv3d(model) == 1


def test_bf16_and_fp32_losses_agree_on_a_trained_tiny_model():
    torch.manual_seed(0)
    model = build_model("r3d_18", pretrained=False, penultimate=16, dropout=0.0)
    guard_cpu_bf16_conv3d(model)
    loss_fn = Cov3dLoss(0.1, (1.0, 1.0))
    x = torch.rand(8, 1, 16, 32, 32)
    x[1::2, :, 4:10, 8:20, 8:20] += 1.0  # covid items hold a bright block
    y = torch.tensor([0, 2, 0, 5, 0, 1, 0, 4])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(8):  # a few steps in bf16, as `--precision bf16` trains
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
    precise_batchnorm(model, [x])  # evaluation statistics that fit the trained weights, as training keeps
    with torch.no_grad():
        fp32 = loss_fn(model(x), y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = loss_fn(model(x).float(), y)
    assert float(fp32) < 0.9 * float(loss_fn(torch.zeros(8, 6), y))  # it did learn something
    assert float(bf16) == pytest.approx(float(fp32), rel=0.05)
