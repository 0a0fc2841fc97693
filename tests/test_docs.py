"""The documentation site builds with warnings as errors, and every code example in it runs.

``sphinx-build -W`` fails on any warning (a broken cross-reference, malformed reStructuredText in a
docstring, a page missing from the table of contents).  Each page's ```python blocks run in order
in one namespace, and each block asserts what it shows (``docs/architecture.md`` has its own test,
which also undoes the primitive it registers).
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p for p in [*DOCS.glob("*.md"), *DOCS.glob("howto/*.md")] if p.name != "architecture.md")


def _blocks(page: pathlib.Path) -> list[str]:
    """The page's ```python blocks, each padded with blank lines so that a traceback's line numbers
    are the page's."""
    text = page.read_text()
    return [
        "\n" * text.count("\n", 0, match.start(1)) + match.group(1)
        for match in re.finditer(r"```python\n(.*?)```", text, flags=re.S)
    ]


def test_every_page_is_in_the_table_of_contents():
    index = (DOCS / "index.md").read_text()
    for page in PAGES:
        if page.name != "index.md":
            assert str(page.relative_to(DOCS).with_suffix("")) in index, page


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_code_examples_run(page):
    blocks = _blocks(page)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)  # noqa: S102


def test_how_to_pages_have_examples():
    for page in PAGES:
        if page.parent.name == "howto":
            assert _blocks(page), page


def test_no_page_or_docstring_names_a_machine_path():
    pattern = re.compile(r"/(?:work|tmp|root|home)/[\w.-]+")
    files = [
        *PAGES,
        *ROOT.glob("jaxdtd/**/*.py"),
        *ROOT.glob("benchmarks/*.py"),
        *ROOT.glob("tests/reference/*"),
    ]
    offending = [
        f"{f.relative_to(ROOT)}: {m}"
        for f in files
        if f.is_file() and f.suffix in (".py", ".md")
        for m in pattern.findall(f.read_text())
    ]
    assert not offending, offending


def test_docs_build_without_warnings(tmp_path):
    missing = [m for m in ("sphinx", "myst_nb", "furo") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"building the docs needs {', '.join(missing)} (pip install -e '.[docs]')")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            str(DOCS),
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    html = tmp_path / "html"
    for page in ("index", "rules", "api", "cli", "architecture", "howto/models", "notebooks/01_quickstart"):
        assert (html / f"{page}.html").is_file(), page
    api = (html / "api.html").read_text()
    for name in (
        "jaxdtd.transform",
        "jaxdtd.rules.ZPlus",
        "jaxdtd.composites.DeepTaylor",
        "jaxdtd.crp.attribute",
    ):
        assert f'id="{name}"' in api, name
