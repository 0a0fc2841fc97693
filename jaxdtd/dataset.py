"""Explaining whole datasets: sharded batches and streaming to disk.

:func:`explain` is an ordinary JAX function, so a batch sharded over a device mesh stays sharded:
``jax.jit(lambda v, x: dtd.explain(model.apply, v, x, composite=c))`` applied to an ``x`` placed with
``jax.device_put(x, NamedSharding(mesh, P("data")))`` computes each shard's relevance on its own
device and returns relevance with the same sharding (the rules act per sample; no communication).

:func:`explain_dataset` streams batches from any iterable, explains each with one compiled program
(optionally placing every batch with a sharding first), shows a progress bar and streams the relevance
into a ``.npy`` file, so the dataset never has to fit in memory; an interrupted run resumes where it
stopped, and the final file holds exactly the samples seen.

Multi-host: run the same script on every host after ``jax.distributed.initialize()``, build the
mesh over ``jax.devices()`` (all hosts), and feed each host's slice of the global batch with
``jax.make_array_from_process_local_data(sharding, local_batch)``; relevance comes back sharded the
same way (``relevance.addressable_shards`` are the host's own samples). Write per-host outputs, e.g.
``out=f"relevance-{jax.process_index()}.npy"``.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Callable, Iterable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from . import composites as C
from . import rules as R
from .api import explain, format_indices, nonfinite_samples, out_of_range

__all__ = ["explain_dataset", "sharded_explain"]


def sharded_explain(
    fn: Callable[..., Any], composite: C.Composite | R.Rule | None, *, argnums: int = 1, target: Any = None
) -> Callable[..., Any]:
    """A jitted ``(variables, x) -> (relevance, output)`` that keeps ``x``'s sharding.

    Relevance and output are constrained to the sharding of the batch along its first axis, so a
    batch sharded over a mesh axis is explained shard by shard on the devices that hold it.
    """
    if argnums != 1:
        raise ValueError("sharded_explain explains fn(variables, x): argnums must be 1")

    def run(variables: Any, x: Any, target: Any = target) -> tuple[Any, Any]:
        return explain(fn, variables, x, target=target, composite=composite)

    return jax.jit(run)


_NPY_MAGIC = b"\x93NUMPY\x01\x00"  # .npy format version 1.0


def _npy_header(shape: tuple[int, ...], dtype: np.dtype, size: int | None = None) -> bytes:
    """A .npy (version 1.0) header for a C-order array, padded with spaces to ``size`` bytes."""
    text = repr(
        {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    ).encode("latin1")
    if size is None:  # room for any row count: the header can be rewritten in place
        longest = len(_npy_header((2**63 - 1, *shape[1:]), dtype, 1 << 16)) - (1 << 16)
        size = -(-(len(_NPY_MAGIC) + 2 + len(text) + longest + 1) // 64) * 64
    padding = size - len(_NPY_MAGIC) - 2 - len(text) - 1
    return _NPY_MAGIC + struct.pack("<H", size - len(_NPY_MAGIC) - 2) + text + b" " * padding + b"\n"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:  # e.g. directories cannot be opened on this platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _PartialNpy:
    """A ``.npy`` file filled block by block whose header always claims only the rows on disk:
    each block's data is written and fsynced before the header is rewritten with the new count."""

    def __init__(self, path: str, row_shape: tuple[int, ...], dtype: Any, rows: int = 0) -> None:
        self.path, self.row_shape, self.dtype = path, tuple(row_shape), np.dtype(dtype)
        self.header_size = len(_npy_header((0, *self.row_shape), self.dtype))
        self.row_bytes = math.prod(self.row_shape) * self.dtype.itemsize
        exists = rows > 0
        self.file = open(path, "r+b" if exists else "w+b")  # noqa: SIM115 - closed by close()
        if exists and os.fstat(self.file.fileno()).st_size < self.header_size + rows * self.row_bytes:
            self.file.close()
            raise ValueError(
                f"explain_dataset: cannot resume: {path} holds fewer than the {rows} samples its "
                "progress file records; delete both or pass resume=False"
            )
        self.rows = rows
        self.file.truncate(self.header_size + rows * self.row_bytes)
        self._write_header()

    def _write_header(self) -> None:
        self.file.seek(0)
        self.file.write(_npy_header((self.rows, *self.row_shape), self.dtype, self.header_size))
        self.file.flush()
        os.fsync(self.file.fileno())

    def append(self, block: np.ndarray) -> None:
        self.file.seek(self.header_size + self.rows * self.row_bytes)
        self.file.write(np.ascontiguousarray(block, dtype=self.dtype).reshape(-1).view(np.uint8).data)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.rows += len(block)
        self._write_header()

    def close(self) -> None:
        self.file.close()


