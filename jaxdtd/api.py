"""Public entry points: :func:`transform`, :func:`explain`, :func:`from_nnx`."""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

import jax
import jax.numpy as jnp
import numpy as np

from . import composites as C
from . import rules as R
from .graph import analyse
from .interpret import Plan, cuts_for, evaluate, plan, select_values
from .trace import Program, trace

__all__ = ["explain", "from_nnx", "transform", "trace_plan"]

_CACHE_SIZE = 32


def _normalize_argnums(argnums: int | Sequence[int]) -> tuple[int, ...]:
    nums: tuple[Any, ...]  # checked to be ints below
    try:
        nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    except TypeError:
        nums = (argnums,)
    if not nums or not all(isinstance(n, int) and not isinstance(n, bool) for n in nums):
        raise TypeError(f"argnums must be an int or a non-empty tuple of ints, got {argnums!r}")
    return nums


def _check_argnums(nums: tuple[int, ...], n_args: int) -> tuple[int, ...]:
    resolved = []
    for n in nums:
        if not -n_args <= n < n_args:
            raise ValueError(
                f"argnums={n} is out of range for a function called with {n_args} positional "
                f"argument(s); with model.apply(variables, x) the input is argnums=1"
            )
        resolved.append(n % n_args)
    return tuple(resolved)


def _leaf_name(path: tuple[Any, ...]) -> str:
    parts = []
    for key in path[1:]:  # drop the argument index
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _signature(leaves: Sequence[Any]) -> tuple[Any, ...]:
    sig = []
    for leaf in leaves:
        aval = jax.typeof(leaf)
        sig.append((tuple(aval.shape), str(aval.dtype), bool(getattr(aval, "weak_type", False))))
    return tuple(sig)


def flat_inputs(args: tuple[Any, ...], resolved: tuple[int, ...]) -> list[Any]:
    """The flat argument leaves, explained ones checked to be floating point.  The others (weights)
    are constants of the rules: :func:`jaxdtd.interpret.evaluate` gives them a zero cotangent in the
    relevance pass and keeps their true derivative for any enclosing differentiation."""
    leaves = []
    for i, arg in enumerate(args):
        for path, leaf in jax.tree_util.tree_flatten_with_path(arg)[0]:
            if i in resolved:
                dtype = jax.typeof(leaf).dtype
                if not jnp.issubdtype(dtype, jnp.inexact):
                    where = jax.tree_util.keystr(path) or "the argument itself"
                    raise TypeError(
                        f"jaxdtd.transform: explained argument {i} has {where} of dtype {dtype}; "
                        "relevance is defined for floating-point inputs only "
                        "(cast with .astype(jnp.float32))"
                    )
                leaves.append(leaf)
            else:
                leaves.append(leaf)
    return leaves


def format_indices(indices: Sequence[Any], limit: int = 10) -> str:
    """``[1, 3]``, or the first ``limit`` indices and the count when there are more."""
    indices = list(indices)
    if len(indices) <= limit:
        return str(indices)
    return f"[{', '.join(map(str, indices[:limit]))}, ...] ({len(indices)} in all)"


def out_of_range(target: np.ndarray, classes: int) -> tuple[list[Any], list[int]]:
    """The positions (sample indices; tuples for targets of rank > 1) and values of the entries of a
    concrete integer ``target`` outside ``0..classes-1``."""
    bad = (target < 0) | (target >= classes)
    if target.ndim == 0:
        return ([()] if bool(bad) else []), ([int(target)] if bool(bad) else [])
    where = np.argwhere(bad)
    positions = [int(p[0]) if target.ndim == 1 else tuple(int(i) for i in p) for p in where]
    return positions, [int(v) for v in target[bad]]


