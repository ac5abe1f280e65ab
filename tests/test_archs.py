"""Every architecture of the registry: shapes, a training step, checkpoints, slice means, ensembles."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_slices
from test_predict import scan_volume
from typer.testing import CliRunner

from cov3d.models.registry import ARCHS, SLICES, VOLUME, Arch, TorchvisionWeights, build_model, get_arch
from cov3d.models.checkpoint import load_model, model_config, save_checkpoint
from cov3d.cli import app
from cov3d.errors import Cov3dError
from cov3d.models.slices import slice_mean_logits
from cov3d.training.loss import Cov3dLoss, probabilities
from cov3d.inference.predict import load_ensemble, predict_scans
from cov3d.models.slices import SliceNet

DOCS = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"
DEPTH, WIDTH = 4, 32  # DenseNet121's three transitions need at least 32x32 slices


def tiny(arch: str, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(arch, pretrained=False, penultimate=8, dropout=0.0, **options)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_maps_volumes_to_six_outputs_and_trains_a_step(arch):
    model = tiny(arch)
    x = torch.rand(2, 1, DEPTH, WIDTH, WIDTH)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 6) and torch.isfinite(out).all()

    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = Cov3dLoss(0.1, (1.0, 1.0))(model(x), torch.tensor([0, 2]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_round_trips_checkpoint_to_predict(arch, tmp_path):
    model = tiny(arch, pool="max", final_bias=False).eval()
    config = model_config(arch=arch, depth=DEPTH, width=WIDTH, lam=0.1, window=(-1350, 150), penultimate=8,
                          dropout=0.0, pool="max", final_bias=False)
    save_checkpoint(tmp_path / "model.pt", model, config)
    loaded, saved = load_model(tmp_path / "model.pt")
    assert saved["input"] == get_arch(arch).input and saved["pool"] == "max" and saved["final_bias"] is False
    x = torch.rand(1, 1, DEPTH, WIDTH, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))

    scan = write_slices(tmp_path / "scan", scan_volume(3, depth=5, size=20))
    predictions, failures = predict_scans([scan], load_ensemble([tmp_path / "model.pt"]), workers=0,
                                          precision="fp32")
    assert not failures and len(predictions[0].presence) == 1 and len(predictions[0].severity) == 1
    assert 0.0 <= predictions[0].presence[0] <= 1.0


def test_slice_model_scan_probabilities_are_the_mean_of_its_slices():
    model = tiny("resnet50").eval()
    x = torch.rand(3, 1, 5, WIDTH, WIDTH)
    with torch.no_grad():
        per_slice = model.slice_logits(x)
        scan = model(x)
    assert per_slice.shape == (3, 5, 6)
    for lam in (0.1, 1.0):
        expected = probabilities(per_slice.reshape(15, 6), lam).view(3, 5, 6).mean(dim=1)
        torch.testing.assert_close(probabilities(scan, lam), expected)


def test_slice_mean_of_extreme_logits_stays_exact():
    logits = torch.tensor([[[40.0, 30, -30, 0, 0, 0], [-40.0, -30, 30, 0, 0, 0]]])
    probs = probabilities(slice_mean_logits(logits), 0.1)
    torch.testing.assert_close(probs[0, :3], torch.tensor([0.5, 0.5, 0.5]), atol=1e-6, rtol=0)


def test_per_slice_loss_is_the_mean_of_the_slice_losses():
    torch.manual_seed(1)
    loss = Cov3dLoss(0.3, (1.5, 0.75), presence_smoothing=0.1, severity_smoothing=0.1)
    logits, target = torch.randn(2, 4, 6), torch.tensor([0, 5])
    per_item = loss.per_item(logits, target)
    for i in range(2):
        slices = loss.per_item(logits[i], target[i].repeat(4))
        torch.testing.assert_close(per_item[i], slices.mean())
    torch.testing.assert_close(loss(logits, target), per_item.mean())


def test_slice_model_samples_k_slices_per_scan_in_training_only():
    model = tiny("resnet50", slices=2)
    assert isinstance(model, SliceNet)
    x = torch.rand(3, 1, 6, WIDTH, WIDTH)
    assert model.train()(x).shape == (3, 2, 6)
    with torch.no_grad():
        assert model.eval()(x).shape == (3, 6)


def test_ensemble_of_a_2d_and_a_3d_model_predicts(tmp_path):
    paths = []
    for arch in ("r3d_18", "resnet50"):
        config = model_config(arch=arch, depth=DEPTH, width=WIDTH, lam=0.1, window=(-1350, 150), penultimate=8,
                              dropout=0.0, pool="avg", final_bias=True)
        paths.append(tmp_path / f"{arch}.pt")
        save_checkpoint(paths[-1], tiny(arch), config)
    scan = write_slices(tmp_path / "scan", scan_volume(4, depth=5, size=20))
    members = load_ensemble(paths)
    predictions, failures = predict_scans([scan], members, workers=0, precision="bf16")  # channels_last for both
    assert not failures
    assert len(predictions[0].presence) == 2 and len(predictions[0].severity) == 2
    alone = [predict_scans([scan], load_ensemble([p]), workers=0, precision="fp32")[0][0].presence[0] for p in paths]
    assert predictions[0].presence == pytest.approx(alone, abs=0.02)


def test_regnet_defaults_to_the_seed_best_configuration_and_from_scratch():
    model = tiny("regnet3d")
    depths = [len(stage) for stage in model.stages]
    widths = [stage[0].c[0].out_channels for stage in model.stages]
    assert depths == [2, 6, 12, 4] and widths == [48, 128, 256, 512]
    conv = model.stages[0][0].b[0]
    assert conv.kernel_size == (3, 3, 3) and conv.in_channels // conv.groups == 8  # group width 8
    assert [len(s) for s in tiny("regnet3d-shallow").stages] == [1, 3, 7, 4]
    with pytest.raises(Cov3dError, match="no pretrained weights exist for --arch regnet3d.*--no-pretrained"):
        build_model("regnet3d", pretrained=True)
    assert not get_arch("regnet3d").pretrained_by_default


def test_pool_and_final_bias_options():
    model = tiny("r3d_18", pool="max", final_bias=False)
    assert isinstance(model.pool, torch.nn.AdaptiveMaxPool3d) and model.head[-1].bias is None
    model = tiny("r3d_18")
    assert isinstance(model.pool, torch.nn.AdaptiveAvgPool3d) and model.head[-1].bias is not None


def test_local_imagenet_weights_are_loaded_with_summed_stem(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    reference = resnet50(weights=None).state_dict()
    torch.save(reference, tmp_path / "resnet50.pth")
    model = build_model("resnet50", weights=[tmp_path / "resnet50.pth"])
    torch.testing.assert_close(model.backbone[0].weight, reference["conv1.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.backbone[7][0].conv1.weight, reference["layer4.0.conv1.weight"])


def test_densenet_weights_with_published_key_names_load(tmp_path):
    from torchvision.models import densenet121

    torch.manual_seed(0)
    state = densenet121(weights=None).state_dict()
    # The published file names 'norm1' as 'norm.1' (and so on), as torchvision's own loader expects.
    published = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()}
    assert published.keys() != state.keys()
    torch.save(published, tmp_path / "densenet121.pth")
    model = build_model("densenet121", weights=[tmp_path / "densenet121.pth"])
    key = "features.denseblock1.denselayer1.norm1.weight"
    torch.testing.assert_close(model.backbone[0].denseblock1.denselayer1.norm1.weight, state[key])


def test_res_dense_takes_two_weights_files_in_order(tmp_path):
    with pytest.raises(Cov3dError, match=r"takes 2 --weights file\(s\) \(resnet101, then densenet121\), got 1"):
        build_model("res-dense", weights=[tmp_path / "one.pth"])
    from torchvision.models import densenet121, resnet101

    torch.save(resnet101(weights=None).state_dict(), tmp_path / "r.pth")
    torch.save(densenet121(weights=None).state_dict(), tmp_path / "d.pth")
    with pytest.raises(Cov3dError, match="weights do not fit resnet101"):
        build_model("res-dense", weights=[tmp_path / "d.pth", tmp_path / "r.pth"])
    model = build_model("res-dense", weights=[tmp_path / "r.pth", tmp_path / "d.pth"])
    assert model.backbone.resnet_projection.out_channels == model.backbone.densenet_projection.out_channels


def test_format_1_checkpoints_still_load(tmp_path):
    model = tiny("r3d_18").eval()
    old = {"format": 1, "arch": "r3d_18", "penultimate": 8, "dropout": 0.0, "depth": DEPTH, "width": WIDTH,
           "lambda": 0.1, "window": [-1350, 150], "outputs": ["presence", "non-covid", "mild", "moderate",
                                                              "severe", "critical"]}
    save_checkpoint(tmp_path / "presence.pt", model, old, epoch=3, metric="presence_f1", score=0.9)
    loaded, config = load_model(tmp_path / "presence.pt")
    assert (config["pool"], config["final_bias"], config["input"]) == ("avg", True, VOLUME)
    x = torch.rand(1, 1, DEPTH, WIDTH, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_fastai_stays_out_of_predict_preprocess_and_cli_start_up():
    code = ("import sys, cov3d.cli, cov3d.inference.predict, cov3d.data.preprocess, cov3d.inference.evaluate, cov3d.models.checkpoint, "
            "cov3d.models.registry, cov3d.reports.show; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'fastai', 'fastcore'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_refuses_pretrained_regnet_in_one_line(dataset):
    result = CliRunner().invoke(app, ["train", str(dataset), "--arch", "regnet3d", "--pretrained"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "no pretrained weights exist for --arch regnet3d" in result.output and "--no-pretrained" in result.output


def test_cli_refuses_slices_for_a_3d_model(dataset):
    result = CliRunner().invoke(app, ["train", str(dataset), "--no-pretrained", "--slices", "4"])
    assert result.exit_code == 1 and "--slices applies to 2D slice models only" in result.output


def test_docs_table_lists_every_registered_arch():
    text = DOCS.read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([^`]+)` \|", text, flags=re.MULTILINE)
    tables = len(rows) // len(ARCHS)
    assert tables >= 2 and rows == list(ARCHS) * tables  # the description and the measurements
    for arch in ARCHS.values():
        assert arch.input in (VOLUME, SLICES)


def test_train_a_slice_model_end_to_end(dataset, tmp_path):
    from cov3d.training.trainer import TrainConfig, train

    config = TrainConfig(data=str(dataset), output=str(tmp_path / "run"), arch="resnet50", pretrained=False,
                         depth=DEPTH, width=WIDTH, epochs=1, slices=2, crop=0.8, batch_size=2, loader_workers=0,
                         penultimate=8,
                         cache=str(tmp_path / "cache"))
    result = train(config)
    model, saved = load_model(result.run / "presence.pt")
    assert isinstance(model, SliceNet) and saved["input"] == SLICES
    scan = write_slices(tmp_path / "scan", scan_volume(5, depth=5, size=20))
    predictions, failures = predict_scans([scan], load_ensemble([result.run]), workers=0)
    assert not failures and 0.0 <= predictions[0].presence[0] <= 1.0


@pytest.mark.parametrize("key, value", [("depth", "64"), ("lambda", 1.5), ("arch", "r4d_18"), ("pool", "median"),
                                        ("final_bias", "yes"), ("window", [150, -1350]), ("outputs", ["p"])])
def test_a_checkpoint_config_with_a_wrong_value_names_the_key(tmp_path, key, value):
    config = model_config(arch="r3d_18", depth=DEPTH, width=WIDTH, lam=0.1, window=(-1350, 150), penultimate=8,
                          dropout=0.0, pool="avg", final_bias=True)
    config[key] = value
    save_checkpoint(tmp_path / "model.pt", tiny("r3d_18"), config)
    with pytest.raises(Cov3dError, match=rf"config key '{key}' is .*, not "):
        load_model(tmp_path / "model.pt")


def test_a_checkpoint_config_without_a_key_names_it(tmp_path):
    config = model_config(arch="r3d_18", depth=DEPTH, width=WIDTH, lam=0.1, window=(-1350, 150), penultimate=8,
                          dropout=0.0, pool="avg", final_bias=True)
    del config["width"]
    save_checkpoint(tmp_path / "model.pt", tiny("r3d_18"), config)
    with pytest.raises(Cov3dError, match="its config lacks width"):
        load_model(tmp_path / "model.pt")


class Toy3d(torch.nn.Module):
    """A four-stage 3D CNN with the Cov3d head: what a third-party architecture brings."""

    def __init__(self, *, penultimate: int, dropout: float, pool: str, final_bias: bool):
        from cov3d.models.video import cov3d_head, global_pool

        super().__init__()
        widths = (1, 4, 8, 8, 8)
        for i, name in enumerate(("one", "two", "three", "four")):
            setattr(self, name, torch.nn.Sequential(torch.nn.Conv3d(widths[i], widths[i + 1], 3, 2 if i else 1, 1),
                                                    torch.nn.BatchNorm3d(widths[i + 1]), torch.nn.ReLU()))
        self.pool = global_pool(pool, 3)
        self.head = cov3d_head(widths[-1], penultimate, dropout, final_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.four(self.three(self.two(self.one(x))))))


def _build_toy(states, **options):
    model = Toy3d(**options)
    if states:
        model.load_state_dict(states[0])
    return model


TOY_STAGES = ("one", "two", "three", "four")


def test_a_new_architecture_is_one_builder_and_one_entry(dataset, tmp_path, monkeypatch):
    from cov3d.inference.explain import explain_scan, stage_modules
    from cov3d.training.trainer import TrainConfig, train

    monkeypatch.setitem(ARCHS, "toy3d", Arch("toy3d", VOLUME, (), (), _build_toy, "a test", "four 3D convolutions",
                                             TOY_STAGES))
    config = TrainConfig(data=str(dataset), output=str(tmp_path / "run"), arch="toy3d", pretrained=False, depth=8,
                         width=16, epochs=1, batch_size=2, loader_workers=0, penultimate=8,
                         cache=str(tmp_path / "cache"))
    run = train(config).run
    members = load_ensemble([run])
    assert {m.config["arch"] for m in members} == {"toy3d"} and isinstance(members[0].model, Toy3d)
    scan = write_slices(tmp_path / "scan", scan_volume(3, depth=6, size=20))
    predictions, failures = predict_scans([scan], members, workers=0, precision="fp32")
    assert not failures and 0.0 <= predictions[0].presence[0] <= 1.0
    model = members[0].model
    assert [stage_modules(model, s) for s in (1, 4)] == [[model.one], [model.four]]
    explanation = explain_scan(scan, members, stage=3)
    for task in ("presence", "severity"):
        heat = explanation.maps[task]
        assert heat.shape == (6, 20, 20) and np.isfinite(heat).all() and (heat >= 0).all()


class _OwnWeights:
    """A third-party weights source: any object with `url` and `get_state_dict(progress=...)`."""

    url = "https://example.org/toy3d.pth"

    def __init__(self, state):
        self.state = state

    def get_state_dict(self, progress: bool = True):
        return self.state


def test_a_new_architecture_can_bring_its_own_weights_loader(monkeypatch, tmp_path):
    torch.manual_seed(3)
    state = Toy3d(penultimate=8, dropout=0.0, pool="avg", final_bias=True).state_dict()
    monkeypatch.setitem(ARCHS, "toy3d", Arch("toy3d", VOLUME, (_OwnWeights(state),), ("toy3d",), _build_toy,
                                             "a test", "four 3D convolutions", TOY_STAGES))
    model = build_model("toy3d", penultimate=8)  # pretrained by default: its entry has weights
    torch.testing.assert_close(model.state_dict(), state)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(Cov3dError, match="use the .* checkpoint https://example.org/toy3d.pth"):
        build_model("toy3d", weights=[tmp_path / "junk.pth"])


def test_an_entry_names_four_stages_and_one_component_per_weights():
    with pytest.raises(Cov3dError, match="architecture 'toy3d' names 3 Grad-CAM stages"):
        Arch("toy3d", VOLUME, (), (), _build_toy, "a test", "toy", TOY_STAGES[:3])
    with pytest.raises(Cov3dError, match="architecture 'toy3d' has 1 weights for 0 components"):
        Arch("toy3d", VOLUME, (_OwnWeights({}),), (), _build_toy, "a test", "toy", TOY_STAGES)


def test_torchvision_weights_resolve_through_the_weights_api():
    from cov3d._torchvision import import_torchvision

    import_torchvision()
    from torchvision.models.video import R3D_18_Weights

    weights = get_arch("r3d_18").weights[0]
    assert isinstance(weights, TorchvisionWeights) and weights.resolve() is R3D_18_Weights.KINETICS400_V1
    assert weights.url == R3D_18_Weights.KINETICS400_V1.url


def test_url_weights_fetch_a_state_dict_into_the_hub_cache(tmp_path, monkeypatch):
    from cov3d.models.registry import UrlWeights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    state = {"weight": torch.arange(3.0)}
    torch.save(state, tmp_path / "toy.pth")
    fetched = UrlWeights((tmp_path / "toy.pth").as_uri()).get_state_dict(progress=False)
    torch.testing.assert_close(fetched, state)
    assert (tmp_path / "hub" / "hub" / "checkpoints" / "toy.pth").is_file()
