"""The package as users import it: lazy submodules, one version."""

from __future__ import annotations

import importlib.metadata
import pathlib
import subprocess
import sys

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

import jaxdtd

ROOT = pathlib.Path(__file__).parent.parent


def test_models_are_an_attribute_imported_on_first_use():
    code = (
        "import sys, jaxdtd\n"
        "assert 'jaxdtd.models' not in sys.modules and 'jaxdtd.models.classic' not in sys.modules\n"
        "assert jaxdtd.models.classic.ResNet18.__name__ == 'ResNet18'\n"
        "assert 'jaxdtd.models' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    with pytest.raises(AttributeError, match=r"module 'jaxdtd' has no attribute 'modles'"):
        jaxdtd.modles  # noqa: B018


def test_the_version_is_defined_once():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and pyproject["project"]["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "jaxdtd.__version__"}
    assert importlib.metadata.version("jaxdtd") == jaxdtd.__version__
    assert f"## {jaxdtd.__version__}" in (ROOT / "CHANGELOG.md").read_text()
