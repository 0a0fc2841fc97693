"""The interpreter: plan a flattened program as units, then evaluate it with rules as VJPs.

:func:`plan` decides, for the values that can receive relevance (*relevance liveness*: computed
backwards from the explained outputs; a value behind ``stop_gradient`` or a cut receives none and
needs no rule), which unit evaluates each equation (:mod:`jaxdtd.units`): affine layers get the rule
their composite assigns, elementwise islands the identity rule, other operations on data the rule of
their primitive in the registry (:mod:`jaxdtd.primitives`) or of the composite's ``operations``.
Every operation without a rule is collected, and one :class:`~jaxdtd.UnsupportedOperationError`
lists them all.  :func:`evaluate` runs the units in program order; forward values are those of the
original function, since each unit binds the very same primitives with the same parameters.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from . import rules as R
from .attention import AttentionUnit, fuse_attention
from .composites import Composite
from .errors import Problem, UnsupportedOperationError
from .graph import AffineLayer, Analysis, ChainOp, analyse, chain_op, consumers_of, is_float
from .primitives import Context, PrimitiveInfo, Unsupported, canonical_name, lookup
from .recognize import find_gates, find_softmax, find_statistics
from .trace import Constant, Equation, Program, flatten
from .units import (
    Bind,
    IslandUnit,
    LayerUnit,
    OperationUnit,
    Unit,
    constant_for_relevance,
    find_islands,
    masked_relevance,
)
from .vanishing import layers_with_vanishing_negative_relevance

__all__ = [
    "Plan",
    "ScanUnit",
    "cuts_for",
    "evaluate",
    "initial_relevance",
    "plan",
    "relevance_liveness",
    "select_values",
]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything needed to evaluate a traced function with relevance rules.

    ``units`` cover every equation once, in program order; ``layer_rules`` lists each affine layer
    with its rule and why it was chosen; ``taps`` and ``seeds`` are ``(name, variable)`` pairs where
    relevance is read out (:func:`jaxdtd.explain`'s ``taps`` and ``seeds``)."""

    program: Program
    analysis: Analysis
    units: tuple[Unit, ...]
    layer_rules: tuple[tuple[AffineLayer, R.Rule | None, str], ...]
    live: frozenset[int] = frozenset()
    operations: tuple[tuple[Equation, R.Rule, str], ...] = ()  # each operation on data: rule, why
    out_tree: Any = None
    taps: tuple[tuple[str, int], ...] = ()
    seeds: tuple[tuple[str, int], ...] = ()

    def unfused_units(self) -> tuple[Unit, ...]:
        """:attr:`units` with each fused attention core (:class:`jaxdtd.attention.AttentionUnit`)
        as the units it stands for: the rule of every product, step and softmax."""
        return tuple(
            part
            for unit in self.units
            for part in (unit.replaced if isinstance(unit, AttentionUnit) else (unit,))
        )


def relevance_liveness(program: Program, analysis: Analysis) -> frozenset[int]:
    """The data values that can receive relevance: program outputs that are data, and, backwards,
    the data operands of every equation with such a value among its results (``stop_gradient``
    and non-data results pass none)."""
    live = {a for a in program.outvars if analysis.is_data(a)}
    for eqn in reversed(program.equations):
        if any(v in live for v in eqn.outvars):
            live.update(a for a in eqn.invars if analysis.is_data(a))
    return frozenset(live)


