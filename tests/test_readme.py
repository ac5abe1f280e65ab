"""The README's install and test commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALL = 'python -m pip install -e ".[test]" -c constraints.txt'
TEST = "python -m pytest"


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for command in (INSTALL, TEST):
        assert command in readme, command
        assert command in ci, command
