"""The interpreter: evaluate a flattened program with relevance rules as VJPs.

Forward values are computed by binding the very same primitives with the same parameters, so they
equal the original function's.  Every affine layer is wrapped in a :func:`jax.custom_vjp` whose
backward pass is its rule (:func:`jaxdtd.rules.affine_relevance`); parameter-free operations on data
are looked up in :data:`OPERATIONS`, a table ``primitive name -> classifier`` that says which rule
(:class:`~jaxdtd.rules.Gradient`, :class:`~jaxdtd.rules.Pass`, :class:`~jaxdtd.rules.Norm`) applies,
or raises :class:`~jaxdtd.UnsupportedOperationError`.  Nothing falls back silently to the gradient
of a nonlinearity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap

from . import rules as R
from .composites import Composite
from .errors import UnsupportedOperationError
from .graph import STRUCTURAL, AffineLayer, Analysis, ChainOp, chain_op
from .trace import Constant, Equation, Program, source_line
from .vanishing import layers_with_vanishing_negative_relevance

__all__ = ["OPERATIONS", "Plan", "evaluate", "plan"]

Classifier = Callable[[Equation, Sequence[bool]], R.Rule]

_GRADIENT = R.Gradient()
_PASS = R.Pass()
_NORM = R.Norm()


def _always(rule: R.Rule) -> Classifier:
    return lambda eqn, data: rule


def _unsupported(reason: str) -> Classifier:
    def classify(eqn: Equation, data: Sequence[bool]) -> R.Rule:
        raise UnsupportedOperationError(eqn.name, eqn.name_stack, source_line(eqn.source_info), reason)

    return classify


def _pass_if_one_data_operand(reason: str) -> Classifier:
    """Elementwise op with constants (ReLU = max(x, 0), clipping, x * c): Pass; else ``reason``."""

    def classify(eqn: Equation, data: Sequence[bool]) -> R.Rule:
        if sum(data) == 1:
            return _PASS
        raise UnsupportedOperationError(eqn.name, eqn.name_stack, source_line(eqn.source_info), reason)

    return classify


def _extremum(eqn: Equation, data: Sequence[bool]) -> R.Rule:
    # max(x, 0) is a ReLU (Pass); max of two data values routes relevance like max pooling
    return _PASS if sum(data) == 1 else _GRADIENT


def _clamp(eqn: Equation, data: Sequence[bool]) -> R.Rule:
    return _PASS if list(data) == [False, True, False] else _GRADIENT


def _sum_or_shift(eqn: Equation, data: Sequence[bool]) -> R.Rule:
    # the add of two data values (residual) is Norm; a shift by a constant passes relevance
    return _NORM if sum(data) > 1 else _PASS


def _divide(eqn: Equation, data: Sequence[bool]) -> R.Rule:
    if list(data) == [True, False]:
        return _PASS
    raise UnsupportedOperationError(
        "div", eqn.name_stack, source_line(eqn.source_info), "division by a data-dependent value"
    )


def _linear_of_data(eqn: Equation, data: Sequence[bool]) -> R.Rule:
    if all(data):
        reason = "both operands depend on the explained input (e.g. attention); no LRP rule is defined"
    else:
        reason = "a convolution whose kernel, not its input, is the explained data"
    raise UnsupportedOperationError(eqn.name, eqn.name_stack, source_line(eqn.source_info), reason)


OPERATIONS: dict[str, Classifier] = {
    **{name: _always(_GRADIENT) for name in STRUCTURAL},
    "max": _extremum,
    "min": _extremum,
    "clamp": _clamp,
    "tanh": _always(_PASS),
    "logistic": _always(_PASS),
    "neg": _always(_PASS),
    "add": _sum_or_shift,
    "add_any": _sum_or_shift,
    "sub": _sum_or_shift,
    "mul": _pass_if_one_data_operand("product of two data-dependent values"),
    "div": _divide,
    "reduce_sum": _always(_NORM),
    "reduce_window_sum": _always(_NORM),
    "dot_general": _linear_of_data,
    "conv_general_dilated": _linear_of_data,
    "cond": _unsupported("data-dependent control flow; compute both branches and select instead"),
    "while": _unsupported("data-dependent loop"),
    "scan": _unsupported("loop over data; unroll it"),
    "gather": _unsupported("data-dependent gather"),
    "scatter": _unsupported("scatter of data"),
    "scatter-add": _unsupported("scatter of data"),
    "scatter_add": _unsupported("scatter of data"),
    "sort": _unsupported("sort of data"),
}


# --- plans -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Step:
    """How one equation is evaluated: ``kind`` is "const", "skip", "layer" or "operation"."""

    kind: str
    equation: Equation
    rule: R.Rule | None = None
    layer: AffineLayer | None = None
    tail: tuple[ChainOp, ...] = ()  # constant scalings fused into a Norm (average = sum / n)
    positive_output_relevance: bool = False  # layer output relevance is 0 where it is <= 0


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything needed to evaluate a traced function with relevance rules."""

    program: Program
    analysis: Analysis
    steps: tuple[Step, ...]
    layer_rules: tuple[tuple[AffineLayer, R.Rule | None, str], ...]
    out_tree: Any = None


