"""`cov3d export`: ONNX and TorchScript graphs equal to cov3d predict, their spec, ONNX Runtime predict, deploy.md."""

import csv
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_dicom_series, write_nifti
from typer.testing import CliRunner

from cov3d.cli import app
from cov3d.errors import Cov3dError
from cov3d.inference import export as export_module
from cov3d.inference.export import OPSET, TOLERANCE, Export, ExportedFile, export_models, load_members, verify
from cov3d.inference.onnx_predict import exported_graphs, load_exported, predict_exported, read_spec
from cov3d.inference.predict import CSV_COLUMNS, load_ensemble, predict_scans
from cov3d.labels import SEVERITY_NAMES
from cov3d.models.checkpoint import model_config, save_checkpoint
from cov3d.models.registry import ARCHS, VOLUME, Arch, build_model
from cov3d.models.video import precise_batchnorm

pytest.importorskip("onnxruntime", reason="the ONNX tests need the test extra: pip install -e '.[test]'")

runner = CliRunner()
DOCS = Path(__file__).resolve().parents[1] / "docs"
DEPTH, WIDTH = 4, 16  # the input of the tests around the graph: tiny, so that the CPU work is small
ARCH_DEPTH, ARCH_WIDTH = 4, 32  # of the per-arch tests: DenseNet121's three transitions need 32x32 slices
FAST = "regnet3d-shallow"  # the quickest arch to export, for the tests of everything around the graph
# Exported by default: the paper's 3D model and a 2D slice model; FAST's export is tested throughout. Each
# other arch's graph takes several seconds to export here; COV3D_SLOW=1 tests every arch of the registry.
DEFAULT_ARCHS = {"r3d_18", "resnet50"}


def tiny_checkpoint(path: Path, arch: str = FAST, lam: float = 0.1, seed: int = 0, depth: int = DEPTH,
                    width: int = WIDTH) -> Path:
    """An untrained checkpoint whose BatchNorm statistics are measured on noise, so that outputs are graded."""
    torch.manual_seed(seed)
    model = build_model(arch, pretrained=False, penultimate=8, dropout=0.0)
    precise_batchnorm(model, [torch.rand(2, 1, depth, width, width)])
    config = model_config(arch=arch, depth=depth, width=width, lam=lam, window=(-1350.0, 150.0), penultimate=8,
                          dropout=0.0, pool="avg", final_bias=True)
    save_checkpoint(path, model, config)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory: presence.pt and severity.pt, different weights. Read only."""
    run = tmp_path_factory.mktemp("export") / "run"
    run.mkdir()
    tiny_checkpoint(run / "presence.pt", seed=0)
    tiny_checkpoint(run / "severity.pt", seed=1)
    return run


@pytest.fixture(scope="module")
def cli_export(run_dir):
    """`cov3d export RUN --verify --threshold metrics.json`: the CLI's result and the folder it wrote."""
    (run_dir.parent / "metrics.json").write_text(json.dumps({"threshold": 0.37}), encoding="utf-8")
    result = runner.invoke(app, ["export", str(run_dir), "--output", str(run_dir.parent / "fold"), "--verify",
                                 "--threshold", str(run_dir.parent / "metrics.json")])
    return result, run_dir.parent / "fold"


@pytest.fixture(scope="module")
def exported(run_dir, cli_export):
    """That export (model.onnx, one graph) as export_models returns it; tests that change files copy them."""
    result, folder = cli_export
    assert result.exit_code == 0, result.output
    members = load_members([run_dir])
    spec = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    return Export("onnx", True, members, [ExportedFile(folder / "model.onnx", folder / "model.json", spec, members)])