def select_values(
    program: Program,
    layers: Sequence[AffineLayer],
    patterns: Sequence[str],
    what: str,
    analysis: Analysis | None = None,
    strict: bool = True,
) -> tuple[tuple[str, int], ...]:
    """The ``(name, variable)`` pairs chosen by ``patterns`` (for taps, seeds and cuts).

    A pattern ``"glob"`` chooses the output of every affine layer whose module path or weight path
    matches (``"*/Conv_3"``, ``"params/Dense_0/kernel"``); if no layer matches, the output of each
    module whose path matches: the last floating-point result of its equations (``"*/Embed_0"``,
    the embedding lookup).  ``"glob:primitive"`` chooses the results of the equations of that
    primitive under matching module paths; ``"glob:softmax"`` the output of each softmax
    (:func:`jaxdtd.recognize.find_softmax`), ``"glob:gate"`` the gate of each gated product
    ``act(g) * u`` under them (:func:`jaxdtd.recognize.find_gates`); these two may choose nothing.
    Any other pattern that chooses nothing raises ``ValueError`` naming the module paths that exist
    (unless not ``strict``: a scan's body, and a program holding a scan, whose body it may choose from)."""
    chosen: dict[int, str] = {}
    for pattern in patterns:
        glob, _, primitive = str(pattern).partition(":")
        found = []
        if primitive == "softmax":  # a unit, not a primitive: the softmax's output
            found = [
                (f"{m.members[-1].name_stack}:softmax#{m.members[-1].index}", m.output)
                for m in find_softmax(program, consumers_of(program), _producers(program))
                if fnmatch.fnmatchcase(m.members[-1].name_stack, glob)
            ]
        elif primitive == "gate" and analysis is not None:  # the gate of act(g) * u
            found = [
                (f"{eqn.name_stack}:gate#{eqn.index}", gate)
                for eqn, gate in find_gates(program, analysis, relevance_liveness(program, analysis))
                if fnmatch.fnmatchcase(eqn.name_stack, glob)
            ]
        elif primitive:
            found = [
                (f"{eqn.name_stack}:{primitive}#{eqn.index}", v)
                for eqn in program.equations
                if eqn.name == primitive and fnmatch.fnmatchcase(eqn.name_stack, glob)
                for v, aval in zip(eqn.outvars, eqn.out_avals, strict=True)
                if is_float(aval)
            ]
        else:
            found = [
                (layer.module_path or layer.param_path, layer.output)
                for layer in layers
                if fnmatch.fnmatchcase(layer.module_path, glob)
                or (layer.param_path and fnmatch.fnmatchcase(layer.param_path, glob))
            ]
            if not found:
                last: dict[str, int] = {}
                for eqn in program.equations:
                    if eqn.name_stack and fnmatch.fnmatchcase(eqn.name_stack, glob):
                        for v, aval in zip(eqn.outvars, eqn.out_avals, strict=True):
                            if is_float(aval):
                                last[eqn.name_stack] = v
                found = list(last.items())
        if not found and strict and primitive not in ("softmax", "gate"):  # a model may have none
            paths = sorted({eqn.name_stack for eqn in program.equations if eqn.name_stack})
            weights = sorted({layer.param_path for layer in layers if layer.param_path})
            raise ValueError(
                f"{what} {pattern!r} matches no layer or module; module paths: {paths}, "
                f"layer weights: {weights}"
            )
        for name, v in found:
            chosen.setdefault(v, name)
    return tuple((name, v) for v, name in chosen.items())


def _producers(program: Program) -> dict[int, Equation]:
    return {v: eqn for eqn in program.equations for v in eqn.outvars}


def _batch_statistics(eqn: Equation, analysis: Analysis, depth: int = 8) -> bool:
    """Does a data operand of ``eqn`` come, within a few steps, from a reduction over axis 0 (the
    statistics of a batch, as in a BatchNorm in training mode)?"""
    frontier = [a for a in eqn.invars if analysis.is_data(a)]
    for _ in range(depth):
        nxt: list[int] = []
        for v in frontier:
            producer = analysis.producer.get(v)
            if producer is None:
                continue
            if producer.name == "reduce_sum" and 0 in producer.params.get("axes", ()):
                return True
            nxt.extend(a for a in producer.invars if analysis.is_data(a))
        frontier = nxt
    return False


def _problem(eqn: Equation, analysis: Analysis, reason: str, fix: str = "") -> Problem:
    return Problem(
        eqn.name, eqn.name_stack, eqn.source, reason, fix, batch_statistics=_batch_statistics(eqn, analysis)
    )