def plan(program: Program, analysis: Analysis, composite: Composite) -> Plan:
    """Decide a rule for every layer and every operation on data; raise for unsupported ones."""
    layer_rules = []
    for layer in analysis.layers:
        rule, why = composite.rule_for(layer)
        if isinstance(rule, R.Norm):
            rule = R.Epsilon(rule.stabilizer)
        if isinstance(rule, R.AffineRule):
            rule.validate_input(layer.input_shape, f"layer '{layer.module_path}' ({layer.param_path})")
        layer_rules.append((layer, rule, why))
    rule_of = {id(layer): rule for layer, rule, _ in layer_rules}

    operations: dict[int, tuple[R.Rule, tuple[ChainOp, ...]]] = {}
    placed_at: dict[int, int] = {}  # index of the last equation of a fused Norm -> its first
    fused: set[int] = set()
    for eqn in program.equations:
        if eqn.index in analysis.absorbed or eqn.index in analysis.layer_at or eqn.index in fused:
            continue
        data = _data_mask(eqn, analysis)
        if not any(data) or eqn.name == "stop_gradient":
            continue
        rule = _operation_rule(eqn, data, composite)
        tail = _norm_tail(eqn, analysis) if isinstance(rule, R.Norm) else ()
        operations[eqn.index] = (rule, tail)
        fused.update(op.equation.index for op in tail)
        placed_at[tail[-1].equation.index if tail else eqn.index] = eqn.index

    vanishing = layers_with_vanishing_negative_relevance(
        program,
        analysis,
        {layer.index: rule for layer, rule, _ in layer_rules},
        {index: rule for index, (rule, _) in operations.items()},
    )
    steps: list[Step] = []
    for eqn in program.equations:
        if eqn.index in analysis.absorbed:
            steps.append(Step("skip", eqn))
        elif eqn.index in analysis.layer_at:
            layer = analysis.layer_at[eqn.index]
            vanishes = layer.index in vanishing
            steps.append(Step("layer", eqn, rule_of[id(layer)], layer, positive_output_relevance=vanishes))
        elif eqn.index in placed_at:
            first = program.equations[placed_at[eqn.index]]
            rule, tail = operations[first.index]
            steps.append(Step("operation", first, rule, tail=tail))
        elif eqn.index in operations or eqn.index in fused:
            steps.append(Step("skip", eqn))
        else:
            steps.append(Step("const", eqn))
    return Plan(program, analysis, tuple(steps), tuple(layer_rules))


def _data_mask(eqn: Equation, analysis: Analysis) -> list[bool]:
    return [not isinstance(a, Constant) and a in analysis.data for a in eqn.invars]


def _operation_rule(eqn: Equation, data: list[bool], composite: Composite) -> R.Rule:
    rule = composite.operation_rule(eqn.name)
    if rule is None:
        classify = OPERATIONS.get(eqn.name)
        if classify is None:
            raise UnsupportedOperationError(
                eqn.name, eqn.name_stack, source_line(eqn.source_info), "unknown operation"
            )
        rule = classify(eqn, data)
    if isinstance(rule, R.Pass) and sum(data) != 1:
        raise UnsupportedOperationError(
            eqn.name, eqn.name_stack, source_line(eqn.source_info), "Pass() needs exactly one data operand"
        )
    return rule


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


# --- evaluation --------------------------------------------------------------------------------
def _bind(eqn: Equation, values: Sequence[Any]) -> list[Any]:
    out = eqn.primitive.bind(*values, **eqn.params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _zero_cotangent(value: Any) -> Any:
    value = jnp.asarray(value)
    if jnp.issubdtype(value.dtype, jnp.inexact):
        return jnp.zeros_like(value)
    return np.zeros(value.shape, dtype=jax.dtypes.float0)


def _sum_to_shape(r: Any, shape: tuple[int, ...]) -> Any:
    """Relevance of a broadcast operand: sum over the broadcast dimensions."""
    if r.shape == tuple(shape):
        return r
    lead = r.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, size in enumerate(shape) if size == 1 and r.shape[lead + i] != 1
    )
    return jnp.sum(r, axis=axes).reshape(shape)


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