@pytest.fixture(scope="module")
def members_exported(run_dir):
    """The run exported to ONNX one file per member (member-1.onnx, member-2.onnx). Read only."""
    return export_models([run_dir], run_dir.parent / "members", ensemble="members")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two checkpoints of different depths (4 and 2) and λ (0.1 and 1)."""
    folder = tmp_path_factory.mktemp("pair")
    return [tiny_checkpoint(folder / "a.pt"), tiny_checkpoint(folder / "b.pt", lam=1.0, seed=2, depth=2)]


def copied(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


def _arch(arch):
    slow = arch not in DEFAULT_ARCHS and not os.environ.get("COV3D_SLOW")
    return pytest.param(arch, marks=pytest.mark.skipif(slow, reason="a big graph to export; COV3D_SLOW=1 runs it"))


@pytest.mark.parametrize("arch", [_arch(a) for a in ARCHS])
def test_every_arch_exports_to_onnx_equal_to_predict(arch, tmp_path):
    exported = export_models([tiny_checkpoint(tmp_path / "model.pt", arch, depth=ARCH_DEPTH, width=ARCH_WIDTH)],
                             tmp_path / "out")
    check = verify(exported)  # on two volumes: the graph was traced with one, its batch axis is free
    assert check.passed and check.largest <= TOLERANCE, check.differences
    # the comparison means something: graded probabilities that differ between the two volumes
    p = check.expected["probability"]
    assert ((p > 1e-4) & (p < 1 - 1e-4)).all() and abs(p[0] - p[1]) > 1e-5, p


def test_cli_export_verifies_and_its_spec_says_what_a_runtime_needs(run_dir, cli_export):
    result, folder = cli_export
    assert result.exit_code == 0, result.output
    assert "Verified" in result.output and "2 random volume(s) of 4x16x16" in result.output
    spec = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    assert spec["file"] == "model.onnx" and spec["opset"] == OPSET and spec["threshold"] == 0.37
    assert spec["inputs"] == [{"name": "volume", "shape": ["batch", 1, DEPTH, WIDTH, WIDTH], "dtype": "float32",
                               "depth": DEPTH, "width": WIDTH, "window": [-1350.0, 150.0], "range": [0.0, 1.0]}]
    assert [o["name"] for o in spec["outputs"]] == ["probability", "severity"]
    assert spec["outputs"][1]["classes"] == ["mild", "moderate", "severe", "critical"]
    assert spec["tta"] is True and "last axis" in spec["tta_rule"] and "LPI" in spec["preprocessing"]["orientation"]
    assert [(m["checkpoint"], m["sha256"], m["presence"], m["severity"]) for m in spec["members"]] == [
        (str(run_dir / name), hashlib.sha256((run_dir / name).read_bytes()).hexdigest(), name == "presence.pt",
         name == "severity.pt") for name in ("presence.pt", "severity.pt")]
    assert spec["cov3d_version"] and spec["cov3d_export"] == 1
    import onnx

    graph = onnx.load(str(folder / "model.onnx"))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == OPSET
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # a dynamic batch axis


def test_an_ensemble_of_two_sizes_folds_into_one_graph_with_an_input_each(pair, tmp_path):
    exported = export_models(pair, tmp_path / "out")
    [file] = exported.files
    assert [i["name"] for i in file.spec["inputs"]] == ["volume_1", "volume_2"]
    assert [(i["depth"], i["width"]) for i in file.spec["inputs"]] == [(DEPTH, WIDTH), (2, WIDTH)]
    check = verify(exported)
    assert check.largest <= TOLERANCE and check.expected["severity"].shape == (2, 4), check.differences


def test_torchscript_members_export_is_averaged_as_predict(pair, tmp_path):
    exported = export_models(pair, tmp_path / "out", format="torchscript", ensemble="members", tta=False)
    assert [f.path.name for f in exported.files] == ["member-1.torchscript", "member-2.torchscript"]
    spec = exported.files[1].spec
    assert spec["ensemble"]["mode"] == "members" and spec["ensemble"]["files"] == ["member-1.torchscript",
                                                                                    "member-2.torchscript"]
    assert spec["tta"] is False and spec["runtime"] == "torch.jit.load"
    check = verify(exported)
    assert set(check.differences) == {"member-1.torchscript", "member-2.torchscript", "combined"}
    assert check.passed, check.differences
    # cov3d predict runs ONNX exports only, and says so
    for value in (exported.files[0].path, tmp_path / "out"):
        with pytest.raises(Cov3dError, match="is a TorchScript export; .*export with --format onnx"):
            exported_graphs([value])


def test_onnx_predict_writes_the_csv_of_the_checkpoints_without_fastai(run_dir, exported, members_exported,
                                                                       tmp_path):
    scans = tmp_path / "scans"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_nifti(scans / f"{name}.nii.gz", rng.integers(-1100, 300, size=(10, 40, 40)))
    found = [scans / "a.nii.gz", scans / "b.nii.gz"]
    theirs, _ = predict_scans(found, load_ensemble([run_dir]), workers=0, precision="fp32")
    # A fresh process, to see what the ONNX path imports: no fastai.
    out = tmp_path / "onnx.csv"
    code = ("import sys; from cov3d.cli import app; "
            f"app(['predict', {str(scans)!r}, '--model', {str(exported.files[0].path)!r}, '--output', "
            f"{str(out)!r}, '--workers', '0'], standalone_mode=False); "
            "print('FASTAI', sorted({m.split('.')[0] for m in sys.modules} & {'fastai', 'fastcore'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "FASTAI []" in done.stdout
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert list(rows[0]) == CSV_COLUMNS and [r["scan"] for r in rows] == ["a.nii.gz", "b.nii.gz"]
    for row, prediction in zip(rows, theirs):
        assert float(row["probability"]) == pytest.approx(prediction.presence[0], abs=TOLERANCE)
        np.testing.assert_allclose([float(row[k]) for k in SEVERITY_NAMES], prediction.severity[0], atol=TOLERANCE)
        assert row["severity"] == SEVERITY_NAMES[int(np.argmax(prediction.severity[0]))]
    # one file per member: the export's folder stands for its graphs, averaged as the checkpoints are
    graphs = exported_graphs([members_exported.files[0].path.parent])
    assert [g.name for g in graphs] == ["member-1.onnx", "member-2.onnx"]
    assert [[o["name"] for o in f.spec["outputs"]] for f in members_exported.files] == [["probability"], ["severity"]]
    mine, _ = predict_exported(found, load_exported(graphs), workers=0)
    for ours, prediction in zip(mine, theirs):
        assert len(ours.presence) == len(ours.severity) == 1
        assert ours.presence[0] == pytest.approx(prediction.presence[0], abs=TOLERANCE)
        np.testing.assert_allclose(ours.severity[0], prediction.severity[0], atol=TOLERANCE)


def deploy_script(tmp_path: Path):
    """The script of docs/deploy.md, as a module: the block after its marker comment."""
    text = (DOCS / "deploy.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- predict_ct\.py.*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/deploy.md lost its predict_ct.py block"
    path = tmp_path / "predict_ct.py"
    path.write_text(match.group(1), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("predict_ct", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deploy_script_reproduces_cov3d_predict_on_dicom_and_nifti(run_dir, exported, tmp_path):
    from PIL import Image

    from cov3d.data.preprocess import Size, preprocess_volume
    from cov3d.data.resample import depth_matrix, resize_slice

    script = deploy_script(tmp_path)
    # its resampling is Pillow's bicubic and scipy's spline, without either
    rng = np.random.default_rng(2)
    image = rng.random((37, 53)).astype(np.float32)
    mine = (script.resize_matrix(37, 24) @ (image.astype(np.float64) @ script.resize_matrix(53, 24).T)
            .astype(np.float32))
    assert np.abs(mine - resize_slice(Image.fromarray(image), 24)).max() <= 1e-6
    for slices, depth in ((1, 8), (3, 8), (4, 16), (23, 16), (70, 64)):
        assert np.abs(script.depth_matrix(slices, depth) - depth_matrix(slices, depth).numpy()).max() <= 1e-6

    hu = rng.integers(-1100, 400, size=(12, 40, 40)).astype(np.int16)
    hu[:, :, :10] -= 300  # not symmetric, so that a wrong reflection or orientation shows
    dicom = write_dicom_series(tmp_path / "dicom", hu)
    nifti = write_nifti(tmp_path / "ct.nii.gz", hu[:, ::-1])
    for scan in (dicom, nifti):
        volume, eight_bit = script.read_scan(scan)
        ours = preprocess_volume(scan, Size(DEPTH, WIDTH), (-1350.0, 150.0))[0].float().numpy()
        theirs = script.preprocess(volume, eight_bit, DEPTH, WIDTH, (-1350.0, 150.0))[0]
        # equal but where float32 rounding tips a voxel to the neighbouring float16 value (2**-11 apart)
        assert np.abs(ours - theirs).max() <= 2 ** -11 and np.mean(ours != theirs) < 1e-3

    out = tmp_path / "deploy.csv"
    assert script.main(["--model", str(exported.files[0].path), str(dicom), str(nifti), "--output", str(out)]) == 0
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    predictions, failures = predict_scans([dicom, nifti], load_ensemble([run_dir]), workers=0, precision="fp32")
    assert not failures and [r["scan"] for r in rows] == ["dicom", "ct.nii.gz"] and list(rows[0]) == CSV_COLUMNS
    for row, prediction in zip(rows, predictions):
        assert float(row["probability"]) == pytest.approx(prediction.presence[0], abs=TOLERANCE)
        np.testing.assert_allclose([float(row[k]) for k in SEVERITY_NAMES], prediction.severity[0], atol=TOLERANCE)
        assert row["prediction"] == ("covid" if prediction.presence[0] >= 0.37 else "non-covid")  # the spec's
    assert abs(float(rows[0]["probability"]) - float(rows[1]["probability"])) > 1e-4  # the scans really differ


def test_the_cli_restates_the_export_constants():
    from cov3d.cli import export as cli

    assert tuple(m.value for m in cli.ExportFormat) == export_module.FORMATS
    assert tuple(m.value for m in cli.EnsembleMode) == export_module.ENSEMBLES
    assert (cli.OPSET, cli.TOLERANCE) == (export_module.OPSET, export_module.TOLERANCE)


# One test per error message, each naming the value and the fix.

def test_export_of_a_missing_model(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path / "nothing"), "--output", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "does not exist; pass a run directory or a .pt checkpoint" in result.output


def test_export_of_a_folder_without_checkpoints(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["export", str(tmp_path / "empty"), "--output", str(tmp_path / "out")])
    assert result.exit_code == 1 and "holds no cov3d checkpoint (no presence.pt, no .pt file)" in result.output


def test_export_of_a_folder_of_checkpoints_names_them(tmp_path):
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "epoch3.pt").write_bytes(b"")
    with pytest.raises(Cov3dError, match=r"pass one of its checkpoints instead: .*epoch3\.pt"):
        export_models([tmp_path / "ckpts"], tmp_path / "out")


def test_export_of_an_unknown_format(run_dir, tmp_path):
    result = runner.invoke(app, ["export", str(run_dir), "--format", "tflite"])
    assert result.exit_code == 2 and "'tflite' is not one of" in result.output and "onnx" in result.output
    with pytest.raises(Cov3dError, match="export format 'tflite' is not one of onnx, torchscript"):
        export_models([run_dir], tmp_path / "out", format="tflite")


def test_export_output_that_is_a_file(run_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["export", str(run_dir), "--output", str(tmp_path / "file")])
    assert result.exit_code == 1 and "is a file, not a folder; give a folder for it" in result.output


def test_export_of_an_export_and_into_another_export(run_dir, members_exported, tmp_path):
    folder = members_exported.files[0].path.parent
    with pytest.raises(Cov3dError, match="is an exported model already; export from the run directory"):
        export_models([members_exported.files[0].path], tmp_path / "again")
    with pytest.raises(Cov3dError, match="is a folder of exported models"):
        export_models([folder], tmp_path / "again")
    with pytest.raises(Cov3dError, match=r"holds another export \(member-1.json, member-1.onnx, member-2.json, "
                                         r"member-2.onnx\).*empty --output"):
        export_models([run_dir], folder)  # fold would leave the member files beside model.onnx
    assert sorted(p.name for p in folder.iterdir()) == ["member-1.json", "member-1.onnx", "member-2.json",
                                                        "member-2.onnx"]


class _Unexportable(torch.nn.Module):
    """A network with an operator ONNX has no translation for (cummax)."""

    def __init__(self, **options):
        super().__init__()
        self.head = torch.nn.Linear(1, 6)

    def forward(self, x):
        return self.head(torch.cummax(x.flatten(1), dim=1).values[:, -1:])


def test_an_arch_that_cannot_be_exported(monkeypatch, tmp_path):
    monkeypatch.setitem(ARCHS, "cumnet", Arch("cumnet", VOLUME, (), (), lambda states, **o: _Unexportable(**o),
                                              "a test", "cummax", ("head",) * 4))
    model = _Unexportable()
    config = model_config(arch="cumnet", depth=4, width=8, lam=0.1, window=(-1350, 150), penultimate=8, dropout=0.0,
                          pool="avg", final_bias=True)
    save_checkpoint(tmp_path / "cum.pt", model, config)
    with pytest.raises(Cov3dError, match="architecture 'cumnet' cannot be exported to onnx .*cummax.*"
                                         "try --format torchscript"):
        export_models([tmp_path / "cum.pt"], tmp_path / "out")
    assert not (tmp_path / "out" / "model.onnx").exists() and not list((tmp_path / "out").glob(".*"))


def test_verification_that_fails_exits_non_zero(run_dir, exported, tmp_path, monkeypatch):
    real = export_module.combine
    monkeypatch.setattr(export_module, "combine", lambda *a: {k: v + 0.01 for k, v in real(*a).items()})
    monkeypatch.setattr(export_module, "export_members", lambda *a, **k: exported)  # what was written: verified
    result = runner.invoke(app, ["export", str(run_dir), "--output", str(tmp_path / "out"), "--verify"])
    assert result.exit_code == 1 and "Verification failed" in result.output and "1.00e-02" in result.output


def test_verification_tensor_of_the_wrong_size(run_dir, tmp_path):
    torch.save(torch.zeros(1, 8, 16, 16, dtype=torch.float16), tmp_path / "small.pt")
    result = runner.invoke(app, ["export", str(run_dir), "--output", str(tmp_path / "out"),
                                 "--verify-with", str(tmp_path / "small.pt")])
    assert result.exit_code == 1 and "holds a 8x16x16 volume but the model reads 4x16x16" in result.output


def test_predict_with_an_export_renamed_away_from_onnx(exported, tmp_path, slice_scan):
    out = copied(exported.files[0].path.parent, tmp_path)
    (out / "model.onnx").rename(out / "model.bin")
    result = runner.invoke(app, ["predict", str(slice_scan), "--model", str(out / "model.bin")])
    assert result.exit_code == 1 and "does not end in .onnx; rename it to model.onnx" in result.output
    (out / "model.json").unlink()  # without its spec, the content still tells
    with pytest.raises(Cov3dError, match="does not end in .onnx"):
        exported_graphs([out / "model.bin"])


def test_predict_with_the_spec_instead_of_the_graph(exported):
    with pytest.raises(Cov3dError, match=r"is the spec of an exported model.*--model .*model\.onnx"):
        exported_graphs([exported.files[0].spec_path])


def test_predict_mixing_exports_and_checkpoints(run_dir, exported):
    with pytest.raises(Cov3dError, match="cannot be mixed in one --model list"):
        exported_graphs([exported.files[0].path, run_dir])


def test_predict_with_a_missing_export(tmp_path):
    with pytest.raises(Cov3dError, match="exported model '.*gone.onnx' does not exist"):
        exported_graphs([tmp_path / "gone.onnx"])


def test_predict_with_a_graph_without_its_spec(exported, tmp_path):
    out = copied(exported.files[0].path.parent, tmp_path)
    (out / "model.json").unlink()
    with pytest.raises(Cov3dError, match=r"has no spec beside it \('model.json' is missing\)"):
        read_spec(out / "model.onnx")
    with pytest.raises(Cov3dError, match="holds model.onnx without the spec .json"):
        exported_graphs([out])


def test_predict_with_onnx_but_no_onnxruntime(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(Cov3dError, match=r"ONNX Runtime is not installed; pip install 'cov3d\[onnx\]'"):
        load_exported([exported.files[0].path])
