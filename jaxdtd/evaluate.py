"""Evaluating explanations: region perturbation / AOPC and the parameter-randomization check.

Region perturbation (Samek, Binder, Montavon, Lapuschkin, Müller, *Evaluating the visualization of
what a deep neural network has learned*, IEEE TNNLS 2017): the image is cut into regions, the
regions are ordered by their summed relevance, and the most relevant ones are destroyed first,

    x^(0) = x,    x^(k) = g(x^(k-1), r_k),   k = 1 .. L,

where ``g`` replaces the pixels of region ``r_k`` (all channels) by a perturbation.  A good heatmap
makes the class score ``f_c(x^(k))`` fall fast, which the *area over the perturbation curve*
measures,

    AOPC = 1/(L+1) < sum_{k=0}^{L} f_c(x^(0)) - f_c(x^(k)) >_{p(x)},

to be compared with a random region order (:func:`random_baseline`).

Parameter randomization (Adebayo, Gilmer, Muelly, Goodfellow, Hardt, Kim, *Sanity Checks for
Saliency Maps*, NeurIPS 2018): an explanation that barely changes when the top layers' weights are
randomized does not explain the model.  :func:`parameter_randomization` reports the Spearman and
Pearson correlations between the original and the randomized explanations.

Everything is batched and jit-able: one ``lax.map`` (a scan) over the perturbation steps with the
region ranks precomputed per sample, no Python loop over samples or steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from .api import _check_argnums, _normalize_argnums, target_cotangent

__all__ = [
    "RandomizationResult",
    "aopc",
    "gaussian_blur",
    "parameter_randomization",
    "pearson",
    "rankdata",
    "random_baseline",
    "region_perturbation",
    "region_ranks",
    "spearman",
]

_ORDERS = ("most_relevant_first", "least_relevant_first", "random")
_PERTURBATIONS = ("uniform", "blur", "mean", "zero")


# --------------------------------------------------------------------------------------------------
# region perturbation


@functools.partial(jax.jit, static_argnames=("region", "order"))
def region_ranks(
    attribution: jax.Array,
    *,
    region: int = 1,
    order: str = "most_relevant_first",
    key: Any = None,
) -> jax.Array:
    """The perturbation step of every pixel: an integer map of shape ``(N, H, W)``.

    ``attribution`` is ``(N, H, W, C)`` (summed over channels) or ``(N, H, W)``.  The image is tiled
    into non-overlapping ``region x region`` squares (the last row/column of tiles is cut short when
    ``H`` or ``W`` is not a multiple of ``region``), numbered row-major.  Each tile's score is the sum
    of the attribution over its pixels; ``order`` ranks the tiles:

    * ``"most_relevant_first"``: by decreasing score (MoRF, Samek et al. 2017);
    * ``"least_relevant_first"``: by increasing score;
    * ``"random"``: a uniformly random permutation per sample, from ``key`` (default
      ``jax.random.key(0)``).

    Ties keep the row-major tile order.  A pixel of rank ``r`` is perturbed from step ``r + 1`` on.
    """
    a = jnp.asarray(attribution)
    if a.ndim == 4:
        a = a.sum(axis=-1)
    if a.ndim != 3:
        raise ValueError(f"region_ranks: attribution must be (N, H, W[, C]), got shape {a.shape}")
    region = int(region)
    if region < 1:
        raise ValueError(f"region must be a positive number of pixels, got {region}")
    if order not in _ORDERS:
        raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
    n, h, w = a.shape
    if order == "random":
        key = jax.random.key(0) if key is None else key
        return _pixel_ranks(jax.random.uniform(key, (n, _n_tiles(h, w, region))), h, w, region)
    scores = _tile_scores(a, region)
    return _pixel_ranks(-scores if order == "most_relevant_first" else scores, h, w, region)


def _n_tiles(h: int, w: int, region: int) -> int:
    return (-(-h // region)) * (-(-w // region))


def _tile_scores(a: jax.Array, region: int) -> jax.Array:
    """Summed attribution per tile, ``(N, H, W) -> (N, tiles)`` (row-major tiles)."""
    n, h, w = a.shape
    nh, nw = -(-h // region), -(-w // region)
    padded = jnp.pad(a, ((0, 0), (0, nh * region - h), (0, nw * region - w)))
    return padded.reshape(n, nh, region, nw, region).sum(axis=(2, 4)).reshape(n, nh * nw)


def _pixel_ranks(keys: jax.Array, h: int, w: int, region: int) -> jax.Array:
    """Tiles ranked by increasing ``keys`` ``(N, tiles)`` (stable), as a per-pixel map ``(N, H, W)``."""
    perm = jnp.argsort(keys, axis=-1, stable=True)
    tile_rank = jnp.argsort(perm, axis=-1)  # inverse permutation: tile -> position in the order
    nw = -(-w // region)
    tile_of_pixel = (np.arange(h) // region)[:, None] * nw + (np.arange(w) // region)[None, :]
    return tile_rank[:, tile_of_pixel]


@functools.partial(jax.jit, static_argnames="sigma")
def gaussian_blur(x: jax.Array, sigma: float) -> jax.Array:
    """Blur each channel of NHWC images with a separable Gaussian of standard deviation ``sigma``
    pixels (kernel radius ``ceil(3 sigma)``, edge padding so a constant image stays constant)."""
    sigma = float(sigma)
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k: np.ndarray | jax.Array = np.exp(-0.5 * (t / sigma) ** 2)
    k = jnp.asarray(k / k.sum(), x.dtype)
    c = x.shape[-1]
    padded = jnp.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    dn = ("NHWC", "HWIO", "NHWC")
    kh = jnp.broadcast_to(k[:, None, None, None], (k.size, 1, 1, c))
    kw = jnp.broadcast_to(k[None, :, None, None], (1, k.size, 1, c))
    out = jax.lax.conv_general_dilated(
        padded, kh, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c
    )
    return jax.lax.conv_general_dilated(out, kw, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c)


def _replacement(x4, perturbation, u, low, high, blur_sigma, region):
    """The image every perturbed pixel takes its value from, shape of ``x4`` (N, H, W, C)."""
    if perturbation == "zero":
        return jnp.zeros_like(x4)
    if perturbation == "mean":
        return jnp.broadcast_to(jnp.mean(x4, axis=(1, 2), keepdims=True), x4.shape)
    if perturbation == "blur":
        sigma = max(1.0, region / 2.0) if blur_sigma is None else blur_sigma
        return gaussian_blur(x4, sigma)
    lo = jnp.min(x4, axis=(1, 2, 3), keepdims=True) if low is None else jnp.asarray(low, x4.dtype)
    hi = jnp.max(x4, axis=(1, 2, 3), keepdims=True) if high is None else jnp.asarray(high, x4.dtype)
    return lo + (hi - lo) * u.astype(x4.dtype)


def _curve(
    fn: Callable,
    args: tuple,
    attribution: Any,
    target: Any,
    key: Any,
    low: Any,
    high: Any,
    *,
    nums: tuple[int, ...],
    region: int,
    steps: int | None,
    perturbation: str,
    order: str,
    repetitions: int,
    blur_sigma: float | None,
    batch_size: int | None,
) -> jax.Array:
    (n_x,) = nums
    x = args[n_x]
    if x.ndim not in (3, 4):
        raise ValueError(f"region_perturbation: the input must be NHWC (or NHW) images, got shape {x.shape}")
    x4 = x if x.ndim == 4 else x[..., None]
    n, h, w, _ = x4.shape

    def score_of(images, onehot):
        full = list(args)
        full[n_x] = images.reshape(x.shape)
        return jnp.sum(fn(*full) * onehot, axis=-1)

    y = fn(*args)
    onehot = jax.lax.stop_gradient(target_cotangent(y, target))
    if y.shape[:-1] != (n,):
        raise ValueError(f"region_perturbation: fn must return (N, classes) scores, got {y.shape}")
    n_tiles = _n_tiles(h, w, region)
    steps = n_tiles if steps is None else int(steps)
    if not 0 <= steps <= n_tiles:
        raise ValueError(f"steps must be in [0, {n_tiles}] (the number of regions), got {steps}")
    random_order = order == "random"
    if attribution is None and not random_order:
        raise ValueError(f"region_perturbation: order={order!r} needs an attribution")
    if repetitions < 1:
        raise ValueError(f"repetitions must be >= 1, got {repetitions}")
    fixed_ranks = None
    if not random_order:
        a = jnp.asarray(attribution)
        a = a.sum(axis=-1) if a.ndim == 4 else a
        if a.shape != (n, h, w):
            raise ValueError(
                f"region_perturbation: attribution of shape {jnp.shape(attribution)} does not match "
                f"the input of shape {x.shape}"
            )
        scores = _tile_scores(a, region)
        fixed_ranks = _pixel_ranks(-scores if order == "most_relevant_first" else scores, h, w, region)
    # all random numbers of a repetition (tile order keys, noise image) come from one uniform draw:
    # one random-number kernel to compile, whatever the options
    n_order = n * n_tiles if random_order else 0
    n_noise = x4.size if perturbation == "uniform" else 0
    if n_order + n_noise == 0:
        repetitions = 1  # nothing random: every repetition would give the same curve
        draws = jnp.zeros((1, 0), jnp.float32)
    else:
        key = jax.random.key(0) if key is None else key
        draws = jax.random.uniform(key, (repetitions, n_order + n_noise), jnp.float32)

    def one_repetition(u):
        if random_order:
            ranks = _pixel_ranks(u[:n_order].reshape(n, n_tiles), h, w, region)
        else:
            ranks = cast(jax.Array, fixed_ranks)  # computed above for every order but random
        noise = u[n_order:].reshape(x4.shape) if n_noise else None
        replacement = _replacement(x4, perturbation, noise, low, high, blur_sigma, region)

        def step(k):
            perturbed = jnp.where((ranks < k)[..., None], replacement, x4)
            return score_of(perturbed, onehot)

        return jax.lax.map(step, jnp.arange(steps + 1), batch_size=batch_size)

    curves = jax.lax.map(one_repetition, draws)
    return jnp.mean(curves, axis=0)


_STATIC = (
    "fn",
    "nums",
    "region",
    "steps",
    "perturbation",
    "order",
    "repetitions",
    "blur_sigma",
    "batch_size",
)
_curve_jit = jax.jit(_curve, static_argnames=_STATIC)


def region_perturbation(
    fn: Callable,
    *args: Any,
    attribution: Any = None,
    target: Any = None,
    argnums: int = 1,
    region: int = 1,
    steps: int | None = None,
    perturbation: str = "uniform",
    order: str = "most_relevant_first",
    key: Any = None,
    repetitions: int = 1,
    low: Any = None,
    high: Any = None,
    blur_sigma: float | None = None,
    batch_size: int | None = None,
) -> jax.Array:
    """The region-perturbation curve ``f_c(x^(k))``, ``k = 0 .. steps``, shape ``(steps + 1, N)``.

    ``fn(*args)`` returns ``(N, classes)`` scores and ``x = args[argnums]`` is a batch of NHWC
    images (or NHW).  ``attribution`` (``(N, H, W, C)`` or channel-summed ``(N, H, W)``) orders the
    regions as in :func:`region_ranks` (non-overlapping ``region x region`` tiles ranked by summed
    attribution; ``order`` is ``"most_relevant_first"``, ``"least_relevant_first"`` or ``"random"``,
    for which ``attribution`` may be ``None``).  ``x^(k)`` has the first ``k`` regions, all channels,
    replaced by the ``perturbation``:

    * ``"uniform"``: noise ``U(low, high)``, by default ``[min(x_n), max(x_n)]`` per sample (Samek et
      al.'s choice); ``low``/``high`` may be scalars or arrays broadcastable to ``(N, H, W, C)``
      (an NHW input is treated as ``C = 1``), e.g. per-channel bounds of shape ``(C,)``;
    * ``"blur"``: the Gaussian-blurred original image (:func:`gaussian_blur`, ``blur_sigma``, default
      ``max(1, region / 2)`` pixels);
    * ``"mean"``: the per-channel mean of the original image;
    * ``"zero"``: zeros.

    The replacement values are drawn once per sample (and repetition) for the whole image, so a
    region is perturbed once and stays so; since regions do not overlap this is the sequential
    process ``x^(k) = g(x^(k-1), r_k)`` of Samek et al. with ``g`` reading the original image.  The
    class ``c`` is ``target`` (``None``: the arg-max class of ``fn(*args)``), fixed for all ``k``;
    the curve is of the raw output ``fn(...)[:, c]`` (wrap ``fn`` to score probabilities instead).
    ``steps=None`` perturbs every region.  When the order or the perturbation is random, the curve is
    averaged over ``repetitions`` draws from ``key`` (default ``jax.random.key(0)``).

    Jit-compiled (``fn`` and the options static when ``fn`` is hashable); ``batch_size`` steps are
    evaluated at once with ``vmap`` (``None``: one forward pass of the batch per step, in a scan).
    """
    nums = _check_argnums(_normalize_argnums(argnums), len(args))
    if len(nums) != 1:
        raise ValueError("region_perturbation perturbs one input: argnums must be a single int")
    if perturbation not in _PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {_PERTURBATIONS}, got {perturbation!r}")
    if order not in _ORDERS:
        raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
    if int(region) < 1:
        raise ValueError(f"region must be a positive number of pixels, got {region}")
    static: dict[str, Any] = dict(
        nums=nums,
        region=int(region),
        steps=None if steps is None else int(steps),
        perturbation=perturbation,
        order=order,
        repetitions=int(repetitions),
        blur_sigma=None if blur_sigma is None else float(blur_sigma),
        batch_size=None if batch_size is None else int(batch_size),
    )
    run: Callable[..., jax.Array]
    try:
        hash(fn)
        run = _curve_jit
    except TypeError:  # an unhashable callable cannot be a static argument: run it traced eagerly
        run = _curve
    return run(
        fn=fn, args=args, attribution=attribution, target=target, key=key, low=low, high=high, **static
    )


def random_baseline(
    fn: Callable,
    *args: Any,
    target: Any = None,
    argnums: int = 1,
    region: int = 1,
    steps: int | None = None,
    perturbation: str = "uniform",
    key: Any = None,
    repetitions: int = 8,
    low: Any = None,
    high: Any = None,
    blur_sigma: float | None = None,
    batch_size: int | None = None,
) -> jax.Array:
    """The perturbation curve for a random region order, averaged over ``repetitions`` random
    orders (and noise draws): the reference a heatmap's MoRF curve must beat.  Options as in
    :func:`region_perturbation`; returns shape ``(steps + 1, N)``."""
    return region_perturbation(
        fn, *args, attribution=None, target=target, argnums=argnums, region=region, steps=steps,
        perturbation=perturbation, order="random", key=key, repetitions=repetitions, low=low,
        high=high, blur_sigma=blur_sigma, batch_size=batch_size,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames="per_sample")
def aopc(curve: jax.Array, *, per_sample: bool = False) -> jax.Array:
    """Area over the perturbation curve (Samek et al. 2017, Eq. 12),

        AOPC = 1/(L+1) sum_{k=0}^{L} ( f(x^(0)) - f(x^(k)) ),

    for ``curve`` of shape ``(L + 1, ...)`` (step first, as returned by :func:`region_perturbation`).
    Returns the mean over the batch, or the per-sample values (shape ``curve.shape[1:]``) with
    ``per_sample=True``.  Larger is better for a most-relevant-first curve."""
    curve = jnp.asarray(curve)
    per = jnp.mean(curve[:1] - curve, axis=0)
    return per if per_sample else jnp.mean(per)


# --------------------------------------------------------------------------------------------------
# rank correlations


@functools.partial(jax.jit, static_argnames="axis")
def rankdata(a: jax.Array, axis: int = -1) -> jax.Array:
    """Ranks ``1 .. n`` along ``axis``, ties get their average rank (``scipy.stats.rankdata``'s
    ``"average"`` method): ``rank(v) = (#{u < v} + #{u <= v} + 1) / 2``."""
    a = jnp.moveaxis(jnp.asarray(a), axis, -1)
    s = jnp.sort(a, axis=-1)

    def search(srt, v):
        return jnp.searchsorted(srt, v, side="left"), jnp.searchsorted(srt, v, side="right")

    left, right = jnp.vectorize(search, signature="(n),(n)->(n),(n)")(s, a)
    ranks = (left + right + 1).astype(jnp.result_type(a.dtype, jnp.float32)) / 2
    return jnp.moveaxis(ranks, -1, axis)


@jax.jit
def pearson(a: jax.Array, b: jax.Array) -> jax.Array:
    """Pearson correlation per sample: ``a`` and ``b`` are ``(N, ...)``, flattened after the first
    axis; ``cov(a, b) / (std(a) std(b))``, and 0 where either is constant."""
    a = jnp.asarray(a, jnp.float32).reshape(jnp.shape(a)[0], -1)
    b = jnp.asarray(b, jnp.float32).reshape(jnp.shape(b)[0], -1)
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    denom = jnp.sqrt(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1))
    cov = jnp.sum(a * b, axis=-1)
    return jnp.where(denom > 0, cov / jnp.where(denom > 0, denom, 1.0), 0.0)


@jax.jit
def spearman(a: jax.Array, b: jax.Array) -> jax.Array:
    """Spearman rank correlation per sample: the Pearson correlation of the (average-tie) ranks of
    ``a`` and ``b`` (``(N, ...)``, flattened after the first axis)."""
    a = jnp.asarray(a).reshape(jnp.shape(a)[0], -1)
    b = jnp.asarray(b).reshape(jnp.shape(b)[0], -1)
    return pearson(rankdata(a), rankdata(b))


# --------------------------------------------------------------------------------------------------
# parameter randomization


class RandomizationResult(NamedTuple):
    """Correlations between the original explanation and those of randomized models.

    Row ``s`` of ``spearman`` and ``pearson`` (shape ``(stages, N)``) belongs to the model with the
    layers ``layers[s]`` randomized; row 0 is the unmodified model (correlation 1 by definition)."""

    layers: tuple[tuple[str, ...], ...]
    spearman: jax.Array
    pearson: jax.Array


@functools.partial(jax.jit, static_argnames="how")
def _randomized(key: Any, subtrees: Any, how: str) -> Any:
    """Every array of ``subtrees`` randomized, from one draw of ``key`` (one random-number kernel)."""
    leaves, treedef = jax.tree_util.tree_flatten(subtrees)
    sizes = [leaf.size for leaf in leaves]
    total = max(1, sum(sizes))
    if how == "gaussian":
        draws = jax.random.normal(key, (total,), jnp.float32)
    else:
        draws = jax.random.uniform(key, (total,), jnp.float32)
    out, offset = [], 0
    for leaf, size in zip(leaves, sizes, strict=True):
        d = draws[offset : offset + size]
        offset += size
        if how == "gaussian":
            new = jnp.mean(leaf) + jnp.std(leaf) * d.reshape(leaf.shape)
        else:
            new = leaf.reshape(-1)[jnp.argsort(d)].reshape(leaf.shape)
        out.append(new.astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def parameter_randomization(
    explain_fn: Callable,
    variables: Mapping,
    x: Any,
    target: Any = None,
    *,
    layers: Sequence[str],
    key: Any = None,
    randomize: str | Callable = "gaussian",
    cascading: bool = True,
    absolute: bool = False,
) -> RandomizationResult:
    """Model-parameter randomization test (Adebayo et al. 2018).

    ``explain_fn(variables, x, target)`` returns the attribution ``(N, ...)`` or a pair
    ``(attribution, output)`` (as :func:`jaxdtd.explain` and :mod:`jaxdtd.baselines` do), e.g.
    ``lambda v, x, t: jaxdtd.explain(model.apply, v, x, target=t, composite=c)``.  ``layers`` are
    top-level names in ``variables["params"]``, ordered from the output down.  Stage ``s = 1 ..
    len(layers)`` randomizes ``layers[:s]`` (``cascading=True``: from the top, cumulatively) or only
    ``layers[s-1]`` (``cascading=False``: independent randomization); the explanation is recomputed
    for the *same* class ``target`` (``None``: the arg-max of the original output, which then must be
    returned by ``explain_fn``), and compared with the original per sample by

        Spearman rho = Pearson(rank(R), rank(R_rand)),    Pearson r = cov(R, R_rand) / (sd sd),

    of the (``absolute=True``: absolute values of the) attributions.  A correlation that stays high
    when the weights are random means the explanation does not reflect what the model learned.

    ``randomize``: ``"gaussian"`` resamples each parameter array i.i.d. from a normal with that
    array's mean and standard deviation; ``"permute"`` shuffles its entries (same distribution,
    structure destroyed); or a callable ``(key, subtree) -> subtree`` (e.g. the layer's own
    initializer), called with ``fold_in(key, j)`` for ``layers[j]``.  The new values of all listed
    layers are drawn once (default key ``jax.random.key(0)``) and reused by every stage, so the
    stages differ only in which layers are replaced.  Other collections (``batch_stats``) are left
    unchanged.  Explanations run under ``jax.jit(explain_fn)``.
    """
    if randomize not in ("gaussian", "permute") and not callable(randomize):
        raise ValueError(f"randomize must be 'gaussian', 'permute' or a callable, got {randomize!r}")
    if "params" not in variables:
        raise KeyError("parameter_randomization: variables must have a 'params' collection")
    names = tuple(layers)
    params = variables["params"]
    missing = [name for name in names if name not in params]
    if missing:
        raise KeyError(f"layers {missing} are not in variables['params'] (which has {sorted(params)})")
    key = jax.random.key(0) if key is None else key
    run = jax.jit(explain_fn)

    def attribution_of(variables, target):
        out = run(variables, x, target)
        return out if not isinstance(out, tuple) else out[0], out

    original, out = attribution_of(variables, target)
    if target is None:
        if not isinstance(out, tuple) or len(out) != 2:
            raise ValueError(
                "parameter_randomization: with target=None explain_fn must return (attribution, output) "
                "so that the randomized models are explained for the original arg-max class"
            )
        target = jnp.argmax(out[1], axis=-1)
    stages: list[tuple[str, ...]] = [()]
    for s in range(len(names)):
        stages.append(names[: s + 1] if cascading else (names[s],))

    if callable(randomize):
        new_layers = {
            name: randomize(jax.random.fold_in(key, j), params[name]) for j, name in enumerate(names)
        }
    else:
        new_layers = _randomized(key, {name: params[name] for name in names}, randomize)

    attributions = []
    for stage in stages:
        if stage:
            new_variables = dict(variables)
            new_variables["params"] = {**params, **{name: new_layers[name] for name in stage}}
            attributions.append(attribution_of(new_variables, target)[0])
        else:
            attributions.append(original)
    spearman_rho, pearson_r = _compare(original, tuple(attributions), absolute)
    return RandomizationResult(layers=tuple(stages), spearman=spearman_rho, pearson=pearson_r)


@functools.partial(jax.jit, static_argnames="absolute")
def _compare(original: jax.Array, attributions: tuple, absolute: bool) -> tuple[jax.Array, jax.Array]:
    """Spearman and Pearson correlations of every stage's attribution with the original, ``(S, N)``."""
    n = jnp.shape(original)[0]
    ref = jnp.reshape(original, (1, n, -1))
    new = jnp.stack([jnp.reshape(a, (n, -1)) for a in attributions])
    if absolute:
        ref, new = jnp.abs(ref), jnp.abs(new)
    ref = jnp.broadcast_to(ref, new.shape).reshape(-1, new.shape[-1])
    flat = new.reshape(-1, new.shape[-1])
    shape = new.shape[:2]
    return spearman(ref, flat).reshape(shape), pearson(ref, flat).reshape(shape)
