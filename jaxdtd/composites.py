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

Parameter-free operations follow the base map of ``docs/rules.md`` (activations Pass,
sums and average pooling Norm, max pooling and structural ops the gradient); ``operations`` maps a
primitive name (``"tanh"``, ``"reduce_window_max"``) to a :class:`~jaxdtd.rules.Pass`,
:class:`~jaxdtd.rules.Norm` or :class:`~jaxdtd.rules.Gradient` to override it or to allow an operation
jaxdtd does not know.

``cuts`` are patterns of values that are constants for the rules (as if detached with
``jax.lax.stop_gradient`` in the relevance pass only, without editing the model; the forward is
unchanged, and a derivative of the relevance itself still sees how the cut value depends on the
weights and the input): ``"glob"`` cuts the
output of every matching layer (module or weight path) or module, ``"glob:primitive"`` the results
of that primitive under matching modules (see :func:`jaxdtd.interpret.select_values`).  Relevance
does not flow through a cut value, and what only a cut value feeds needs no rule.

The presets are functions returning composites; their rules are those of docs/rules.md.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

from . import rules as R
from . import selectors as S

__all__ = [
    "AttnLRP",
    "CPLRP",
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


def _matches(layer: Any, pattern: str) -> bool:
    return fnmatch.fnmatchcase(layer.module_path, pattern) or bool(
        layer.param_path and fnmatch.fnmatchcase(layer.param_path, pattern)
    )


def _applies(rule: R.Rule, unit: str) -> bool:
    """Affine rules (and Gradient, Norm = Epsilon) act on layers; operation rules on operations."""
    if unit == "layer":
        return isinstance(rule, R.AffineRule) or (isinstance(rule, R.OperationRule) and not rule.is_identity)
    return isinstance(rule, R.OperationRule)


def _layer_target(layer: Any) -> S.Target:
    return S.Target(
        unit="layer",
        primitive=layer.linear.name,
        module_path=layer.module_path,
        param_path=layer.param_path,
        layer_kind=layer.kind,
        first=layer.first,
    )


@dataclasses.dataclass(frozen=True)
class Composite:
    """An ordered list of ``(selector, rule)`` maps; for each affine layer and each parameter-free
    operation on data the first entry whose selector matches and whose rule applies wins
    (:mod:`jaxdtd.selectors`).

    ``rules`` holds explicit ``(selector, rule)`` pairs and comes first; the keywords are shorthands
    for the entries after it, in this order: ``layers`` (``(glob, rule)`` pairs: ``Path(glob)``),
    ``first`` (``First()``), ``conv`` / ``dense`` (``LayerKind``), ``default`` (every layer), and
    ``operations`` (``{primitive: rule}``: ``UnitKind("operation") & Primitive(name)``).

    ``attention_block`` is an evaluation setting, not a rule: the attention cores
    (``softmax(c q k^T + M) v``) are evaluated as one unit whose backward pass applies the same
    rules to blocks of this many query rows at a time (:mod:`jaxdtd.attention`; the same relevance,
    memory ``O(T * block)`` instead of ``O(T^2)``).  ``None`` chooses the block so that one block of
    the scores has at most 2**22 elements; ``0`` evaluates the core unit by unit.
    """

    dense: R.Rule | None = None
    conv: R.Rule | None = None
    first: R.Rule | None = None
    layers: Any = ()
    default: R.Rule | None = None
    operations: Any = ()
    name: str = "Composite"
    cuts: Any = ()
    rules: Any = ()
    attention_block: int | None = None

    def __post_init__(self) -> None:
        if self.attention_block is not None and (
            not isinstance(self.attention_block, int) or self.attention_block < 0
        ):
            raise TypeError(
                f"Composite.attention_block must be None, 0 or a positive number of query rows, "
                f"got {self.attention_block!r}"
            )
        if isinstance(self.cuts, str) or not all(isinstance(c, str) for c in self.cuts):
            raise TypeError(f"Composite.cuts must be a sequence of pattern strings, got {self.cuts!r}")
        object.__setattr__(self, "cuts", tuple(self.cuts))
        object.__setattr__(self, "layers", _pairs(self.layers, "layers"))
        object.__setattr__(self, "operations", _pairs(self.operations, "operations"))
        rules = tuple(tuple(entry) for entry in self.rules)
        for i, entry in enumerate(rules):
            if len(entry) != 2 or not isinstance(entry[0], S.Selector) or not isinstance(entry[1], R.Rule):
                raise TypeError(
                    f"Composite.rules[{i}] must be a (selector, rule) pair such as "
                    f"(selectors.Path('*/Dense_1'), rules.Epsilon()), got {entry!r}"
                )
        object.__setattr__(self, "rules", rules)
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
            if not isinstance(rule, R.OperationRule):
                raise TypeError(
                    f"Composite.operations['{primitive}'] must be an operation rule (Pass(), Norm(), "
                    f"Uniform() or Gradient()), got {rule!r}"
                )

    def entries(self) -> tuple[tuple[S.Selector, R.Rule, str], ...]:
        """The whole ordered list as ``(selector, rule, reason)``; ``reason`` is what
        :func:`jaxdtd.describe` prints."""
        out = [(selector, rule, str(selector)) for selector, rule in self.rules]
        out += [(S.Path(glob), rule, f"layers[{glob!r}]") for glob, rule in self.layers]
        if self.first is not None:
            out.append((S.First(), self.first, "first"))
        out += [
            (S.LayerKind(k), r, k) for k, r in (("conv", self.conv), ("dense", self.dense)) if r is not None
        ]
        if self.default is not None:
            out.append((S.UnitKind("layer"), self.default, "default"))
        out += [
            (S.UnitKind("operation") & S.Primitive(name), rule, f"operations[{name!r}]")
            for name, rule in self.operations
        ]
        return tuple(out)

    def match(self, target: S.Target) -> tuple[R.Rule, str] | None:
        """The first entry that matches ``target`` and whose rule applies to it."""
        for selector, rule, reason in self.entries():
            if selector.matches(target) and _applies(rule, target.unit):
                return rule, reason
        return None

    def rule_for(self, layer: Any) -> tuple[R.Rule | None, str]:
        """The rule for an affine layer and why it was chosen (for printing)."""
        found = self.match(_layer_target(layer))
        return found if found is not None else (None, "gradient")

    def operation_rule_for(
        self, primitive: str, module_path: str = "", unit: str = "operation"
    ) -> tuple[R.Rule, str] | None:
        """The rule the composite assigns to an operation (or an elementwise island), or ``None``:
        then the primitive registry decides."""
        return self.match(S.Target(unit=unit, primitive=primitive, module_path=module_path))

    def unmatched_patterns(self, layers: Iterable[Any]) -> tuple[str, ...]:
        """The ``layers`` globs that match none of ``layers`` (affine layers with ``module_path`` and
        ``param_path``), neither by module path nor by weight path: usually a typo."""
        layers = list(layers)
        return tuple(
            pattern for pattern, _ in self.layers if not any(_matches(layer, pattern) for layer in layers)
        )

    def operation_rule(self, primitive: str) -> R.Rule | None:
        """The rule for an operation of ``primitive`` at the top level (see :meth:`operation_rule_for`)."""
        found = self.operation_rule_for(primitive)
        return None if found is None else found[0]


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


#: the primitives whose operations AttnLRP maps to LRP-0: sums of data values (residuals), shifts by
#: constants (a constant addend absorbs its share), reductions (mean pooling, LayerNorm's mean)
_LRP0_OPERATIONS = ("add", "add_any", "sub", "reduce_sum", "reduce_window_sum")


def AttnLRP(epsilon: float = 0.0) -> Composite:  # noqa: N802
    """AttnLRP (Achtibat et al., ICML 2024) as LXT 2.1's efficient mode computes it.

    LRP-epsilon with ``epsilon = 0`` (LRP-0, safe division) on dense and conv layers, sums, shifts
    and reductions; the uniform rule on products of data values (``q @ k.T``, ``A @ v``, gates):
    each factor gets half; the identity rule on elementwise nonlinearities (GELU, SiLU, ...: islands);
    the softmax rule ``R_x = x (R_A - A sum R_A)``; LayerNorm and RMSNorm with the standard deviation
    a constant (every composite does this) and the centering kept.  Relevance is not conserved
    (biases absorb, softmax is not conservative).  A positive ``epsilon`` stabilizes every division.
    """
    lrp0 = R.Norm(epsilon)
    rules = [
        (S.UnitKind("softmax"), R.Norm(epsilon)),
        (S.UnitKind("operation") & S.Primitive("mul"), R.Uniform(epsilon)),
        (S.UnitKind("operation") & S.Primitive("dot_general"), R.Uniform(epsilon)),
        *((S.UnitKind("operation") & S.Primitive(p), lrp0) for p in _LRP0_OPERATIONS),
        (S.UnitKind("layer"), R.Epsilon(epsilon)),
    ]
    return Composite(rules=rules, name="AttnLRP")


def CPLRP(epsilon: float = 0.0) -> Composite:  # noqa: N802
    """CP-LRP (Ali et al. 2022, as LXT 2.1 applies it): AttnLRP with every softmax output (the
    attention weights) held constant, as if ``q`` and ``k`` were detached: no relevance flows through
    the attention scores, and ``A @ v`` gives all of its relevance to ``v`` (LRP-0 on the linear map
    ``v -> A v``); in gated units (SwiGLU ``silu(gate x) * up x``) the activated gate is a constant
    too, so ``up x`` receives all of the product's relevance (LXT's Llama CP-LRP).  Differs strongly
    from :func:`AttnLRP`; never a silent fallback."""
    return dataclasses.replace(AttnLRP(epsilon), cuts=("*:softmax", "*:gate"), name="CPLRP")
