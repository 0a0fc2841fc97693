"""BiLRP: explaining a similarity as relevance of feature pairs (Eberle et al., "Building and
Interpreting Deep Similarity Models", IEEE TPAMI 2022).

A similarity model scores two inputs by the dot product of their embeddings,
``s(x, x') = <phi(x), phi(x')> = sum_m phi_m(x) phi_m(x')``.  Explaining each embedding dimension
``phi_m`` with LRP gives ``R^m(x)`` (relevance of the features of ``x``, summing to ``phi_m(x)`` for a
conservative composite); BiLRP combines them into the matrix of feature pairs

    ``R_(i, i') = sum_m R^m_i(x) R^m_(i')(x')``,

so that ``sum_(i, i') R_(i, i') = sum_m phi_m(x) phi_m(x') = s(x, x')`` when every ``R^m`` is
conservative.  Features are reduced before the product (``reduce``, by default the sum over the
last axis: over colour channels for images, over the embedding dimensions for tokens), which keeps
the matrix ``(pixels, pixels)`` or ``(tokens, tokens)``.

The explanations are computed in chunks of ``chunk`` dimensions, one forward pass per input and
chunk with the backward passes of the chunk's dimensions ``vmap``-ped, inside a ``lax.scan`` that
accumulates the matrix (memory: ``chunk`` explanations at a time).  For wide embeddings,
``projection=h`` replaces ``phi`` by ``P phi`` with a random Gaussian ``P`` of shape ``(h, D)``
scaled by ``1/sqrt(h)``, so ``<P phi, P phi'>`` approximates the similarity with ``h``
explanations instead of ``D`` (the paper's random projection).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from . import composites as C
from . import rules as R
from .api import explain

__all__ = ["bilrp", "sum_last_axis"]


def sum_last_axis(relevance: jax.Array) -> jax.Array:
    """``(N, ..., C) -> (N, F)``: relevance summed over the last axis and flattened per sample."""
    summed = relevance.sum(axis=-1)
    return summed.reshape(summed.shape[0], -1)


def _explained_value(relevance: Any) -> jax.Array:
    if isinstance(relevance, dict):  # seeds: the one seeded value
        if len(relevance) != 1:
            raise ValueError(f"bilrp: seeds must choose one value, they choose {list(relevance)}")
        (relevance,) = relevance.values()
    leaves: list[jax.Array] = jax.tree_util.tree_leaves(relevance)
    if len(leaves) != 1:
        raise ValueError(f"bilrp: the explained argument must be one array, it has {len(leaves)} leaves")
    return leaves[0]


def bilrp(
    fn: Callable[..., Any],
    variables: Any,
    x: Any,
    x_prime: Any,
    composite: C.Composite | R.Rule | None = None,
    *,
    reduce: Callable[[jax.Array], jax.Array] = sum_last_axis,
    chunk: int | None = None,
    projection: int | None = None,
    key: jax.Array | None = None,
    seeds: Sequence[str] | None = None,
    extra: tuple[Any, ...] = (),
    extra_prime: tuple[Any, ...] = (),
) -> tuple[jax.Array, jax.Array]:
    """The BiLRP matrix of ``s = <phi(x), phi(x')>`` and the similarity: ``(R, s)``.

    ``fn(variables, x, *extra) -> (N, D)`` is the embedding ``phi`` (pairs are sample ``n`` of ``x``
    with sample ``n`` of ``x_prime``); ``R`` is ``(N, F, F')`` with ``F`` the reduced features of one
    sample (``reduce``, default :func:`sum_last_axis`) and ``s`` is ``(N,)``.  ``chunk``: embedding
    dimensions explained at a time (default all).  ``projection=h`` with a PRNG ``key``: explain ``h``
    random projections of ``phi`` instead of its ``D`` dimensions (``s`` is then ``<P phi, P phi'>``).
    ``seeds`` (e.g. ``["*/word_embeddings"]`` for a text model fed token ids): the relevance is
    taken at that value instead of at ``x`` (see :func:`jaxdtd.explain`); ``extra`` /
    ``extra_prime``: further arguments of ``fn`` for each side (an attention mask).
    Pure and jit-able.  Conservation: for a composite whose explanations are conservative,
    ``R.sum((1, 2)) == s``."""
    embed = fn
    if projection is not None:
        if key is None:
            raise ValueError("bilrp: projection needs a PRNG key (key=jax.random.PRNGKey(0))")
        width = jnp.shape(fn(variables, x, *extra))[-1]
        matrix = jax.random.normal(key, (width, projection)) / jnp.sqrt(projection)

        def embed(variables: Any, x: Any, *rest: Any) -> Any:
            phi = fn(variables, x, *rest)
            return phi @ matrix.astype(phi.dtype)

    phi = embed(variables, x, *extra)
    phi_prime = embed(variables, x_prime, *extra_prime)
    if phi.ndim != 2 or phi.shape != phi_prime.shape:
        raise ValueError(
            f"bilrp: fn must return embeddings (N, D) of the same shape for both inputs, got {phi.shape} "
            f"and {phi_prime.shape}"
        )
    dims = phi.shape[-1]
    size = dims if chunk is None else max(1, min(chunk, dims))
    n_chunks = -(-dims // size)
    padded = jnp.arange(n_chunks * size).reshape(n_chunks, size)

    def side(inputs: Any, rest: tuple[Any, ...], m: jax.Array) -> jax.Array:
        target = jnp.full(phi.shape[:1], jnp.minimum(m, dims - 1), jnp.int32)
        relevance, _ = explain(
            embed, variables, inputs, *rest, target=target, composite=composite, seeds=seeds
        )
        features = reduce(_explained_value(relevance))
        return jnp.where(m < dims, features, 0)  # padded dimensions contribute nothing

    def step(total: jax.Array, ms: jax.Array) -> tuple[jax.Array, None]:
        r = jax.vmap(lambda m: side(x, extra, m))(ms)  # (chunk, N, F)
        r_prime = jax.vmap(lambda m: side(x_prime, extra_prime, m))(ms)
        return total + jnp.einsum("mnf,mng->nfg", r, r_prime), None

    r0 = jax.eval_shape(lambda: side(x, extra, jnp.int32(0)))
    r0_prime = jax.eval_shape(lambda: side(x_prime, extra_prime, jnp.int32(0)))
    total = jnp.zeros(
        (phi.shape[0], r0.shape[-1], r0_prime.shape[-1]), jnp.result_type(r0.dtype, jnp.float32)
    )
    total, _ = jax.lax.scan(step, total, padded)
    return total, jnp.sum(phi * phi_prime, axis=-1)
