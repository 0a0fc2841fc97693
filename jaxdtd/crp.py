"""Concept relevance propagation (CRP; Achtibat et al., "From attribution maps to human-understandable
explanations through Concept Relevance Propagation", Nature Machine Intelligence 2023).

A *concept* is a channel of a layer (the last axis of its output: a conv filter, a dense neuron, a
hidden feature of a transformer).  Relevance propagation already distributes the relevance of a
prediction over every value of the network; CRP reads it out per concept and *conditions* the
backward pass on concepts:

* the relevance of concept ``c`` of layer ``l`` is ``R_c = sum_p R_(p, c)``, the relevance arriving
  at the layer's output summed over positions ``p`` (:func:`concept_relevance`; with ``abs_norm``
  divided by ``sum_c |R_c| + 1e-10`` per sample, as zennit-crp);
* a *condition* ``{"y": [k], "*/Conv_3": [c1, c2]}`` starts relevance at the output with
  ``R = f(x) * onehot(k)`` and, on the way back, multiplies the relevance arriving at the output of
  ``*/Conv_3`` by the mask ``theta`` that is 1 on channels ``c1, c2`` and 0 elsewhere:
  ``R_(p, c) <- R_(p, c) theta_c``.  The input relevance then is the *conditional heatmap* of those
  concepts: the part of the explanation that flows through them.  The masks are linear in the
  relevance, so the heatmaps of all the channels of a layer sum to the unconditional heatmap.
  Several layers in one condition apply all their masks.  A channel's entry may also name one
  position ``{c: n}`` (``n`` the flat index over the layer's positions, ``n = h * W + w`` for an
  ``(H, W, C)`` output): the relevance of that single neuron (zennit-crp's ``mask_rf``).
* with ``start="*/Conv_3"`` the relevance starts at that layer instead of at the output: from its
  activation, ``R = a * theta`` (the concept's reference heatmap on a sample).

:func:`attribute` evaluates many conditions at once (``vmap`` over their masks; the forward pass runs
once), :func:`top_concepts` ranks the concepts of a sample, and :func:`concept_atlas` streams a
dataset to find, for each concept, the samples that maximise its relevance (RelMax) and its
activation (ActMax), with :meth:`ConceptAtlas.reference_heatmaps` and :func:`crop_box` to show them.
Everything matches zennit-crp 0.6.0 number for number (``tests/test_crp.py``), with these documented
differences: the channel axis is the last one; a condition without ``"y"`` explains the predicted
class; the relevance recorded at a conditioned layer is the masked relevance once (zennit-crp's
default ``exclude_parallel=True`` returns it twice).

The masks act on one full backward pass, as zennit-crp's ``exclude_parallel=False``.  In a network
whose layers all lie on one path (the tested case) that is also its default.  Where a conditioned
layer has a parallel branch around it (a residual block's skip connection), the relevance that flows
through the branch instead of the layer still reaches the input: zennit-crp's default
``exclude_parallel=True`` (restarting the backward pass at the conditioned layer) is not
implemented.  Conditioning on a layer every path goes through (a stage's output, EfficientNet's
``conv_head``) is unaffected.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from . import composites as C
from . import rules as R
from .api import (
    _build_plan,
    _check_argnums,
    _explained_mask,
    _holds_tracer,
    _normalize_argnums,
    _signature,
    bind_static,
    flat_inputs,
)
from .interpret import Plan, evaluate, select_values

__all__ = [
    "Attribution",
    "ConceptAtlas",
    "Ranking",
    "attribute",
    "concept_atlas",
    "concept_relevance",
    "crop_box",
    "top_concepts",
]

OUTPUT = "y"  # the condition key of the model output (zennit-crp's MODEL_OUTPUT_NAME)
ABS_NORM_EPS = 1e-10


@dataclasses.dataclass(frozen=True)
class Attribution:
    """The result of :func:`attribute` for ``K`` conditions and a batch of ``N`` samples.

    ``heatmap``: the relevance of the explained argument per condition, leading axes ``(K, N)``
    (the structure of ``args[argnums]``).  ``relevances[layer]``: the relevance arriving at the
    layer's output per condition ``(K, N, ...)``, after that layer's mask.  ``activations[layer]``:
    the layer's output ``(N, ...)`` (before its activation function).  ``output``: ``fn(*args)``
    (with ``start``: the start layer's output)."""

    heatmap: Any
    relevances: dict[str, jax.Array]
    activations: dict[str, jax.Array]
    output: Any

    def concepts(self, layer: str, abs_norm: bool = False) -> jax.Array:
        """The relevance of each concept of ``layer``, ``(K, N, channels)`` (:func:`concept_relevance`)."""
        return concept_relevance(self.relevances[layer], abs_norm=abs_norm, batch_axes=2)


jax.tree_util.register_dataclass(
    Attribution, data_fields=["heatmap", "relevances", "activations", "output"], meta_fields=[]
)


def concept_relevance(relevance: jax.Array, abs_norm: bool = False, batch_axes: int = 1) -> jax.Array:
    """``R_c = sum_p R_(p, c)``: relevance summed over every axis but the ``batch_axes`` leading ones
    and the last (the channel).  With ``abs_norm``: ``R_c / (sum_c |R_c| + 1e-10)``."""
    relevance = jnp.asarray(relevance)
    axes = tuple(range(batch_axes, relevance.ndim - 1))
    total = relevance.sum(axis=axes) if axes else relevance
    if abs_norm:
        total = total / (jnp.abs(total).sum(axis=-1, keepdims=True) + ABS_NORM_EPS)
    return total


# --- conditions -----------------------------------------------------------------------------------
def _channel_mask(entry: tuple[Any, ...], shape: tuple[int, ...], key: str) -> np.ndarray:
    """The mask of one layer's (frozen) condition entry for one sample of ``shape`` (channel last):
    ``("channels", (c, ...))``, or ``("neurons", ((c, n), ...))`` with ``n`` a flat position."""
    channels = shape[-1]
    positions = math.prod(shape[:-1])
    mask = np.zeros((positions, channels), np.float32)
    kind, items = entry
    if kind == "neurons":
        for c, n in items:
            if not isinstance(c, (int, np.integer)) or not isinstance(n, (int, np.integer)):
                raise ValueError(
                    f"condition {key!r}: neuron {{{c!r}: {n!r}}} must map a channel to a position"
                )
            if not 0 <= c < channels or not 0 <= n < positions:
                raise ValueError(
                    f"condition {key!r}: neuron {{{c}: {n}}} is outside the layer's output of shape "
                    f"{shape} ({channels} channels, {positions} positions)"
                )
            mask[n, c] = 1
    else:
        for c in items:
            if not isinstance(c, int) or not 0 <= c < channels:
                raise ValueError(
                    f"condition {key!r}: channel {c!r} is not an index of the layer's {channels} channels"
                )
            mask[:, c] = 1
    return mask.reshape(shape)


def _one_value(the_plan: Plan, pattern: str, what: str) -> tuple[str, int]:
    found = select_values(the_plan.program, the_plan.analysis.layers, [pattern], what)
    if len(found) != 1:
        raise ValueError(
            f"{what} {pattern!r} must choose one layer or module, it chooses {len(found)}: "
            f"{[name for name, _ in found]}"
        )
    return found[0]


# --- attribution ----------------------------------------------------------------------------------
def attribute(
    fn: Callable[..., Any],
    *args: Any,
    conditions: Sequence[Mapping[str, Any]],
    composite: C.Composite | R.Rule | None = None,
    record: Sequence[str] = (),
    start: str | None = None,
    argnums: int | Sequence[int] = 1,
    batch_size: int | None = None,
    paired: bool = False,
) -> Attribution:
    """Conditional relevance of ``fn(*args)`` for each of ``conditions`` (see the module docstring).

    ``conditions``: dicts ``{"y": classes, layer_pattern: channels or {channel: position}, ...}``;
    the patterns are those of taps (``"*/Conv_3"``, a module or weight path glob) and must each choose
    one layer.  ``"y"`` is an int or a list of classes (their sum is explained), or an integer array:
    one class per sample (shape ``(N,)``) or one for all (shape ``()``, also traced); without it each
    sample's arg-max class is explained.  ``record``: more layers
    whose relevance and activation to return (each pattern may choose several).  ``start``: a layer
    where relevance starts from the layer's activation instead of at the output (then no condition
    may have ``"y"``).  ``batch_size``: evaluate that many conditions at a time (``lax.map``) to bound
    memory; default all at once (``vmap``).  ``paired``: condition ``i`` applies to sample ``i`` only
    (as many conditions as samples; the result has one condition axis of length 1), e.g. each
    reference sample with its own neuron.  Pure and jit-able (the conditions are static)::

        result = crp.attribute(model.apply, variables, x, composite=c,
                               conditions=[{"y": [3], "*/Conv_1": [c]} for c in range(6)])
        result.heatmap            # (6, N, H, W, C): each channel's conditional heatmap
        result.concepts("*/Conv_1")
    """
    if not conditions:
        raise ValueError("crp.attribute: give at least one condition (e.g. [{'y': [0]}])")
    if start is not None and any(OUTPUT in cond for cond in conditions):
        raise ValueError(
            f"crp.attribute: with start={start!r} relevance starts at that layer; a condition's 'y' "
            "would have no effect (remove it)"
        )
    comp = C.as_composite(composite) or C.Composite()
    nums = _check_argnums(_normalize_argnums(argnums), len(args))
    frozen, labels = _freeze(conditions)
    keys = tuple(dict.fromkeys(key for _, entries in frozen for key, _ in entries))
    bound, dynamic, static_key = bind_static(fn, args, {}, nums)
    shapes = _condition_shapes(fn, comp, bound, dynamic, nums, keys, start, static_key)
    masks = _condition_masks(frozen, keys, shapes, paired)
    targets = tuple(y for y, _ in frozen)
    spec = _Spec(targets, keys, tuple(record), start, nums, batch_size, paired, isinstance(argnums, int))
    if _holds_tracer(comp):  # traced hyper-parameters (ZBox bounds under jit): evaluated inline
        return _attribute(bound, comp, spec, dynamic, labels, masks)
    key = (fn, comp, spec, static_key)
    program: Callable[..., Attribution] | None
    try:
        hash(key)
    except TypeError:  # an unhashable function or composite: compiled for this call only
        program = jax.jit(functools.partial(_attribute, bound, comp, spec))
    else:
        program = _PROGRAMS.get(key)
        if program is None:
            program = jax.jit(functools.partial(_attribute, bound, comp, spec))
            if len(_PROGRAMS) >= 32:
                _PROGRAMS.pop(next(iter(_PROGRAMS)))
            _PROGRAMS[key] = program
    return program(dynamic, labels, masks)


def _condition_shapes(
    fn: Callable[..., Any],
    comp: C.Composite,
    bound: Callable[..., Any],
    dynamic: tuple[Any, ...],
    nums: tuple[int, ...],
    keys: tuple[str, ...],
    start: str | None,
    static_key: Any,
) -> dict[str, tuple[int, ...]]:
    """The output shape of the layer each condition key chooses (from the plan; cached by function,
    composite, keys and input signature, so that new channel or neuron indices reuse it)."""
    if not keys:
        return {}
    leaves = jax.tree_util.tree_leaves(dynamic)
    cache_key: tuple[Any, ...] | None
    cache_key = (fn, comp, keys, start, nums, static_key, _signature(leaves))
    try:
        found = _SHAPES.get(cache_key)
    except TypeError:  # unhashable
        cache_key, found = None, None
    if found is None:
        the_plan = _build_plan(bound, comp, dynamic, nums, taps=list(keys), start=start)
        avals = the_plan.analysis.avals
        found = {key: tuple(avals[_one_value(the_plan, key, "condition")[1]].shape) for key in keys}
        if cache_key is not None:
            if len(_SHAPES) >= 64:
                _SHAPES.pop(next(iter(_SHAPES)))
            _SHAPES[cache_key] = found
    return found


def _condition_masks(
    frozen: tuple[Any, ...], keys: tuple[str, ...], shapes: dict[str, tuple[int, ...]], paired: bool
) -> dict[str, np.ndarray]:
    """Per condition key, the masks of all conditions ``(K, *sample_shape)`` (ones where a condition
    does not name the key); with ``paired`` ``(1, N, *sample_shape)``, sample ``i`` under condition
    ``i``."""
    masks = {}
    for key in keys:
        shape = shapes[key][1:]
        rows = []
        for _, entries in frozen:
            entry = dict(entries).get(key)
            rows.append(np.ones(shape, np.float32) if entry is None else _channel_mask(entry, shape, key))
        masks[key] = np.stack(rows)
    if paired:
        n_samples = next((shape[0] for shape in shapes.values()), None)
        if n_samples is not None and len(frozen) != n_samples:
            raise ValueError(
                f"crp.attribute: paired=True needs one condition per sample, got {len(frozen)} "
                f"conditions for {n_samples} samples"
            )
        masks = {key: m[None] for key, m in masks.items()}
    return masks


#: layer shapes of condition keys, by (fn, composite, keys, start, argnums, static part, signature)
_SHAPES: dict[tuple[Any, ...], dict[str, tuple[int, ...]]] = {}


# jitted attribution programs by (fn, composite, conditions, static arguments): an eager call
# compiles once per input signature instead of dispatching every primitive of the model
_PROGRAMS: dict[tuple[Any, ...], Callable[..., Attribution]] = {}


@dataclasses.dataclass(frozen=True)
class _Spec:
    targets: tuple[Any, ...]  # per condition its y (see _freeze); the masks are arguments
    keys: tuple[str, ...]  # the condition keys, in order
    record: tuple[str, ...]
    start: str | None
    nums: tuple[int, ...]
    batch_size: int | None
    paired: bool
    single: bool  # argnums was an int


def _freeze(conditions: Sequence[Mapping[str, Any]]) -> tuple[tuple[Any, ...], list[Any]]:
    """Conditions as hashable values, and the per-sample label arrays they refer to.  ``y`` becomes
    ``("argmax",)``, ``("classes", (k, ...))`` or ``("labels", i)`` (the ``i``-th array); a layer's
    entry ``("channels", (c, ...))`` or ``("neurons", ((c, n), ...))``."""
    frozen: list[tuple[tuple[Any, ...], tuple[Any, ...]]] = []
    labels: list[jax.Array] = []
    for cond in conditions:
        y: tuple[Any, ...] = ("argmax",)
        if OUTPUT in cond:
            target = cond[OUTPUT]
            if isinstance(target, (jax.Array, np.ndarray)) and np.ndim(target) <= 1:  # traced or per sample
                y = ("labels", len(labels))
                labels.append(jnp.asarray(target))
            else:
                y = ("classes", tuple(np.atleast_1d(np.asarray(target)).tolist()))
        entries = []
        for key, entry in cond.items():
            if key == OUTPUT:
                continue
            if isinstance(entry, Mapping):
                entries.append((key, ("neurons", tuple((int(c), int(n)) for c, n in entry.items()))))
            else:
                entries.append((key, ("channels", tuple(np.atleast_1d(np.asarray(entry)).tolist()))))
        frozen.append((y, tuple(entries)))
    return tuple(frozen), labels


def _output_cotangent(y_spec: tuple[Any, ...], y: jax.Array, labels: Sequence[Any]) -> jax.Array:
    """The cotangent at the output for one condition: multi-hot on its classes, one-hot on each
    sample's label, or on each sample's arg-max class."""
    classes = y.shape[-1]
    if y_spec[0] == "argmax":
        return jax.nn.one_hot(jnp.argmax(y, axis=-1), classes, dtype=y.dtype)
    if y_spec[0] == "labels":
        target = labels[y_spec[1]]
        if not jnp.issubdtype(target.dtype, jnp.integer):
            raise TypeError(f"condition 'y': per-sample classes must be integers, got {target.dtype}")
        if target.ndim == 0:  # one class (an array, possibly traced) for every sample
            target = jnp.broadcast_to(target, y.shape[:1])
        if target.shape != y.shape[:1]:
            raise ValueError(
                f"condition 'y': per-sample classes have shape {target.shape}, the batch has "
                f"{y.shape[0]} samples"
            )
        return jax.nn.one_hot(target, classes, dtype=y.dtype)
    values = list(y_spec[1])
    bad = [v for v in values if not isinstance(v, int) or not 0 <= v < classes]
    if bad:
        raise ValueError(f"condition 'y': class(es) {bad} are not in 0..{classes - 1}")
    hot = np.zeros(classes, np.float32)
    hot[values] = 1
    return jnp.broadcast_to(jnp.asarray(hot, y.dtype), y.shape)


def _attribute(
    bound: Callable[..., Any],
    comp: C.Composite,
    spec: _Spec,
    dynamic: tuple[Any, ...],
    labels: list[Any],
    masks_by_key: dict[str, Any],
) -> Attribution:
    """The traced body of :func:`attribute` (``dynamic``: the array arguments; ``masks_by_key``:
    :func:`_condition_masks`)."""
    nums, start, keys = spec.nums, spec.start, list(spec.keys)
    patterns = list(dict.fromkeys([*keys, *spec.record, *([start] if start else [])]))
    leaves = flat_inputs(dynamic, nums)
    the_plan = _build_plan(bound, comp, dynamic, nums, taps=patterns, start=start)
    avals = the_plan.analysis.avals

    condition_values = {key: _one_value(the_plan, key, "condition") for key in keys}
    masks = {v: jnp.asarray(masks_by_key[key]) for key, (_, v) in condition_values.items()}
    chosen = {
        p: select_values(the_plan.program, the_plan.analysis.layers, [p], "record") for p in spec.record
    }
    chosen.update({key: (value,) for key, value in condition_values.items()})
    names = dict.fromkeys(name for found in chosen.values() for name, _ in found)
    variable = {name: v for found in chosen.values() for name, v in found}
    aliases = {p: found[0][0] for p, found in chosen.items() if len(found) == 1 and p not in names}
    record_names = list(names)
    record_vars = [variable[name] for name in record_names]

    explained_mask = _explained_mask(dynamic, nums)
    explained = [leaf for leaf, m in zip(leaves, explained_mask, strict=True) if m]
    probes = {v: jnp.zeros(avals[v].shape, avals[v].dtype) for v in record_vars}

    def run(explained: list[Any], probes: dict[int, Any], masks: dict[int, Any]) -> tuple[Any, list[Any]]:
        values = iter(explained)
        full = [next(values) if m else leaf for leaf, m in zip(leaves, explained_mask, strict=True)]
        outs, acts = evaluate(the_plan, full, value_probes=probes, value_masks=masks, record=record_vars)
        return jax.tree_util.tree_unflatten(the_plan.out_tree, outs), acts

    y, acts = run(explained, probes, {v: jnp.ones(m.shape[1:]) for v, m in masks.items()})
    cotangents = jnp.stack(
        [
            jnp.ones_like(y) if start is not None else _output_cotangent(y_spec, y, labels)
            for y_spec in spec.targets
        ]
    )
    if spec.paired:  # row i of condition i
        cotangents = jnp.diagonal(cotangents, axis1=0, axis2=1)
        cotangents = jnp.moveaxis(cotangents, -1, 0)[None]

    def one(mask_and_cotangent: tuple[dict[int, Any], jax.Array]) -> Any:
        masks_k, ct = mask_and_cotangent
        _, vjp, _ = jax.vjp(lambda e, p: run(e, p, masks_k), explained, probes, has_aux=True)
        return vjp(ct)

    batch = (masks, cotangents)
    if spec.batch_size is None:
        r_explained, r_probes = jax.vmap(one)(batch)
    else:
        r_explained, r_probes = jax.lax.map(one, batch, batch_size=spec.batch_size)

    per_arg = iter(r_explained)
    structured = [
        jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(dynamic[n]),
            [next(per_arg) for _ in jax.tree_util.tree_leaves(dynamic[n])],
        )
        for n in nums
    ]
    heatmap = structured[0] if spec.single else tuple(structured)
    relevances = {name: r_probes[v] for name, v in zip(record_names, record_vars, strict=True)}
    activations = dict(zip(record_names, acts, strict=True))
    for pattern, name in aliases.items():  # a pattern that chose one layer also names it
        relevances[pattern], activations[pattern] = relevances[name], activations[name]
    return Attribution(heatmap=heatmap, relevances=relevances, activations=activations, output=y)