def _zeros_like_tree(tree: Any) -> Any:
    return jax.tree_util.tree_map(_zero_cotangent, tree)


def _operation(
    eqn: Equation,
    rule: R.Rule,
    values: list[Any],
    data: list[bool],
    tail: Sequence[ChainOp],
    tail_values: list,
) -> list[Any]:
    """A parameter-free operation (and the constant scalings fused after it) under Pass or Norm."""
    if isinstance(rule, R.Gradient):
        return _bind(eqn, values)
    positions = [i for i, d in enumerate(data) if d]

    def forward(data_values, others, tail_values):
        merged = list(others)
        for i, v in zip(positions, data_values):
            merged[i] = v
        out = _bind(eqn, merged)[0]
        for op, c in zip(tail, tail_values):
            out = apply_chain_op(op, out, c)
        return out

    def backward(args, out, relevance):
        data_values, others, tail_values = args
        zeros = (_zeros_like_tree(others), _zeros_like_tree(tail_values))
        if isinstance(rule, R.Pass):
            (x,) = data_values
            return ((_sum_to_shape(relevance, x.shape).astype(x.dtype),), *zeros)
        # Norm: R_i = x_i * (df/dx_i)^T (R / stab(f(x)))
        compute = jnp.promote_types(relevance.dtype, jnp.float32)
        s = R.safe_divide(relevance.astype(compute), R.stabilize(out.astype(compute), rule.stabilizer))
        _, pullback = jax.vjp(lambda *d: forward(d, others, tail_values), *data_values)
        grads = pullback(s.astype(out.dtype))
        return (tuple((x * g).astype(x.dtype) for x, g in zip(data_values, grads)), *zeros)

    others = [None if d else jnp.asarray(v) for v, d in zip(values, data)]
    tail_values = [jnp.asarray(c) for c in tail_values]
    return [with_relevance_vjp(forward, backward)(tuple(values[i] for i in positions), others, tail_values)]


def apply_chain_op(op: ChainOp, z: Any, c: Any) -> Any:
    """``z (op) c`` for a constant-operand op, or the rearrangement ``view(z)``."""
    if op.op == "view":
        return _bind(op.equation, [z])[0]
    operands = [None, None]
    operands[1 - op.const_position], operands[op.const_position] = z, c
    return _bind(op.equation, operands)[0]


def chain_value(op: ChainOp, read: Callable) -> Any:
    """The constant operand of a chain op (``None`` for a view)."""
    return None if op.op == "view" else jnp.asarray(read(op.equation.invars[op.const_position]))


def _fold(layer: AffineLayer, kernel: Any, chain_values: Sequence[Any]) -> tuple[Any, Any]:
    """The folded kernel and bias of ``layer``: ``z = views(A(x; kernel)) + bias``."""
    scale = bias = None
    for op, c in zip(layer.chain, chain_values):
        if op.op == "view":
            if bias is not None:  # views are linear: view(a + b) = view(a) + view(b)
                bias = _bind(op.equation, [jnp.broadcast_to(bias, op.equation.in_avals[0].shape)])[0]
        elif op.op == "add":
            bias = c if bias is None else bias + c
        elif op.op == "sub":
            bias = -c if bias is None else bias - c
        elif op.op == "mul":
            scale = c if scale is None else scale * c
            bias = None if bias is None else bias * c
        else:  # div
            scale = 1.0 / c if scale is None else scale / c
            bias = None if bias is None else bias / c
    if scale is not None:
        kernel = layer.scale_kernel(kernel, scale)
    return kernel, bias


@custom_vmap
def _after(value: Any, anchor: Any) -> Any:
    """``value``, made to depend on one element of ``anchor`` (it adds an exact zero).

    XLA's CPU scheduler (concurrency-optimized) computes everything that depends only on the
    parameters, such as the rules' modified weights, at the start of the program, so all of them
    would be alive at once; it drops ``optimization_barrier``.  Tying the weights to the incoming
    relevance makes each layer's modified weights exist only while its backward runs.  Under
    ``vmap`` the anchor is batched but ``value`` must not become batched (that would turn every
    convolution into a grouped one): the batching rule below keeps ``value``'s own batching.
    """
    first = jax.lax.stop_gradient(anchor.reshape(-1)[0])
    zero = jnp.where(jnp.isfinite(first), first, 0).astype(value.dtype) * 0
    return value + zero


