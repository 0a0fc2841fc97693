"""Recognizers of multi-equation operations in a flattened program: softmax and normalization statistics.

Both are found from the structure of the program alone, whatever library wrote the model (flax's
``nn.softmax`` / ``jax.nn.softmax`` inlined or as the ``_softmax`` custom_jvp, a hand-written
``exp(x - max) / sum``; flax's ``LayerNorm`` and ``RMSNorm``, ``jnp.std``, a hand-written
``rsqrt(mean(x**2) + eps)``):

* :func:`find_softmax`: ``A = exp(z) / sum(exp(z))`` over an axis, with ``z = x - max(x)`` (the max
  detached or not) or ``z = x``.  The plan evaluates it as one unit from ``x`` to ``A`` under one rule
  (AttnLRP's softmax rule, ``R_x = x (R_A - A sum R_A)``).
* :func:`find_gates`: the gate of a gated unit, ``act(g) * u`` with ``act`` an elementwise island
  (SwiGLU's ``silu(gate x) * up x``, GEGLU): the island's output.  CP-LRP holds it constant.
* :func:`find_statistics`: ``rsqrt`` / ``sqrt`` of a value computed from a reduction over non-batch
  axes of the explained data (the standard deviation of LayerNorm, RMSNorm, ``x / jnp.std(x)``).  Every
  composite treats such a statistic as a constant (AttnLRP: "sigma constant, centering kept"); a
  reduction over axis 0 (batch statistics, a BatchNorm in training mode) is not one, and stays an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .trace import Constant, Equation, Program

if TYPE_CHECKING:
    from .graph import Analysis

__all__ = ["SoftmaxMatch", "find_gates", "find_softmax", "find_statistics"]

_BROADCASTS = ("broadcast_in_dim", "reshape", "expand_dims")
_STATISTIC_ROOTS = ("rsqrt", "sqrt")
_STATISTIC_STEPS = (
    "add",
    "sub",
    "mul",
    "div",
    "max",
    "min",
    "clamp",
    "abs",
    "square",
    "integer_pow",
    "select_n",
    "convert_element_type",
)


@dataclasses.dataclass(frozen=True)
class SoftmaxMatch:
    """The equations of one softmax (program order), its input ``x`` and its output ``A``."""

    members: tuple[Equation, ...]
    input: int
    output: int


def _var(atom) -> int | None:
    return None if isinstance(atom, Constant) else atom


def _single_use(v: int, consumers: dict[int, list[Equation]], outputs: set[int], n: int = 1) -> bool:
    return v not in outputs and len(consumers.get(v, [])) == n


def _max_of(e: int, x: int, producer, consumers, outputs) -> list[Equation] | None:
    """The equations computing ``e = broadcast(max(x))`` (with an optional ``stop_gradient``,
    ``max(-inf, .)`` and casts), or ``None``."""
    chain: list[Equation] = []
    v = e
    while True:
        eqn = producer.get(v)
        if eqn is None or not _single_use(v, consumers, outputs):
            return None
        chain.append(eqn)
        if eqn.name == "reduce_max":
            return chain[::-1] if eqn.invars[0] == x else None
        if eqn.name in (*_BROADCASTS, "stop_gradient", "convert_element_type"):
            v = eqn.invars[0]
        elif eqn.name == "max" and len(eqn.invars) == 2:
            operands = [a for a in eqn.invars if _var(a) is not None and producer.get(a) is not None]
            candidates = [a for a in operands if producer[a].name in ("reduce_max", *_BROADCASTS, "max")]
            if len(candidates) != 1:
                return None
            v = candidates[0]
        else:
            return None


def find_softmax(program: Program, consumers: dict[int, list[Equation]], producer: dict[int, Equation]):
    """Every softmax in ``program`` as a :class:`SoftmaxMatch` (see the module docstring)."""
    outputs = {a for a in program.outvars if not isinstance(a, Constant)}
    found: list[SoftmaxMatch] = []
    for eqn in program.equations:
        if eqn.name != "div" or len(eqn.invars) != 2:
            continue
        g, i = (_var(a) for a in eqn.invars)
        if g is None or i is None:
            continue
        exp, denominator = producer.get(g), []
        if exp is None or exp.name != "exp":
            continue
        v = i
        while (
            (p := producer.get(v)) is not None
            and p.name in _BROADCASTS
            and _single_use(v, consumers, outputs)
        ):
            denominator.append(p)
            v = p.invars[0]
        total = producer.get(v)
        if total is None or total.name != "reduce_sum" or not _single_use(v, consumers, outputs):
            continue
        z = _var(exp.invars[0])
        if z is None:
            continue
        if total.invars[0] == g and _single_use(g, consumers, outputs, 2):  # e / e.sum()
            exps = [exp]
        else:  # exp(z) / exp(z).sum(): the exponential computed twice
            t = _var(total.invars[0])
            twin = None if t is None else producer.get(t)
            if (
                twin is None
                or twin.name != "exp"
                or twin.invars[0] != z
                or not _single_use(g, consumers, outputs)
                or not _single_use(twin.outvars[0], consumers, outputs)
            ):
                continue
            exps = [exp, twin]
        members = [*exps, total, *denominator[::-1], eqn]
        x = z
        shift = producer.get(z)
        if shift is not None and shift.name == "sub" and _single_use(z, consumers, outputs, len(exps)):
            a, e = (_var(b) for b in shift.invars)
            chain = None if a is None or e is None else _max_of(e, a, producer, consumers, outputs)
            if chain is not None and a is not None:  # (a chain implies a is not None)
                members = [*chain, shift, *members]
                x = a
        members.sort(key=lambda m: m.index)
        found.append(SoftmaxMatch(tuple(members), x, eqn.outvars[0]))
    return found


def _reduces_non_batch_axes(eqn: Equation) -> bool:
    axes = tuple(eqn.params.get("axes", ()))
    return bool(axes) and (0 not in axes or len(eqn.in_avals[0].shape) == 1)


def _reductions_behind(eqn: Equation, producer: dict[int, Equation], dependent: set[int], depth: int):
    """The ``reduce_sum`` equations ``eqn``'s operand comes from within ``depth`` elementwise steps."""
    frontier, reductions = [eqn.invars[0]], []
    for _ in range(depth):
        nxt: list[int] = []
        for v in frontier:
            p = producer.get(v)
            if p is None:
                continue
            if p.name == "reduce_sum":
                reductions.append(p)
            elif p.name in (*_STATISTIC_STEPS, *_BROADCASTS):
                nxt.extend(a for a in p.invars if _var(a) in dependent)
        frontier = nxt
    return reductions