def _operation_rule(
    eqn: Equation, analysis: Analysis, composite: Composite
) -> tuple[R.OperationRule, str] | Problem:
    ctx = Context(analysis.data_mask(eqn), analysis.dependent_mask(eqn))
    found = composite.operation_rule_for(eqn.name, eqn.name_stack)
    rule: R.Rule | Unsupported | None
    rule, why = found if found is not None else (None, "registry")
    if rule is None:
        info = lookup(eqn.primitive)
        if info is None:
            return _problem(
                eqn,
                analysis,
                "unknown operation",
                "if it acts elementwise on one data operand, rules.Pass() is the identity rule; if it "
                "is linear in the data, rules.Norm()",
            )
        rule = info.relevance(eqn, ctx)
        if isinstance(rule, Unsupported):
            return _problem(eqn, analysis, rule.reason, rule.fix)
    # an operation rule: Composite admits no other rule on operations, nor the registry
    rule = cast(R.OperationRule, rule)
    if isinstance(rule, R.Uniform) and ctx.n_data > 1 and eqn.name not in _MULTILINEAR:
        return _problem(
            eqn,
            analysis,
            f"Uniform() shares the relevance of a product; '{eqn.name}' of {ctx.n_data} data values "
            "is not one",
            "use Norm() for sums of data values",
        )
    if rule.is_identity and ctx.n_data != 1:
        return _problem(eqn, analysis, "Pass() needs exactly one data operand")
    if rule.is_identity:
        (x,) = (a for a in eqn.invars if analysis.is_data(a))
        shape, out = tuple(analysis.avals[x].shape), tuple(eqn.out_avals[0].shape)
        try:
            elementwise = np.broadcast_shapes(shape, out) == out
        except ValueError:
            elementwise = False
        if not elementwise:
            return _problem(
                eqn, analysis, f"Pass() needs an elementwise operation (operand {shape}, result {out})"
            )
    return rule, why


_MULTILINEAR = ("mul", "dot_general")
#: AttnLRP's softmax rule (Prop. 3.1): LRP-0 on the whole softmax, R_x = x (R_A - A sum R_A)
_SOFTMAX_RULE = R.Norm(0.0)


def _norm_tail(eqn: Equation, analysis: Analysis) -> tuple[ChainOp, ...]:
    """Scalings by constants right after a Norm op (``mean = sum / n``), fused into it so that the
    Norm divides by the stabilized mean as zennit's Norm on average pooling does."""
    tail: list[ChainOp] = []
    current = eqn.outvars[0]
    while analysis.uses.get(current, 0) == 1 and len(analysis.consumers.get(current, [])) == 1:
        op = chain_op(analysis.consumers[current][0], current, analysis.data)
        if op is None or op.op not in ("mul", "div"):
            break
        tail.append(op)
        current = op.equation.outvars[0]
    return tuple(tail)


