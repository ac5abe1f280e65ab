import torch

from cov3d.data.dataset import random_crop, reflect


def test_crop_of_one_is_the_identity():
    volume = torch.rand(1, 6, 10, 10)
    assert random_crop(volume, 1.0) is volume


def test_crop_keeps_the_shape_and_a_constant_volume_constant():
    torch.manual_seed(0)
    for _ in range(20):
        out = random_crop(torch.full((1, 6, 10, 12), 0.25), 0.5)
        assert out.shape == (1, 6, 10, 12)
        torch.testing.assert_close(out, torch.full_like(out, 0.25))


def test_crop_zooms_into_a_box_of_at_least_the_scale():
    torch.manual_seed(1)
    # Values index the position along the width, so a crop shows a narrower range of them.
    volume = torch.arange(40.0).view(1, 1, 1, 40).expand(1, 4, 8, 40).contiguous()
    for _ in range(20):
        out = random_crop(volume, 0.5)
        span = float(out.max() - out.min())
        assert 0.5 * 39 - 2 <= span <= 39 + 1e-4


def test_reflection_mirrors_the_width_axis():
    volume = torch.arange(6.0).view(1, 1, 2, 3)
    assert reflect(volume).flatten().tolist() == [2.0, 1.0, 0.0, 5.0, 4.0, 3.0]
