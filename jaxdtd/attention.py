"""The attention core as one unit whose relevance is computed in blocks of query rows.

In ``o = softmax(c * (q k^T) + M) v`` every rule of the core (the product rule on ``q k^T``, the
rules of the scaling and the additive mask, the softmax rule, the product rule on ``A v``) acts
row by row: the relevance of query row ``t`` needs only row ``t`` of the scores ``S``, of the
softmax input ``x`` and of the attention weights ``A``, and the relevance of ``k`` and ``v`` is a
sum over rows.  Evaluated unit by unit, the backward pass keeps ``S``, ``x`` and ``A`` whole, each
of shape ``(heads, T, T)``: at long sequences these dominate the memory (more than the gradient
keeps, which needs ``A`` only).  :class:`AttentionUnit` evaluates the same rules on blocks of
query rows instead: its forward value is the original equations' (bit for bit), its residuals are
only its inputs and ``o``, and its backward pass recomputes ``S_b, x_b, A_b`` for one block ``b``
of rows at a time and applies the very same rules to them,

``R_{q_b}, R_k^{(b)}, R_v^{(b)} = rules(q_b, k, v, o_b, R_{o_b})``,  ``R_k = sum_b R_k^{(b)}``,
``R_v = sum_b R_v^{(b)}``,

inside a ``jax.lax.scan`` over the blocks.  The result equals the unit-by-unit relevance up to
floating-point summation order; memory is ``O(T * block)`` per head instead of ``O(T^2)``.  Rows are
padded to a multiple of the block (edge values; the padded rows receive zero relevance, and every
rule is linear in its incoming relevance, so they contribute nothing).

The block comes from ``Composite.attention_block`` (rows per block at most; ``0`` keeps the units
apart), by default as many rows as keep one block of the scores within
:data:`DEFAULT_BLOCK_ELEMENTS`.

:func:`fuse_attention` finds the cores among a plan's units: a product of two values (``dot_general``
under an operation rule) whose result passes through elementwise operations with one data operand
each (scaling, additive masks, casts) into a recognized softmax, whose output (through casts) is
an operand of a second product, contracted over the softmax axis; every intermediate value has a
single use and none is tapped.  Anything else keeps its units.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from . import rules as R
from .graph import Analysis
from .primitives import lookup
from .trace import Constant, Equation
from .units import (
    Bind,
    IslandUnit,
    OperationUnit,
    Unit,
    external_inputs,
    run_equations,
    with_relevance_vjp,
    zero_cotangent,
)

__all__ = ["DEFAULT_BLOCK_ELEMENTS", "AttentionUnit", "fuse_attention"]

#: without an explicit block, rows per block are chosen so that one block of the scores holds at most
#: this many elements (16 MiB in float32)
DEFAULT_BLOCK_ELEMENTS = 2**22


@dataclasses.dataclass(frozen=True)
class _Step:
    """One elementwise unit between the products: its equations, data input, output and rule
    (``None``: its gradient)."""

    equations: tuple[Equation, ...]
    input: int
    output: int
    rule: R.OperationRule | None


@dataclasses.dataclass(frozen=True)
class AttentionUnit(Unit):
    """``o = product(softmax(chain(product(q, k))), v)`` under its members' rules, evaluated in
    blocks of at most ``block`` query rows in the backward pass (see the module docstring): the
    fewest blocks that respect it, all of one size, the last padded.

    ``scores`` and ``values`` are the two products' units, ``chain`` the elementwise units between
    the scores and the softmax, ``softmax`` the softmax unit (axis ``key_axis`` of the scores),
    ``tail`` the elementwise units between the softmax and the second product.  ``row_axis`` is the
    axis of the scores that holds the query rows (``None``: no axis to split), ``query_axis`` that
    axis in the query operand (operand ``query_position`` of the scores product), ``output_axis``
    in ``o``, ``weights_position`` the position of the attention weights in the second product."""

    scores: OperationUnit
    chain: tuple[_Step, ...]
    softmax: IslandUnit
    tail: tuple[_Step, ...]
    values: OperationUnit
    key_axis: int
    row_axis: int | None
    query_position: int
    query_axis: int | None
    weights_position: int
    output_axis: int | None
    block: int
    replaced: tuple[Unit, ...] = ()  # every unit it stands for (the products, steps and softmax)

    def equations(self) -> tuple[Equation, ...]:
        found = [*self.scores.equations(), *self.softmax.equations(), *self.values.equations()]
        for step in (*self.chain, *self.tail):
            found += step.equations
        return tuple(sorted(found, key=lambda e: e.index))

    def outputs(self) -> tuple[int, ...]:
        return self.values.outputs()

    def evaluate(self, read) -> list[Any]:
        equations = self.equations()
        external = external_inputs(equations)
        (output,) = self.outputs()

        def forward(args):
            return run_equations(equations, dict(zip(external, args, strict=True)))[output]

        def backward(args, out, relevance):
            (inputs,) = args
            env = dict(zip(external, inputs, strict=True))
            found = self._relevance(env, out, relevance)
            return (tuple(found.get(v, zero_cotangent(a)) for v, a in zip(external, inputs, strict=True)),)

        args = tuple(jnp.asarray(read(a)) for a in external)
        return [with_relevance_vjp(forward, backward)(args)]

    # --- the blocked backward pass ----------------------------------------------------------------
    def _relevance(self, env: dict[int, Any], out: Any, relevance: Any) -> dict[int, Any]:
        scores_eqn = self.scores.equation
        query = scores_eqn.invars[self.query_position]
        rows = 1 if self.row_axis is None else int(scores_eqn.out_avals[0].shape[self.row_axis])
        n = math.ceil(rows / max(1, min(self.block, rows)))
        block = math.ceil(rows / n)  # n blocks of at most self.block rows, as even as possible
        padded = n * block

        def pad(value: Any, axis: int | None, zeros: bool = False) -> Any:
            if axis is None or padded == rows:
                return value
            widths = [(0, 0)] * value.ndim
            widths[axis] = (0, padded - rows)
            return jnp.pad(value, widths) if zeros else jnp.pad(value, widths, mode="edge")

        # per-row operands other than the query: constants of the steps with a row axis (masks)
        row_shaped: dict[Any, Any] = {}  # variable or id(Constant) -> padded value
        for step in (*self.chain, *self.tail):
            for eqn in step.equations:
                for a in eqn.invars:
                    value = a.value if isinstance(a, Constant) else env.get(a)
                    if value is not None and self._has_rows(value, rows):
                        key = id(a) if isinstance(a, Constant) else a
                        row_shaped[key] = pad(jnp.asarray(value), self.row_axis)
        query_p = pad(env[query], self.query_axis)
        out_p, relevance_p = pad(out, self.output_axis), pad(relevance, self.output_axis, zeros=True)

        full_data = [  # operands whose relevance sums over the blocks
            v
            for unit, skip in ((self.scores, self.query_position), (self.values, self.weights_position))
            for i, (v, d) in enumerate(zip(unit.equation.invars, unit.data, strict=True))
            if d and i != skip
        ]

        def one_block(start: Any) -> tuple[Any, dict[int, Any]]:
            def rows_of(value: Any, axis: int | None) -> Any:
                if axis is None or n == 1:
                    return value
                return jax.lax.dynamic_slice_in_dim(value, start, block, axis)

            def read(atom: Any) -> Any:
                key = id(atom) if isinstance(atom, Constant) else atom
                if key in row_shaped:
                    return rows_of(row_shaped[key], self.row_axis)
                return atom.value if isinstance(atom, Constant) else env[atom]

            # forward on the block
            q_b = rows_of(query_p, self.query_axis)
            s_b, scores_rel = _product(self.scores, read, {self.query_position: q_b})
            x_b, chain_back = _steps(self.chain, s_b, read)
            axis = self.key_axis

            def softmax(x):
                return jax.nn.softmax(x, axis=axis)

            a_b = softmax(x_b)
            w_b, tail_back = _steps(self.tail, a_b, read)
            o_b = rows_of(out_p, self.output_axis)
            r_o = rows_of(relevance_p, self.output_axis)
            # backward on the block: the members' rules in reverse order
            found: dict[int, Any] = {}
            weights_rel = _product(self.values, read, {self.weights_position: w_b})[1]
            r_w = weights_rel(o_b, r_o, found, self.weights_position)
            r_a = tail_back(r_w)
            (r_x,) = self.softmax.rule.relevance(softmax, [x_b], a_b, r_a)
            r_s = chain_back(r_x)
            r_q = scores_rel(s_b, r_s, found, self.query_position)
            return r_q, found

        if n == 1:
            r_q, found = one_block(0)
        else:

            def block_step(carry: dict[int, Any], i: Any) -> tuple[dict[int, Any], Any]:
                r_q, found = one_block(i * block)
                return {v: carry[v] + found[v].astype(carry[v].dtype) for v in carry}, r_q

            # the sums over blocks in at least float32 (bfloat16 models), cast back at the end
            init = {
                v: jnp.zeros(jnp.shape(env[v]), jnp.promote_types(jnp.result_type(env[v]), jnp.float32))
                for v in dict.fromkeys(full_data)
            }
            found, blocks = jax.lax.scan(block_step, init, jnp.arange(n))
            found = {v: r.astype(jnp.result_type(env[v])) for v, r in found.items()}
            axis = cast(int, self.query_axis)  # n > 1 blocks: the rows have an axis in the query
            r_q = jnp.moveaxis(blocks, 0, axis)
            shape = list(r_q.shape)
            r_q = r_q.reshape(shape[:axis] + [shape[axis] * shape[axis + 1]] + shape[axis + 2 :])
            r_q = jax.lax.slice_in_dim(r_q, 0, rows, axis=axis)
        found = dict(found)
        found[query] = found[query] + r_q if query in found else r_q
        return found

    def _has_rows(self, value: Any, rows: int) -> bool:
        shape = np.shape(value)
        return (
            self.row_axis is not None
            and len(shape) == len(self.scores.equation.out_avals[0].shape)
            and rows > 1
            and shape[self.row_axis] == rows
        )


def _product(unit: OperationUnit, read, replaced: dict[int, Any]):
    """The product of ``unit`` on the block (operands from ``read`` except ``replaced``) and a
    function applying its rule: ``rel(output, relevance, found, position) -> R of operand
    position`` that adds the relevance of the other data operands into ``found``."""
    eqn = unit.equation
    operands = [replaced[i] if i in replaced else read(a) for i, a in enumerate(eqn.invars)]
    positions = [i for i, d in enumerate(unit.data) if d]

    def f(*data_values):
        merged = list(operands)
        for i, v in zip(positions, data_values, strict=True):
            merged[i] = v
        return eqn.bind(merged)[0]

    value = f(*(operands[i] for i in positions))

    def rel(output, relevance, found, position):
        shares = unit.rule.relevance(f, [operands[i] for i in positions], output, relevance)
        mine = None
        for i, r in zip(positions, shares, strict=True):
            if i == position:
                mine = r
                continue
            v = eqn.invars[i]
            found[v] = found[v] + r if v in found else r
        return mine

    return value, rel


def _steps(steps: Sequence[_Step], value: Any, read):
    """The elementwise steps applied to ``value`` on the block, and their relevance function."""
    saved = []
    for step in steps:

        def f(x, step=step):
            return run_equations(step.equations, {step.input: x}, read)[step.output]

        out = f(value)
        saved.append((step, f, value, out))
        value = out

    def back(relevance):
        for step, f, x, y in reversed(saved):
            if step.rule is None:
                relevance = jax.vjp(f, x)[1](relevance)[0]
            else:
                (relevance,) = step.rule.relevance(f, [x], y, relevance)
        return relevance

    return value, back


# --- the matcher ----------------------------------------------------------------------------------
_ROW_SAFE_RULES = (R.Pass, R.Norm, R.Uniform, R.Gradient)


def _output_axes(eqn: Equation) -> list[tuple[int, int] | None]:
    """For each output axis of a ``dot_general``, ``(operand position, operand axis)`` of the free
    axis it comes from (``None``: a batch axis)."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    free = [
        [a for a in range(len(aval.shape)) if a not in contract and a not in batch]
        for aval, contract, batch in zip(eqn.in_avals, (lc, rc), (lb, rb), strict=True)
    ]
    return [None] * len(lb) + [(0, a) for a in free[0]] + [(1, a) for a in free[1]]