def plan(
    program: Program,
    analysis: Analysis,
    composite: Composite,
    *,
    cuts: frozenset[int] = frozenset(),
    keep: frozenset[int] = frozenset(),
) -> Plan:
    """Decide a unit and a rule for every equation; raise one error listing every operation on
    data that can receive relevance and has no rule.  ``cuts`` are equation indices evaluated as
    constants (see :func:`jaxdtd.graph.analyse`); ``keep`` are values that must stay visible (taps):
    no fused unit (:func:`jaxdtd.attention.fuse_attention`) hides them."""
    live = relevance_liveness(program, analysis)
    units: dict[int, Unit] = {}  # index of a unit's last equation -> unit
    covered: set[int] = set()
    problems: list[Problem] = []

    layer_rules: list[tuple[AffineLayer, R.AffineRule | None, str]] = []
    for layer in analysis.layers:
        if layer.last_equation.index in cuts:  # its output is a constant: its equations are bound as is
            continue
        if layer.output in live:
            rule, why = composite.rule_for(layer)
            if isinstance(rule, R.OperationRule):
                rule = rule.for_affine_layer()
            if isinstance(rule, R.AffineRule):
                rule.validate_input(layer.input_shape, f"layer '{layer.module_path}' ({layer.param_path})")
        else:
            rule, why = None, "no relevance reaches it"
        # an affine rule or None now: the composite gives a layer an affine or an operation rule
        layer_rules.append((layer, cast(R.AffineRule | None, rule), why))
        covered.update(e.index for e in (layer.linear, *(op.equation for op in layer.chain)))

    excluded = covered | cuts
    for match in find_softmax(program, analysis.consumers, analysis.producer):
        indices = {eqn.index for eqn in match.members}
        if (
            match.output not in live
            or not analysis.is_data(match.input)
            or indices & excluded
            or not all(analysis.is_data(v) for eqn in match.members[-1:] for v in eqn.invars)
        ):
            continue
        found: tuple[R.Rule, str] | Problem | None
        found = composite.operation_rule_for("softmax", match.members[-1].name_stack, unit="softmax")
        rule, why = found if found is not None else (_SOFTMAX_RULE, "softmax (AttnLRP)")
        # the composite gives a softmax only an operation rule
        unit: Unit = IslandUnit(
            match.members, match.input, match.output, cast(R.OperationRule, rule), why, kind="softmax"
        )
        units[match.members[-1].index] = unit
        covered.update(indices)
        excluded |= indices
    for eqn in program.equations:  # the scalings fused after a Norm reduction belong to it, not to islands
        if (
            eqn.index in excluded
            or not any(v in live for v in eqn.outvars)
            or not any(analysis.data_mask(eqn))
        ):
            continue
        info = lookup(eqn.primitive)
        if info is None or info.elementwise or eqn.name == "stop_gradient":
            continue
        found = _operation_rule(eqn, analysis, composite)
        if not isinstance(found, Problem) and isinstance(found[0], R.Norm):
            excluded |= {op.equation.index for op in _norm_tail(eqn, analysis)}
    for island in find_islands(program, analysis, live, excluded):
        found = composite.operation_rule_for("island", island.members[-1].name_stack, unit="island")
        if found is not None:
            island = dataclasses.replace(island, rule=cast(R.OperationRule, found[0]), reason=found[1])
        units[island.members[-1].index] = island
        covered.update(eqn.index for eqn in island.members)

    operation_rules: dict[int, R.OperationRule] = {}
    reasons: dict[int, str] = {}
    batch_statistics = {
        eqn.index for eqn in find_statistics(program, analysis.producer, analysis.dependent, batch=True)
    }
    for eqn in program.equations:
        if eqn.index in covered:
            continue
        if eqn.index in cuts:
            units[eqn.index] = Bind(eqn, cut=True)
            continue
        data = analysis.data_mask(eqn)
        if not any(data) or eqn.name == "stop_gradient" or not any(v in live for v in eqn.outvars):
            if any(data) and eqn.name == "convert_element_type" and not is_float(eqn.out_avals[0]):
                problems.extend(_cast_problem(eqn, analysis, program))
            continue
        if eqn.name == "scan":
            try:
                unit = _scan_unit(eqn, analysis, composite)
            except UnsupportedOperationError as error:
                problems.extend(error.problems)
                continue
            units[eqn.index] = unit
            covered.add(eqn.index)
            continue
        if eqn.index in batch_statistics:
            problems.append(
                _problem(
                    eqn,
                    analysis,
                    "a normalization statistic over the batch axis (each example's relevance would "
                    "depend on the others)",
                )
            )
            continue
        found = _operation_rule(eqn, analysis, composite)
        if isinstance(found, Problem):
            problems.append(found)
            continue
        rule, reasons[eqn.index] = found
        operation_rules[eqn.index] = rule
        if rule.is_gradient:
            continue
        tail = _norm_tail(eqn, analysis) if isinstance(rule, R.Norm) else ()
        unit = OperationUnit(eqn, rule, data, tail, reasons[eqn.index])
        units[unit.equations()[-1].index] = unit
        covered.update(e.index for e in unit.equations())
    if problems:
        raise UnsupportedOperationError(problems)

    vanishing = layers_with_vanishing_negative_relevance(
        program,
        analysis,
        {layer.index: rule for layer, rule, _ in layer_rules},
        operation_rules,
    )
    for layer, rule, why in layer_rules:
        unit = LayerUnit(layer, rule, why, positive_output_relevance=layer.index in vanishing)
        units[layer.last_equation.index] = unit
    ordered: list[Unit] | tuple[Unit, ...]
    ordered = []
    for eqn in program.equations:
        if eqn.index in units:
            ordered.append(units[eqn.index])
        elif eqn.index not in covered:
            ordered.append(Bind(eqn))
    if composite.attention_block != 0:
        outputs = frozenset(a for a in program.outvars if not isinstance(a, Constant))
        ordered = fuse_attention(ordered, analysis, outputs, keep, composite.attention_block)
    operations = tuple((program.equations[i], rule, reasons[i]) for i, rule in operation_rules.items())
    return Plan(program, analysis, tuple(ordered), tuple(layer_rules), live, operations)


