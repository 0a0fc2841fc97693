"""CI proves the README: ``.ci/run`` runs the README's test command verbatim, then, on Python 3.12
(the other end of the supported range the README states), the engine's tests at the JAX boundary."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).parent.parent


def _commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.startswith("    python3 -m venv")]


def test_ci_runs_the_readme_test_command_and_a_python_312_leg():
    readme = (ROOT / "README.md").read_text()
    demo, suite = _commands(readme)  # exactly the two one-line commands near the top
    assert "jaxdtd demo" in demo and "pytest" in suite
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "set -euo pipefail" in ci
    assert suite in ci
    (leg,) = [line for line in ci if line.startswith("PYENV_VERSION=3.12")]
    # the 3.12 leg is the same command in its own venv
    assert (
        leg.replace(".venv312", ".venv")
        .replace("PYENV_VERSION=3.12.1 python3.12", "python3")
        .startswith(suite.rsplit(" && ", 1)[0])
    )
    assert re.search(r"pytest -q -n 2 \$JAX_BOUNDARY_TESTS$", leg)
    # every file of the 3.12 leg exists (a renamed test file would otherwise fail CI only at its end)
    (listing,) = [line for line in ci if line.startswith("JAX_BOUNDARY_TESTS=")]
    files = listing.split("=", 1)[1].strip('"').split()
    assert len(files) >= 10
    assert [f for f in files if not (ROOT / f).is_file()] == []
    assert "tests/test_scan.py" in files and "tests/test_fuzz.py" in files  # what broke on jax 0.12
