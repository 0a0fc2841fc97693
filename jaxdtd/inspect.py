"""See what the engine did: the layers it found and the relevance that flows through them.

* :func:`describe` lists the discovered affine layers in execution order (module path, weight
  path, primitive, shapes, whether a BatchNorm-style scale was folded into the kernel, the rule and
  why it was chosen) and the parameter-free operations on the data with their rules.
* :func:`ledger` measures, for a given input and target, the total relevance entering each layer
  (at its output) and leaving it (at its input), so you see where relevance is absorbed (biases,
  stabilizers, dropped branches) or created.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from . import composites as C
from . import rules as R
from .api import (
    _build_plan,
    _check_argnums,
    _normalize_argnums,
    bind_static,
    flat_inputs,
    target_cotangent,
)
from .interpret import Plan, ScanUnit, evaluate
from .units import Bind, IslandUnit

__all__ = ["Description", "LayerRow", "Ledger", "describe", "ledger"]


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One affine layer as :func:`describe` reports it."""

    index: int
    module_path: str
    param_path: str
    primitive: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    folded: bool
    first: bool
    non_negative_input: bool
    rule: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Description:
    """The layers and parameter-free operations of a traced function; ``str()`` gives a table."""

    layers: tuple[LayerRow, ...]
    operations: tuple[tuple[str, str, int], ...]  # (primitive, rule, count)
    #: (primitive, rule, why, count): ``why`` is the composite entry that matched, or "registry"
    operation_reasons: tuple[tuple[str, str, str, int], ...] = ()

    def __str__(self) -> str:
        header = ("#", "module path", "weight", "primitive", "input -> output", "BN folded", "rule", "why")
        rows = [
            (
                str(r.index),
                r.module_path or "-",
                r.param_path or "-",
                r.primitive,
                f"{r.input_shape} -> {r.output_shape}",
                "yes" if r.folded else "no",
                r.rule,
                r.reason + (", input >= 0" if r.non_negative_input else ""),
            )
            for r in self.layers
        ]
        widths = [
            max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)
        ]
        lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
        lines.append("-+-".join("-" * w for w in widths))
        lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
        if self.operation_reasons:
            ops = ", ".join(
                f"{name} x{count}: {rule}" + ("" if why == "registry" else f" ({why})")
                for name, rule, why, count in self.operation_reasons
            )
            lines.append(f"operations on the data: {ops}")
        return "\n".join(lines)


def _rule_name(rule: R.Rule | None) -> str:
    return "Gradient()" if rule is None else repr(rule)


def _plan(
    fn: Callable[..., Any], args: tuple[Any, ...], composite: Any, argnums: Any
) -> tuple[Plan, tuple[int, ...]]:
    comp = C.as_composite(composite) or C.Composite()
    resolved = _check_argnums(_normalize_argnums(argnums), len(args))
    bound, dynamic, _ = bind_static(fn, args, {}, resolved)  # static arguments as transform has them
    flat_inputs(dynamic, resolved)  # the same input checks as transform
    return _build_plan(bound, comp, dynamic, resolved), resolved


def describe(
    fn: Callable[..., Any],
    *args: Any,
    composite: C.Composite | R.Rule | None = None,
    argnums: int | Sequence[int] = 1,
) -> Description:
    """Trace ``fn(*args)`` and report its affine layers and the rules ``composite`` assigns.

    ``print(describe(model.apply, variables, x, composite=DeepTaylor(0., 1.)))`` prints a table with
    one row per layer in execution order; "BN folded" says that a per-channel scale (an inference
    BatchNorm) was folded into the kernel before the rule sees it.
    """
    the_plan, _ = _plan(fn, args, composite, argnums)
    return _describe_plan(the_plan)


def _describe_plan(the_plan: Plan) -> Description:
    rows = []
    for layer, rule, reason in the_plan.layer_rules:
        rows.append(
            LayerRow(
                index=layer.index,
                module_path=layer.module_path,
                param_path=layer.param_path,
                primitive=layer.linear.name,
                input_shape=layer.input_shape,
                output_shape=tuple(the_plan.analysis.avals[layer.output].shape),
                folded=layer.folds_scale,
                first=layer.first,
                non_negative_input=layer.non_negative_input,
                rule=_rule_name(rule),
                reason=reason,
            )
        )
    counts = Counter((eqn.name, type(rule).__name__, why) for eqn, rule, why in the_plan.operations)
    counts.update(
        (
            f"{unit.kind}(" + "+".join(e.name for e in unit.members) + ")",
            type(unit.rule).__name__,
            unit.reason,
        )
        for unit in the_plan.unfused_units()
        if isinstance(unit, IslandUnit)
    )
    counts.update(  # values made constants: normalization statistics and the composite's cuts
        (f"cut {unit.equation.name}", "constant", "cut")
        for unit in the_plan.units
        if isinstance(unit, Bind) and unit.cut
    )
    counts.update(  # a scan's body is planned as a program of its own
        ("scan", f"body: {len(unit.body.layer_rules)} layers, {len(unit.body.operations)} operations", "scan")
        for unit in the_plan.units
        if isinstance(unit, ScanUnit)
    )
    merged: Counter[tuple[str, str]] = Counter()
    for (name, rule_name, _), n in counts.items():
        merged[(name, rule_name)] += n
    operations = tuple((name, rule, n) for (name, rule), n in merged.items())
    reasons = tuple((name, rule, why, n) for (name, rule, why), n in counts.items())
    return Description(tuple(rows), operations, reasons)