def cuts_for(
    program: Program, analysis: Analysis, composite: Composite, strict: bool = True
) -> frozenset[int]:
    """The equations whose results are constants for the rules: normalization statistics (every
    composite) and the composite's ``cuts`` patterns."""
    cuts = frozenset(eqn.index for eqn in find_statistics(program, analysis.producer, analysis.dependent))
    if composite.cuts:
        scans = any(eqn.name == "scan" for eqn in program.equations)
        if strict and scans:
            _check_patterns_reach(program, analysis.layers, composite.cuts, "cut")
        chosen = select_values(
            program, analysis.layers, composite.cuts, "cut", analysis, strict and not scans
        )
        cuts |= frozenset(analysis.producer[v].index for _, v in chosen if v in analysis.producer)
    return cuts


def _equations_with_bodies(program: Program) -> list[Equation]:
    """The equations of ``program`` and, recursively, of the bodies of its scans (flattened with
    their module-path prefix, as :func:`_scan_unit` plans them)."""
    found = list(program.equations)
    for eqn in program.equations:
        if eqn.name == "scan":
            body = flatten(
                eqn.params["jaxpr"], prefix=eqn.name_stack, call_sites=(eqn.source_info, *eqn.call_sites)
            )
            found += _equations_with_bodies(body)
    return found


def _check_patterns_reach(
    program: Program, layers: Sequence[AffineLayer], patterns: Sequence[str], what: str
) -> None:
    """In a program holding a scan, a pattern may choose values of the scan's body only: each
    pattern must still match a module path or a layer's weight path (``glob``), or an equation of
    its primitive under a module path (``glob:primitive``), in the program or in a scan body; else
    ``ValueError`` as :func:`select_values` raises without scans (a typo is never silently ignored)."""
    equations = _equations_with_bodies(program)
    for pattern in patterns:
        glob, _, primitive = str(pattern).partition(":")
        if primitive in ("softmax", "gate"):  # a model may have none
            continue
        weights = not primitive and any(
            layer.param_path and fnmatch.fnmatchcase(layer.param_path, glob) for layer in layers
        )
        if not weights and not any(
            fnmatch.fnmatchcase(eqn.name_stack, glob) and (not primitive or eqn.name == primitive)
            for eqn in equations
            if eqn.name_stack
        ):
            paths = sorted({eqn.name_stack for eqn in equations if eqn.name_stack})
            raise ValueError(
                f"{what} {pattern!r} matches no module or equation, in the program or its scan bodies; "
                f"module paths: {paths}"
            )


@dataclasses.dataclass(frozen=True)
class ScanUnit(Unit):
    """A ``scan`` (``jax.lax.scan``, ``nn.scan``, ``fori_loop`` with static bounds) whose body is
    planned as a program of its own and evaluated inside a ``jax.lax.scan`` with the same length,
    direction and unrolling: the loop stays a loop (memory like the scanned gradient's), and each
    iteration applies the rules of the body's units.

    ``remat``: the ``(prevent_cse, policy)`` of a ``checkpoint`` (``jax.checkpoint``, ``nn.remat``)
    among the body's own equations, as in ``nn.scan(nn.remat(Block))``, else ``None``.  The planned
    body inlines it, so the relevance step is checkpointed as a whole with the same policy: the
    backward pass saves only what the policy saves per iteration (for the default policy, the carry)
    and recomputes the rest, as the user's gradient does."""

    equation: Equation
    body: Plan
    remat: tuple[bool, Any] | None = None

    def equations(self) -> tuple[Equation, ...]:
        return (self.equation,)

    def evaluate(self, read) -> list[Any]:
        params = self.equation.params
        n_consts, n_carry = scan_counts(params)
        values = [read(a) for a in self.equation.invars]
        consts, init, xs = (
            values[:n_consts],
            values[n_consts : n_consts + n_carry],
            values[n_consts + n_carry :],
        )

        def step(carry, x):
            outs = evaluate(self.body, [*consts, *carry, *x], explained_outputs=False, hold_constants=False)
            return outs[:n_carry], outs[n_carry:]

        if self.remat is not None:
            prevent_cse, policy = self.remat
            step = jax.checkpoint(step, prevent_cse=prevent_cse, policy=policy)
        carry, ys = jax.lax.scan(
            step, init, xs, length=params["length"], reverse=params["reverse"], unroll=params["unroll"]
        )
        return [*carry, *ys]


