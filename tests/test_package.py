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


SMOKE = """
import importlib.resources, pathlib, sys
import jax, jax.numpy as jnp
import jaxdtd as dtd

assert dtd.__version__ == sys.argv[1], (dtd.__version__, sys.argv[1])
assert "site-packages" in pathlib.Path(dtd.__file__).parts, dtd.__file__   # not the checkout
names = importlib.resources.files("jaxdtd.models").joinpath("imagenet_classes.txt").read_text().splitlines()
assert len(names) == 1000, len(names)                                      # package data shipped

def f(w, x):
    return jnp.maximum(x @ w, 0.0) @ jnp.ones((4, 2))

w = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
x = jax.random.uniform(jax.random.PRNGKey(1), (5, 3))
R, y = jax.jit(lambda w, x: dtd.explain(f, w, x, target=0, composite=dtd.composites.DeepTaylor()))(w, x)
ok = y[:, 0] > 0
assert jnp.allclose(R.sum(-1)[ok], y[ok, 0], rtol=1e-5)
assert dtd.models.classic.LeNet.__name__ == "LeNet"
print("smoke ok")
"""


def test_sdist_and_wheel_build_install_in_a_clean_venv_and_work(tmp_path):
    """``python -m build`` makes an sdist and a wheel; each installs into a fresh venv (the wheel with
    its dependencies resolved from the package index, so the declared dependencies suffice) and
    passes a smoke test there: version, package data, a jitted explanation, the console script."""
    pytest.importorskip("build", reason="pip install build (in jaxdtd[test])")
    dist = tmp_path / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    version = jaxdtd.__version__
    wheel, sdist = dist / f"jaxdtd-{version}-py3-none-any.whl", dist / f"jaxdtd-{version}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), sorted(p.name for p in dist.iterdir())

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python, script = venv / "bin" / "python", venv / "bin" / "jaxdtd"
    for artifact, deps in ((wheel, []), (sdist, ["--no-deps", "--force-reinstall"])):
        install = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *deps, str(artifact)], capture_output=True, text=True
        )
        assert install.returncode == 0, install.stderr[-3000:]
        smoke = subprocess.run(
            [str(python), "-c", SMOKE, version], capture_output=True, text=True, cwd=tmp_path, timeout=300
        )
        assert smoke.returncode == 0 and "smoke ok" in smoke.stdout, (artifact.name, smoke.stderr[-3000:])
        usage = subprocess.run(
            [str(script), "explain", "--help"], capture_output=True, text=True, cwd=tmp_path
        )
        assert usage.returncode == 0 and "--top-k" in usage.stdout, usage.stderr[-2000:]
