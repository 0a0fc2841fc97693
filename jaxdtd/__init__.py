"""jaxdtd: deep Taylor decomposition and layer-wise relevance propagation as a JAX transformation.

``transform(fn, composite)`` returns ``fn`` with the same forward values whose VJP is relevance
propagation (Montavon et al., "Explaining NonLinear Classification Decisions with Deep Taylor
Decomposition", Pattern Recognition 2017), so ``jax.grad`` of a class score is its heatmap.
"""

from types import ModuleType

from . import composites, crp, rules
from .api import explain, from_nnx, trace_plan, transform
from .composites import Composite
from .dataset import explain_dataset, sharded_explain
from .errors import UnsupportedOperationError
from .inspect import describe, ledger
from .similarity import bilrp

__version__ = "0.1.0"  # the one place of the version: pyproject.toml reads it

#: submodules reached as attributes on first use (``jaxdtd.models.classic``), so that ``import jaxdtd``
#: does not import them
_LAZY = frozenset({"models", "guided", "generation", "text", "image", "evaluate", "baselines", "demo"})


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'jaxdtd' has no attribute {name!r}")


__all__ = [
    "Composite",
    "bilrp",
    "UnsupportedOperationError",
    "composites",
    "crp",
    "describe",
    "ledger",
    "explain",
    "explain_dataset",
    "from_nnx",
    "rules",
    "sharded_explain",
    "trace_plan",
    "transform",
]
