"""The package's layout: stages import only earlier stages, and no import cycle exists, function-level imports too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cov3d"

# Each module's stage; a module may import its own stage and earlier ones. reports draws pictures from plain
# arrays and files, so it needs only the base and data, and any later stage may use it.
BASE = {"cov3d", "cov3d.errors", "cov3d.atomic", "cov3d.labels", "cov3d._torchvision"}
STAGES = {"data": 1, "reports": 1.5, "models": 2, "training": 3, "inference": 4, "cli": 5}
TOP = {"cov3d.demo": 5, "cov3d.__main__": 6}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> float:
    if module in BASE:
        return 0
    if module in TOP:
        return TOP[module]
    return STAGES[module.split(".")[1]]


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """The cov3d modules a file imports anywhere (module level or inside functions), type-checking blocks aside."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("cov3d"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cov3d") and node.level == 0:
            for alias in node.names:  # `from cov3d.x import y` imports the module cov3d.x.y when y is one
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def test_relative_imports_are_not_used():
    # Absolute imports keep the stage of every dependency visible, and this test's graph complete.
    for name, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        relative = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]
        assert not relative, f"{name} has relative imports at lines {relative}"


def test_stages_import_only_earlier_stages():
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            allowed = stage(target) <= stage(module)
            if module.startswith("cov3d.reports") and target not in BASE:
                allowed = target.startswith(("cov3d.reports", "cov3d.data"))
            if not allowed:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    edges = graph()
    cycles = []

    def visit(node: str, path: list[str], on_path: set[str], done: set[str]) -> None:
        for target in sorted(edges.get(node, ())):
            if target in on_path:
                cycles.append(" → ".join(path[path.index(target):] + [target]))
            elif target not in done:
                on_path.add(target)
                visit(target, path + [target], on_path, done)
                on_path.discard(target)
        done.add(node)

    done: set[str] = set()
    for start in sorted(edges):
        if start not in done:
            visit(start, [start], {start}, done)
    # A package's __init__ importing its own modules is not a cycle between stages; nothing else may loop.
    real = [c for c in cycles if not all(part.startswith(c.split(" → ")[0]) for part in c.split(" → "))]
    assert not real, "\n".join(real)


def test_a_handful_of_modules_at_the_top_and_each_subpackage_says_what_it_holds():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 7, top
    for package in STAGES:
        init = PACKAGE / package / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and "\n" not in doc.strip(), f"cov3d/{package}/__init__.py needs a one-line docstring"


def test_the_modules_of_cov3d_0_3_still_import():
    import importlib

    import cov3d

    for old, new in cov3d.MOVED.items():
        assert importlib.import_module(f"cov3d.{old}") is importlib.import_module(new), old
    from cov3d.data import ScanDataset, load_splits  # the old cov3d.data module's names
    from cov3d.data.dataset import ScanDataset as moved, load_splits as moved_loader

    assert (ScanDataset, load_splits) == (moved, moved_loader)
    # names that left their 0.3 module still import from it
    from cov3d.explain import top_slices, write_explanation
    from cov3d.loss import MILD, SEVERITY_NAMES, slice_mean_logits, target_of
    from cov3d.reports import explanation
    from cov3d.show import render_montage, render_saliency

    assert (write_explanation, top_slices, render_saliency, render_montage) == (
        explanation.write_explanation, explanation.top_slices, explanation.render_saliency,
        explanation.render_montage)
    assert (MILD, SEVERITY_NAMES, target_of("covid", 2)) == (1, ("mild", "moderate", "severe", "critical"), 2)
    assert callable(slice_mean_logits)