def scan_counts(params: Mapping[str, Any]) -> tuple[int, int]:
    """``(constants, carries)`` of a ``scan`` equation: its operands are the constants, then the
    carries, then the scanned inputs.  jax <= 0.10 states the counts (``num_consts``,
    ``num_carry``); jax 0.12 states the flat structure of the three groups instead (``ft_in``, one
    entry per operand), and drops scanned outputs that only forward an input from the equation."""
    if "num_consts" in params:
        return int(params["num_consts"]), int(params["num_carry"])
    groups = params["ft_in"]  # a flat tree of the three groups; len() of a group counts its leaves
    consts, carry, _ = getattr(groups, "elts", groups)
    return len(consts), len(carry)


def _scan_unit(eqn: Equation, analysis: Analysis, composite: Composite) -> ScanUnit:
    """Plan a scan's body: its data inputs are the data operands and, to a fixed point, the carries
    that the body makes data; layers inside are never ``first`` (they run at every iteration)."""
    params = eqn.params
    n_consts, n_carry = scan_counts(params)
    body = flatten(params["jaxpr"], prefix=eqn.name_stack, call_sites=(eqn.source_info, *eqn.call_sites))
    data = [analysis.is_data(a) for a in eqn.invars]
    while True:
        explained = {v for v, d in zip(body.invars, data, strict=True) if d}
        body_analysis = analyse(body, explained, {})
        carry_out = [body_analysis.is_data(a) for a in body.outvars[:n_carry]]
        grown = [d or c for d, c in zip(data[n_consts : n_consts + n_carry], carry_out, strict=True)]
        if grown == data[n_consts : n_consts + n_carry]:
            break
        data[n_consts : n_consts + n_carry] = grown
    cuts = cuts_for(body, body_analysis, composite, strict=False)
    if cuts:
        body_analysis = analyse(body, explained, {}, cuts=cuts)
    layers = tuple(dataclasses.replace(layer, first=False) for layer in body_analysis.layers)
    body_analysis = dataclasses.replace(
        body_analysis, layers=layers, layer_at={layer.last_equation.index: layer for layer in layers}
    )
    return ScanUnit(eqn, plan(body, body_analysis, composite, cuts=cuts), _body_remat(params["jaxpr"]))


def _body_remat(closed: Any) -> tuple[bool, Any] | None:
    """``(prevent_cse, policy)`` of the first ``checkpoint`` equation at the top level of a scan
    body, or ``None`` when the body is not rematerialised."""
    for eqn in closed.jaxpr.eqns:
        if canonical_name(eqn.primitive.name) == "remat2":
            return bool(eqn.params.get("prevent_cse", True)), eqn.params.get("policy")
    return None


def _cast_problem(eqn: Equation, analysis: Analysis, program: Program) -> list[Problem]:
    """A cast of data out of floating point whose result still reaches an output: the relevance
    path is cut there (``(x * 255).astype(jnp.uint8)``)."""
    reaches = set()
    outputs = {a for a in program.outvars if not isinstance(a, Constant)}
    frontier = list(eqn.outvars)
    while frontier:
        v = frontier.pop()
        if v in reaches:
            continue
        reaches.add(v)
        if v in outputs:
            # the registry's classifier of a cast out of floating point: Unsupported
            info = cast(PrimitiveInfo, lookup(eqn.primitive))
            rule = cast(
                Unsupported,
                info.relevance(eqn, Context(analysis.data_mask(eqn), analysis.dependent_mask(eqn))),
            )
            return [_problem(eqn, analysis, rule.reason, rule.fix)]
        for consumer in analysis.consumers.get(v, []):
            frontier.extend(consumer.outvars)
    return []


