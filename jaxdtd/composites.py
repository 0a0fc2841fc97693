"""Composites: which rule acts on which layer.

A :class:`Composite` is data.  For an affine layer the rule is chosen by this precedence
(first match wins):

1. ``layers``: ``(glob, rule)`` pairs matched with :func:`fnmatch.fnmatchcase` against the layer's
   module path from the name stack (``"CNN/Dense_0"``) and against the pytree path of its weight
   (``"params/Dense_0/kernel"``), in the order given;
2. ``first``: the first layer(s) in data-flow order, i.e. affine layers whose input does not pass
   through another affine layer (the layer that sees the raw input);
3. ``conv`` for convolutions, ``dense`` for ``dot_general`` layers;
4. ``default``; if that is ``None`` too, the plain gradient.

Parameter-free operations follow the base map of ``shared/reference/rules.md`` (activations Pass,
sums and average pooling Norm, max pooling and structural ops the gradient); ``operations`` maps a
primitive name (``"tanh"``, ``"reduce_window_max"``) to a :class:`~jaxdtd.rules.Pass`,
:class:`~jaxdtd.rules.Norm` or :class:`~jaxdtd.rules.Gradient` to override it or to allow an operation
jaxdtd does not know.

The presets are functions returning composites; their rules are those of rules.md.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from typing import Any

from . import rules as R

__all__ = [
    "Composite",
    "DeepTaylor",
    "EpsilonAlpha2Beta1",
    "EpsilonAlpha2Beta1Flat",
    "EpsilonGammaBox",
    "EpsilonPlus",
    "EpsilonPlusFlat",
    "as_composite",
]


def _pairs(value: Any, field: str) -> tuple[tuple[str, R.Rule], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    pairs = tuple((str(k), r) for k, r in items)
    for key, rule in pairs:
        if not isinstance(rule, R.Rule):
            raise TypeError(f"Composite.{field}[{key!r}] must be a jaxdtd rule, got {rule!r}")
    return pairs


@dataclasses.dataclass(frozen=True)
class Composite:
    """Assigns rules to affine layers and parameter-free operations (see the module docstring)."""

    dense: R.Rule | None = None
    conv: R.Rule | None = None
    first: R.Rule | None = None
    layers: Any = ()
    default: R.Rule | None = None
    operations: Any = ()
    name: str = "Composite"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _pairs(self.layers, "layers"))
        object.__setattr__(self, "operations", _pairs(self.operations, "operations"))
        for field in ("dense", "conv", "first", "default"):
            rule = getattr(self, field)
            if rule is not None and not isinstance(rule, R.Rule):
                raise TypeError(f"Composite.{field} must be a jaxdtd rule or None, got {rule!r}")
            if isinstance(rule, R.Pass):
                raise TypeError(
                    f"Composite.{field}: Pass() cannot act on an affine layer (its output has another "
                    "shape than its input); use Epsilon, ZPlus, ... or Gradient()"
                )
        for primitive, rule in self.operations:
            if not isinstance(rule, (R.Pass, R.Norm, R.Gradient)):
                raise TypeError(
                    f"Composite.operations['{primitive}'] must be Pass(), Norm() or Gradient(), got {rule!r}"
                )

    def rule_for(self, layer: Any) -> tuple[R.Rule | None, str]:
        """The rule for an affine layer and why it was chosen (for printing)."""
        for pattern, rule in self.layers:
            if fnmatch.fnmatchcase(layer.module_path, pattern) or (
                layer.param_path and fnmatch.fnmatchcase(layer.param_path, pattern)
            ):
                return rule, f"layers[{pattern!r}]"
        if layer.first and self.first is not None:
            return self.first, "first"
        by_kind = self.conv if layer.kind == "conv" else self.dense
        if by_kind is not None:
            return by_kind, layer.kind
        if self.default is not None:
            return self.default, "default"
        return None, "gradient"

    def operation_rule(self, primitive: str) -> R.Rule | None:
        for name, rule in self.operations:
            if name == primitive:
                return rule
        return None


def as_composite(composite: Composite | R.Rule | None) -> Composite | None:
    """A composite, or a single rule meaning "this rule on every dense and conv layer"."""
    if composite is None or isinstance(composite, Composite):
        return composite
    if isinstance(composite, R.Rule):
        return Composite(dense=composite, conv=composite, name=type(composite).__name__)
    raise TypeError(
        f"composite must be a jaxdtd.composites.Composite, a jaxdtd rule or None, got {composite!r}"
    )


def EpsilonPlus(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:  # noqa: N802
    """ZPlus on convolutions, Epsilon on dense layers (zennit's ``EpsilonPlus``)."""
    return Composite(conv=R.ZPlus(stabilizer=stabilizer), dense=R.Epsilon(epsilon), name="EpsilonPlus")


def EpsilonPlusFlat(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:  # noqa: N802
    """Flat on the first layer, ZPlus on convolutions, Epsilon on dense layers."""
    return Composite(
        first=R.Flat(stabilizer=stabilizer),
        conv=R.ZPlus(stabilizer=stabilizer),
        dense=R.Epsilon(epsilon),
        name="EpsilonPlusFlat",
    )


def EpsilonAlpha2Beta1(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:  # noqa: N802
    """AlphaBeta(2, 1) on convolutions, Epsilon on dense layers."""
    return Composite(
        conv=R.AlphaBeta(2.0, 1.0, stabilizer=stabilizer),
        dense=R.Epsilon(epsilon),
        name="EpsilonAlpha2Beta1",
    )


def EpsilonAlpha2Beta1Flat(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:  # noqa: N802
    """Flat on the first layer, AlphaBeta(2, 1) on convolutions, Epsilon on dense layers."""
    return Composite(
        first=R.Flat(stabilizer=stabilizer),
        conv=R.AlphaBeta(2.0, 1.0, stabilizer=stabilizer),
        dense=R.Epsilon(epsilon),
        name="EpsilonAlpha2Beta1Flat",
    )


def EpsilonGammaBox(  # noqa: N802
    low: Any, high: Any, gamma: float = 0.25, epsilon: float = 1e-6, stabilizer: float = 1e-6
) -> Composite:
    """ZBox(low, high) on the first layer, Gamma(gamma) on convolutions, Epsilon on dense layers."""
    return Composite(
        first=R.ZBox(low, high, stabilizer=stabilizer),
        conv=R.Gamma(gamma, stabilizer=stabilizer),
        dense=R.Epsilon(epsilon),
        name="EpsilonGammaBox",
    )


def DeepTaylor(low: Any = None, high: Any = None, stabilizer: float = 1e-6) -> Composite:  # noqa: N802
    """The deep Taylor decomposition of Montavon et al. (2017) for ReLU networks.

    First layer: the z^B rule ``ZBox(low, high)`` for inputs bounded by ``low <= x <= high``
    (pixels), or the w^2 rule when no bounds are given (unbounded real inputs); every other dense
    and conv layer: the z+ rule.  All biases dropped, so every layer is conservative wherever its
    positive contributions are non-zero, and the relevance is positive for inputs inside the box:
    ``sum_i R_i(x) = f_c(x)`` on a sequential ReLU network with ``f_c(x) > 0``.
    """
    if (low is None) != (high is None):
        raise ValueError(
            "DeepTaylor: give both low and high (z^B rule on the first layer) or neither "
            f"(w^2 rule), got low={low!r}, high={high!r}"
        )
    if low is None:
        first: R.Rule = R.WSquare(stabilizer=stabilizer, zero_bias=True)
    else:
        first = R.ZBox(low, high, stabilizer=stabilizer, zero_bias=True)
    plus = R.ZPlus(stabilizer=stabilizer, zero_bias=True)
    return Composite(first=first, conv=plus, dense=plus, name="DeepTaylor")
