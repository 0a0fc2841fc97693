"""Explaining what a causal language model generates: greedy decoding and, for every generated
token at once, the relevance of each earlier token (a generated-token x context-token matrix).

A causal LM maps token embeddings ``E`` ``(1, T, D)`` to logits ``y`` ``(1, T, V)``; the logit
``y[t, v]`` scores token ``v`` as the one following position ``t``.  Decoding greedily from a prompt
of ``P`` tokens appends ``w_P = argmax_v y[P-1, v]``, then ``w_{P+1}``, ... (:func:`generate`).  The
explanation of generated token ``w_k`` (``k >= P``) is the relevance of the embeddings for the logit
that chose it,

    R^(k) = LRP( y[k-1, w_k] ),   r^(k)_t = sum_d R^(k)[t, d]      (t < k),

with the relevance started at the explained logit alone (``y[k-1, w_k]`` times a one-hot cotangent,
as :func:`jaxdtd.explain` does).  Causality makes positions ``t >= k`` receive exactly zero (the
masked attention weights are 0, so are their relevances), so one forward pass over the whole
sequence serves every row: :func:`explain_generation` runs the relevance forward once
(``jax.vjp`` of :func:`jaxdtd.transform`) and ``vmap``-s the relevance backward over the ``K``
one-hot cotangents, ``R = vmap(vjp_fn)(onehots)``.  Row ``k`` equals the explanation of the
truncated sequence ``w_0 .. w_{k-1}`` (tested), so the matrix ``r[k, :P]`` is the
generated-token x prompt-token relevance and ``r[k, P:k]`` what earlier generated tokens
contributed.  AttnLRP and CP-LRP are not conservative: ``sum_t r^(k)_t`` is reported next to
``y[k-1, w_k]`` as a diagnostic, not asserted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import composites as C
from .api import transform

__all__ = ["GenerationExplanation", "explain_generation", "explain_tokens", "generate"]


def _as_ids(ids: Any, where: str) -> np.ndarray:
    array = np.asarray(ids)
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"{where}: expected the token ids of one sequence, shape (T,) or (1, T), got {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{where}: token ids must be integers, got dtype {array.dtype}")
    return array.astype(np.int32)


def generate(
    logits_fn: Callable[[Any, jax.Array], jax.Array],
    variables: Any,
    prompt_ids: Any,
    max_new_tokens: int,
    *,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
) -> np.ndarray:
    """Greedy decoding: the prompt followed by up to ``max_new_tokens`` tokens, ``w_k = argmax_v
    y[k-1, v]``, stopping after a token in ``stop_ids``.  Returns int32 ids ``(P + n,)``.

    ``logits_fn(variables, ids)`` maps ids ``(1, T)`` to logits ``(1, T, V)`` (e.g. ``model.apply``)
    and must be causal.  The sequence is decoded in one fixed buffer of ``P + max_new_tokens``
    positions (the positions not yet decoded hold ``pad_id``; causality keeps them from changing
    earlier logits), so the jitted forward compiles once; there is no key/value cache: every step
    reruns the whole buffer, which is what a few tokens of a small model need.

    Raises:
        ValueError: ids not one integer sequence, or ``max_new_tokens < 1``.
    """
    prompt = _as_ids(prompt_ids, "generate")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    length = prompt.size
    buffer = np.full(length + max_new_tokens, pad_id, np.int32)
    buffer[:length] = prompt
    next_token = jax.jit(lambda v, ids, t: jnp.argmax(logits_fn(v, ids[None])[0, t]))
    stops = {int(s) for s in stop_ids}
    for position in range(length, length + max_new_tokens):
        token = int(next_token(variables, jnp.asarray(buffer), position - 1))
        buffer[position] = token
        if token in stops:
            return buffer[: position + 1]
    return buffer


def explain_tokens(
    fn: Callable[[Any, jax.Array], jax.Array],
    variables: Any,
    embeddings: Any,
    positions: Any,
    targets: Any,
    composite: C.Composite | None = None,
    *,
    batch_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Relevance of ``embeddings`` ``(1, T, D)`` for each logit ``y[positions[k], targets[k]]``, all
    ``K`` at once: ``(R, logits)`` with ``R`` ``(K, T, D)`` and ``logits`` ``(K,)``.

    ``fn(variables, E)`` maps embeddings ``(1, T, D)`` to logits ``(1, T, V)`` (for
    :class:`~jaxdtd.models.llama.Llama`: ``lambda v, E: model.apply(v, E,
    method=Llama.from_embeddings)``).  One relevance forward (``jax.vjp`` of ``transform(fn,
    composite)``, default :class:`~jaxdtd.composites.AttnLRP`) and the backward ``vmap``-ped over the
    one-hot cotangents ``e_k = onehot(positions[k], targets[k])``: ``R_k = vjp(e_k)``, which starts
    the relevance at ``e_k * y``, the logit's value (the transformed function's VJP is relevance
    propagation from ``cotangent * output``).  ``batch_size`` bounds how many backward passes run
    at once (``jax.lax.map``), for long sequences; ``None`` runs all ``K`` together.  Pure and
    jit-able (``positions`` and ``targets`` may be traced).

    Raises:
        ValueError: ``embeddings`` not ``(1, T, D)``, or ``positions`` / ``targets`` not the same
            ``(K,)`` integer shape.
    """
    E = jnp.asarray(embeddings)
    if E.ndim != 3 or E.shape[0] != 1:
        raise ValueError(f"explain_tokens: embeddings must have shape (1, T, D), got {E.shape}")
    positions = jnp.asarray(positions)
    targets = jnp.asarray(targets)
    if positions.ndim != 1 or positions.shape != targets.shape:
        raise ValueError(
            f"explain_tokens: positions {positions.shape} and targets {targets.shape} "
            "must be the same (K,) shape"
        )
    for name, value in (("positions", positions), ("targets", targets)):
        if not jnp.issubdtype(value.dtype, jnp.integer):
            raise ValueError(f"explain_tokens: {name} must be integers, got dtype {value.dtype}")
    explained = transform(fn, C.AttnLRP() if composite is None else composite)
    y, vjp = jax.vjp(lambda e: explained(variables, e), E)
    picked = y[0, positions, targets]

    def backward(k: jax.Array) -> jax.Array:
        cotangent = jnp.zeros_like(y).at[0, positions[k], targets[k]].set(1)
        return vjp(cotangent)[0][0]

    index = jnp.arange(positions.shape[0])
    if batch_size is None:
        R = jax.vmap(backward)(index)
    else:
        R = jax.lax.map(backward, index, batch_size=batch_size)
    return R, picked