def _output_axis_of(eqn: Equation, position: int, axis: int) -> int | None:
    """Where ``axis`` of operand ``position`` of a ``dot_general`` lands in its output (``None``:
    contracted or a batch axis)."""
    axes = _output_axes(eqn)
    return axes.index((position, axis)) if (position, axis) in axes else None


def _operand_axis_of(eqn: Equation, out_axis: int) -> tuple[int, int] | None:
    """``(operand position, operand axis)`` of a free output axis of a ``dot_general``."""
    return _output_axes(eqn)[out_axis]


def _step_of(unit: Unit, analysis: Analysis, shape: tuple[int, ...]) -> _Step | None:
    """``unit`` as an elementwise step with one data operand keeping ``shape``, or ``None``."""
    if isinstance(unit, OperationUnit):
        equations, rule = unit.equations(), unit.rule
        if sum(unit.data) != 1 or not isinstance(rule, _ROW_SAFE_RULES):
            return None
        data_input = unit.equation.invars[unit.data.index(True)]
    elif isinstance(unit, Bind) and not unit.cut:
        equations, rule = unit.equations(), None
        mask = analysis.data_mask(unit.equation)
        if sum(mask) != 1:
            return None
        data_input = unit.equation.invars[mask.index(True)]
    else:
        return None
    for eqn in equations:
        info = lookup(eqn.primitive)
        if info is None or not info.elementwise or tuple(eqn.out_avals[0].shape) != shape:
            return None
    return _Step(tuple(equations), data_input, equations[-1].outvars[0], rule)


