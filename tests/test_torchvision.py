import torch

from cov3d._torchvision import import_torchvision


def test_video_models_build_and_run():
    torchvision = import_torchvision()
    from torchvision.models.video import R3D_18_Weights, r3d_18

    assert torchvision.__version__
    model = r3d_18(weights=None).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 4, 16, 16))
    assert out.shape == (1, 400)
    assert R3D_18_Weights.KINETICS400_V1.url.endswith(".pth")  # the weights API is intact