def _save_progress(path: str, state: dict[str, Any]) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    _fsync_dir(path)


def _load_progress(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("format") == _PROGRESS_FORMAT else None


_PROGRESS_FORMAT = "jaxdtd.explain_dataset/1"


def _check_batch(x: Any, first: int, k: int) -> None:
    """Eager check of one concrete batch before it is explained: finite inputs."""
    bad = nonfinite_samples(x)
    if bad:
        raise ValueError(
            f"explain_dataset: input has NaN or Inf in sample(s) {format_indices([first + i for i in bad])} "
            f"(batch {k}, samples {first}..{first + len(x) - 1}); their relevance would be NaN"
        )


def _check_labels(labels: Any, classes: int, first: int, k: int) -> None:
    if labels is None or isinstance(labels, jax.core.Tracer):
        return
    positions, values = out_of_range(np.asarray(labels), classes)
    if values:
        samples = [first + p if isinstance(p, int) else p for p in positions]
        raise ValueError(
            f"explain_dataset: target out of range at sample(s) {format_indices(samples)} (batch {k}): "
            f"{format_indices(values)}; the output has {classes} classes, valid targets are 0..{classes - 1}"
        )


def explain_dataset(
    fn: Callable[..., Any],
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
    resume: bool = True,
) -> np.ndarray:
    """Explain every batch of ``batches`` and collect the relevance in a (memory-mapped) array.

    ``batches`` yields arrays ``x`` of shape ``(B, ...)`` or ``(x, labels)`` pairs; with pairs the
    labels are the targets, otherwise ``target(x)`` if given, else each sample's arg-max class.
    ``sharding`` (e.g. ``NamedSharding(mesh, P("data"))``) places each batch on the mesh before it
    is explained.  Each distinct batch shape compiles once.  Each batch is checked eagerly: NaN or
    Inf in an input, or labels out of range, raise ``ValueError`` naming the samples (by their
    index in the dataset).

    Without ``out`` the relevance is gathered in memory.  ``out`` is a ``.npy`` path: the relevance
    is streamed to ``out + ".partial"`` (a ``.npy`` whose header always claims exactly the rows on
    disk), with ``out + ".progress.json"`` recording, after each batch is on disk (fsynced), the
    samples done and the batch sizes; at the end the file is renamed to ``out`` atomically and holds
    exactly the samples seen (any batch sizes, the last one may be short; ``num_samples`` is then
    only an upper bound that is checked, and the progress bar's total).  So ``out`` never exists
    half-written.  After an interruption (a killed process, an exception), the same call with
    ``resume=True`` (the default) continues where it stopped: it iterates ``batches`` again,
    skipping -- without explaining -- the batches already done (their sizes and sample shapes must
    match, else ``ValueError``), and the result equals an uninterrupted run.  ``resume=False``
    starts afresh.  Returns the array read back from ``out`` as a memory map.
    """
    explain_fn = sharded_explain(fn, composite)
    stream = stream or sys.stderr
    chunks: list[np.ndarray] = []
    offset = 0
    # the files of an interrupted run (read and written only with out)
    partial, progress_path = ("", "") if out is None else (out + ".partial", out + ".progress.json")
    state = None
    if out is not None:
        state = _load_progress(progress_path) if resume else None
        if state is not None and not os.path.exists(partial):
            state = None
        if (
            state is not None
            and num_samples is not None
            and state.get("num_samples") not in (None, num_samples)
        ):
            raise ValueError(
                f"explain_dataset: cannot resume {partial}: it was started with "
                f"num_samples={state['num_samples']}, this call has num_samples={num_samples}; delete it "
                "or pass resume=False"
            )
        if state is None:
            for stale in (partial, progress_path):
                if os.path.exists(stale):
                    os.remove(stale)
    done_batches: list[int] = list(state["batches"]) if state else []
    writer: _PartialNpy | None = None
    if state is not None:
        writer = _PartialNpy(partial, tuple(state["row_shape"]), state["dtype"], rows=int(state["done"]))
    total = num_samples
    sizes: list[int] = []
    bar = None
    try:
        for k, item in enumerate(batches):
            x, labels = item if isinstance(item, tuple) else (item, None)
            n = int(np.shape(x)[0])
            if total is None:
                try:
                    total = len(batches) * n  # type: ignore[arg-type]
                except TypeError:
                    total = None
            if k < len(done_batches):  # explained before the interruption
                resumed = cast(_PartialNpy, writer)  # opened above from the progress record
                if n != done_batches[k] or tuple(np.shape(x)[1:]) != resumed.row_shape:
                    raise ValueError(
                        f"explain_dataset: cannot resume {partial}: batch {k} has shape {np.shape(x)}, "
                        f"the interrupted run's batch {k} had {done_batches[k]} samples of shape "
                        f"{resumed.row_shape}; iterate the same batches, or pass resume=False"
                    )
                offset += n
                sizes.append(n)
                continue
            if num_samples is not None and offset + n > num_samples:
                raise ValueError(
                    f"explain_dataset: more samples than num_samples={num_samples} "
                    f"(batch ending at sample {offset + n})"
                )
            x = jnp.asarray(x)
            _check_batch(x, offset, k)
            if labels is None and target is not None:
                labels = target(x)
            if sharding is not None:
                x = jax.device_put(x, sharding)
            relevance, y = explain_fn(variables, x, None if labels is None else jnp.asarray(labels))
            _check_labels(labels, y.shape[-1], offset, k)
            relevance = np.asarray(relevance)
            if out is not None:
                if writer is None:
                    writer = _PartialNpy(partial, relevance.shape[1:], relevance.dtype)
                elif relevance.shape[1:] != writer.row_shape or relevance.dtype != writer.dtype:
                    raise ValueError(
                        f"explain_dataset: batch {k} gives relevance of shape {relevance.shape[1:]} and "
                        f"dtype {relevance.dtype} per sample, {partial} holds {writer.row_shape} "
                        f"{writer.dtype}; iterate the same batches, or pass resume=False"
                    )
                writer.append(relevance)
                sizes.append(n)
                _save_progress(
                    progress_path,
                    {
                        "format": _PROGRESS_FORMAT,
                        "done": writer.rows,
                        "batches": sizes,
                        "row_shape": list(writer.row_shape),
                        "dtype": writer.dtype.str,
                        "num_samples": num_samples,
                    },
                )
            else:
                chunks.append(relevance)
            offset += n
            if progress:
                if bar is None:  # the total is known once the first batch is seen
                    bar = tqdm(total=total, desc="explaining", unit="sample", file=stream, dynamic_ncols=True)
                bar.update(n)
        if out is None:
            return np.concatenate(chunks) if chunks else np.zeros((0,))
        if len(sizes) < len(done_batches):
            raise ValueError(
                f"explain_dataset: cannot resume {partial}: the interrupted run explained "
                f"{len(done_batches)} batches, batches now yields only {len(sizes)}; iterate the same "
                "batches, or pass resume=False"
            )
        if writer is None:
            raise ValueError("explain_dataset: batches was empty")
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    os.replace(partial, out)
    _fsync_dir(out)
    os.remove(progress_path)
    return np.lib.format.open_memmap(out, mode="r+")
