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
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import composites as C
from . import rules as R
from .api import _build_plan, _check_argnums, _normalize_argnums, flat_inputs, target_cotangent
from .interpret import Plan, evaluate

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
        lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths))]
        lines.append("-+-".join("-" * w for w in widths))
        lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        if self.operations:
            ops = ", ".join(f"{name} x{count}: {rule}" for name, rule, count in self.operations)
            lines.append(f"operations on the data: {ops}")
        return "\n".join(lines)


def _rule_name(rule: R.Rule | None) -> str:
    return "Gradient()" if rule is None else repr(rule)


def _plan(fn: Callable, args: tuple, composite: Any, argnums: Any) -> tuple[Plan, tuple[int, ...]]:
    comp = C.as_composite(composite) or C.Composite()
    resolved = _check_argnums(_normalize_argnums(argnums), len(args))
    flat_inputs(args, resolved)  # the same input checks as transform
    return _build_plan(fn, comp, args, resolved), resolved


def describe(
    fn: Callable, *args: Any, composite: C.Composite | R.Rule | None = None, argnums: int | Sequence[int] = 1
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
    counts = Counter(
        (step.equation.name, type(step.rule).__name__) for step in the_plan.steps if step.kind == "operation"
    )
    operations = tuple((name, rule, n) for (name, rule), n in counts.items())
    return Description(tuple(rows), operations)


@dataclasses.dataclass(frozen=True)
class Ledger:
    """Relevance totals per layer and sample, from :func:`ledger`.

    ``entering[k]`` is the relevance arriving at layer ``k``'s output, ``leaving[k]`` what its rule
    hands to its input, both summed over all but the batch axis (shape ``(batch,)``).
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
        return self.entering - self.leaving

    def __str__(self) -> str:
        lines = [f"initial relevance f_c(x): {np.array2string(self.output, precision=5)}"]
        lines.append(
            f"{'#':>3}  {'module path':<28} {'rule':<34} {'entering':>12} {'leaving':>12} {'absorbed':>10}"
        )
        for row, e, lv in zip(self.layers, self.entering, self.leaving):
            absorbed = (e.sum() - lv.sum()) / (abs(e.sum()) + 1e-30)
            lines.append(
                f"{row.index:>3}  {row.module_path[-28:]:<28} {row.rule[:34]:<34} "
                f"{e.sum():>12.5g} {lv.sum():>12.5g} {absorbed:>9.2%}"
            )
        lines.append(f"input relevance: {np.array2string(self.input, precision=5)}")
        return "\n".join(lines)


def ledger(
    fn: Callable,
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
    leaves = flat_inputs(args, resolved)
    offset = sum(len(jax.tree_util.tree_leaves(a)) for a in args[: resolved[0]])
    count = len(jax.tree_util.tree_leaves(args[resolved[0]]))
    avals = the_plan.analysis.avals
    probes = [
        (
            jnp.zeros(avals[layer.input].shape, avals[layer.input].dtype),
            jnp.zeros(avals[layer.output].shape, avals[layer.output].dtype),
        )
        for layer, _, _ in the_plan.layer_rules
    ]

    def run(explained, probes):
        full = list(leaves)
        full[offset : offset + count] = explained
        outs = evaluate(the_plan, full, probes)
        return jax.tree_util.tree_unflatten(the_plan.out_tree, outs)

    explained = leaves[offset : offset + count]
    y, vjp = jax.vjp(jax.jit(run), explained, probes)
    ct = target_cotangent(y, target)
    r_input, r_probes = vjp(ct)

    def per_sample(a):
        a = jnp.asarray(a)
        return np.asarray(a.reshape(a.shape[0], -1).sum(1) if a.ndim > 1 else a)

    return Ledger(
        layers=_describe_plan(the_plan).layers,
        entering=np.stack([per_sample(out) for _, out in r_probes]) if probes else np.zeros((0,)),
        leaving=np.stack([per_sample(inp) for inp, _ in r_probes]) if probes else np.zeros((0,)),
        output=per_sample(y * ct),
        input=np.sum([per_sample(r) for r in r_input], axis=0),
    )