def _check_target(target: Any, y_shape: tuple[int, ...]) -> Any:
    """``target`` as an integer array of shape ``()`` or ``y_shape[:-1]``, in range when concrete."""
    batch_shape, classes = tuple(y_shape[:-1]), y_shape[-1]
    expected = (
        f"an int in 0..{classes - 1} or an integer array of shape {batch_shape} (one class index per sample)"
    )
    array: jax.Array | np.ndarray
    if isinstance(target, jax.core.Tracer):
        array = target
    else:
        try:
            array = np.asarray(target)
        except Exception:  # ragged lists and the like
            raise TypeError(f"explain: target must be {expected}, got {target!r}") from None
    if isinstance(target, (bool, np.bool_)) or not jnp.issubdtype(array.dtype, jnp.integer):
        got = (
            f"an array of dtype {array.dtype} and shape {tuple(array.shape)}"
            if hasattr(target, "dtype")
            else f"{target!r} of type {type(target).__name__}"
        )
        raise TypeError(f"explain: target must be {expected}, got {got}")
    if array.ndim != 0 and tuple(array.shape) != batch_shape:
        raise ValueError(
            f"explain: target of shape {tuple(array.shape)} does not match the output of shape "
            f"{tuple(y_shape)}: give one class index per sample, shape {batch_shape}, or a single index"
        )
    if not isinstance(array, jax.core.Tracer):
        positions, values = out_of_range(array, classes)
        if values and array.ndim == 0:
            raise ValueError(
                f"explain: target {values[0]} is out of range: the output has {classes} classes, "
                f"valid targets are 0..{classes - 1}"
            )
        if values:
            raise ValueError(
                f"explain: target out of range at sample(s) {format_indices(positions)}: "
                f"{format_indices(values)}; the output has {classes} classes, valid targets are "
                f"0..{classes - 1}"
            )
    return jnp.asarray(array)


def target_cotangent(y: Any, target: Any) -> Any:
    """``onehot(target)`` shaped like ``y``; ``target=None`` means the arg-max class per sample.

    A concrete ``target`` is checked eagerly (integer dtype, shape, range ``0..classes-1``); a traced
    one (under ``jit``) only for dtype and shape: an out-of-range traced index gives a zero
    cotangent for that sample, as :func:`jax.nn.one_hot` does."""
    if not hasattr(y, "shape") or y.ndim < 1:
        raise ValueError(f"explain: fn must return an array of scores (..., classes), got {y!r}")
    target = jnp.argmax(y, axis=-1) if target is None else _check_target(target, tuple(y.shape))
    return jax.nn.one_hot(jnp.broadcast_to(target, y.shape[:-1]), y.shape[-1], dtype=y.dtype)


def nonfinite_samples(leaf: Any) -> list[int]:
    """Indices along the leading axis of the samples of a concrete array that hold NaN or Inf
    (``[0]`` for a 0-d array that is not finite; ``[]`` for non-float or non-array leaves)."""
    try:
        array = jnp.asarray(leaf)
    except TypeError:
        return []
    if not jnp.issubdtype(array.dtype, jnp.inexact) or array.size == 0:
        return []
    finite = jnp.all(jnp.isfinite(array), axis=tuple(range(1, array.ndim)))
    return [int(i) for i in np.flatnonzero(~np.atleast_1d(np.asarray(finite)))]


def check_finite_inputs(args: tuple[Any, ...], nums: tuple[int, ...], caller: str = "explain") -> None:
    """Raise ``ValueError`` naming the samples of concrete explained inputs that hold NaN or Inf."""
    entries = [
        (n, path, leaf) for n in nums for path, leaf in jax.tree_util.tree_flatten_with_path(args[n])[0]
    ]
    for n, path, leaf in entries:
        bad = nonfinite_samples(leaf)
        if not bad:
            continue
        where = f" (argument {n}{jax.tree_util.keystr(path)})" if len(entries) > 1 else ""
        shape = np.shape(leaf)
        what = f"in sample(s) {format_indices(bad)} of {shape[0]}" if shape else "(a scalar)"
        raise ValueError(
            f"{caller}: input{where} has NaN or Inf {what}; its relevance would be NaN (clean or mask "
            "those samples first)"
        )


def _checkify_finite(args: tuple[Any, ...], nums: tuple[int, ...]) -> None:
    """``checkify.check`` that traced explained inputs are finite (reported under ``checkify``)."""
    from jax.experimental import checkify

    for n in nums:
        for leaf in jax.tree_util.tree_leaves(args[n]):
            if not jnp.issubdtype(jax.typeof(leaf).dtype, jnp.inexact) or math.prod(np.shape(leaf)) == 0:
                continue
            finite = jnp.all(jnp.isfinite(leaf), axis=tuple(range(1, jnp.ndim(leaf))))
            bad = ~jnp.reshape(finite, (-1,))
            checkify.check(
                ~jnp.any(bad),
                "explain: input has NaN or Inf in {count} sample(s), the first is sample {first}",
                count=jnp.sum(bad),
                first=jnp.argmax(bad),
            )


