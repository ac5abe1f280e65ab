import urllib.error

import pytest
import torch

from cov3d._torchvision import import_torchvision
from cov3d.errors import Cov3dError
from cov3d.models.registry import build_model


@pytest.mark.parametrize("arch", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_video_resnets_take_one_channel_and_give_six_outputs(arch):
    model = build_model(arch, pretrained=False, penultimate=32).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 8, 16, 16))
    assert out.shape == (2, 6)


def test_head_and_dropout_layout():
    model = build_model("r3d_18", pretrained=False, penultimate=64, dropout=0.3)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        dropout = getattr(model, name)[-1]
        assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.3
    linear1, relu, dropout, linear2 = list(model.head)[1:]
    assert (linear1.in_features, linear1.out_features) == (512, 64)
    assert isinstance(relu, torch.nn.ReLU) and dropout.p == 0.3
    assert (linear2.in_features, linear2.out_features) == (64, 6)


def test_local_kinetics_weights_are_loaded_with_summed_stem(tmp_path):
    import_torchvision()
    from torchvision.models.video import r3d_18

    torch.manual_seed(0)
    reference = r3d_18(weights=None).state_dict()
    path = tmp_path / "r3d_18-kinetics.pth"
    torch.save(reference, path)
    model = build_model("r3d_18", weights=[path])
    torch.testing.assert_close(model.stem[0].weight, reference["stem.0.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.layer3[0][0].conv1[0].weight, reference["layer3.0.conv1.0.weight"])


def test_unavailable_pretrained_weights_stop_with_both_remedies(monkeypatch):
    import_torchvision()
    from torchvision.models._api import WeightsEnum

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(Cov3dError, match=r"--weights PATH.*--no-pretrained"):
        build_model("r3d_18", pretrained=True)


def test_weights_file_errors(tmp_path):
    with pytest.raises(Cov3dError, match="does not exist"):
        build_model("r3d_18", weights=[tmp_path / "missing.pth"])
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(Cov3dError, match="is not a torch state dict"):
        build_model("r3d_18", weights=[tmp_path / "junk.pth"])
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(Cov3dError, match="weights do not fit r3d_18"):
        build_model("r3d_18", weights=[tmp_path / "other.pth"])


def test_unknown_architecture():
    with pytest.raises(Cov3dError, match="architecture 'resnet18' is not one of r3d_18, "):
        build_model("resnet18", pretrained=False)