def top_concepts(
    fn: Callable[..., Any],
    *args: Any,
    layer: str,
    target: Any = None,
    composite: C.Composite | R.Rule | None = None,
    k: int = 5,
    abs_norm: bool = True,
    argnums: int | Sequence[int] = 1,
) -> tuple[jax.Array, jax.Array]:
    """The ``k`` most relevant concepts of ``layer`` for each sample's ``target`` (an int, one class per
    sample, or ``None``: the arg-max): ``(channels, relevances)``, each ``(N, k)``, largest first
    (relevance :func:`concept_relevance`, abs-normalised by default)."""
    condition = {} if target is None else {OUTPUT: target}
    result = attribute(
        fn, *args, conditions=[condition], composite=composite, record=[layer], argnums=argnums
    )
    scores = result.concepts(layer, abs_norm=abs_norm)[0]
    values, channels = jax.lax.top_k(scores, min(k, scores.shape[-1]))
    return channels, values


# --- the concept atlas ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Ranking:
    """The reference samples of every concept of one layer, best first: ``samples[i, c]`` is the
    dataset index of the ``i``-th best sample of concept ``c``, ``values[i, c]`` its score,
    ``neurons[i, c]`` the flat position of the concept's most relevant (or active) neuron in it."""

    samples: np.ndarray
    values: np.ndarray
    neurons: np.ndarray