def warn_outside_box(the_plan: Plan, leaves: Sequence[Any], caller: str = "explain") -> None:
    """Warn when a concrete input read directly by a :class:`~jaxdtd.rules.ZBox` layer lies outside
    the rule's box ``low <= x <= high``."""
    position = {var: i for i, var in enumerate(the_plan.program.invars)}
    for layer, rule, _ in the_plan.layer_rules:
        if not isinstance(rule, R.ZBox) or layer.input not in position:
            continue
        x = leaves[position[layer.input]]
        if (
            any(isinstance(v, jax.core.Tracer) for v in (x, rule.low, rule.high))
            or math.prod(np.shape(x)) == 0
        ):
            continue
        low, high = jnp.asarray(rule.low), jnp.asarray(rule.high)
        outside, x_min, x_max = jax.device_get((jnp.any((x < low) | (x > high)), jnp.min(x), jnp.max(x)))
        if not outside:
            continue
        if low.ndim == 0 and high.ndim == 0:
            box = f"[{float(low):g}, {float(high):g}]"
        else:
            box = (
                f"of per-element bounds (low in [{float(low.min()):g}, {float(low.max()):g}], "
                f"high in [{float(high.min()):g}, {float(high.max()):g}])"
            )
        warnings.warn(
            f"{caller}: the input of layer '{layer.module_path or '<top level>'}'"
            f"{f' ({layer.param_path})' if layer.param_path else ''} lies outside the ZBox box {box}: "
            f"its values range over [{float(x_min):.6g}, {float(x_max):.6g}]; the z^B rule assumes "
            "low <= x <= high, so give the bounds of the input's actual range",
            UserWarning,
            stacklevel=3,
        )


def is_array_leaf(leaf: Any) -> bool:
    """Whether an argument leaf is data (traced) rather than static: a ``jax.Array`` (tracers
    included), an ``np.ndarray``, a NumPy scalar, a Python ``float`` or ``complex``, or an object
    with ``__jax_array__``.  Everything else (``bool``, ``int``, ``str``, functions, ...) is static."""
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, float, complex)) or hasattr(
        leaf, "__jax_array__"
    )


def _describe_position(path: tuple[Any, ...], n_positional: int) -> str:
    index = path[0].idx
    rest = jax.tree_util.keystr(path[1:])
    if index < n_positional:
        return f"argument {index}{f' at {rest}' if rest else ''}"
    return f"keyword argument {rest}"


def bind_static(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], resolved: tuple[int, ...]
) -> tuple[Callable[..., Any], tuple[Any, ...], tuple[Any, ...]]:
    """Split the call ``fn(*args, **kwargs)`` into its data and its static part.

    Returns ``(bound, dynamic, key)``: ``dynamic`` is ``args`` -- followed by the keyword arguments
    as one dict when there are any -- with every static leaf (see :func:`is_array_leaf`; leaves of
    the explained arguments ``resolved`` are never static) replaced by ``None``;
    ``bound(*dynamic)`` calls ``fn`` with the static leaves and the keywords put back; ``key``
    identifies the static part by value (tree structure, static leaves and their types)."""
    n = len(args)
    full = (*args, dict(kwargs)) if kwargs else tuple(args)
    with_path, treedef = jax.tree_util.tree_flatten_with_path(full)
    static: dict[int, Any] = {}
    key_parts = []
    for i, (path, leaf) in enumerate(with_path):
        if path[0].idx in resolved or is_array_leaf(leaf):
            continue
        try:
            hash((type(leaf), leaf))
        except TypeError:
            raise TypeError(
                f"jaxdtd.transform: {_describe_position(path, n)} is {leaf!r} of type "
                f"{type(leaf).__name__}: not an array, so it is a static value (closed over when "
                "tracing and part of the cache key), and static values must be hashable; pass it as an "
                "array or make it hashable"
            ) from None
        static[i] = leaf
        key_parts.append((i, type(leaf), leaf))
    key = (treedef, tuple(key_parts))
    if not static and not kwargs:
        return fn, full, key
    count = len(with_path)
    dynamic = jax.tree_util.tree_unflatten(
        treedef, [None if i in static else leaf for i, (_, leaf) in enumerate(with_path)]
    )

    def bound(*dynamic_args: Any) -> Any:
        values = iter(jax.tree_util.tree_leaves(dynamic_args))
        merged = jax.tree_util.tree_unflatten(
            treedef, [static[i] if i in static else next(values) for i in range(count)]
        )
        return fn(*merged[:n], **(merged[n] if kwargs else {}))

    return bound, tuple(dynamic), key