def find_statistics(
    program: Program,
    producer: dict[int, Equation],
    dependent: Iterable[int],
    *,
    batch: bool = False,
    depth: int = 8,
) -> tuple[Equation, ...]:
    """The ``rsqrt`` / ``sqrt`` equations that compute a normalization statistic of the explained
    data (see the module docstring): their operand depends on the explained input and comes, within
    ``depth`` elementwise steps, from reductions over non-batch axes only.  With ``batch``, those that
    reduce over the batch axis instead (a BatchNorm in training mode: no rule, an error)."""
    dependent = set(dependent)
    found = []
    for eqn in program.equations:
        if eqn.name not in _STATISTIC_ROOTS or _var(eqn.invars[0]) not in dependent:
            continue
        reductions = _reductions_behind(eqn, producer, dependent, depth)
        if not reductions:
            continue
        over_batch = not all(_reduces_non_batch_axes(r) for r in reductions)
        if over_batch == batch:
            found.append(eqn)
    return tuple(found)


def find_gates(program: Program, analysis: Analysis, live: Iterable[int]) -> tuple[tuple[Equation, int], ...]:
    """``(product, gate)`` for every elementwise product of two data values of which exactly one is
    the output of an elementwise island (an activation of one value: ``silu(g)`` in
    ``silu(g) * u``); ``gate`` is that operand."""
    from .units import find_islands  # units build on the analysis; recognize stays importable alone

    islands = find_islands(program, analysis, frozenset(live))
    inside = {eqn.index for island in islands for eqn in island.members}  # silu's own x * sigmoid(x)
    activations = {island.output for island in islands}
    activations |= {
        eqn.outvars[0]
        for eqn in program.equations
        if eqn.name in ("logistic", "tanh", "erf") and analysis.is_data(eqn.outvars[0])
    }
    found = []
    for eqn in program.equations:
        if (
            eqn.name != "mul"
            or len(eqn.invars) != 2
            or eqn.index in inside
            or not all(analysis.data_mask(eqn))
        ):
            continue
        a, b = eqn.invars
        if a == b or tuple(analysis.avals[a].shape) != tuple(analysis.avals[b].shape):
            continue
        gates = [v for v in (a, b) if v in activations]
        if len(gates) == 1:
            found.append((eqn, gates[0]))
    return tuple(found)