def fuse_attention(
    units: Sequence[Unit],
    analysis: Analysis,
    outputs: frozenset[int],
    keep: frozenset[int] = frozenset(),
    block: int | None = None,
) -> tuple[Unit, ...]:
    """``units`` with every attention core replaced by an :class:`AttentionUnit` (see the module
    docstring).  ``outputs`` are the program's outputs and ``keep`` values that must stay visible
    (taps): neither may be inside a core.  ``block``: query rows per block (``None``: as many as
    keep one block of the scores within :data:`DEFAULT_BLOCK_ELEMENTS`)."""
    defining: dict[int, Unit] = {}
    at_equation: dict[int, Unit] = {}
    for unit in units:
        for v in unit.outputs():
            defining[v] = unit
        for eqn in unit.equations():
            at_equation[eqn.index] = unit

    def sole_user(v: int) -> Unit | None:
        """The one unit reading ``v`` (``None``: several, none, or ``v`` must stay visible)."""
        users = {id(at_equation[e.index]): at_equation[e.index] for e in analysis.consumers.get(v, [])}
        if v in outputs or v in keep or len(users) != 1:
            return None
        return next(iter(users.values()))

    fused_at: dict[int, AttentionUnit] = {}  # id of the second product's unit -> fused unit
    removed: set[int] = set()
    for softmax in units:
        if not isinstance(softmax, IslandUnit) or softmax.kind != "softmax" or softmax.external():
            continue
        if not isinstance(softmax.rule, _ROW_SAFE_RULES):
            continue
        fused = _match(softmax, defining, sole_user, analysis, block)
        if fused is None or any(id(u) in removed for u in fused.replaced):
            continue
        removed.update(id(u) for u in fused.replaced)
        fused_at[id(fused.values)] = fused
    if not fused_at:
        return tuple(units)
    return tuple(
        fused_at.get(id(unit), unit) for unit in units if id(unit) in fused_at or id(unit) not in removed
    )


