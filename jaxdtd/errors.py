"""Errors raised by jaxdtd, each naming what is wrong and where."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

__all__ = ["Problem", "UnsupportedOperationError"]

_BATCHNORM_HINT = (
    "This looks like a BatchNorm in training mode, normalizing with statistics of the batch "
    "(they depend on the input, so no rule applies): explain in inference mode, i.e. "
    "nn.BatchNorm(use_running_average=True) in linen, model.eval() in NNX, "
    "eqx.nn.inference_mode(model) in Equinox, is_training=False in Haiku, and jaxdtd folds "
    "the BatchNorm into the preceding layer."
)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One operation on the explained data that has no relevance rule."""

    primitive: str
    module_path: str
    source: str
    reason: str
    fix: str = ""
    batch_statistics: bool = False  # the operation normalizes with statistics over the batch axis

    def describe(self) -> str:
        where = self.module_path or "<top level>"
        text = f"primitive '{self.primitive}' at module '{where}', {self.source}: {self.reason}"
        return text + (f". Fix: {self.fix}" if self.fix else "")


class UnsupportedOperationError(NotImplementedError):
    """Operations on the explained data have no relevance rule.

    Raised once per traced function with every offending operation (``problems``), each naming the
    primitive, the module path (from the name stack), the user's source line, why no rule applies
    and a fix.  ``primitive``, ``module_path`` and ``source`` are those of the first problem.
    """

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        first = self.problems[0]
        self.primitive = first.primitive
        self.module_path = first.module_path
        self.source = first.source
        count = len(self.problems)
        lines = [
            f"jaxdtd has no relevance rule for {count} operation{'s' if count > 1 else ''} on the "
            "explained data:"
        ]
        lines += [f"  {i}. {problem.describe()}" for i, problem in enumerate(self.problems, start=1)]
        if any(
            p.batch_statistics or "batchnorm" in p.module_path.lower().replace("_", "") for p in self.problems
        ):
            lines.append(_BATCHNORM_HINT)
        names = ", ".join(dict.fromkeys(f"'{p.primitive}'" for p in self.problems))
        lines.append(
            f"Where a parameter-free rule is right for an operation ({names}), assign it explicitly with "
            "Composite(..., operations={primitive: rule}) (rules.Pass(): relevance unchanged through an "
            "elementwise operation of one data operand; rules.Norm(): in proportion to each operand's "
            "contribution, for operations linear in the data; rules.Gradient(): the plain gradient)."
        )
        super().__init__("\n".join(lines))
