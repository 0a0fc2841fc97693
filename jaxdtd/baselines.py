"""Gradient-based attribution baselines with the call shape of :func:`jaxdtd.explain`.

Every function here is ``method(fn, *args, target=None, argnums=1, **options) -> (attribution,
output)``: ``fn(*args)`` returns scores of shape ``(..., classes)``, ``output`` is ``fn(*args)``,
and ``attribution`` has the structure of ``args[argnums]`` (a tuple when ``argnums`` is a tuple).
The explained class score is::

    f_c(x) = fn(*args)[..., c],    c = target (or the arg-max class of ``output`` when ``None``).

The leading axes of the output, ``output.shape[:-1]``, are the batch axes: samples are explained
independently (gradients are taken of ``sum_n f_c(x_n)``, which assumes ``fn`` does not mix samples,
e.g. no training-mode BatchNorm).  All functions are pure and compose with ``jax.jit`` and
``jax.vmap``; options that change shapes or loop counts (``n_samples``, ``steps``, ``method``,
``grid``, ``iterations``, ``batch_size``) must be Python values, the rest may be traced.

Methods (Montavon et al., *Explaining NonLinear Classification Decisions with Deep Taylor
Decomposition*, Pattern Recognition 2017, compare deep Taylor decomposition to sensitivity analysis
and to the simple Taylor decomposition):

* :func:`sensitivity`: ``R_i = (d f_c / d x_i)^2`` (sensitivity analysis);
* :func:`gradient`: ``R_i = d f_c / d x_i`` (Simonyan et al. 2014);
* :func:`gradient_x_input`: ``R_i = x_i * d f_c / d x_i``;
* :func:`smoothgrad`: ``R_i = mean_s d f_c / d x_i (x + eps_s)`` (Smilkov et al. 2017);
* :func:`integrated_gradients`: ``R_i = (x_i - x'_i) int_0^1 d f_c / d x_i (x' + a (x - x')) da``
  (Sundararajan et al. 2017);
* :func:`simple_taylor`: ``R_i = (x_i - x0_i) * d f_c / d x_i (x0)`` with ``f_c(x0) = 0``, the root
  ``x0`` found by :func:`taylor_root` on the segment from ``x`` to the origin.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .api import _check_argnums, _normalize_argnums, target_cotangent

__all__ = [
    "gradient",
    "gradient_x_input",
    "integrated_gradients",
    "sensitivity",
    "simple_taylor",
    "smoothgrad",
    "taylor_root",
]

_tree_map = jax.tree_util.tree_map

# options that fix shapes or loop counts: compile-time constants of the jitted methods
_STATIC = frozenset({"argnums", "n_samples", "steps", "method", "grid", "iterations", "batch_size"})


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def _run_jitted(method, fn, args, dynamic, static):
    return method(fn, *args, **dynamic, **dict(static))


def _jitted(method: Callable) -> Callable:
    """``method`` compiled as one program (``fn`` and the shape options static) when ``fn`` is
    hashable, instead of dispatching every operation eagerly; under an outer ``jax.jit`` it inlines."""

    @functools.wraps(method)
    def wrapper(fn: Callable, *args: Any, **kwargs: Any) -> Any:
        static: list[tuple[str, Any]] | tuple[tuple[str, Any], ...]
        static = []
        for name in sorted(kwargs):
            if name in _STATIC:
                value = kwargs.pop(name)
                static.append((name, tuple(value) if isinstance(value, list) else value))
        static = tuple(static)
        try:
            hash((fn, static))
        except TypeError:
            return method(fn, *args, **kwargs, **dict(static))
        return _run_jitted(method, fn, args, kwargs, static)

    return wrapper


class _Scores:
    """``f_c`` as a function of the explained arguments, with the target fixed at the input.

    ``explained`` is the tuple ``(args[n] for n in argnums)``; ``onehot`` is the target's one-hot
    (held constant, so that noisy or interpolated inputs keep explaining the original class).
    """

    def __init__(self, fn: Callable, args: tuple, argnums: int | Sequence[int], target: Any):
        self.fn = fn
        self.args = args
        self.single = isinstance(argnums, int)
        self.nums = _check_argnums(_normalize_argnums(argnums), len(args))
        self.explained = tuple(args[n] for n in self.nums)
        for n, arg in zip(self.nums, self.explained, strict=True):
            for leaf in jax.tree_util.tree_leaves(arg):
                if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
                    raise TypeError(
                        f"argument {n} has a leaf of dtype {jnp.result_type(leaf)}; attributions are "
                        "defined for floating-point inputs only (cast with .astype(jnp.float32))"
                    )
        self.output = self.call(*self.explained)
        self.onehot = jax.lax.stop_gradient(target_cotangent(self.output, target))
        self.batch_shape = tuple(self.output.shape[:-1])

    def call(self, *explained: Any) -> Any:
        full = list(self.args)
        for n, value in zip(self.nums, explained, strict=True):
            full[n] = value
        return self.fn(*full)

    def score(self, *explained: Any) -> jax.Array:
        """``f_c`` per sample, shape ``batch_shape``."""
        return jnp.sum(self.call(*explained) * self.onehot, axis=-1)

    def grad(self, *explained: Any) -> tuple:
        """``d f_c / d x`` per sample, the structure of ``explained``."""
        _, vjp = jax.vjp(self.call, *explained)
        return vjp(self.onehot)

    def result(self, attribution: tuple) -> tuple[Any, Any]:
        return (attribution[0] if self.single else attribution), self.output

    def per_sample(self, value: jax.Array, leaf: jax.Array) -> jax.Array:
        """Broadcast a ``batch_shape`` array against ``leaf`` (whose leading axes are the batch)."""
        nb = len(self.batch_shape)
        if tuple(leaf.shape[:nb]) != self.batch_shape:
            raise ValueError(
                f"an explained input of shape {leaf.shape} does not start with the batch shape "
                f"{self.batch_shape} of the output {self.output.shape}; per-sample options need inputs "
                "whose leading axes are the output's batch axes"
            )
        return value.reshape(self.batch_shape + (1,) * (leaf.ndim - nb)).astype(leaf.dtype)


def _like(explained: tuple, value: Any, single: bool) -> tuple:
    """``value`` (``None`` = zeros, an array broadcast to every leaf, or a pytree like the explained
    argument(s)) as a tuple with the structure of ``explained``."""
    if value is None:
        return _tree_map(jnp.zeros_like, explained)
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(value)):
        return _tree_map(lambda x: jnp.broadcast_to(jnp.asarray(value, x.dtype), x.shape), explained)
    if single:
        value = (value,)
    # PyTreeDef comes from a compiled module without type information: mypy sees no __ne__
    if jax.tree_util.tree_structure(value) != jax.tree_util.tree_structure(explained):  # type: ignore[operator]
        raise ValueError(
            "a baseline/root must be None, one array broadcastable to every explained input, or a "
            "pytree with the structure of the explained argument(s)"
        )
    return _tree_map(lambda x, v: jnp.broadcast_to(jnp.asarray(v, x.dtype), x.shape), explained, value)


def _weighted_sum(f: Callable, points: jax.Array, weights: jax.Array, batch_size: int | None) -> Any:
    """``sum_k weights[k] * f(points[k])`` over a pytree result, evaluating ``batch_size`` points at a
    time with ``vmap`` inside a ``lax.scan`` (``None``: all at once); with a ``batch_size`` memory
    does not grow with the number of points."""
    n = points.shape[0]
    chunk = n if batch_size is None else max(1, min(int(batch_size), n))
    m = -(-n // chunk)
    pad = m * chunk - n
    points = jnp.concatenate([points, jnp.repeat(points[-1:], pad, axis=0)]).reshape(
        (m, chunk) + points.shape[1:]
    )
    weights = jnp.concatenate([weights, jnp.zeros((pad,), weights.dtype)]).reshape(m, chunk)
    shapes = jax.eval_shape(f, points[0, 0])
    init = _tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(acc, chunk_points_weights):
        p, w = chunk_points_weights
        values = jax.vmap(f)(p)
        return _tree_map(lambda a, v: a + jnp.tensordot(w.astype(v.dtype), v, axes=1), acc, values), None

    total, _ = jax.lax.scan(body, init, (points, weights))
    return total


@_jitted
def gradient(fn: Callable, *args: Any, target: Any = None, argnums: int | Sequence[int] = 1):
    """The input gradient ``R_i = d f_c / d x_i (x)`` (Simonyan et al. 2014) and ``fn(*args)``."""
    s = _Scores(fn, args, argnums, target)
    return s.result(s.grad(*s.explained))


@_jitted
def gradient_x_input(fn: Callable, *args: Any, target: Any = None, argnums: int | Sequence[int] = 1):
    """Gradient times input, ``R_i = x_i * d f_c / d x_i (x)`` (Shrikumar et al. 2016).

    For a linear ``f_c(x) = w.x + b`` this is ``w_i x_i``, which sums to ``f_c(x) - b``."""
    s = _Scores(fn, args, argnums, target)
    grads = s.grad(*s.explained)
    return s.result(_tree_map(lambda x, g: x * g, s.explained, grads))


@_jitted
def sensitivity(fn: Callable, *args: Any, target: Any = None, argnums: int | Sequence[int] = 1):
    """Sensitivity analysis, ``R_i = (d f_c / d x_i (x))^2``: non-negative, ``sum_i R_i = ||grad f_c||^2``,
    which measures how much a change of ``x_i`` changes ``f_c``, not how much ``x_i`` contributes to it
    (the contrast drawn in Montavon et al. 2017, Sec. 2)."""
    s = _Scores(fn, args, argnums, target)
    grads = s.grad(*s.explained)
    return s.result(_tree_map(jnp.square, grads))


@_jitted
def smoothgrad(
    fn: Callable,
    *args: Any,
    target: Any = None,
    argnums: int | Sequence[int] = 1,
    n_samples: int = 16,
    noise: float = 0.1,
    key: Any = None,
    batch_size: int | None = None,
):
    """SmoothGrad (Smilkov et al. 2017): the gradient averaged over noisy copies of the input,

        R_i = 1/S sum_{s=1}^{S} d f_c / d x_i (x + eps_s),   eps_s ~ N(0, sigma^2),
        sigma = noise * (max(x_n) - min(x_n))  per sample n (over all of its entries),

    with ``S = n_samples`` and the class ``c`` fixed by the noise-free input.  ``noise=0`` gives the
    gradient exactly.  ``key`` defaults to ``jax.random.key(0)`` (so the call is deterministic);
    ``batch_size`` noisy copies are evaluated at once (``None``: all ``S``), the rest in a scan.
    """
    if int(n_samples) < 1:
        raise ValueError(f"smoothgrad: n_samples must be >= 1, got {n_samples}")
    s = _Scores(fn, args, argnums, target)
    key = jax.random.key(0) if key is None else key
    nb = len(s.batch_shape)
    leaves, treedef = jax.tree_util.tree_flatten(s.explained)
    sigmas = []
    for leaf in leaves:
        axes = tuple(range(nb, leaf.ndim))
        spread = jnp.max(leaf, axis=axes) - jnp.min(leaf, axis=axes)
        sigmas.append(s.per_sample(jnp.asarray(noise, spread.dtype) * spread, leaf))

    sizes = [x.size for x in leaves]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]

    def noisy_grad(i):
        # one draw for all leaves: a single random-number kernel whatever the input's structure
        eps = jax.random.normal(jax.random.fold_in(key, i), (sum(sizes),), jnp.float32)
        noisy = [
            x + sig * eps[o : o + x.size].reshape(x.shape).astype(x.dtype)
            for x, sig, o in zip(leaves, sigmas, offsets, strict=True)
        ]
        return s.grad(*jax.tree_util.tree_unflatten(treedef, noisy))

    n = int(n_samples)
    weights = jnp.full((n,), 1.0 / n, jnp.float32)
    total = _weighted_sum(noisy_grad, jnp.arange(n), weights, batch_size)
    return s.result(total)


@_jitted
def integrated_gradients(
    fn: Callable,
    *args: Any,
    target: Any = None,
    argnums: int | Sequence[int] = 1,
    baseline: Any = None,
    steps: int = 32,
    method: str = "midpoint",
    batch_size: int | None = None,
):
    """Integrated gradients (Sundararajan et al. 2017),

        R_i = (x_i - x'_i) * int_0^1 d f_c / d x_i (x' + a (x - x')) da
            ~ (x_i - x'_i) * sum_k w_k d f_c / d x_i (x' + a_k (x - x')),

    with the baseline ``x'`` (``None``: zeros; an array broadcast to the input; or a pytree like the
    explained argument(s)) and the quadrature ``method``:

    * ``"midpoint"``: ``a_k = (k + 1/2) / steps``, ``w_k = 1 / steps``, ``k = 0 .. steps-1``;
    * ``"trapezoid"``: ``a_k = k / steps``, ``k = 0 .. steps``, ``w_k = 1 / steps`` with half weight at
      both ends.

    Completeness: ``sum_i R_i = f_c(x) - f_c(x')`` up to the quadrature error (exactly for a linear
    ``f_c``, for which ``R = w * (x - x')``).  ``batch_size`` path points are evaluated at once
    (``None``: all), the rest in a scan.
    """
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"integrated_gradients: steps must be >= 1, got {steps}")
    if method == "midpoint":
        alphas = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps
        weights = jnp.full((steps,), 1.0 / steps, jnp.float32)
    elif method == "trapezoid":
        alphas = jnp.arange(steps + 1, dtype=jnp.float32) / steps
        weights = jnp.full((steps + 1,), 1.0 / steps, jnp.float32).at[jnp.array([0, steps])].mul(0.5)
    else:
        raise ValueError(f"integrated_gradients: method must be 'midpoint' or 'trapezoid', got {method!r}")
    s = _Scores(fn, args, argnums, target)
    base = _like(s.explained, baseline, s.single)
    delta = _tree_map(lambda x, b: x - b, s.explained, base)

    def path_grad(a):
        point = _tree_map(lambda b, d: b + a.astype(d.dtype) * d, base, delta)
        return s.grad(*point)

    mean_grad = _weighted_sum(path_grad, alphas, weights, batch_size)
    return s.result(_tree_map(lambda d, g: d * g, delta, mean_grad))


@_jitted
def taylor_root(
    fn: Callable,
    *args: Any,
    target: Any = None,
    argnums: int | Sequence[int] = 1,
    grid: int = 16,
    iterations: int = 30,
) -> tuple[jax.Array, Any]:
    """The root point of :func:`simple_taylor`: ``(t, x0)`` with ``x0 = t * x`` and ``f_c(x0) = 0``.

    Per sample, ``g(t) = f_c(t x)`` is searched on the segment ``t in [0, 1]`` from ``x`` toward the
    origin for the root nearest to ``x`` (the largest ``t``):

    1. if ``g(1) = f_c(x) = 0``, ``t = 1``;
    2. otherwise ``g`` is evaluated on the grid ``t_j = j / grid``; ``j*`` is the largest ``j < grid``
       with ``g(t_j) * g(1) <= 0`` (a sign change or a zero in ``[t_j*, t_{j*+1}]``);
    3. bisection on that bracket for ``iterations`` steps (in a ``lax.fori_loop``, all samples at
       once) keeps ``g(lo) * g(1) <= 0 < g(hi) * g(1)`` and returns ``t = lo``;
    4. if there is no such ``j`` (no sign change on the grid: ``f_c`` has no root on the segment, or
       two roots within one grid cell), ``t = 0`` and ``x0 = 0``.

    ``t`` has the batch shape of the output; ``x0`` has the structure of ``args[argnums]``.  All
    explained arguments are scaled by the same ``t``.  Cost: ``grid + 1 + iterations`` forward passes.
    """
    s = _Scores(fn, args, argnums, target)
    t, root = _root(s, int(grid), int(iterations))
    return t, (root[0] if s.single else root)


def _root(s: _Scores, grid: int, iterations: int) -> tuple[jax.Array, tuple]:
    if grid < 1 or iterations < 0:
        raise ValueError(f"taylor root search: need grid >= 1 and iterations >= 0, got {grid}, {iterations}")
    leaves, treedef = jax.tree_util.tree_flatten(s.explained)

    def scaled(t):  # t: batch-shaped
        return jax.tree_util.tree_unflatten(treedef, [x * s.per_sample(t, x) for x in leaves])

    def g(t):
        return s.score(*scaled(t)).astype(jnp.float32)

    ones = jnp.ones(s.batch_shape, jnp.float32)
    ts = jnp.arange(grid + 1, dtype=jnp.float32) / grid
    values = jax.lax.map(lambda t: g(t * ones), ts)  # (grid + 1, *batch)
    sign1 = jnp.sign(values[-1])
    opposite = values[:-1] * sign1 <= 0  # (grid, *batch)
    has_root = jnp.any(opposite, axis=0)
    j = grid - 1 - jnp.argmax(opposite[::-1], axis=0)  # largest j with a sign change after it
    lo = j.astype(jnp.float32) / grid
    hi = (j + 1).astype(jnp.float32) / grid

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        left = g(mid) * sign1 <= 0
        return jnp.where(left, mid, lo), jnp.where(left, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iterations, bisect, (lo, hi))
    t = jnp.where(sign1 == 0, 1.0, jnp.where(has_root, lo, 0.0))
    return t, scaled(t)


@_jitted
def simple_taylor(
    fn: Callable,
    *args: Any,
    target: Any = None,
    argnums: int | Sequence[int] = 1,
    root: Any = None,
    grid: int = 16,
    iterations: int = 30,
):
    """Simple Taylor decomposition (Montavon et al. 2017, Sec. 3): the first-order terms of the
    Taylor expansion of ``f_c`` at a root point ``x0``,

        R_i = (x_i - x0_i) * d f_c / d x_i (x0),   f_c(x0) = 0,

    so that ``sum_i R_i = f_c(x) - (second and higher order terms)``, exactly ``f_c(x)`` for a
    linear (or piecewise linear, on one linear piece) ``f_c``.

    ``root=None`` searches the root nearest to ``x`` on the segment ``x0 = t x, t in [0, 1]`` (see
    :func:`taylor_root` for the grid + bisection search and its options ``grid`` and
    ``iterations``); where ``f_c`` has no root on the segment it falls back to ``t = 0``, i.e.
    ``x0 = 0`` and ``R_i = x_i * d f_c / d x_i (0)`` (which then sums to ``f_c(x) - f_c(0)`` for a
    linear ``f_c``, not to ``f_c(x)``).  ``root`` may also be given: an array broadcast to the input
    or a pytree like the explained argument(s) (``root=0.`` is the Taylor expansion at the origin).
    """
    s = _Scores(fn, args, argnums, target)
    if root is None:
        _, x0 = _root(s, int(grid), int(iterations))
    else:
        x0 = _like(s.explained, root, s.single)
    grads = s.grad(*x0)
    return s.result(_tree_map(lambda x, r, g: (x - r) * g, s.explained, x0, grads))