def _check_fn(fn: Any) -> None:
    linen = sys.modules.get("flax.linen")
    if linen is not None and isinstance(fn, linen.Module):
        raise TypeError(
            f"jaxdtd.transform: got the Flax linen module {type(fn).__name__} itself; pass its apply "
            "function: f = dtd.transform(model.apply, composite), called as f(variables, x)"
        )
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(fn, nnx.Module):
        raise TypeError(
            f"jaxdtd.transform: got the Flax NNX module {type(fn).__name__}; split it first: "
            "apply_fn, state = dtd.from_nnx(module); f = dtd.transform(apply_fn, composite), called as "
            "f(state, x)"
        )
    if not callable(fn):
        hint = " (it has an .apply: pass fn.apply)" if callable(getattr(fn, "apply", None)) else ""
        raise TypeError(
            f"jaxdtd.transform: fn must be a function such as model.apply, got {fn!r} of type "
            f"{type(fn).__name__}{hint}"
        )


def _holds_tracer(composite: Any) -> bool:
    """Whether a composite (or rule) holds traced hyper-parameters, e.g. ZBox bounds under jit/vmap."""
    if composite is None:
        return False
    if isinstance(composite, C.Composite):
        rules = [composite.dense, composite.conv, composite.first, composite.default]
        rules += [rule for _, rule in composite.layers] + [rule for _, rule in composite.operations]
        rules += [rule for _, rule in composite.rules]
    else:
        rules = [composite]
    return any(
        isinstance(leaf, jax.core.Tracer)
        for rule in rules
        if rule is not None
        for value in getattr(rule, "__dict__", {}).values()
        for leaf in jax.tree_util.tree_leaves(value)
    )


def _explained_mask(dynamic: tuple[Any, ...], resolved: tuple[int, ...]) -> list[bool]:
    return [path[0].idx in resolved for path, _ in jax.tree_util.tree_flatten_with_path(dynamic)[0]]


def _empty_batch_forward(
    bound: Callable[..., Any], dynamic: tuple[Any, ...], inputs: list[Any], resolved: tuple[int, ...]
) -> Any:
    """The forward of a call whose explained inputs have no elements (a batch of 0 samples).

    There is no relevance to propagate: ``fn`` itself is evaluated (weights behind
    ``stop_gradient``), so the VJP is an empty array of each input's shape.  When ``fn`` cannot
    evaluate an empty batch (e.g. ``x.reshape(x.shape[0], -1)``), the output is zeros of the shape
    its batch axis -- the axis whose size follows the batch at 1 and 2 samples -- gives at 0."""
    treedef = jax.tree_util.tree_structure(dynamic)
    call: Callable[..., Any] = lambda *leaves: bound(*jax.tree_util.tree_unflatten(treedef, leaves))
    try:
        return call(*inputs)
    except Exception as error:  # noqa: BLE001 - re-raised below when the shapes do not help
        explained = _explained_mask(dynamic, resolved)

        def at(batch: int) -> Any:
            return jax.eval_shape(
                call,
                *(
                    jax.ShapeDtypeStruct((batch, *leaf.shape[1:]), leaf.dtype)
                    if is_explained and leaf.ndim and leaf.shape[0] == 0
                    else leaf
                    for leaf, is_explained in zip(inputs, explained, strict=True)
                ),
            )

        try:
            one, two = at(1), at(2)
        except Exception:  # noqa: BLE001
            raise error from None
        outs = []
        for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(two), strict=True):
            axes = [d for d, (p, q) in enumerate(zip(a.shape, b.shape, strict=False)) if p != q]
            if (
                len(a.shape) != len(b.shape)
                or len(axes) != 1
                or (a.shape[axes[0]], b.shape[axes[0]]) != (1, 2)
            ):
                raise error from None
            shape = list(a.shape)
            shape[axes[0]] = 0
            outs.append(jnp.zeros(shape, a.dtype))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(one), outs)


