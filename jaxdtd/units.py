"""Units: the pieces a relevance program is evaluated in.

A plan (:mod:`jaxdtd.interpret`) covers every equation of the flattened program by exactly one unit,
placed at the position of its last equation.  Each unit knows the equations it covers, the variables
it defines, and evaluates itself with one method, ``evaluate(read) -> {variable: value}``:

* :class:`Bind`: an equation evaluated as it is (constants, operations whose relevance is their
  gradient, data no relevance can reach); a cut equation's results are constants of the rules
  (:func:`constant_for_relevance`).
* :class:`LayerUnit`: an affine layer ``z = A(x) + b`` (:class:`jaxdtd.graph.AffineLayer`) with its
  rule as the VJP (:func:`jaxdtd.rules.affine_relevance`), BatchNorm-style scales folded.
* :class:`OperationUnit`: a parameter-free operation on data under an
  :class:`~jaxdtd.rules.OperationRule` (Pass, Norm, ...), with the constant scalings fused after a
  Norm (average pooling = sum / n is one Norm dividing by the stabilized mean, as zennit).
* :class:`IslandUnit`: a connected set of elementwise equations with one data input and one data
  output (``h * sigmoid(h)``, ``where(x > 0, x, a * x)``, GELU, softplus, hard_tanh), evaluated
  under one rule (Pass: the identity rule of LXT and zennit for elementwise nonlinearities).

The interpreter only wraps a rule in a :func:`jax.custom_vjp` (:func:`with_relevance_vjp`); the math
of every rule lives in :mod:`jaxdtd.rules`.  :func:`find_islands` is the matcher for islands.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap

from . import rules as R
from .graph import AffineLayer, Analysis, ChainOp
from .primitives import lookup
from .trace import Constant, Equation, Program

__all__ = [
    "Bind",
    "IslandUnit",
    "LayerUnit",
    "OperationUnit",
    "Unit",
    "external_inputs",
    "find_islands",
    "run_equations",
    "constant_for_relevance",
    "masked_relevance",
    "with_relevance_vjp",
]

Read = Callable[[Any], Any]


# --- helpers --------------------------------------------------------------------------------------
def zero_cotangent(value: Any) -> Any:
    value = jnp.asarray(value)
    if jnp.issubdtype(value.dtype, jnp.inexact):
        return jnp.zeros_like(value)
    return np.zeros(value.shape, dtype=jax.dtypes.float0)


def _zeros_like_tree(tree: Any) -> Any:
    return jax.tree_util.tree_map(zero_cotangent, tree)


def external_inputs(equations: Sequence[Equation], exclude: Iterable[Any] = ()) -> tuple[Any, ...]:
    """The variables ``equations`` read but do not define (nor ``exclude``), in order of first use."""
    defined = {v for eqn in equations for v in eqn.outvars} | set(exclude)
    seen: dict[Any, None] = {}
    for eqn in equations:
        for a in eqn.invars:
            if not isinstance(a, Constant) and a not in defined:
                seen[a] = None
    return tuple(seen)


def run_equations(
    equations: Sequence[Equation], env: dict[Any, Any], read: Read | None = None
) -> dict[Any, Any]:
    """Bind ``equations`` in order, adding their results to ``env`` (returned).  An operand is read
    from ``env`` when it is there, else with ``read`` (default: a :class:`Constant`'s value)."""
    for eqn in equations:
        values = [
            env[a] if not isinstance(a, Constant) and a in env else (read(a) if read else a.value)
            for a in eqn.invars
        ]
        env.update(zip(eqn.outvars, eqn.bind(values), strict=True))
    return env


def with_relevance_vjp(forward: Callable, backward: Callable) -> Callable:
    """``forward`` with ``backward(args, output, relevance) -> cotangents`` as its VJP.

    The arguments and the output are the residuals; every array reaches the rule as an explicit
    argument (closing over weights would break differentiation with respect to them)."""
    function = jax.custom_vjp(forward)

    def fwd(*args):
        out = forward(*args)
        return out, (args, out)

    def bwd(residuals, relevance):
        args, out = residuals
        return backward(args, out, relevance)

    function.defvjp(fwd, bwd)
    return function


@jax.custom_vjp
def constant_for_relevance(value: Any, anchor: Any) -> Any:
    """``value``; its VJP is zero (for ``value`` and for ``anchor``).

    The weights are constants of the rules, so the relevance pass gives them no cotangent; a cut
    value (``Composite.cuts``, LayerNorm's standard deviation) is one as well.  Unlike
    ``stop_gradient``, which cuts every level of differentiation, a custom VJP acts only in the
    differentiation that processes it, and JAX evaluates ``fwd`` (the identity) for the enclosing
    ones.  The ``anchor``, an element of the explained input (for a cut, the value itself), makes
    the relevance pass the one that processes it (a custom VJP whose operands all have zero
    tangents is handed to the enclosing differentiation).  Hence the relevance ``R(w, x)`` is a
    differentiable function of the weights: ``jax.grad(lambda w: loss(R(w, x)))`` is its true
    derivative, also through cut values."""
    return value


def _constant_fwd(value: Any, anchor: Any) -> tuple[Any, None]:
    return value, None


def _constant_bwd(_: None, ct: Any) -> tuple[None, None]:
    return None, None


constant_for_relevance.defvjp(_constant_fwd, _constant_bwd)


@jax.custom_vjp
def masked_relevance(value: Any, mask: Any) -> Any:
    """``value``; its VJP multiplies the incoming relevance by ``mask`` (broadcast against
    ``value``): ``R <- R * mask``, zero for the mask.  This is how a concept condition selects the
    relevance of some channels or neurons (zennit-crp masks the gradient at the module's output)."""
    return value


def _masked_fwd(value: Any, mask: Any) -> tuple[Any, Any]:
    return value, mask


def _masked_bwd(mask: Any, ct: Any) -> tuple[Any, None]:
    return (ct * mask.astype(ct.dtype), None)


masked_relevance.defvjp(_masked_fwd, _masked_bwd)


def apply_chain_op(op: ChainOp, z: Any, c: Any) -> Any:
    """``z (op) c`` for a constant-operand op, or the rearrangement ``view(z)``."""
    if op.op == "view":
        return op.equation.bind([z])[0]
    operands = [None, None]
    operands[1 - op.const_position], operands[op.const_position] = z, c
    return op.equation.bind(operands)[0]


def chain_value(op: ChainOp, read: Read) -> Any:
    """The constant operand of a chain op (``None`` for a view)."""
    return None if op.op == "view" else jnp.asarray(read(op.equation.invars[op.const_position]))


@custom_vmap
def _after_unbatched(value: Any, anchor: Any) -> Any:
    first = jax.lax.stop_gradient(anchor.reshape(-1)[0])
    zero = jnp.where(jnp.isfinite(first), first, 0).astype(value.dtype) * 0
    return value + zero


@_after_unbatched.def_vmap
def _after_vmap(axis_size: int, in_batched: Sequence[bool], value: Any, anchor: Any) -> tuple[Any, bool]:
    return _after_unbatched(value, anchor), in_batched[0]


@jax.custom_jvp
def _after(value: Any, anchor: Any) -> Any:
    """``value``, made to depend on one element of ``anchor`` (it adds an exact zero).

    XLA's CPU scheduler (concurrency-optimized) computes everything that depends only on the
    parameters, such as the rules' modified weights, at the start of the program, so all of them
    would be alive at once; it drops ``optimization_barrier``.  Tying the weights to the incoming
    relevance makes each layer's modified weights exist only while its backward runs.  Under
    ``vmap`` the anchor is batched but ``value`` must not become batched (that would turn every
    convolution into a grouped one): the batching rule of :func:`_after_unbatched` keeps
    ``value``'s own batching.  Its derivative is the identity in ``value`` (and zero in ``anchor``),
    so that the relevance can itself be differentiated (``jax.grad`` of a loss on the heatmap).
    """
    return _after_unbatched(value, anchor)


@_after.defjvp
def _after_jvp(primals: tuple[Any, Any], tangents: tuple[Any, Any]) -> tuple[Any, Any]:
    value, anchor = primals
    return _after(value, anchor), tangents[0]


# --- units ----------------------------------------------------------------------------------------
class Unit:
    """Base class of the units of a plan (see the module docstring)."""

    def equations(self) -> tuple[Equation, ...]:
        raise NotImplementedError

    def outputs(self) -> tuple[int, ...]:
        """The variables the unit defines for the rest of the program."""
        return self.equations()[-1].outvars

    def evaluate(self, read: Read) -> list[Any]:
        """The values of :meth:`outputs`, with the unit's rule as their VJP."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Bind(Unit):
    """One equation evaluated as it is (its VJP is its gradient); ``cut``: as a constant."""

    equation: Equation
    cut: bool = False

    def equations(self) -> tuple[Equation, ...]:
        return (self.equation,)

    def evaluate(self, read: Read) -> list[Any]:
        outs = self.equation.bind([read(a) for a in self.equation.invars])
        return [constant_for_relevance(o, o) for o in outs] if self.cut else outs


@dataclasses.dataclass(frozen=True)
class LayerUnit(Unit):
    """An affine layer with its rule (``None``: the plain gradient) and why it was chosen."""

    layer: AffineLayer
    rule: R.AffineRule | None
    reason: str = ""
    positive_output_relevance: bool = False  # output relevance is 0 where the output is <= 0

    def equations(self) -> tuple[Equation, ...]:
        return (self.layer.linear, *(op.equation for op in self.layer.chain))

    def outputs(self) -> tuple[int, ...]:
        return (self.layer.output,)

    def evaluate(self, read: Read, x: Any = None) -> list[Any]:
        layer = self.layer
        x = read(layer.input) if x is None else x
        chain_values = [chain_value(op, read) for op in layer.chain]
        if self.rule is None:  # the plain gradient: evaluate as in the program
            operands = [read(a) for a in layer.linear.invars]
            operands[layer.data_position] = x
            z = layer.linear.bind(operands)[0]
            for op, c in zip(layer.chain, chain_values, strict=True):
                z = apply_chain_op(op, z, c)
            return [z]
        kernel = jnp.asarray(read(layer.kernel_atom))
        return [self._with_rule(x, kernel, chain_values)]

    def _with_rule(self, x: Any, kernel: Any, chain_values: list[Any]) -> Any:
        layer, rule = self.layer, cast(R.AffineRule, self.rule)  # evaluate comes here with a rule only
        views = [op for op in layer.chain if op.op == "view"]

        def linear(v, w):
            return layer.apply_linear(v, w)

        def linear_with_views(v, w):
            z = linear(v, w)
            for op in views:
                z = apply_chain_op(op, z, None)
            return z

        def forward(x, kernel, chain_values):
            z = linear(x, kernel)
            for op, c in zip(layer.chain, chain_values, strict=True):
                z = apply_chain_op(op, z, c)
            return z

        def backward(args, out, relevance):
            x, kernel, chain_values = args
            kernel = _after(kernel, relevance)
            folded_kernel, bias = layer.fold(kernel, chain_values)
            r_in = R.affine_relevance(
                rule, linear_with_views, x, folded_kernel, bias, out, relevance,
                non_negative_input=layer.non_negative_input,
                positive_output_relevance=self.positive_output_relevance,
            )  # fmt: skip
            return (
                r_in,
                zero_cotangent(kernel),
                [None if c is None else zero_cotangent(c) for c in chain_values],
            )

        return with_relevance_vjp(forward, backward)(x, kernel, chain_values)


def _operation_vjp(rule: R.OperationRule, f: Callable, data_values: Sequence[Any], others: Any) -> Any:
    """``f(data_values, others)`` with ``rule`` as the VJP with respect to the data values (the
    other operands, constants for the rule, get zero cotangents)."""

    def forward(data_values, others):
        return f(data_values, others)

    def backward(args, out, relevance):
        data_values, others = args
        inputs = rule.relevance(lambda *d: f(d, others), data_values, out, relevance)
        return (tuple(inputs), _zeros_like_tree(others))

    return with_relevance_vjp(forward, backward)(tuple(data_values), others)


@dataclasses.dataclass(frozen=True)
class OperationUnit(Unit):
    """A parameter-free operation on data (and the constant scalings fused after it)."""

    equation: Equation
    rule: R.OperationRule
    data: tuple[bool, ...]  # which operands are data
    tail: tuple[ChainOp, ...] = ()
    reason: str = ""

    def equations(self) -> tuple[Equation, ...]:
        return (self.equation, *(op.equation for op in self.tail))

    def evaluate(self, read: Read) -> list[Any]:
        eqn, data, tail = self.equation, self.data, self.tail
        values = [read(a) for a in eqn.invars]
        if self.rule.is_gradient:
            return eqn.bind(values)
        positions = [i for i, d in enumerate(data) if d]

        def f(data_values, others):
            operands, tail_values = others
            merged = list(operands)
            for i, v in zip(positions, data_values, strict=True):
                merged[i] = v
            out = eqn.bind(merged)[0]
            for op, c in zip(tail, tail_values, strict=True):
                out = apply_chain_op(op, out, c)
            return out

        operands = [None if d else jnp.asarray(v) for v, d in zip(values, data, strict=True)]
        tail_values = [jnp.asarray(read(op.equation.invars[op.const_position])) for op in tail]
        data_values = [values[i] for i in positions]
        return [_operation_vjp(self.rule, f, data_values, (operands, tail_values))]


@dataclasses.dataclass(frozen=True)
class IslandUnit(Unit):
    """Elementwise equations with one data input and one data output, under one rule."""

    members: tuple[Equation, ...]
    input: int
    output: int
    rule: R.OperationRule = R.Pass()
    reason: str = "elementwise island"
    kind: str = "island"  # or "softmax" (jaxdtd.recognize.find_softmax): the same unit, other members

    def equations(self) -> tuple[Equation, ...]:
        return self.members

    def outputs(self) -> tuple[int, ...]:
        return (self.output,)

    def external(self) -> tuple[Any, ...]:
        """Operands read from outside the island other than its input (constants for the rule)."""
        return external_inputs(self.members, exclude=(self.input,))

    def evaluate(self, read: Read) -> list[Any]:
        external = self.external()

        def f(data_values, others):
            (x,) = data_values
            env = dict(zip(external, others, strict=True))
            env[self.input] = x
            return run_equations(self.members, env)[self.output]

        others = tuple(jnp.asarray(read(a)) for a in external)
        return [_operation_vjp(self.rule, f, [read(self.input)], others)]


# --- the island matcher ---------------------------------------------------------------------------
def _needs_island(eqn: Equation, analysis: Analysis) -> bool:
    """An elementwise equation whose own rule cannot give the island's identity rule: two data
    operands (``h * sigmoid(h)``), or a ``where`` on a comparison of the data."""
    data = analysis.data_mask(eqn)
    if sum(data) > 1:
        return True
    return eqn.name == "select_n" and analysis.dependent_mask(eqn)[0]


def find_islands(
    program: Program, analysis: Analysis, live: frozenset[int], excluded: Iterable[int] = ()
) -> list[IslandUnit]:
    """Maximal elementwise islands among the live equations not in ``excluded``.

    An equation is a candidate when its primitive is elementwise (registry), it reads a value that
    depends on the explained input, and its dependent operands and results have one shape.  Every
    candidate is traced to the single value it depends on through candidates (its *source*); the
    candidates of one source form a group.  A group is an island when exactly one of its values is
    used outside it (or is a program output) and some member needs the island (:func:`_needs_island`);
    values of a group used both inside and outside it split the group there.  Other candidates keep
    the rule of their own primitive.
    """
    excluded = set(excluded)
    outputs = {a for a in program.outvars if not isinstance(a, Constant)}
    candidates: list[Equation] = []
    for eqn in program.equations:
        info = lookup(eqn.primitive)
        if info is None or not info.elementwise or eqn.index in excluded:
            continue
        dependent = [a for a in eqn.invars if not isinstance(a, Constant) and a in analysis.dependent]
        if not dependent or not any(v in live or v not in analysis.data for v in eqn.outvars):
            continue
        shape = tuple(eqn.out_avals[0].shape)
        if any(tuple(analysis.avals[a].shape) != shape for a in dependent):
            continue
        candidates.append(eqn)

    boundary: set[int] = set()
    while True:
        source: dict[int, int] = {}
        groups: dict[int, list[Equation]] = defaultdict(list)
        for eqn in candidates:
            sources = {
                a if (a in boundary or a not in source) else source[a]
                for a in eqn.invars
                if not isinstance(a, Constant) and a in analysis.dependent
            }
            if len(sources) != 1:
                continue
            (src,) = sources
            for v in eqn.outvars:
                source[v] = src
            groups[src].append(eqn)
        exits_of: dict[int, list[int]] = {}
        split: set[int] = set()
        for src, members in groups.items():
            inside = {eqn.index for eqn in members}
            exits = []
            for eqn in members:
                for v in eqn.outvars:
                    users = analysis.consumers.get(v, [])
                    if v in outputs or any(c.index not in inside for c in users):
                        exits.append(v)
            exits_of[src] = exits
            if len(exits) > 1:  # values also used inside become sources of their own
                split.update(
                    v for v in exits if any(c.index in inside for c in analysis.consumers.get(v, []))
                )
        if split <= boundary:
            break
        boundary |= split

    islands = []
    for src, members in groups.items():
        exits = exits_of[src]
        if len(exits) != 1 or exits[0] not in members[-1].outvars or exits[0] not in analysis.data:
            continue
        if src not in analysis.data or not any(_needs_island(eqn, analysis) for eqn in members):
            continue
        islands.append(IslandUnit(tuple(members), src, exits[0]))
    return islands
