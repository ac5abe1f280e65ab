"""CPU bf16: the Conv3d guard and agreement with fp32."""

import pytest
import torch

from cov3d.models.registry import build_model
from cov3d.training.loss import Cov3dLoss
from cov3d.models.video import precise_batchnorm
from cov3d.training.runtime import guard_cpu_bf16_conv3d


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


def tiny_volume_net() -> torch.nn.Module:
    """Three strided 3×3×3 convolutions down to depth 2, then one at depth 2 (the buggy kernel), pooled to 6 outputs.

    The layer kinds of r3d_18's last stage at a tiny cost: emulated bf16 (CPUs
    without AVX512-BF16) trains it in seconds, where r3d_18 takes minutes.
    """
    layers = []
    for cin, cout in ((1, 8), (8, 16), (16, 16)):
        layers += [torch.nn.Conv3d(cin, cout, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm3d(cout),
                   torch.nn.ReLU()]
    layers += [torch.nn.Conv3d(16, 16, 3, padding=1, bias=False), torch.nn.BatchNorm3d(16), torch.nn.ReLU(),
               torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(), torch.nn.Linear(16, 6)]
    return torch.nn.Sequential(*layers)


def test_bf16_and_fp32_losses_agree_on_a_trained_tiny_model():
    torch.manual_seed(0)
    model = tiny_volume_net()
    assert guard_cpu_bf16_conv3d(model) == 4
    loss_fn = Cov3dLoss(0.1, (1.0, 1.0))
    x = torch.rand(8, 1, 16, 32, 32)  # depth 16 → 8 → 4 → 2
    x[1::2, :, 4:10, 8:20, 8:20] += 1.0  # covid items hold a bright block
    y = torch.tensor([0, 2, 0, 5, 0, 1, 0, 4])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(30):  # a few steps in bf16, as `--precision bf16` trains
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


# --- choosing the precision from the hardware ---------------------------------------------------------------

import dataclasses
import json
import logging

from cov3d.training import precision as chooser
from cov3d.models.registry import ARCHS
from cov3d.errors import Cov3dError


def cpu(**changes) -> chooser.CpuInfo:
    base = chooser.CpuInfo(model="Test CPU", capability="AVX512", threads=2, cores=2, avx512_bf16=True, amx=True,
                           isa_limit=None)
    return dataclasses.replace(base, **changes)


@pytest.fixture
def on_cpu(monkeypatch):
    """Make cov3d see the CpuInfo it is given, on an x86 machine, without a cached measurement."""
    def use(info: chooser.CpuInfo) -> None:
        monkeypatch.setattr(chooser, "cpu_info", lambda: info)
        monkeypatch.setattr(chooser.platform, "machine", lambda: "x86_64")
    chooser._announced.clear()
    return use


def test_auto_is_fp32_on_a_cpu_without_native_bf16(on_cpu, monkeypatch):
    on_cpu(cpu(avx512_bf16=False, amx=False, capability="AVX2"))
    monkeypatch.setattr(chooser, "time_bf16", lambda: pytest.fail("flags settle it; nothing to measure"))
    choice = chooser.resolve_precision("auto", "cpu")
    assert choice.precision == "fp32" and "no native bf16" in choice.reason
    assert choice.record() == {"precision": "fp32", "precision_reason": choice.reason}


def test_auto_is_bf16_for_inference_on_a_cpu_with_native_bf16(on_cpu):
    on_cpu(cpu())
    choice = chooser.resolve_precision("auto", "cpu", "inference")
    assert choice.precision == "bf16" and "natively (AMX)" in choice.reason
    on_cpu(cpu(amx=False))
    assert "AVX512-BF16" in chooser.resolve_precision("auto", "cpu").reason


def test_auto_trains_in_fp32_on_any_cpu(on_cpu):
    for info in (cpu(), cpu(avx512_bf16=False, amx=False)):
        on_cpu(info)
        assert chooser.resolve_precision("auto", "cpu", "training").precision == "fp32"


def test_an_instruction_set_limit_below_bf16_means_fp32(on_cpu):
    on_cpu(cpu(isa_limit="AVX2", capability="AVX2"))
    choice = chooser.resolve_precision("auto", "cpu")
    assert choice.precision == "fp32" and "ONEDNN_MAX_CPU_ISA=AVX2" in choice.reason
    on_cpu(cpu(isa_limit="AVX512_CORE_AMX"))
    assert chooser.resolve_precision("auto", "cpu").precision == "bf16"


def test_uncertain_hardware_is_measured_once_and_cached(on_cpu, monkeypatch, tmp_path):
    on_cpu(cpu(isa_limit="SOMETHING_NEW"))
    calls = []

    def timing():
        calls.append(1)
        return 0.010, 0.300  # bf16 30x slower: emulated
    monkeypatch.setattr(chooser, "time_bf16", timing)
    first = chooser.resolve_precision("auto", "cpu", cache=tmp_path)
    second = chooser.resolve_precision("auto", "cpu", cache=tmp_path)
    assert first.precision == second.precision == "fp32"
    assert "measured 30.00× fp32's time" in first.reason and len(calls) == 1
    saved = json.loads((tmp_path / chooser.MEASUREMENT_FILE).read_text(encoding="utf-8"))
    assert [entry["bf16"] for entry in saved.values()] == [0.300]
    monkeypatch.setattr(chooser, "time_bf16", lambda: (0.010, 0.004))  # another machine: bf16 faster
    on_cpu(cpu(isa_limit="SOMETHING_NEW", model="Another CPU"))
    assert chooser.resolve_precision("auto", "cpu", cache=tmp_path).precision == "bf16"


def test_a_torch_without_the_cpu_queries_is_measured(on_cpu, monkeypatch, tmp_path):
    on_cpu(cpu(avx512_bf16=None, amx=None))
    monkeypatch.setattr(chooser, "time_bf16", lambda: (0.010, 0.004))
    choice = chooser.resolve_precision("auto", "cpu", cache=tmp_path)
    assert choice.precision == "bf16" and "cannot say" in choice.reason


def test_the_micro_measurement_is_quick():
    import time

    start = time.perf_counter()
    fp32, bf16 = chooser.time_bf16()
    assert fp32 > 0 and bf16 > 0
    assert time.perf_counter() - start < 5  # well under a second on the CPUs measured; generous for slow CI


def test_explicit_bf16_on_an_emulating_cpu_is_kept_with_a_warning(on_cpu, caplog):
    on_cpu(cpu(avx512_bf16=False, amx=False))
    with caplog.at_level(logging.WARNING, logger="cov3d.training.precision"):
        choice = chooser.resolve_precision("bf16", "cpu")
        chooser.resolve_precision("bf16", "cpu")
    assert choice.precision == "bf16"
    warnings = [r for r in caplog.records if "many times slower" in r.getMessage()]
    assert len(warnings) == 1  # logged once


def test_the_choice_is_logged_once(on_cpu, caplog):
    on_cpu(cpu(avx512_bf16=False, amx=False))
    with caplog.at_level(logging.INFO, logger="cov3d.training.precision"):
        for _ in range(3):
            chooser.resolve_precision("auto", "cpu")
    assert [r.getMessage() for r in caplog.records] == [
        "fp32: this CPU has no native bf16 (neither AVX512-BF16 nor AMX), so bf16 would be emulated"]


def test_fp16_needs_cuda():
    with pytest.raises(Cov3dError, match="--precision fp16 needs a CUDA device"):
        chooser.resolve_precision("fp16", "cpu")


def test_unknown_precision_is_refused():
    with pytest.raises(Cov3dError, match="--precision fp8 is not one of auto, fp32, bf16, fp16"):
        chooser.resolve_precision("fp8", "cpu")


def test_cuda_auto_is_fp16():
    assert chooser.resolve_precision("auto", "cuda").precision == "fp16"


def test_cpu_description_names_model_capability_and_threads():
    text = chooser.cpu_info().describe()
    assert torch.backends.cpu.get_cpu_capability() in text and f"{torch.get_num_threads()} torch threads" in text


@pytest.mark.parametrize("arch", [a for a in ARCHS if ARCHS[a].input != "slices"])
def test_folded_batchnorm_computes_the_same_function(arch):
    torch.manual_seed(0)
    model = build_model(arch, pretrained=False).eval()
    for module in model.modules():  # statistics far from the defaults, so folding has something to fold
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    folded = chooser.fold_batchnorm(model)
    assert folded is not None
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    for batch in (1, 3):  # any batch size, not only the traced one
        x = torch.rand(batch, 1, 8, 32, 32)
        with torch.inference_mode():
            assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())  # original intact


