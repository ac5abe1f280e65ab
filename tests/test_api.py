"""Every name docs/api.md lists as public imports from the module it names."""

import importlib
import re
from pathlib import Path

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def listed() -> list[tuple[str, str]]:
    pairs = []
    for line in API.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| `(cov3d[\w.]*)`(?: \(also `(cov3d[\w.]*)`\))? \| (.+) \|$", line)
        if match:
            names = re.findall(r"`(\w+)`", match.group(3))
            for module in filter(None, (match.group(1), match.group(2))):
                pairs += [(module, name) for name in names]
    return pairs


def test_the_documented_public_names_import():
    pairs = listed()
    assert len(pairs) > 100  # the table was read
    missing = [f"{module}.{name}" for module, name in pairs if not hasattr(importlib.import_module(module), name)]
    assert not missing, missing