def trace_plan(
    fn: Callable[..., Any], composite: Any, args: tuple[Any, ...], argnums: int | Sequence[int] = 1
) -> Plan:
    """Trace ``fn(*args)`` and build its relevance plan (layers, rules, operations).  Static
    arguments (see :func:`transform`) are closed over; the plan's inputs are the array leaves."""
    comp = C.as_composite(composite) or C.Composite()
    nums = _check_argnums(_normalize_argnums(argnums), len(args))
    bound, dynamic, _ = bind_static(fn, args, {}, nums)
    return _build_plan(bound, comp, dynamic, nums)


def _build_plan(
    fn: Callable[..., Any],
    composite: C.Composite,
    args: tuple[Any, ...],
    nums: tuple[int, ...],
    taps: Sequence[str] = (),
    seeds: Sequence[str] = (),
    start: str | None = None,
) -> Plan:
    """Trace, analyse and plan ``fn(*args)``; with ``seeds`` no argument is explained: relevance is
    delivered at the seed values (see :func:`explain`).  With ``start`` (a pattern choosing one
    value, as for taps) the program's output is that intermediate value: relevance starts there
    (concept reference heatmaps, :func:`jaxdtd.crp.attribute`)."""
    with_path, _ = jax.tree_util.tree_flatten_with_path(args)
    program, out_tree = trace(fn, args)
    if start is not None:
        program = _output_at(program, args, nums, start)
        out_tree = jax.tree_util.tree_structure(0)
    explained = set()
    leaf_names = {}
    for var, (path, _leaf) in zip(program.invars, with_path, strict=True):
        if path[0].idx in nums and not seeds:
            explained.add(var)
        else:
            leaf_names[var] = _leaf_name(path)
    seed_values = select_values(program, (), seeds, "seed") if seeds else ()
    seed_vars = frozenset(v for _, v in seed_values)
    analysis = analyse(program, explained, leaf_names, seeds=seed_vars)
    cuts = cuts_for(program, analysis, composite)  # LayerNorm's sigma, the composite's cuts
    if cuts:
        analysis = analyse(program, explained, leaf_names, cuts=cuts, seeds=seed_vars)
    tap_values = select_values(program, analysis.layers, taps, "tap") if taps else ()
    result = plan(program, analysis, composite, cuts=cuts, keep=frozenset(v for _, v in tap_values))
    result = dataclasses.replace(result, taps=tap_values, seeds=seed_values)
    layers = [layer for layer, _, _ in result.layer_rules]
    unmatched = composite.unmatched_patterns(layers)
    if unmatched:
        module_paths = list(dict.fromkeys(layer.module_path for layer in layers if layer.module_path))
        param_paths = list(dict.fromkeys(layer.param_path for layer in layers if layer.param_path))
        warnings.warn(
            f"jaxdtd: Composite.layers pattern(s) {', '.join(map(repr, unmatched))} match no layer; "
            f"the layers' module paths are {module_paths} and their weight paths {param_paths}",
            UserWarning,
            stacklevel=3,
        )
    return dataclasses.replace(result, out_tree=out_tree)


def _output_at(program: Program, args: tuple[Any, ...], nums: tuple[int, ...], pattern: str) -> Program:
    """``program`` with the one value chosen by ``pattern`` as its only output."""
    with_path, _ = jax.tree_util.tree_flatten_with_path(args)
    explained = {v for v, (path, _) in zip(program.invars, with_path, strict=True) if path[0].idx in nums}
    layers = analyse(program, explained, {}).layers
    found = select_values(program, layers, [pattern], "start")
    if len(found) != 1:
        raise ValueError(
            f"start {pattern!r} must choose one value, it chooses {len(found)}: {[name for name, _ in found]}"
        )
    ((_, v),) = found
    avals = {o: a for eqn in program.equations for o, a in zip(eqn.outvars, eqn.out_avals, strict=True)}
    aval = avals[v]
    return dataclasses.replace(program, outvars=(v,), out_avals=(aval,))