@dataclasses.dataclass(frozen=True)
class Ledger:
    """Relevance totals per layer and sample, from :func:`ledger`.

    ``entering[k]`` is the relevance arriving at layer ``k``'s output, ``leaving[k]`` what its rule
    hands to its input, both summed over all but the batch axis (shape ``(batch,)``).  A layer's
    batch axis is the axis of its input (output) whose size follows the batch when the function is
    traced again with one more sample, so layers inside e.g. ``jax.image.resize`` (batch on axis 1)
    are reduced correctly.  When some layer's arrays have no such axis (a reshape merged the batch
    with another axis), every sample is measured by its own backward pass instead: column ``b`` is
    then the relevance that originates from sample ``b``'s target score (the same numbers for
    models that treat samples independently).
    ``absorbed = entering - leaving`` is what the layer absorbs (bias, stabilizer, dropped
    branches; negative: created).  ``output`` is the initial relevance ``f_c(x)``, ``input`` the
    total input relevance.
    """

    layers: tuple[LayerRow, ...]
    entering: np.ndarray  # (n_layers, batch)
    leaving: np.ndarray  # (n_layers, batch)
    output: np.ndarray  # (batch,)
    input: np.ndarray  # (batch,)

    @property
    def absorbed(self) -> np.ndarray:
        return cast(np.ndarray, self.entering - self.leaving)  # (numpy types array arithmetic as Any)

    def __str__(self) -> str:
        lines = [f"initial relevance f_c(x): {np.array2string(self.output, precision=5)}"]
        lines.append(
            f"{'#':>3}  {'module path':<28} {'rule':<34} {'entering':>12} {'leaving':>12} {'absorbed':>10}"
        )
        for row, e, lv in zip(self.layers, self.entering, self.leaving, strict=True):
            absorbed = (e.sum() - lv.sum()) / (abs(e.sum()) + 1e-30)
            lines.append(
                f"{row.index:>3}  {row.module_path[-28:]:<28} {row.rule[:34]:<34} "
                f"{e.sum():>12.5g} {lv.sum():>12.5g} {absorbed:>9.2%}"
            )
        lines.append(f"input relevance: {np.array2string(self.input, precision=5)}")
        return "\n".join(lines)


def ledger(
    fn: Callable[..., Any],
    *args: Any,
    target: Any = None,
    composite: C.Composite | R.Rule | None = None,
    argnums: int = 1,
) -> Ledger:
    """Total relevance entering and leaving every affine layer for ``args`` and ``target``.

    Zero probes are added to each layer's input (as the layer reads it) and output; the
    cotangents of the probes are exactly the relevance flowing through those points, so
    ``leaving[k]`` is what layer ``k``'s rule produced and ``entering[k]`` what reached it.
    """
    if not isinstance(argnums, int):
        raise TypeError("ledger: argnums must be a single int")
    the_plan, resolved = _plan(fn, args, composite, argnums)
    bound, dynamic, _ = bind_static(fn, args, {}, resolved)
    leaves = flat_inputs(dynamic, resolved)
    offset = sum(len(jax.tree_util.tree_leaves(a)) for a in dynamic[: resolved[0]])
    count = len(jax.tree_util.tree_leaves(dynamic[resolved[0]]))
    avals = the_plan.analysis.avals
    probes = [
        (
            jnp.zeros(avals[layer.input].shape, avals[layer.input].dtype),
            jnp.zeros(avals[layer.output].shape, avals[layer.output].dtype),
        )
        for layer, _, _ in the_plan.layer_rules
    ]

    def run(explained: list[Any], probes: list[tuple[jax.Array, jax.Array]]) -> Any:
        full = list(leaves)
        full[offset : offset + count] = explained
        outs = evaluate(the_plan, full, probes)
        return jax.tree_util.tree_unflatten(the_plan.out_tree, outs)

    explained = leaves[offset : offset + count]
    y, vjp = jax.vjp(jax.jit(run), explained, probes)
    ct = target_cotangent(y, target)
    r_input, r_probes = vjp(ct)

    def per_sample(a: Any, axis: int = 0) -> np.ndarray:
        a = jnp.asarray(a)
        return np.asarray(jnp.sum(a, axis=tuple(d for d in range(a.ndim) if d != axis)) if a.ndim > 1 else a)

    batch = y.shape[0] if y.ndim > 1 else None
    axes = None
    if batch is not None and probes:
        comp = C.as_composite(composite) or C.Composite()
        axes = _probe_batch_axes(bound, comp, dynamic, resolved, the_plan, batch)
    if axes is not None or not probes or batch is None:  # every layer's arrays have a batch axis
        axes = axes or [(0, 0)] * len(probes)
        entering = [per_sample(out, a) for (_, out), (_, a) in zip(r_probes, axes, strict=True)]
        leaving = [per_sample(inp, a) for (inp, _), (a, _) in zip(r_probes, axes, strict=True)]
        r_in = np.sum([per_sample(r) for r in r_input], axis=0)
    else:  # some layer mixes samples along one axis: one backward pass per sample's target score
        leaving, entering, r_in = _per_sample_backward(vjp, ct, batch)
    return Ledger(
        layers=_describe_plan(the_plan).layers,
        entering=np.stack(entering) if probes else np.zeros((0,)),
        leaving=np.stack(leaving) if probes else np.zeros((0,)),
        output=per_sample(y * ct),
        input=r_in,
    )