@dataclasses.dataclass(frozen=True)
class ConceptAtlas:
    """Reference samples per concept (:func:`concept_atlas`): ``relevance[layer]`` maximises the
    concept's relevance for the sample's label (RelMax), ``activation[layer]`` its activation
    (ActMax)."""

    relevance: dict[str, Ranking]
    activation: dict[str, Ranking]
    layers: tuple[str, ...]

    def reference_heatmaps(
        self,
        fn: Callable[..., Any],
        variables: Any,
        data: Any,
        layer: str,
        concept: int,
        composite: C.Composite | R.Rule | None = None,
        mode: str = "relevance",
        count: int = 8,
        rf: bool = True,
    ) -> tuple[np.ndarray, jax.Array]:
        """``(indices, heatmaps)`` of the ``count`` best reference samples of ``concept``: each
        sample's input relevance started at ``layer`` from the concept's activation; with ``rf``
        only from its best neuron (receptive field: crop with :func:`crop_box`).  ``data`` is the
        array of the dataset's inputs, indexed by the atlas's sample indices."""
        ranking = {"relevance": self.relevance, "activation": self.activation}[mode][layer]
        indices = ranking.samples[:count, concept]
        neurons = ranking.neurons[:count, concept]
        x = jnp.asarray(np.asarray(data)[indices])
        if rf:
            conditions = [{layer: {concept: int(n)}} for n in neurons]
            result = attribute(
                fn, variables, x, conditions=conditions, composite=composite, start=layer, paired=True
            )
        else:
            result = attribute(
                fn, variables, x, conditions=[{layer: [concept]}], composite=composite, start=layer
            )
        return indices, result.heatmap[0]


