"""Public entry points: :func:`transform`, :func:`explain`, :func:`from_nnx`."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from . import composites as C
from . import rules as R
from .graph import analyse
from .interpret import Plan, evaluate, plan
from .trace import trace

__all__ = ["explain", "from_nnx", "transform", "trace_plan"]

_CACHE_SIZE = 32


def _normalize_argnums(argnums: int | Sequence[int]) -> tuple[int, ...]:
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


def _leaf_name(path: tuple) -> str:
    parts = []
    for key in path[1:]:  # drop the argument index
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _signature(leaves: Sequence[Any]) -> tuple:
    sig = []
    for leaf in leaves:
        aval = jax.typeof(leaf)
        sig.append((tuple(aval.shape), str(aval.dtype), bool(getattr(aval, "weak_type", False))))
    return tuple(sig)


def flat_inputs(args: tuple, resolved: tuple[int, ...]) -> list[Any]:
    """The flat argument leaves, explained ones checked to be floating point, the others (weights)
    wrapped in ``stop_gradient`` so that their cotangent is zero."""
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
                leaves.append(jax.lax.stop_gradient(leaf))
    return leaves


def target_cotangent(y: Any, target: Any) -> Any:
    """``onehot(target)`` shaped like ``y``; ``target=None`` means the arg-max class per sample."""
    if not hasattr(y, "shape") or y.ndim < 1:
        raise ValueError(f"explain: fn must return an array of scores (..., classes), got {y!r}")
    if target is None:
        target = jnp.argmax(y, axis=-1)
    target = jnp.asarray(target)
    if not jnp.issubdtype(target.dtype, jnp.integer):
        raise TypeError(f"explain: target must be integer class indices, got dtype {target.dtype}")
    if target.ndim != 0 and target.shape != y.shape[:-1]:
        raise ValueError(
            f"explain: target of shape {target.shape} does not match the output of shape {y.shape}: "
            f"give one class index per sample, shape {y.shape[:-1]}, or a single index"
        )
    return jax.nn.one_hot(jnp.broadcast_to(target, y.shape[:-1]), y.shape[-1], dtype=y.dtype)


def trace_plan(fn: Callable, composite: Any, args: tuple, argnums: int | Sequence[int] = 1) -> Plan:
    """Trace ``fn(*args)`` and build its relevance plan (layers, rules, operations)."""
    comp = C.as_composite(composite) or C.Composite()
    nums = _check_argnums(_normalize_argnums(argnums), len(args))
    return _build_plan(fn, comp, args, nums)


def _build_plan(fn: Callable, composite: C.Composite, args: tuple, nums: tuple[int, ...]) -> Plan:
    with_path, _ = jax.tree_util.tree_flatten_with_path(args)
    program, out_tree = trace(fn, args)
    explained = set()
    leaf_names = {}
    for var, (path, _leaf) in zip(program.invars, with_path):
        if path[0].idx in nums:
            explained.add(var)
        else:
            leaf_names[var] = _leaf_name(path)
    analysis = analyse(program, explained, leaf_names)
    result = plan(program, analysis, composite)
    return dataclasses.replace(result, out_tree=out_tree)


def transform(
    fn: Callable, composite: C.Composite | R.Rule | None = None, *, argnums: int | Sequence[int] = 1
) -> Callable:
    """Return ``fn`` with relevance propagation as its VJP with respect to ``argnums``.

    The returned function has ``fn``'s signature and forward values (the same primitives are
    evaluated).  Its vector-Jacobian product with respect to the arguments in ``argnums`` is
    layer-wise relevance propagation: for a cotangent ``ct`` on the output ``y`` the initial
    relevance is ``y * ct``, every affine layer applies its rule from ``composite``, and
    parameter-free operations follow rules.md (ReLU: Pass; sums, average pooling: Norm; max pooling
    and structural ops: gradient).  Hence::

        f = transform(model.apply, composites.DeepTaylor(low=0., high=1.))
        R = jax.grad(lambda x: (f(variables, x) * jax.nn.one_hot(c, n)).sum())(x)

    is the heatmap of class ``c``, with ``R.sum() == f(variables, x)[:, c].sum()`` for conservative
    composites.  The VJP with respect to arguments *not* in ``argnums`` (the weights) is zero: they
    are constants of the rules.

    ``composite`` is a :class:`~jaxdtd.composites.Composite`, a single rule (that rule on every dense
    and conv layer) or ``None`` (``fn`` itself: the plain gradient).  ``argnums`` is an int or a
    tuple of ints (``argnums=0`` for a single-argument function).  The function is traced once per
    input signature and cached; it composes with ``jax.jit``, ``jax.vmap`` and ``jax.lax.scan``.
    """
    comp = C.as_composite(composite)
    nums = _normalize_argnums(argnums)
    cache: dict[tuple, tuple[Plan, Callable]] = {}

    @functools.wraps(fn)
    def relevance_fn(*args: Any) -> Any:
        resolved = _check_argnums(nums, len(args))
        if comp is None:
            return fn(*args)
        inputs = flat_inputs(args, resolved)
        key = (jax.tree_util.tree_structure(args), _signature(inputs), resolved)
        if key not in cache:
            the_plan = _build_plan(fn, comp, args, resolved)
            if len(cache) >= _CACHE_SIZE:
                cache.pop(next(iter(cache)))
            # evaluated as one jitted program: eager calls compile once instead of dispatching (and
            # compiling) every primitive; under an outer jit/vmap it simply inlines
            cache[key] = (the_plan, jax.jit(functools.partial(evaluate, the_plan)))
        the_plan, run = cache[key]
        outs = run(inputs)
        return jax.tree_util.tree_unflatten(the_plan.out_tree, outs)

    return relevance_fn


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _cached_transform(fn: Callable, composite: Any, argnums: Any) -> Callable:
    return transform(fn, composite, argnums=argnums)


def explain(
    fn: Callable,
    *args: Any,
    target: Any = None,
    composite: C.Composite | R.Rule | None = None,
    argnums: int | Sequence[int] = 1,
) -> tuple[Any, Any]:
    """Relevance of ``target`` and the output: ``(R, fn(*args))``.

    ``target`` is a class index, an integer array with one index per sample (shape ``y.shape[:-1]``),
    or ``None`` for the arg-max class of each sample.  The initial relevance is ``y * onehot(target)``,
    so ``R`` sums to ``y[..., target]`` per sample for conservative composites.  ``R`` has the
    structure of ``args[argnums]`` (a tuple when ``argnums`` is a tuple).  Pure and jit-able::

        R, logits = jax.jit(lambda v, x: explain(model.apply, v, x, composite=c))(variables, x)
    """
    nums = _check_argnums(_normalize_argnums(argnums), len(args))
    try:
        f = _cached_transform(fn, composite, argnums)
    except TypeError:  # unhashable function or composite
        f = transform(fn, composite, argnums=argnums)

    def call(*explained: Any) -> Any:
        full = list(args)
        for n, value in zip(nums, explained):
            full[n] = value
        return f(*full)

    y, vjp = jax.vjp(call, *(args[n] for n in nums))
    relevance = vjp(target_cotangent(y, target))
    return (relevance[0] if isinstance(argnums, int) else relevance), y


def from_nnx(module: Any) -> tuple[Callable, Any]:
    """Split a Flax NNX module into ``(apply_fn, state)`` with ``apply_fn(state, *inputs) = module(*inputs)``.

    Use it as ``f = transform(apply_fn, composite)`` and ``f(state, x)``; the module itself is not
    modified.
    """
    from flax import nnx

    graphdef, state = nnx.split(module)

    def apply_fn(state: Any, *inputs: Any) -> Any:
        return nnx.merge(graphdef, state)(*inputs)

    return apply_fn, state
