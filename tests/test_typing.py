"""The package type-checks: mypy with the project's configuration (pyproject.toml's ``[tool.mypy]``:
the public API strictly, the rest with the default checks and the bodies of unannotated functions)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent


def test_mypy():
    pytest.importorskip("mypy", reason="pip install mypy (in jaxdtd[test])")
    done = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr
