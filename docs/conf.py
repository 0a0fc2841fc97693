"""Sphinx configuration of the jaxdtd documentation (``sphinx-build -W -b html docs docs/_build``).

Sphinx with MyST-NB, as JAX and Flax build theirs: the docstrings are reStructuredText with Sphinx
roles (``:func:``, ``:class:``), which autodoc renders as they are, and MyST-NB renders the
notebooks with the outputs stored in them (they are executed by ``tests/test_notebooks.py``, not
again here).  The notebooks live in ``notebooks/`` at the top of the repository; they are copied
into ``docs/notebooks/`` (git-ignored) when the build starts.
"""

from __future__ import annotations

import pathlib
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import jaxdtd  # noqa: E402

project = "jaxdtd"
author = "the jaxdtd authors"
release = version = jaxdtd.__version__
copyright = "2026, the jaxdtd authors"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "demo", "demo-text", "demo-llm", "**/.ipynb_checkpoints"]
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the stored outputs; tests/test_notebooks.py executes every notebook
nb_merge_streams = True

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False
suppress_warnings = ["mystnb.unknown_mime_type"]

html_theme = "furo"
html_title = f"jaxdtd {version}"


def _copy_notebooks(app) -> None:
    target = DOCS / "notebooks"
    target.mkdir(exist_ok=True)
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        copy = target / notebook.name
        if not copy.exists() or copy.read_bytes() != notebook.read_bytes():
            shutil.copyfile(notebook, copy)


def setup(app):
    app.connect("builder-inited", _copy_notebooks)
