"""Errors raised by jaxdtd, each naming what is wrong and where."""

from __future__ import annotations

__all__ = ["UnsupportedOperationError"]


class UnsupportedOperationError(NotImplementedError):
    """An operation on the explained data has no relevance rule.

    The message names the primitive, the module path (from the name stack) and the user's source
    line, and says how to assign a rule explicitly through ``Composite(operations={...})``.
    """

    def __init__(self, primitive: str, module_path: str, source: str, reason: str = "") -> None:
        self.primitive = primitive
        self.module_path = module_path
        self.source = source
        where = module_path or "<top level>"
        detail = f" ({reason})" if reason else ""
        hint = ""
        if "batchnorm" in module_path.lower().replace("_", ""):
            hint = (
                " This looks like a BatchNorm in training mode, normalizing with statistics of the batch "
                "(they depend on the input, so no rule applies): explain in inference mode, i.e. "
                "nn.BatchNorm(use_running_average=True) in linen or model.eval() in NNX, and jaxdtd folds "
                "the BatchNorm into the preceding layer."
            )
        super().__init__(
            f"jaxdtd has no relevance rule for primitive '{primitive}' applied to the explained data"
            f"{detail}, at module '{where}', {source}.{hint} If a parameter-free rule is right for it, "
            f"assign one explicitly, e.g. Composite(..., operations={{'{primitive}': rules.Gradient()}})"
            f" (or rules.Pass() / rules.Norm())."
        )