def test_models_that_cannot_be_traced_are_left_as_they_are():
    slice_arch = next(a for a in ARCHS if ARCHS[a].input == "slices")
    assert chooser.fold_batchnorm(build_model(slice_arch, pretrained=False)) is None


def test_auto_keeps_bf16_only_for_models_it_speeds_up(on_cpu, monkeypatch, tmp_path):
    from cov3d.inference import predict as predict_module
    from cov3d.models.checkpoint import model_config, save_checkpoint
    from conftest import write_slices
    from test_predict import scan_volume

    on_cpu(cpu())  # native bf16
    path = tmp_path / "model.pt"
    config = model_config(arch="regnet3d-shallow", depth=8, width=16, lam=0.1, window=(-1350, 150), penultimate=8,
                          dropout=0.0, pool="avg", final_bias=True)
    save_checkpoint(path, build_model("regnet3d-shallow", pretrained=False, penultimate=8, dropout=0.0), config)
    scan = write_slices(tmp_path / "scan", scan_volume(4, depth=5, size=20))
    for timings, expected in (((0.010, 0.020), "fp32"), ((0.020, 0.010), "bf16")):
        monkeypatch.setenv("COV3D_CACHE", str(tmp_path / f"cache-{expected}"))  # a fresh measurement each time
        monkeypatch.setattr(predict_module, "_time_both", lambda model, arch, shape, t=timings: t)
        [member] = predict_module.load_ensemble([path])
        predictions, failures = predict_module.predict_scans([scan], [member], workers=0)
        assert not failures and member.precision.precision == expected
        if expected == "fp32":
            assert "bf16 measured 2.00× fp32's time for regnet3d-shallow at 2x1x8x16x16" in member.precision.reason
