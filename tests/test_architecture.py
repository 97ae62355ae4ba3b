"""The layer order of docs/architecture.md, enforced: the import-linter contracts in pyproject.toml must hold, and a
violation must be caught (a module that imports upward makes the check fail)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("importlinter", reason="import-linter is in the [dev] extra: pip install -e '.[dev]'")


def _lint(cwd: Path, src: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "PYTHONPATH": str(src)}
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_layer_contracts_hold():
    r = _lint(ROOT, ROOT / "src")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "src" / "distillrec", tmp_path / "src" / "distillrec",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bad = tmp_path / "src" / "distillrec" / "data" / "upward.py"
    bad.write_text("from ..training import trainer  # noqa: F401  (data must not import the engine)\n")
    r = _lint(tmp_path, tmp_path / "src")
    assert r.returncode != 0 and "distillrec.data.upward" in r.stdout
    bad.unlink()
    (tmp_path / "src" / "distillrec" / "serving" / "upward.py").write_text(
        "from ..training import checkpoint  # noqa: F401\n")
    r = _lint(tmp_path, tmp_path / "src")
    assert r.returncode != 0 and "distillrec.serving.upward" in r.stdout
