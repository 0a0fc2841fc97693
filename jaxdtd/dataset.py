"""Explaining whole datasets: sharded batches and streaming to disk.

:func:`explain` is an ordinary JAX function, so a batch sharded over a device mesh stays sharded:
``jax.jit(lambda v, x: dtd.explain(model.apply, v, x, composite=c))`` applied to an ``x`` placed with
``jax.device_put(x, NamedSharding(mesh, P("data")))`` computes each shard's relevance on its own
device and returns relevance with the same sharding (the rules act per sample; no communication).

:func:`explain_dataset` streams batches from any iterable, explains each with one compiled program
(optionally placing every batch with a sharding first), shows a progress bar and writes the relevance
into a ``.npy`` file opened as a memory map, so the dataset never has to fit in memory.

Multi-host: run the same script on every host after ``jax.distributed.initialize()``, build the
mesh over ``jax.devices()`` (all hosts), and feed each host's slice of the global batch with
``jax.make_array_from_process_local_data(sharding, local_batch)``; relevance comes back sharded the
same way (``relevance.addressable_shards`` are the host's own samples). Write per-host outputs, e.g.
``out=f"relevance-{jax.process_index()}.npy"``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import composites as C
from . import rules as R
from .api import explain

__all__ = ["explain_dataset", "sharded_explain"]


def sharded_explain(
    fn: Callable, composite: C.Composite | R.Rule | None, *, argnums: int = 1, target: Any = None
) -> Callable:
    """A jitted ``(variables, x) -> (relevance, output)`` that keeps ``x``'s sharding.

    Relevance and output are constrained to the sharding of the batch along its first axis, so a
    batch sharded over a mesh axis is explained shard by shard on the devices that hold it.
    """
    if argnums != 1:
        raise ValueError("sharded_explain explains fn(variables, x): argnums must be 1")

    def run(variables: Any, x: Any, target: Any = target) -> tuple[Any, Any]:
        return explain(fn, variables, x, target=target, composite=composite)

    return jax.jit(run)


def _progress(done: int, total: int | None, start: float, stream: Any) -> None:
    rate = done / max(time.perf_counter() - start, 1e-9)
    if total:
        width = 30
        filled = int(width * done / total)
        bar = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
    else:
        bar = f"{done}"
    stream.write(f"\rexplaining {bar} samples, {rate:.1f}/s")
    stream.flush()


def explain_dataset(
    fn: Callable,
    variables: Any,
    batches: Iterable[Any],
    *,
    composite: C.Composite | R.Rule | None,
    out: str | None = None,
    num_samples: int | None = None,
    target: Callable[[Any], Any] | None = None,
    sharding: Any = None,
    progress: bool = True,
    stream: Any = None,
) -> np.ndarray:
    """Explain every batch of ``batches`` and collect the relevance in a (memory-mapped) array.

    ``batches`` yields arrays ``x`` of shape ``(B, ...)`` or ``(x, labels)`` pairs; with pairs the
    labels are the targets, otherwise ``target(x)`` if given, else each sample's arg-max class.
    ``out`` is a ``.npy`` path: the result is written there through ``numpy.lib.format.open_memmap``
    (``num_samples`` must then be given, or ``batches`` must have a ``len`` in batches and a fixed
    batch size); without ``out`` the relevance is gathered in memory.  ``sharding`` (e.g.
    ``NamedSharding(mesh, P("data"))``) places each batch on the mesh before it is explained.
    Each distinct batch shape compiles once.
    """
    explain_fn = sharded_explain(fn, composite)
    stream = stream or sys.stderr
    result: np.ndarray | None = None
    chunks: list[np.ndarray] = []
    offset = 0
    start = time.perf_counter()
    for item in batches:
        x, labels = item if isinstance(item, tuple) else (item, None)
        x = jnp.asarray(x)
        if labels is None and target is not None:
            labels = target(x)
        if sharding is not None:
            x = jax.device_put(x, sharding)
        relevance, _ = explain_fn(variables, x, None if labels is None else jnp.asarray(labels))
        relevance = np.asarray(relevance)
        if out is not None:
            if result is None:
                total = num_samples
                if total is None:
                    try:
                        total = len(batches) * relevance.shape[0]  # type: ignore[arg-type]
                    except TypeError:
                        raise ValueError(
                            "explain_dataset: give num_samples when writing to out= from an iterator "
                            "without len()"
                        ) from None
                result = np.lib.format.open_memmap(
                    out, mode="w+", dtype=relevance.dtype, shape=(total, *relevance.shape[1:])
                )
            if offset + len(relevance) > result.shape[0]:
                raise ValueError(
                    f"explain_dataset: more samples than num_samples={result.shape[0]} "
                    f"(batch ending at sample {offset + len(relevance)})"
                )
            result[offset : offset + len(relevance)] = relevance
        else:
            chunks.append(relevance)
        offset += len(relevance)
        if progress:
            _progress(offset, num_samples or (result.shape[0] if result is not None else None), start, stream)
    if progress:
        stream.write("\n")
    if out is not None:
        if result is None:
            raise ValueError("explain_dataset: batches was empty")
        result.flush()
        return result[:offset] if offset < result.shape[0] else result
    return np.concatenate(chunks) if chunks else np.zeros((0,))