@dataclasses.dataclass(frozen=True)
class GenerationExplanation:
    """The explanation of a generated continuation (:func:`explain_generation`).

    * ``ids`` ``(T,)``: the prompt (``prompt_length`` tokens) and the ``K = T - prompt_length``
      generated tokens;
    * ``relevance`` ``(K, T)``: row ``k`` is the relevance of every token for generated token
      ``prompt_length + k`` (summed over the embedding axis); zero from its own position on;
    * ``logits`` ``(K,)``: the explained logits ``y[p-1, ids[p]]``;
    * ``embedding_relevance`` ``(K, T, D)`` or ``None``: the relevance before the sum, when asked for.
    """

    ids: np.ndarray
    prompt_length: int
    relevance: np.ndarray
    logits: np.ndarray
    embedding_relevance: np.ndarray | None = None

    @property
    def generated(self) -> np.ndarray:
        """The generated ids ``(K,)``."""
        return self.ids[self.prompt_length :]

    @property
    def matrix(self) -> np.ndarray:
        """Generated-token x prompt-token relevance ``(K, prompt_length)``."""
        return self.relevance[:, : self.prompt_length]

    @property
    def prompt_share(self) -> np.ndarray:
        """``sum_{t < P} r[k, t] / sum_t r[k, t]`` per generated token (NaN where the total is 0)."""
        total = self.relevance.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total != 0, self.matrix.sum(axis=1) / total, np.nan)


def explain_generation(
    fn: Callable[[Any, jax.Array], jax.Array],
    variables: Any,
    embeddings: Any,
    ids: Any,
    prompt_length: int,
    composite: C.Composite | None = None,
    *,
    batch_size: int | None = None,
    keep_embedding_relevance: bool = False,
) -> GenerationExplanation:
    """Explain every generated token of ``ids`` (the prompt's ``prompt_length`` tokens, then the
    generated ones) at once: row ``k`` explains ``ids[P + k]`` by the logit ``y[P + k - 1, ids[P + k]]``
    (:func:`explain_tokens` with those positions and targets, jitted).

    ``fn(variables, E)``: embeddings ``(1, T, D)`` -> logits ``(1, T, V)``; ``embeddings``: those of
    ``ids`` (``(1, T, D)`` or ``(T, D)``).  Each call jits and compiles anew (a new ``fn`` each time is
    the usual case); to explain many sequences of one length, ``jax.jit`` :func:`explain_tokens`
    once and call it with their positions and targets.

    Raises:
        ValueError: ``prompt_length`` not in ``1 .. T - 1`` (nothing generated to explain), or the
            embeddings do not have ``T`` positions.
    """
    sequence = _as_ids(ids, "explain_generation")
    total = sequence.size
    if not isinstance(prompt_length, (int, np.integer)) or not 1 <= prompt_length < total:
        raise ValueError(
            f"explain_generation: prompt_length must be in 1..{total - 1} for {total} ids "
            f"(at least one generated token), got {prompt_length!r}"
        )
    E = jnp.asarray(embeddings)
    if E.ndim == 2:
        E = E[None]
    if E.ndim != 3 or E.shape[:2] != (1, total):
        raise ValueError(
            f"explain_generation: embeddings of shape {tuple(E.shape)} do not fit {total} ids "
            f"(expected (1, {total}, D))"
        )
    positions = np.arange(prompt_length - 1, total - 1, dtype=np.int32)
    targets = sequence[prompt_length:]
    run = jax.jit(lambda v, e, p, t: explain_tokens(fn, v, e, p, t, composite, batch_size=batch_size))
    R, logits = run(variables, E, positions, targets)
    R = np.asarray(R)
    return GenerationExplanation(
        ids=sequence,
        prompt_length=int(prompt_length),
        relevance=R.sum(axis=-1, dtype=np.float64),
        logits=np.asarray(logits, np.float64),
        embedding_relevance=R if keep_embedding_relevance else None,
    )
