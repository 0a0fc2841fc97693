"""Where relevance provably vanishes: a static analysis that lets rules skip work, exactly.

Two properties of a data value ``v`` (a variable of the flattened program), decided from the plan
(which rule acts where) before anything is evaluated:

* ``Z(v)``: the relevance of ``v`` is 0 wherever ``v == 0``.  It holds when every consumer of ``v``
  gives relevance in proportion to its input (``R_i = x_i * ...``: Epsilon, z+, gamma, alpha-beta
  and Norm) or routes relevance only to entries equal to a value that itself has ``Z`` (reshapes,
  max pooling, ``max(v, 0)``, scaling by constants, ...), and when ``v`` is a program output
  (initial relevance ``y * c``).  Flat, w^2, z^B and the plain gradient of a layer give relevance
  to zero inputs, so they break it.
* ``N(z)`` for the output ``z`` of an affine layer: the relevance of ``z`` is 0 wherever ``z <= 0``.
  It holds when every consumer of ``z`` is a ReLU, ``max(z, 0)`` or ``clamp(0, z, hi)``, whose
  output has ``Z``: where ``z <= 0`` the ReLU output is 0, so its relevance is 0, and Pass (or the
  ReLU's gradient) hands that 0 back to ``z``.

Under ``N`` the gamma rule's second denominator group (neurons with ``z < 0``) receives no relevance
at all, so :func:`jaxdtd.rules.affine_relevance` drops it: one transposed pass with ``w + gamma w+``
instead of two (the heatmap is the same to the last bit of the dropped terms, which are exact zeros).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from . import rules as R
from .graph import AffineLayer, Analysis, is_float
from .primitives import lookup
from .trace import Constant, Equation, Program

__all__ = ["layers_with_vanishing_negative_relevance"]


def _is_relu_of(eqn: Equation, z: int, constant: Callable[[Any], np.ndarray | None]) -> bool:
    """``max(z, 0)`` or ``clamp(0, z, hi >= 0)``: zero exactly where ``z <= 0``."""
    if eqn.name == "max" and len(eqn.invars) == 2 and z in eqn.invars:
        other = eqn.invars[1 - eqn.invars.index(z)]
        c = constant(other)
        return c is not None and bool(np.all(c == 0))
    if eqn.name == "clamp" and len(eqn.invars) == 3 and eqn.invars[1] == z:
        low, high = constant(eqn.invars[0]), constant(eqn.invars[2])
        return low is not None and high is not None and bool(np.all(low == 0) and np.all(high > 0))
    return False


def layers_with_vanishing_negative_relevance(
    program: Program,
    analysis: Analysis,
    layer_rules: Mapping[int, R.Rule | None],
    operation_rules: Mapping[int, R.OperationRule],
) -> frozenset[int]:
    """Indices of the affine layers whose output relevance is provably 0 wherever the output is
    ``<= 0`` (property ``N`` of the module docstring).

    ``layer_rules`` maps a layer index to its rule, ``operation_rules`` the index of the (first)
    equation of each parameter-free operation on data to its rule, as decided by the plan.
    """
    layer_of_linear: dict[int, AffineLayer] = {layer.linear.index: layer for layer in analysis.layers}
    outputs = {a for a in program.outvars if not isinstance(a, Constant)}
    zero_ok: dict[int, bool] = {}

    def constant(atom: Any) -> np.ndarray | None:
        if isinstance(atom, Constant):
            return np.asarray(atom.value)
        return analysis.static.get(atom)

    def consumer_ok(eqn: Equation, v: int) -> bool:
        if eqn.name == "stop_gradient" or not any(is_float(a) for a in eqn.out_avals):
            return True  # no relevance flows back
        layer = layer_of_linear.get(eqn.index)
        if layer is not None:
            if layer.index not in layer_rules:
                return True  # a cut layer: its output is a constant, no relevance flows back through it
            rule = layer_rules[layer.index]
            return eqn.invars[layer.data_position] == v and rule is not None and rule.proportional_to_input
        rule = operation_rules.get(eqn.index)
        if rule is None:
            return False  # inside a layer's chain or an island, or not an operation on data
        if rule.proportional_to_input:
            return True  # R_in = x * (...)
        outs_ok = all(
            zero_ok.get(o, False) for o, a in zip(eqn.outvars, eqn.out_avals, strict=True) if is_float(a)
        )
        info = lookup(eqn.primitive)
        if info is None:
            return False
        if rule.is_identity:
            return outs_ok and info.keeps_zero(eqn, v, constant)
        return outs_ok and rule.is_gradient and info.routes

    def holds(v: int) -> bool:
        return all(consumer_ok(c, v) for c in analysis.consumers.get(v, []))

    for eqn in reversed(program.equations):  # consumers come after producers
        for v in eqn.outvars:
            if v in analysis.data:
                zero_ok[v] = holds(v)

    found = set()
    for layer in analysis.layers:
        z = layer.output
        consumers = analysis.consumers.get(z, [])
        if z in outputs or not consumers:
            continue
        if all(
            _is_relu_of(c, z, constant)
            and c.index in operation_rules
            and (operation_rules[c.index].is_identity or operation_rules[c.index].is_gradient)
            and zero_ok.get(c.outvars[0], False)
            for c in consumers
        ):
            found.add(layer.index)
    return frozenset(found)