def _scores(values: jax.Array, max_target: str, abs_norm: bool) -> tuple[jax.Array, jax.Array]:
    """Per sample and channel: the flat position of the largest value and the score (sum over the
    positions, or that largest value), abs-normalised over channels: zennit-crp's reference sampling."""
    flat = values.reshape(values.shape[0], -1, values.shape[-1])
    neuron = jnp.argmax(flat, axis=1)
    if max_target == "sum":
        score = flat.sum(axis=1)
    elif max_target == "max":
        score = jnp.take_along_axis(flat, neuron[:, None, :], axis=1)[:, 0]
    else:
        raise ValueError(f"max_target must be 'sum' or 'max', got {max_target!r}")
    if abs_norm:
        score = score / (jnp.abs(score).sum(axis=-1, keepdims=True) + ABS_NORM_EPS)
    return score, neuron


def _merge(
    old: Ranking | None, samples: np.ndarray, values: np.ndarray, neurons: np.ndarray, count: int
) -> Ranking:
    if old is not None:
        samples = np.concatenate([samples, old.samples])
        values = np.concatenate([values, old.values])
        neurons = np.concatenate([neurons, old.neurons])
    order = np.argsort(-values, axis=0, kind="stable")[:count]
    take: Callable[[np.ndarray], np.ndarray] = lambda a: np.take_along_axis(a, order, axis=0)  # noqa: E731
    return Ranking(samples=take(samples), values=take(values), neurons=take(neurons))