def transform(
    fn: Callable[..., Any], composite: C.Composite | R.Rule | None = None, *, argnums: int | Sequence[int] = 1
) -> Callable[..., Any]:
    """Return ``fn`` with relevance propagation as its VJP with respect to ``argnums``.

    The returned function has ``fn``'s signature and forward values (the same primitives are
    evaluated).  Its vector-Jacobian product with respect to the arguments in ``argnums`` is
    layer-wise relevance propagation: for a cotangent ``ct`` on the output ``y`` the initial
    relevance is ``y * ct``, every affine layer applies its rule from ``composite``, and
    parameter-free operations follow docs/rules.md (ReLU: Pass; sums, average pooling: Norm; max pooling
    and structural ops: gradient).  Hence::

        f = transform(model.apply, composites.DeepTaylor(low=0., high=1.))
        R = jax.grad(lambda x: (f(variables, x) * jax.nn.one_hot(c, n)).sum())(x)

    is the heatmap of class ``c``, with ``R.sum() == f(variables, x)[:, c].sum()`` for conservative
    composites.  The VJP with respect to arguments *not* in ``argnums`` (the weights) is zero: they
    are constants of the rules.  The relevance itself is a differentiable function of the weights
    and the input: ``jax.grad(lambda w: loss(R(w, x)))`` is the true derivative of the heatmap
    (second order through the rules, e.g. for explanation-guided training), see
    :func:`jaxdtd.units.constant_for_relevance`.

    ``composite`` is a :class:`~jaxdtd.composites.Composite`, a single rule (that rule on every dense
    and conv layer) or ``None`` (``fn`` itself: the plain gradient).  ``argnums`` is an int or a
    tuple of ints (``argnums=0`` for a single-argument function).  The function is traced once per
    input signature and cached; it composes with ``jax.jit``, ``jax.vmap`` and ``jax.lax.scan``.
    A composite with traced hyper-parameters (``ZBox`` bounds under ``jit`` or ``vmap``) works too.

    Arguments other than the explained ones: a leaf that is an array (``jax.Array``, tracers
    included, ``np.ndarray``, a NumPy scalar) or a Python ``float``/``complex`` is data -- traced,
    a constant of the rules, zero VJP; every other leaf (``bool``, ``int``, ``str``, functions,
    enums; ``None`` is no leaf) is *static*: closed over as ``fn`` receives it when tracing and part
    of the cache key by value, so it must be hashable.  Hence ``f(variables, x, False)`` for a
    ``train: bool`` argument works, and keyword arguments are passed through to ``fn`` under the
    same rule (``f(variables, x, train=False)``).  A batch of no samples (every explained leaf
    empty) has no relevance to propagate: ``fn`` itself gives the forward (see
    :func:`_empty_batch_forward`) and the VJP is empty.

    ``fn`` must be a function: a Flax linen module is rejected with a hint to pass ``model.apply``,
    an NNX module with a hint to :func:`from_nnx`.  ``f.plan_for(*args, **kwargs)`` returns the
    ``(plan, flat_input_leaves)`` a call would evaluate (``None`` without composite or for an empty
    batch).
    """
    _check_fn(fn)
    comp = C.as_composite(composite)
    nums = _normalize_argnums(argnums)
    # traced hyper-parameters cannot be closed over by an inner jit: evaluate inline instead
    inline = _holds_tracer(comp)
    cache: dict[tuple[Any, ...], tuple[Plan, Callable[..., Any]]] = {}

    def prepare(
        args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[int, ...], Callable[..., Any], tuple[Any, ...], tuple[Any, ...], list[Any], bool]:
        resolved = _check_argnums(nums, len(args))
        bound, dynamic, static_key = bind_static(fn, args, kwargs, resolved)
        inputs = flat_inputs(dynamic, resolved)
        explained = [leaf for leaf, e in zip(inputs, _explained_mask(dynamic, resolved), strict=True) if e]
        empty = bool(explained) and all(math.prod(np.shape(leaf)) == 0 for leaf in explained)
        return resolved, bound, dynamic, static_key, inputs, empty

    def lookup(
        resolved: tuple[int, ...],
        bound: Callable[..., Any],
        dynamic: tuple[Any, ...],
        static_key: tuple[Any, ...],
        inputs: list[Any],
    ) -> tuple[Plan, Callable[..., Any]]:
        key = (static_key, _signature(inputs), resolved)
        if key not in cache:
            # (called only with a composite: relevance_fn and plan_for return before without one)
            the_plan = _build_plan(bound, cast(C.Composite, comp), dynamic, resolved)
            if len(cache) >= _CACHE_SIZE:
                cache.pop(next(iter(cache)))
            # evaluated as one jitted program: eager calls compile once instead of dispatching (and
            # compiling) every primitive; under an outer jit/vmap it simply inlines
            run = functools.partial(evaluate, the_plan)
            cache[key] = (the_plan, run if inline else jax.jit(run))
        return cache[key]

    @functools.wraps(fn)
    def relevance_fn(*args: Any, **kwargs: Any) -> Any:
        if comp is None:
            _check_argnums(nums, len(args))
            return fn(*args, **kwargs)
        resolved, bound, dynamic, static_key, inputs, empty = prepare(args, kwargs)
        if empty:
            return _empty_batch_forward(bound, dynamic, inputs, resolved)
        the_plan, run = lookup(resolved, bound, dynamic, static_key, inputs)
        outs = run(inputs)
        return jax.tree_util.tree_unflatten(the_plan.out_tree, outs)

    def plan_for(*args: Any, **kwargs: Any) -> tuple[Plan, list[Any]] | None:
        if comp is None:
            return None
        resolved, bound, dynamic, static_key, inputs, empty = prepare(args, kwargs)
        if empty:
            return None
        return lookup(resolved, bound, dynamic, static_key, inputs)[0], inputs

    relevance_fn.plan_for = plan_for  # type: ignore[attr-defined]
    return relevance_fn