@_after.def_vmap
def _after_vmap(axis_size: int, in_batched: Sequence[bool], value: Any, anchor: Any) -> tuple[Any, bool]:
    return _after(value, anchor), in_batched[0]


def _affine(
    layer: AffineLayer,
    rule: R.AffineRule,
    x: Any,
    kernel: Any,
    chain_values: list[Any],
    positive_output_relevance: bool = False,
) -> Any:
    """An affine layer evaluated as in the program, with ``rule`` as its VJP."""
    position = layer.data_position
    views = [op for op in layer.chain if op.op == "view"]

    def linear(v, w):
        operands = [None, None]
        operands[position], operands[1 - position] = v, w
        return _bind(layer.linear, operands)[0]

    def linear_with_views(v, w):
        z = linear(v, w)
        for op in views:
            z = apply_chain_op(op, z, None)
        return z

    def forward(x, kernel, chain_values):
        z = linear(x, kernel)
        for op, c in zip(layer.chain, chain_values):
            z = apply_chain_op(op, z, c)
        return z

    def backward(args, out, relevance):
        x, kernel, chain_values = args
        kernel = _after(kernel, relevance)
        folded_kernel, bias = _fold(layer, kernel, chain_values)
        r_in = R.affine_relevance(
            rule, linear_with_views, x, folded_kernel, bias, out, relevance,
            non_negative_input=layer.non_negative_input,
            positive_output_relevance=positive_output_relevance,
        )  # fmt: skip
        return (
            r_in,
            _zero_cotangent(kernel),
            [None if c is None else _zero_cotangent(c) for c in chain_values],
        )

    return with_relevance_vjp(forward, backward)(x, kernel, chain_values)


@jax.custom_vjp
def initial_relevance(y: Any) -> Any:
    """Identity forward; its VJP turns the cotangent ``ct`` into the initial relevance ``y * ct``."""
    return y


def _initial_fwd(y):
    return y, y


def _initial_bwd(y, ct):
    return (y * ct,)


initial_relevance.defvjp(_initial_fwd, _initial_bwd)


def evaluate(the_plan: Plan, leaves: Sequence[Any], probes: Sequence[Any] | None = None) -> list[Any]:
    """Evaluate the plan on the flat argument leaves; returns the flat outputs.

    ``probes``, one ``(input_probe, output_probe)`` pair of zeros per affine layer, are added to
    each layer's input (as that layer reads it) and output: the cotangents of the probes are the
    relevance leaving and entering the layer (see :func:`jaxdtd.inspect.ledger`)."""
    program, analysis = the_plan.program, the_plan.analysis
    env: dict[int, Any] = dict(zip(program.invars, leaves))

    def read(atom: Any) -> Any:
        return atom.value if isinstance(atom, Constant) else env[atom]

    for step in the_plan.steps:
        eqn = step.equation
        if step.kind == "skip":
            continue
        if step.kind == "const":
            outs = _bind(eqn, [read(a) for a in eqn.invars])
        elif step.kind == "layer":
            layer = step.layer
            x = read(layer.input)
            if probes is not None:
                x = x + probes[layer.index][0]
            if not isinstance(step.rule, R.AffineRule):  # Gradient / no rule: ordinary evaluation
                z = _bind(layer.linear, _operands(layer.linear, layer.data_position, x, read))[0]
                for op in layer.chain:
                    z = apply_chain_op(op, z, chain_value(op, read))
            else:
                kernel = jnp.asarray(read(layer.kernel_atom))
                chain_values = [chain_value(op, read) for op in layer.chain]
                z = _affine(layer, step.rule, x, kernel, chain_values, step.positive_output_relevance)
            if probes is not None:
                z = z + probes[layer.index][1]
            outs = [z]
        else:
            tail_values = [read(op.equation.invars[op.const_position]) for op in step.tail]
            outs = _operation(
                eqn,
                step.rule,
                [read(a) for a in eqn.invars],
                _data_mask(eqn, analysis),
                step.tail,
                tail_values,
            )
            eqn = step.tail[-1].equation if step.tail else eqn
        env.update(zip(eqn.outvars, outs))

    results = []
    for atom in program.outvars:
        value = read(atom)
        if not isinstance(atom, Constant) and atom in analysis.data:
            value = initial_relevance(value)
        results.append(value)
    return results


def _operands(eqn: Equation, data_position: int, value: Any, read: Callable) -> list[Any]:
    operands = [read(a) if i != data_position else None for i, a in enumerate(eqn.invars)]
    operands[data_position] = value
    return operands
