"""Analysis of a flattened program: data flow, non-negativity and affine layers.

* **Data**: a floating-point value that depends on the explained input through differentiable
  operations (``stop_gradient`` cuts the dependence; booleans and integers never carry relevance).
  Everything else is a constant for the rules (weights, statistics, masks).
* **Non-negative**: data values that are provably ``>= 0`` (outputs of ReLU, ReLU6, clipping at a
  non-negative bound, pooling or reshaping of non-negative values, ...).  Rules skip their ``x-``
  branches on such inputs.
* **Affine layers**: each ``dot_general`` / ``conv_general_dilated`` with one data operand and one
  that does not depend on the explained input (a weight; a detached computed value is no kernel),
  grouped with the single-use chain of constant-operand ops after it (bias add, BatchNorm's
  subtract/scale/shift) into ``z = A(x) + b``.  Per-output-channel scales are folded into the kernel
  so that the rules see the folded weights (docs/rules.md, BatchNorm).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .primitives import lookup
from .trace import Constant, Equation, Program

__all__ = ["AffineLayer", "Analysis", "ChainOp", "analyse", "chain_op", "consumers_of", "is_float"]


def is_float(aval: Any) -> bool:
    return jnp.issubdtype(getattr(aval, "dtype", np.int32), jnp.inexact)


@dataclasses.dataclass(frozen=True)
class ChainOp:
    """An op after a linear primitive: ``z <- z (op) const``, or a rearrangement ``z <- view(z)``."""

    equation: Equation
    op: str  # "add", "sub", "mul", "div" or "view"
    const_position: int


@dataclasses.dataclass(frozen=True)
class AffineLayer:
    """An affine layer ``z = A(x; kernel) + bias`` discovered in the program."""

    index: int
    kind: str  # "dense" or "conv"
    linear: Equation
    data_position: int
    chain: tuple[ChainOp, ...]
    input: int
    output: int
    module_path: str
    param_path: str
    first: bool
    non_negative_input: bool

    @property
    def kernel_atom(self) -> Any:
        return self.linear.invars[1 - self.data_position]

    @property
    def last_equation(self) -> Equation:
        return self.chain[-1].equation if self.chain else self.linear

    @property
    def folds_scale(self) -> bool:
        return any(op.op in ("mul", "div") for op in self.chain)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.linear.in_avals[self.data_position].shape)

    def apply_linear(self, x: Any, kernel: Any) -> Any:
        """``A(x; kernel)``, the layer's linear primitive, for the rules (which transpose it).

        A convolution padded wider than its kernel's reach ``(k - 1) * dilation`` on a side (a
        window wholly in the padding) is computed as an explicit zero ``pad`` of the excess followed
        by the convolution with the rest: the same values, but a transpose without the negative
        padding that XLA:CPU computes wrong (openxla/xla#48713), so the relevance stays exact."""
        eqn = self.linear
        operands: list[Any] = [None, None]
        operands[self.data_position], operands[1 - self.data_position] = x, kernel
        excess = _padding_beyond_reach(eqn) if eqn.name == "conv_general_dilated" else None
        if not excess:
            return eqn.bind(operands)[0]
        lhs_spec = eqn.params["dimension_numbers"].lhs_spec
        config = [(0, 0, 0)] * len(eqn.in_avals[0].shape)
        for d, (lo, hi) in zip(lhs_spec[2:], excess, strict=True):
            config[d] = (lo, hi, 0)
        padded = jax.lax.pad(operands[0], jnp.zeros((), operands[0].dtype), config)
        padding = tuple(
            (lo - a, hi - b) for (lo, hi), (a, b) in zip(eqn.params["padding"], excess, strict=True)
        )
        return dataclasses.replace(eqn, params={**eqn.params, "padding": padding}).bind(
            [padded, operands[1]]
        )[0]

    def scale_kernel(self, kernel: Any, scale: Any) -> Any:
        """``kernel * scale`` where ``scale`` (broadcastable to the output) varies only along the
        output features: folds a per-output-channel factor into the weights."""
        out_shape = self.linear.out_avals[0].shape
        features = _output_feature_dims(self.linear, self.data_position)
        scale = jnp.asarray(scale)
        scale = jnp.reshape(scale, (1,) * (len(out_shape) - scale.ndim) + scale.shape)
        # only feature dims may differ from 1 (checked when the layer was built): broadcast, squeeze
        feature_shape = tuple(out_shape[d] if d in features else 1 for d in range(len(out_shape)))
        vector = jnp.broadcast_to(scale, feature_shape).reshape(tuple(out_shape[d] for d in features))
        kernel_dims = _kernel_feature_dims(self.linear, self.data_position)
        shape = [1] * kernel.ndim
        for d, size in zip(kernel_dims, vector.shape, strict=True):
            shape[d] = size
        return kernel * jnp.reshape(vector, shape).astype(kernel.dtype)

    def fold(self, kernel: Any, chain_values: Sequence[Any]) -> tuple[Any, Any]:
        """The folded kernel and bias: ``z = views(A(x; kernel')) + bias`` with the chain's
        per-output-channel scales folded into ``kernel'`` (BatchNorm, rules.md) and its shifts
        (scaled and rearranged like the output) summed into ``bias`` (``None`` if there is none)."""
        scale = bias = None
        out_shape = tuple(self.linear.out_avals[0].shape)
        features = _output_feature_dims(self.linear, self.data_position)
        views: list[Equation] = []
        for op, c in zip(self.chain, chain_values, strict=True):
            if op.op == "view":
                if bias is not None:  # views are linear: view(a + b) = view(a) + view(b)
                    bias = op.equation.bind([jnp.broadcast_to(bias, op.equation.in_avals[0].shape)])[0]
                views.append(op.equation)
            elif op.op == "add":
                bias = c if bias is None else bias + c
            elif op.op == "sub":
                bias = -c if bias is None else bias - c
            else:  # mul, div: the factor on z itself (_find_layers checked that it maps there)
                factor = _to_layout(jnp.asarray(c), views, out_shape, features)
                if op.op == "mul":
                    scale = factor if scale is None else scale * factor
                    bias = None if bias is None else bias * c
                else:
                    scale = 1.0 / factor if scale is None else scale / factor
                    bias = None if bias is None else bias / c
        if scale is not None:
            kernel = self.scale_kernel(kernel, scale)
        return kernel, bias


#: for each dimension of a view of a layer's output, the set of output dimensions it is made of (a
#: transpose moves them, a reshape merges or splits them); ``None``: a view that is not tracked
Layout = tuple[frozenset[int], ...] | None


def _reshape_groups(before: tuple[int, ...], after: tuple[int, ...]) -> list[frozenset[int]]:
    """For each dimension of ``after``, the dimensions of ``before`` that a row-major reshape makes it
    from (the minimal contiguous groups of equal size products); size-1 dimensions: none."""
    groups: list[frozenset[int]] = [frozenset()] * len(after)
    i = j = 0
    while True:
        while i < len(before) and before[i] == 1:
            i += 1
        while j < len(after) and after[j] == 1:
            j += 1
        if i >= len(before) or j >= len(after):
            return groups
        left, right, p, q = [i], [j], before[i], after[j]
        i, j = i + 1, j + 1
        while p != q:
            if p < q:
                left.append(i)
                p, i = p * before[i], i + 1
            else:
                right.append(j)
                q, j = q * after[j], j + 1
        for a in right:
            groups[a] = frozenset(left)


def _view_layout(layout: Layout, view: Equation) -> Layout:
    """The :data:`Layout` after ``view`` (transpose, reshape, squeeze, expand_dims); others: ``None``."""
    if layout is None:
        return None
    if view.name == "transpose":
        return tuple(layout[p] for p in view.params["permutation"])
    if view.name in ("reshape", "squeeze", "expand_dims"):
        groups = _reshape_groups(tuple(view.in_avals[0].shape), tuple(view.out_avals[0].shape))
        return tuple(frozenset().union(*(layout[b] for b in group)) for group in groups)
    return None


def _scale_maps_to_features(shape: tuple[int, ...], layout: Layout, features: Sequence[int]) -> bool:
    """Can a constant of ``shape``, multiplying a view (``layout``) of a layer's output, be folded:
    does it vary only along view dimensions made of the output's feature dimensions alone?"""
    if layout is None or len(shape) > len(layout):
        return False
    padded = (1,) * (len(layout) - len(shape)) + tuple(shape)
    return all(
        size == 1 or (dims and dims <= set(features)) for size, dims in zip(padded, layout, strict=True)
    )


def _to_layout(
    value: Any, views: Sequence[Equation], out_shape: tuple[int, ...], features: Sequence[int]
) -> Any:
    """``value``, broadcastable to the result of ``views`` of a layer's output (``out_shape``) and
    varying only along its feature dimensions there (checked by :func:`_scale_maps_to_features`),
    as a factor of the output itself: broadcast to the viewed shape, the views undone (inverse
    transposes, reshapes back), and the non-feature dimensions taken at index 0 (size 1)."""
    shapes = [tuple(out_shape)]
    for view in views:
        shapes.append(tuple(view.out_avals[0].shape))
    full = jnp.broadcast_to(value, shapes[-1])
    for view, before in zip(reversed(views), reversed(shapes[:-1]), strict=True):
        if view.name == "transpose":
            full = jnp.transpose(full, tuple(int(k) for k in np.argsort(view.params["permutation"])))
        else:
            full = jnp.reshape(full, before)
    index = tuple(slice(None) if d in features else slice(0, 1) for d in range(len(out_shape)))
    return full[index]


def _output_feature_dims(eqn: Equation, data_position: int) -> tuple[int, ...]:
    """Output dimensions indexed by the kernel's output features."""
    if eqn.name == "conv_general_dilated":
        return (eqn.params["dimension_numbers"].out_spec[1],)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs_rank = len(eqn.in_avals[0].shape)
    rhs_rank = len(eqn.in_avals[1].shape)
    n_batch = len(lb)
    n_lhs_free = lhs_rank - len(lc) - len(lb)
    n_rhs_free = rhs_rank - len(rc) - len(rb)
    if data_position == 0:  # kernel is rhs: its free dims come last
        return tuple(range(n_batch + n_lhs_free, n_batch + n_lhs_free + n_rhs_free))
    return tuple(range(n_batch, n_batch + n_lhs_free))


def _kernel_feature_dims(eqn: Equation, data_position: int) -> tuple[int, ...]:
    if eqn.name == "conv_general_dilated":
        return (eqn.params["dimension_numbers"].rhs_spec[0],)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contracting, batch = (rc, rb) if data_position == 0 else (lc, lb)
    rank = len(eqn.in_avals[1 - data_position].shape)
    return tuple(d for d in range(rank) if d not in contracting and d not in batch)


@dataclasses.dataclass(frozen=True)
class Analysis:
    """What :func:`analyse` found: data values, non-negative values and affine layers."""

    data: frozenset[int]
    non_negative: frozenset[int]
    layers: tuple[AffineLayer, ...]
    absorbed: frozenset[int]  # equation indices evaluated as part of a layer (not the last one)
    layer_at: dict[int, AffineLayer]  # last equation index -> layer
    avals: dict[int, Any]
    uses: dict[int, int]  # variable -> number of uses (operands and program outputs)
    consumers: dict[int, list[Equation]]  # variable -> equations reading it
    static: dict[int, Any] = dataclasses.field(default_factory=dict)  # small constants' values
    dependent: frozenset[int] = frozenset()  # values depending on the explained input (any dtype)
    producer: dict[int, Equation] = dataclasses.field(default_factory=dict)  # variable -> its equation

    def is_data(self, atom: Any) -> bool:
        return not isinstance(atom, Constant) and atom in self.data

    def data_mask(self, eqn: Equation) -> tuple[bool, ...]:
        return tuple(self.is_data(a) for a in eqn.invars)

    def dependent_mask(self, eqn: Equation) -> tuple[bool, ...]:
        return tuple(not isinstance(a, Constant) and a in self.dependent for a in eqn.invars)


def _static_value(atom: Any, known: dict[int, Any]) -> Any:
    if isinstance(atom, Constant):
        return np.asarray(atom.value)
    return known.get(atom)


def analyse(
    program: Program,
    explained: set[int],
    leaf_names: dict[int, str],
    *,
    cuts: frozenset[int] = frozenset(),
    seeds: frozenset[int] = frozenset(),
) -> Analysis:
    """Analyse ``program`` where the invars in ``explained`` carry the input to explain.

    ``cuts`` are indices of equations whose outputs are constants for the rules (as if wrapped in
    ``stop_gradient``); ``seeds`` are variables where relevance is delivered instead of at the
    inputs: they are data whatever they depend on (an embedding lookup of integer token ids)."""
    avals: dict[int, Any] = dict(zip(program.invars, program.in_avals, strict=True))
    for eqn in program.equations:
        avals.update(zip(eqn.outvars, eqn.out_avals, strict=True))

    data = {v for v in explained if is_float(avals[v])}
    dependent = set(explained) | set(seeds)  # depends on the explained input, any dtype
    non_negative: set[int] = set()
    known: dict[int, Any] = {}
    producer: dict[int, Equation] = {}
    uses: Counter = Counter()
    for eqn in program.equations:
        for atom in eqn.invars:
            if not isinstance(atom, Constant):
                uses[atom] += 1
    for atom in program.outvars:
        if not isinstance(atom, Constant):
            uses[atom] += 1

    def is_data(atom: Any) -> bool:
        return not isinstance(atom, Constant) and atom in data

    def known_sign_ok(atom: Any) -> bool:
        if is_data(atom):
            return atom in non_negative
        value = _static_value(atom, known)
        return value is not None and bool(np.all(value >= 0))

    for eqn in program.equations:
        for v in eqn.outvars:
            producer[v] = eqn
        if any(not isinstance(a, Constant) and a in dependent for a in eqn.invars):
            dependent.update(eqn.outvars)
        seeded = [v for v in eqn.outvars if v in seeds and is_float(avals[v])]
        if seeded:
            data.update(seeded)
            continue
        has_data = any(is_data(a) for a in eqn.invars)
        if not has_data:
            if (
                all(isinstance(a, Constant) or a in known for a in eqn.invars)
                and all(np.size(_static_value(a, known)) <= 64 for a in eqn.invars)
                and not eqn.primitive.multiple_results
                and np.prod(eqn.out_avals[0].shape) <= 64
            ):
                try:
                    values = [_static_value(a, known) for a in eqn.invars]
                    with jax.ensure_compile_time_eval():
                        value = eqn.primitive.bind(*values, **eqn.params)
                    known[eqn.outvars[0]] = np.asarray(value)
                except Exception:  # noqa: BLE001 - best-effort constant folding only
                    pass
            continue
        if eqn.name == "stop_gradient" or eqn.index in cuts:
            continue
        for v, aval in zip(eqn.outvars, eqn.out_avals, strict=True):
            if is_float(aval):
                data.add(v)
        info = lookup(eqn.primitive)
        if info is not None and info.sign(eqn, known_sign_ok):
            non_negative.update(eqn.outvars)

    consumers = consumers_of(program)
    layers, absorbed, layer_at = _find_layers(
        program, data, dependent, non_negative, uses, consumers, producer, leaf_names
    )
    return Analysis(
        data=frozenset(data),
        non_negative=frozenset(non_negative),
        layers=layers,
        absorbed=frozenset(absorbed),
        layer_at=layer_at,
        avals=avals,
        uses=dict(uses),
        consumers=consumers,
        static=known,
        dependent=frozenset(dependent),
        producer=producer,
    )


def consumers_of(program: Program) -> dict[int, list[Equation]]:
    consumers: dict[int, list[Equation]] = {}
    for eqn in program.equations:
        for atom in eqn.invars:
            if not isinstance(atom, Constant):
                consumers.setdefault(atom, []).append(eqn)
    return consumers


def chain_op(
    eqn: Equation, current: int, data: set[int] | frozenset[int], *, views: bool = False
) -> ChainOp | None:
    """``eqn`` as a constant-operand op applied to ``current``, or None if it is not one.
    With ``views``, an element-preserving rearrangement of ``current`` (vmapped Equinox layers
    transpose the batch axis back before adding the bias) is a ``"view"`` op."""
    info = lookup(eqn.primitive)
    is_view = info is not None and info.view
    if views and is_view and len(eqn.invars) == 1 and eqn.invars[0] == current:
        return ChainOp(eqn, "view", -1)
    if eqn.name not in ("add", "sub", "mul", "div") or len(eqn.invars) != 2:
        return None
    a, b = eqn.invars
    if a == current and (isinstance(b, Constant) or b not in data):
        position = 1
    elif b == current and (isinstance(a, Constant) or a not in data) and eqn.name in ("add", "mul"):
        position = 0
    else:
        return None
    data_aval = eqn.in_avals[1 - position]
    if tuple(data_aval.shape) != tuple(eqn.out_avals[0].shape) or data_aval.dtype != eqn.out_avals[0].dtype:
        return None
    return ChainOp(eqn, eqn.name, position)


def _conv_reach(conv: Equation) -> list[int]:
    """``(k - 1) * dilation`` per spatial dimension of a convolution's kernel."""
    rhs_spatial = conv.params["dimension_numbers"].rhs_spec[2:]
    dilation = conv.params.get("rhs_dilation") or (1,) * len(rhs_spatial)
    shape = conv.in_avals[1].shape
    return [(shape[d] - 1) * r for d, r in zip(rhs_spatial, dilation, strict=True)]


def _padding_beyond_reach(conv: Equation, padding: Any = None) -> tuple[tuple[int, int], ...] | None:
    """Per spatial dimension, how far ``padding`` (default: the convolution's) exceeds the kernel's
    reach on each side; ``None`` when it nowhere does (or the input is dilated: left as it is)."""
    padding = conv.params["padding"] if padding is None else padding
    if isinstance(padding, str) or any(d != 1 for d in conv.params.get("lhs_dilation") or ()):
        return None
    excess = tuple(
        (max(0, lo - m), max(0, hi - m)) for (lo, hi), m in zip(padding, _conv_reach(conv), strict=True)
    )
    return excess if any(a or b for a, b in excess) else None


def _literal(atom: Any, producer) -> Any:
    """The scalar value of ``atom`` when it is a constant, possibly behind ``convert_element_type``
    (``jnp.pad`` converts its Python padding value inside a jit); else ``None``."""
    while not isinstance(atom, Constant):
        eqn = producer.get(atom)
        if eqn is None or eqn.name != "convert_element_type":
            return None
        atom = eqn.invars[0]
    value = np.asarray(atom.value)
    return value.item() if value.size == 1 else None


def _absorb_zero_pad(conv: Equation, producer, uses, consumers, data) -> Equation:
    """A convolution of ``jnp.pad(x, ..., constant 0)`` (Flax's ``padding="CAUSAL"``, hand-written
    "same" padding) as the convolution of ``x`` with that padding added to its own: the same values,
    but the padded zeros are the convolution's implicit padding, not input features, so no rule
    hands them relevance (w^2 and Flat count only in-bounds taps, as for lax padding).  Only a pad
    used by this convolution alone, with zero padding value, no interior padding, non-negative
    padding on the spatial dimensions only, and no input dilation; else ``conv`` unchanged.  (A
    padding wider than the kernel's reach is fine: :meth:`AffineLayer.apply_linear` handles it.)"""
    x = conv.invars[0]
    pad = producer.get(x)
    if (
        pad is None
        or pad.name != "pad"
        or uses.get(x, 0) != 1
        or len(consumers.get(x, [])) != 1
        or isinstance(pad.invars[0], Constant)
        or pad.invars[0] not in data
        or _literal(pad.invars[1], producer) != 0
        or any(d != 1 for d in conv.params.get("lhs_dilation") or ())
    ):
        return conv
    config = pad.params["padding_config"]
    lhs_spec = conv.params["dimension_numbers"].lhs_spec
    batch_dim, feature_dim, spatial = lhs_spec[0], lhs_spec[1], lhs_spec[2:]
    if any(interior != 0 for _, _, interior in config) or any(
        config[d][:2] != (0, 0) for d in (batch_dim, feature_dim)
    ):
        return conv
    if any(config[d][0] < 0 or config[d][1] < 0 for d in spatial):
        return conv
    padding = tuple(
        (lo + config[d][0], hi + config[d][1])
        for (lo, hi), d in zip(conv.params["padding"], spatial, strict=True)
    )
    return dataclasses.replace(
        conv,
        params={**conv.params, "padding": padding},
        invars=(pad.invars[0], *conv.invars[1:]),
        in_avals=(pad.in_avals[0], *conv.in_avals[1:]),
    )


def _find_layers(program, data, dependent, non_negative, uses, consumers, producer, leaf_names):
    layers: list[AffineLayer] = []
    absorbed: set[int] = set()
    layer_at: dict[int, AffineLayer] = {}
    after_layer: set[int] = set()  # data values downstream of some affine layer
    for eqn in program.equations:
        if eqn.index in absorbed:
            continue
        data_in = [i for i, a in enumerate(eqn.invars) if not isinstance(a, Constant) and a in data]
        info = lookup(eqn.primitive)
        kind = info.linear if info is not None else None
        # the other operand must be a constant of the model (a weight), not a value computed from the
        # explained input and detached (CP-LRP's stop_gradient(A) @ v is an operation, not a layer)
        if (
            kind is not None
            and len(data_in) == 1
            and len(eqn.invars) == 2
            and not _is_dependent(eqn.invars[1 - data_in[0]], dependent)
        ):
            if eqn.name == "conv_general_dilated" and (
                data_in[0] != 0 or eqn.params.get("batch_group_count", 1) != 1
            ):
                _propagate(eqn, data, after_layer)
                continue
            data_position = data_in[0]
            if eqn.name == "conv_general_dilated":
                eqn = _absorb_zero_pad(eqn, producer, uses, consumers, data)
            chain: list[ChainOp] = []
            current = eqn.outvars[0]
            while uses[current] == 1 and len(consumers.get(current, [])) == 1:
                nxt = consumers[current][0]
                op = chain_op(nxt, current, data, views=True)
                if op is None:
                    break
                if op.op in ("mul", "div"):
                    layout: Layout = tuple(frozenset({d}) for d in range(len(eqn.out_avals[0].shape)))
                    for o in chain:
                        if o.op == "view":
                            layout = _view_layout(layout, o.equation)
                    features = _output_feature_dims(eqn, data_position)
                    if not _scale_maps_to_features(nxt.in_avals[op.const_position].shape, layout, features):
                        break  # a scale folds only along the output's features, through any views
                chain.append(op)
                current = nxt.outvars[0]
            while chain and chain[-1].op == "view":  # keep views only when a bias add follows them
                chain.pop()
            current = chain[-1].equation.outvars[0] if chain else eqn.outvars[0]
            x = eqn.invars[data_position]
            layer = AffineLayer(
                index=len(layers),
                kind=kind,
                linear=eqn,
                data_position=data_position,
                chain=tuple(chain),
                input=x,
                output=current,
                module_path=eqn.name_stack,
                param_path=_param_path(eqn.invars[1 - data_position], producer, leaf_names),
                first=x not in after_layer,
                non_negative_input=x in non_negative,
            )
            layers.append(layer)
            for op in chain[:-1]:
                absorbed.add(op.equation.index)
            if chain:
                absorbed.add(eqn.index)
            layer_at[layer.last_equation.index] = layer
            after_layer.add(current)
            for op in chain:
                after_layer.update(op.equation.outvars)
            after_layer.update(eqn.outvars)
            continue
        _propagate(eqn, data, after_layer)
    return tuple(layers), absorbed, layer_at


def _is_dependent(atom: Any, dependent: set[int]) -> bool:
    return not isinstance(atom, Constant) and atom in dependent


def _propagate(eqn: Equation, data: set[int], after_layer: set[int]) -> None:
    if any(not isinstance(a, Constant) and a in after_layer for a in eqn.invars):
        after_layer.update(v for v in eqn.outvars if v in data)


def _param_path(atom: Any, producer: dict[int, Equation], leaf_names: dict[int, str]) -> str:
    while not isinstance(atom, Constant):
        if atom in leaf_names:
            return leaf_names[atom]
        eqn = producer.get(atom)
        info = lookup(eqn.primitive) if eqn is not None else None
        if eqn is None or info is None or not info.weight_view:
            return ""
        atom = eqn.invars[0]
    return ""