def _atlas_step(
    fn: Callable[..., Any], composite: Any, layers: tuple[str, ...], max_target: str, abs_norm: bool
) -> Callable[..., Any]:
    """The jitted per-batch step of :func:`concept_atlas`, shared between calls with the same
    arguments when they are hashable (a new closure would compile anew on every call)."""
    try:
        hash((fn, composite, layers, max_target, abs_norm))
    except TypeError:
        return _make_atlas_step(fn, composite, layers, max_target, abs_norm)
    return _cached_atlas_step(fn, composite, layers, max_target, abs_norm)


def _make_atlas_step(
    fn: Callable[..., Any], composite: Any, layers: tuple[str, ...], max_target: str, abs_norm: bool
) -> Callable[..., Any]:
    @jax.jit
    def step(variables: Any, x: Any, labels: Any) -> dict[str, Any]:
        result = attribute(
            fn, variables, x, conditions=[{OUTPUT: labels}], composite=composite, record=layers
        )
        return {
            layer: (
                _scores(result.relevances[layer][0], max_target, abs_norm),
                _scores(result.activations[layer], max_target, abs_norm),
            )
            for layer in layers
        }

    return step


_cached_atlas_step = functools.lru_cache(maxsize=16)(_make_atlas_step)


def concept_atlas(
    fn: Callable[..., Any],
    variables: Any,
    data: Iterable[tuple[Any, Any]],
    layers: Sequence[str],
    composite: C.Composite | R.Rule | None = None,
    count: int = 40,
    max_target: str = "sum",
    abs_norm: bool = True,
    progress: bool = True,
) -> ConceptAtlas:
    """Stream a dataset and keep, for every concept of ``layers``, the ``count`` samples that maximise
    its relevance (RelMax) and its activation (ActMax), as zennit-crp's ``FeatureVisualization``.

    ``data`` yields ``(x, labels)`` batches (any iterable; the samples are numbered in order).  For
    each batch one jitted step explains each sample's *label* (``{"y": labels}``) and reads, per
    layer, the relevance arriving at its output and the output itself.  A concept's score on a sample
    is the sum over positions (``max_target="sum"``) or the largest value (``"max"``), divided by the
    sum of the absolute scores of the layer's concepts (``abs_norm``, zennit-crp's default); the
    position of the largest value is kept as the concept's neuron in that sample.  ``progress`` shows
    a ``tqdm`` bar."""
    from tqdm import tqdm

    layers = tuple(layers)
    step = _atlas_step(fn, composite, layers, max_target, abs_norm)
    relevance: dict[str, Ranking] = {}
    activation: dict[str, Ranking] = {}
    offset, size = 0, None
    total = len(cast(Sized, data)) if hasattr(data, "__len__") else None
    for x, labels in tqdm(data, total=total, disable=not progress, desc="concept atlas"):
        x, labels = np.asarray(x), np.asarray(labels)
        n = len(labels)
        size = n if size is None else size
        if n < size:  # a short last batch: padded to the batch size, so that the step compiles once
            x = np.concatenate([x, np.repeat(x[-1:], size - n, axis=0)])
            labels = np.concatenate([labels, np.repeat(labels[-1:], size - n)])
        out = jax.device_get(step(variables, x, labels))
        index = np.arange(offset, offset + n)[:, None]
        for layer in layers:
            (r_score, r_neuron), (a_score, a_neuron) = out[layer]
            idx = np.broadcast_to(index, r_score[:n].shape)
            relevance[layer] = _merge(relevance.get(layer), idx, r_score[:n], r_neuron[:n], count)
            activation[layer] = _merge(activation.get(layer), idx, a_score[:n], a_neuron[:n], count)
        offset += n
    return ConceptAtlas(relevance=relevance, activation=activation, layers=layers)


def crop_box(heatmap: Any, threshold: float = 0.1) -> tuple[int, int, int, int]:
    """The bounding box ``(top, bottom, left, right)`` (exclusive ends) of the pixels whose absolute
    relevance is at least ``threshold`` times the largest (a receptive-field heatmap's region; the
    whole image when it is all zero).  ``heatmap`` is ``(H, W)`` or ``(H, W, C)`` (summed over C)."""
    h = np.abs(np.asarray(heatmap, np.float64))
    if h.ndim == 3:
        h = h.sum(-1)
    peak = h.max(initial=0.0)
    if peak == 0:
        return 0, h.shape[0], 0, h.shape[1]
    rows, cols = np.nonzero(h >= threshold * peak)
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