class _RelevanceFunction(Protocol):
    """What :func:`transform` returns: ``fn`` with relevance as its VJP, with a ``plan_for`` attribute."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def plan_for(self, *args: Any, **kwargs: Any) -> tuple[Plan, list[Any]] | None: ...


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _cached_transform(fn: Callable[..., Any], composite: Any, argnums: Any) -> Callable[..., Any]:
    return transform(fn, composite, argnums=argnums)


def explain(
    fn: Callable[..., Any],
    *args: Any,
    target: Any = None,
    composite: C.Composite | R.Rule | None = None,
    argnums: int | Sequence[int] = 1,
    check_finite: bool | None = None,
    taps: Sequence[str] | None = None,
    seeds: Sequence[str] | None = None,
) -> tuple[Any, ...]:
    """Relevance of ``target`` and the output: ``(R, fn(*args))``.

    ``target`` is a class index, an integer array with one index per sample (shape ``y.shape[:-1]``),
    or ``None`` for the arg-max class of each sample.  The initial relevance is ``y * onehot(target)``,
    so ``R`` sums to ``y[..., target]`` per sample for conservative composites.  ``R`` has the
    structure of ``args[argnums]`` (a tuple when ``argnums`` is a tuple).  Pure and jit-able::

        R, logits = jax.jit(lambda v, x: explain(model.apply, v, x, composite=c))(variables, x)

    Checks.  A concrete ``target`` (a Python int or a NumPy/JAX array, also under ``jit`` when it is
    not an argument of the jitted function) must be integer, of shape ``()`` or ``y.shape[:-1]``
    and in ``0..classes-1`` (``ValueError`` naming the bad values and samples).  A *traced* target
    is checked for dtype and shape only: an out-of-range traced index gives all-zero relevance for
    that sample (``jax.nn.one_hot``).  A concrete explained input (an eager call) with NaN or Inf
    raises ``ValueError`` naming the samples; a traced one gives NaN relevance for those samples
    unless ``check_finite=True``, which adds a ``jax.experimental.checkify.check`` (then wrap the
    jitted function in ``checkify.checkify``, e.g. ``err, (R, y) =
    checkify.checkify(jax.jit(f))(variables, x); err.throw()``; staged without ``checkify`` the
    check itself raises).  ``check_finite=False`` skips the eager check too.  For an eager call,
    an input read directly by a ``ZBox`` layer that lies outside the box warns (``UserWarning``).

    Taps and seeds (patterns as for :attr:`Composite.cuts`: ``"*/Conv_3"`` chooses the output of each
    matching layer, or of a matching module; ``"glob:primitive"`` the results of a primitive):

    * ``taps=[...]`` returns ``(R, y, tapped)``: ``tapped[name]`` is the relevance arriving at that
      value (the cotangent at the value, shape of the value), e.g. the relevance of every channel of
      a layer, the basis of concept relevance.  It equals what :func:`~jaxdtd.ledger` measures as
      "entering" the layer.
    * ``seeds=[...]`` starts relevance at intermediate values instead of at an argument: no argument
      is explained (they may be integers, e.g. token ids) and ``R`` is a dict ``{name: relevance at
      the seed value}``: for ``seeds=["*/Embed_0"]`` the relevance of each embedding, equal to the
      relevance of the same model fed the embeddings directly.
    """
    if taps or seeds:
        return _explain_probed(fn, args, target, composite, argnums, tuple(taps or ()), tuple(seeds or ()))
    nums = _check_argnums(_normalize_argnums(argnums), len(args))
    f = _transform_for(fn, composite, argnums)
    leaves = jax.tree_util.tree_leaves(tuple(args[n] for n in nums))
    concrete = bool(leaves) and not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves)
    if concrete:  # concrete inputs, also inside a jit of a function that closes over them
        with jax.ensure_compile_time_eval():
            if check_finite is not False:
                check_finite_inputs(args, nums)
            entry = cast(_RelevanceFunction, f).plan_for(*args)
            if entry is not None:
                warn_outside_box(*entry)
    elif check_finite:
        _checkify_finite(args, nums)

    def call(*explained: Any) -> Any:
        full = list(args)
        for n, value in zip(nums, explained, strict=True):
            full[n] = value
        return f(*full)

    y, vjp = jax.vjp(call, *(args[n] for n in nums))
    relevance = vjp(target_cotangent(y, target))
    return (relevance[0] if isinstance(argnums, int) else relevance), y


def _explain_probed(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    target: Any,
    composite: Any,
    argnums: Any,
    taps: tuple[str, ...],
    seeds: tuple[str, ...],
) -> tuple[Any, ...]:
    """:func:`explain` with taps and/or seeds: zero probes added where the chosen values are
    defined; their cotangents are the relevance arriving there."""
    comp = C.as_composite(composite) or C.Composite()
    nums = () if seeds else _check_argnums(_normalize_argnums(argnums), len(args))
    bound, dynamic, _ = bind_static(fn, args, {}, nums)
    leaves = flat_inputs(dynamic, nums)
    the_plan = _build_plan(bound, comp, dynamic, nums, taps=taps, seeds=seeds)
    mask = _explained_mask(dynamic, nums)
    explained = [leaf for leaf, m in zip(leaves, mask, strict=True) if m]
    avals = the_plan.analysis.avals
    probed = (*the_plan.seeds, *the_plan.taps)
    probes = {v: jnp.zeros(avals[v].shape, avals[v].dtype) for _, v in probed}

    def run(explained: list[Any], probes: dict[int, Any]) -> Any:
        values = iter(explained)
        full = [next(values) if m else leaf for leaf, m in zip(leaves, mask, strict=True)]
        outs = evaluate(the_plan, full, value_probes=probes)
        return jax.tree_util.tree_unflatten(the_plan.out_tree, outs)

    y, vjp = jax.vjp(run, explained, probes)
    r_explained, r_probes = vjp(target_cotangent(y, target))
    tapped = {name: r_probes[v] for name, v in the_plan.taps}
    relevance: Any  # a dict of seeds' relevance, or the explained arguments'
    if seeds:
        relevance = {name: r_probes[v] for name, v in the_plan.seeds}
    else:
        per_arg = iter(r_explained)
        structured = [
            jax.tree_util.tree_unflatten(
                jax.tree_util.tree_structure(dynamic[n]),
                [next(per_arg) for _ in jax.tree_util.tree_leaves(dynamic[n])],
            )
            for n in nums
        ]
        relevance = structured[0] if isinstance(argnums, int) else tuple(structured)
    return (relevance, y, tapped) if taps else (relevance, y)


def _transform_for(fn: Callable[..., Any], composite: Any, argnums: Any) -> Callable[..., Any]:
    """``transform(fn, composite, argnums=argnums)``, shared between calls when everything is
    hashable and the composite holds no tracer (a cached tracer would outlive its trace)."""
    try:
        hash((fn, composite, argnums))
    except TypeError:  # unhashable function, composite or argnums
        return transform(fn, composite, argnums=argnums)
    if _holds_tracer(composite):
        return transform(fn, composite, argnums=argnums)
    return _cached_transform(fn, composite, argnums)


def from_nnx(module: Any) -> tuple[Callable[..., Any], Any]:
    """Split a Flax NNX module into ``(apply_fn, state)`` with ``apply_fn(state, *inputs) = module(*inputs)``.

    Use it as ``f = transform(apply_fn, composite)`` and ``f(state, x)``; the module itself is not
    modified.
    """
    from flax import nnx

    graphdef, state = nnx.split(module)

    def apply_fn(state: Any, *inputs: Any) -> Any:
        return nnx.merge(graphdef, state)(*inputs)

    return apply_fn, state