def _changed_axis(before: tuple[int, ...], after: tuple[int, ...], batch: int) -> int | None:
    """The single axis whose size goes from ``batch`` to ``batch + 1`` between two traces."""
    if len(before) != len(after):
        return None
    changed = [d for d, (p, q) in enumerate(zip(before, after, strict=True)) if p != q]
    if len(changed) == 1 and (before[changed[0]], after[changed[0]]) == (batch, batch + 1):
        return changed[0]
    return None


def _probe_batch_axes(
    bound: Callable[..., Any],
    comp: C.Composite,
    dynamic: tuple[Any, ...],
    resolved: tuple[int, ...],
    the_plan: Plan,
    batch: int,
) -> list[tuple[int, int]] | None:
    """The batch axis of every layer's input and output: the axis whose size follows the batch
    when the function is traced again with ``batch + 1`` samples.  ``None`` when some array has no
    such axis (e.g. the batch merged with another axis by a reshape) or the second trace fails."""

    def grow(leaf: Any) -> Any:
        shape = np.shape(leaf)
        if shape and shape[0] == batch:
            return jax.ShapeDtypeStruct((batch + 1, *shape[1:]), jax.typeof(leaf).dtype)
        return leaf

    bigger = tuple(jax.tree_util.tree_map(grow, a) if i in resolved else a for i, a in enumerate(dynamic))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            other = _build_plan(bound, comp, bigger, resolved)
    except Exception:  # noqa: BLE001 - e.g. a model written for one batch size
        return None
    if len(other.layer_rules) != len(the_plan.layer_rules):
        return None
    axes: list[tuple[int, int]] = []
    for (a, _, _), (b, _, _) in zip(the_plan.layer_rules, other.layer_rules, strict=True):
        pair = tuple(
            _changed_axis(
                tuple(the_plan.analysis.avals[getattr(a, end)].shape),
                tuple(other.analysis.avals[getattr(b, end)].shape),
                batch,
            )
            for end in ("input", "output")
        )
        if None in pair:
            return None
        axes.append(cast(tuple[int, int], pair))  # the input's and the output's axis, neither None
    return axes


def _per_sample_backward(
    vjp: Callable[..., Any], ct: Any, batch: int
) -> tuple[list[Any], list[Any], np.ndarray]:
    """Per-sample totals without a batch axis: backward passes of the cotangent masked to one
    sample at a time; column ``b`` is the relevance that originates from sample ``b``'s score."""

    def totals(b: Any) -> Any:
        mask = (jnp.arange(batch) == b).reshape((batch,) + (1,) * (ct.ndim - 1))
        r_input, r_probes = vjp(jnp.where(mask, ct, jnp.zeros_like(ct)))
        return (
            [jnp.sum(inp) for inp, _ in r_probes],
            [jnp.sum(out) for _, out in r_probes],
            sum(jnp.sum(r) for r in r_input),
        )

    leaving, entering, r_in = jax.lax.map(totals, jnp.arange(batch), batch_size=min(batch, 8))
    return [np.asarray(v) for v in leaving], [np.asarray(v) for v in entering], np.asarray(r_in)