def _match(softmax: IslandUnit, defining, sole_user, analysis: Analysis, block: int | None):
    """The attention core around ``softmax`` as an :class:`AttentionUnit`, or ``None``."""
    reductions = [e for e in softmax.members if e.name == "reduce_sum"]
    if len(reductions) != 1 or len(reductions[0].params["axes"]) != 1:
        return None
    key_axis = int(reductions[0].params["axes"][0])
    shape = tuple(analysis.avals[softmax.input].shape)

    chain: list[_Step] = []
    step_units: list[Unit] = []
    current, reader = softmax.input, softmax
    while True:  # back from the softmax to the scores product
        if sole_user(current) is not reader:
            return None
        unit = defining.get(current)
        if isinstance(unit, OperationUnit) and unit.equation.name == "dot_general" and not unit.tail:
            scores = unit
            break
        step = None if unit is None else _step_of(unit, analysis, shape)
        if step is None or step.output != current:
            return None
        chain.insert(0, step)
        step_units.append(unit)
        current, reader = step.input, unit
    if not isinstance(scores.rule, _ROW_SAFE_RULES) or tuple(scores.equation.out_avals[0].shape) != shape:
        return None

    tail: list[_Step] = []
    current = softmax.output
    while True:  # forward from the softmax to the second product
        unit = sole_user(current)
        if unit is None:
            return None
        if isinstance(unit, OperationUnit) and unit.equation.name == "dot_general" and not unit.tail:
            values = unit
            break
        step = _step_of(unit, analysis, shape)
        if step is None or step.input != current:
            return None
        tail.append(step)
        step_units.append(unit)
        current = step.output
    if not isinstance(values.rule, _ROW_SAFE_RULES):
        return None
    positions = [i for i, a in enumerate(values.equation.invars) if a == current]
    if len(positions) != 1 or not values.data[positions[0]]:
        return None
    weights_position = positions[0]
    (lc, rc), _ = values.equation.params["dimension_numbers"]
    if tuple((lc, rc)[weights_position]) != (key_axis,):
        return None  # the second product must contract the weights over the softmax axis

    located = _operand_axis_of(scores.equation, key_axis)
    if located is None:
        return None
    query_position = 1 - located[0]
    if not scores.data[query_position]:
        return None
    sides = {a: _operand_axis_of(scores.equation, a) for a in range(len(shape)) if a != key_axis}
    candidates = [a for a, side in sides.items() if side is not None and side[0] == query_position]
    row_axis = max(candidates, key=lambda a: (shape[a], a)) if candidates else None
    query_axis = output_axis = None
    if row_axis is not None:
        # a candidate row axis is one of the query operand (its side is not None)
        query_axis = cast(tuple[int, int], _operand_axis_of(scores.equation, row_axis))[1]
        output_axis = _output_axis_of(values.equation, weights_position, row_axis)
        if output_axis is None:
            row_axis = query_axis = None
    if row_axis is None:
        rows_per_block = 1
    elif block is not None:
        rows_per_block = max(1, int(block))
    else:
        per_row = math.prod(shape) // shape[row_axis]
        rows_per_block = max(1, DEFAULT_BLOCK_ELEMENTS // max(per_row, 1))
    return AttentionUnit(
        scores, tuple(chain), softmax, tuple(tail), values, key_axis, row_axis, query_position,
        query_axis, weights_position, output_axis, rows_per_block,
        replaced=(scores, *step_units, softmax, values),
    )  # fmt: skip
