"""The import layering (pyproject.toml ``[tool.importlinter]``): ``lint-imports`` keeps both contracts.

The CLI on top, then the stages (inspect; sfm and cluster; matching; pairs; extraction and
pictures), the store, and the dependency-free base modules; no import cycles between the modules
of a package nor between packages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def lint_imports() -> str:
    """The ``lint-imports`` console script of this interpreter's environment."""
    beside = Path(sys.executable).with_name("lint-imports")
    found = str(beside) if beside.is_file() else shutil.which("lint-imports")
    assert found, "lint-imports is not installed: pip install 'import-linter>=2' (the test extra has it)"
    return found


def test_import_contracts_are_kept() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's sp_extract, not an installed one
    result = subprocess.run(
        [lint_imports(), "--no-cache"],  # reads ROOT/pyproject.toml
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, f"lint-imports failed:\n{result.stdout}\n{result.stderr}"
    assert "Contracts: 2 kept, 0 broken." in result.stdout, result.stdout