def evaluate(
    the_plan: Plan,
    leaves: Sequence[Any],
    probes: Sequence[Any] | None = None,
    value_probes: dict[int, Any] | None = None,
    *,
    explained_outputs: bool = True,
    hold_constants: bool = True,
    value_masks: dict[int, Any] | None = None,
    record: Sequence[int] | None = None,
) -> list[Any] | tuple[list[Any], list[Any]]:
    """Evaluate the plan on the flat argument leaves; returns the flat outputs.

    ``probes``, one ``(input_probe, output_probe)`` pair of zeros per affine layer, are added to
    each layer's input (as that layer reads it) and output: the cotangents of the probes are the
    relevance leaving and entering the layer (see :func:`jaxdtd.inspect.ledger`).
    ``value_probes`` maps variables to zeros added where the variable is defined: their cotangents
    are the relevance arriving at those values (taps and seeds).  ``value_masks`` maps variables
    to masks that multiply the relevance arriving there (:func:`jaxdtd.units.masked_relevance`;
    concept conditions), after a probe at the same variable, so that the probe reads the masked
    relevance.  With ``record`` (a sequence) the values of those variables are returned too, as
    ``(outputs, values)``.  With ``explained_outputs=False`` (a scan's body) the outputs pass
    relevance through instead of starting it (``y * ct``).

    With ``hold_constants`` (the default; a scan's body has it off) the floating-point leaves that
    are not explained, the weights, pass through :func:`constant_for_relevance`: their cotangent in
    the relevance pass is zero, as a constant of the rules, while the relevance stays a
    differentiable function of them."""
    program, analysis = the_plan.program, the_plan.analysis
    if hold_constants:
        leaves = _hold_constants(program, analysis, leaves, probes, value_probes)
    env: dict[int, Any] = dict(zip(program.invars, leaves, strict=True))
    value_probes = value_probes or {}
    value_masks = value_masks or {}

    def define(v: Any, value: Any) -> Any:
        if v in value_probes:
            value = value + value_probes[v]
        if v in value_masks:
            value = masked_relevance(value, value_masks[v])
        return value

    for v in program.invars:
        env[v] = define(v, env[v])

    def read(atom: Any) -> Any:
        return atom.value if isinstance(atom, Constant) else env[atom]

    for unit in the_plan.units:
        if probes is not None and isinstance(unit, LayerUnit):
            layer = unit.layer
            (z,) = unit.evaluate(read, x=read(layer.input) + probes[layer.index][0])
            outs = [z + probes[layer.index][1]]
        else:
            outs = unit.evaluate(read)
        for v, value in zip(unit.outputs(), outs, strict=True):
            env[v] = define(v, value)

    results = []
    for atom in program.outvars:
        value = read(atom)
        if explained_outputs and analysis.is_data(atom):
            value = initial_relevance(value)
        results.append(value)
    if record is not None:
        return results, [read(v) for v in record]
    return results


def _hold_constants(
    program: Program,
    analysis: Analysis,
    leaves: Sequence[Any],
    probes: Sequence[Any] | None,
    value_probes: dict[int, Any] | None,
) -> list[Any]:
    """``leaves`` with every floating-point leaf that is not explained passed through
    :func:`constant_for_relevance`, anchored to one element of the values the relevance pass
    differentiates (an explained leaf, else a seed or tap probe, else a layer probe)."""
    anchors = [leaf for v, leaf in zip(program.invars, leaves, strict=True) if analysis.is_data(v)]
    anchors += list((value_probes or {}).values()) + [p for pair in (probes or ()) for p in pair]
    anchors = [a for a in anchors if jnp.size(a) > 0]
    if not anchors:
        return list(leaves)
    anchor = jnp.ravel(anchors[0])[0]
    return [
        constant_for_relevance(leaf, anchor)
        if not analysis.is_data(v) and jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
        else leaf
        for v, leaf in zip(program.invars, leaves, strict=True)
    ]


@jax.custom_vjp
def initial_relevance(y: Any) -> Any:
    """Identity forward; its VJP turns the cotangent ``ct`` into the initial relevance ``y * ct``."""
    return y


def _initial_fwd(y):
    return y, y


def _initial_bwd(y, ct):
    return (y * ct,)


initial_relevance.defvjp(_initial_fwd, _initial_bwd)
