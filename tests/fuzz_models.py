"""Random models for ``tests/test_fuzz.py``: a small architecture language, a hypothesis strategy that
draws valid architectures from it, and two implementations of every architecture: a Flax linen module
(:class:`FuzzNet`) and a plain JAX function (:func:`jax_apply`) over an explicit parameter pytree.

An architecture (:class:`Spec`) is a per-sample input shape and a tuple of ops (:class:`Dense`,
:class:`Conv`, :class:`BatchNorm`, :class:`Act`, :class:`Pool`, :class:`Residual`, :class:`Concat`,
:class:`Flatten`, :class:`Mean`, :class:`Reshape`, :class:`Unsupported`), always ending with the
output ``Dense(classes)``.  Both implementations read the same variables (``make_variables``): the
Flax layout ``{"params": {name: {"kernel", "bias", "scale"}}, "batch_stats": {name: {"mean", "var"}}}``,
with every module named after its position in the spec (``op3``, ``op2_1_0`` for op 0 of branch 1
of the concat at position 2), so the two outputs agree to float32 rounding.

Strategies (:func:`models`) come in three vocabularies (``mode``):

* ``"general"``: everything, biases of any sign, BatchNorm with random statistics, every activation.
* ``"deep_taylor"``: where the z+ family (DeepTaylor, Flat/w^2/z^B first + z+) provably conserves
  relevance (see :func:`models`).
* ``"epsilon"``: where LRP-0 (``Epsilon(0)`` and ``Norm(0)``) provably conserves relevance.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

BN_EPSILON = 1e-5
MAX_WIDTH = 4


# ==================================================================================================
# The architecture language
# ==================================================================================================


@dataclasses.dataclass(frozen=True)
class Dense:
    """``x @ w (+ b)`` on the last axis (also of a spatial tensor: a 1x1 convolution).

    ``form`` (plain JAX only; Flax uses ``nn.Dense``): ``"matmul"`` (``x @ w``), ``"einsum"``,
    ``"dot_general"`` (``lax.dot_general``) or ``"transposed"`` (``(w.T @ x.T).T``: the data is the
    right operand and a transpose sits between the product and the bias add; vectors only).
    ``bias``: ``"none"`` (no bias), ``"any"`` (normal) or ``"nonpositive"`` (``<= 0``).
    """

    features: int
    bias: str = "any"
    form: str = "matmul"


@dataclasses.dataclass(frozen=True)
class Conv:
    """An N-D convolution (N = 1, 2, 3) over ``(batch, spatial..., channels)``.

    ``layout`` (plain JAX only): ``"last"`` (``NHWC``/``HWIO``) or ``"first"`` (transpose to
    channels-first, convolve with ``NCHW``/``OIHW`` and transpose back before the bias add).
    """

    features: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    padding: Any  # "SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL" (1-D) or ((lo, hi), ...) per axis
    dilation: tuple[int, ...]
    groups: int = 1
    bias: str = "any"
    layout: str = "last"


@dataclasses.dataclass(frozen=True)
class BatchNorm:
    """Inference-mode BatchNorm over the last axis.

    ``stats``: ``"any"`` (random running mean/var, scale of either sign, shift), ``"nonpositive"``
    (random mean/var/scale, shift chosen so that the bias folded into the layer before,
    ``shift - mean * scale / sqrt(var + eps)``, is in [-0.3, -0.02]) or ``"zero"`` (mean = shift = 0,
    random var and scale of either sign: a per-channel scaling).  ``form`` (plain JAX only):
    ``"rsqrt"`` (``(x - m) * (scale * rsqrt(v + eps)) + shift``, as Flax) or ``"div"``
    (``(x - m) / sqrt(v + eps) * scale + shift``).
    """

    stats: str = "any"
    form: str = "rsqrt"


@dataclasses.dataclass(frozen=True)
class Act:
    """``relu``, ``relu6``, ``leaky_relu`` (``slope``), ``tanh``, ``sigmoid`` or ``clip`` (``low``,
    ``high``)."""

    name: str
    slope: float = 0.01
    low: float = 0.0
    high: float = 1.0


@dataclasses.dataclass(frozen=True)
class Pool:
    """``max``, ``avg`` or ``sum`` pooling over the spatial axes (``include_pad``: the average's
    ``count_include_pad``).  ``padding``: "SAME", "VALID" or ``((lo, hi), ...)`` with every pad smaller
    than the window (no window lies in the padding alone)."""

    kind: str
    window: tuple[int, ...]
    strides: tuple[int, ...]
    padding: Any
    include_pad: bool = True


@dataclasses.dataclass(frozen=True)
class Residual:
    """``x + body(x)``; ``body`` keeps the shape."""

    body: tuple


@dataclasses.dataclass(frozen=True)
class Concat:
    """``concatenate([branch(x) for branch in branches], axis=-1)``; an empty branch is ``x`` itself."""

    branches: tuple


@dataclasses.dataclass(frozen=True)
class Flatten:
    """``x.reshape(batch, -1)``."""


@dataclasses.dataclass(frozen=True)
class Mean:
    """``jnp.mean`` over the spatial axes (global average pooling)."""


@dataclasses.dataclass(frozen=True)
class Reshape:
    """``x.reshape(batch, *shape)``."""

    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Unsupported:
    """An operation of the data that no relevance rule covers: ``sort``, ``cumsum``, ``cond``
    (data-dependent ``lax.cond``), ``loop`` (``lax.while_loop`` on a condition of the data) or ``quotient``
    (``x / (1 + sum(|x|))``, a division by a data value; products of data values have the uniform rule)."""

    name: str


#: The primitive each unsupported op is reported as.
UNSUPPORTED_PRIMITIVE = {
    "sort": "sort",
    "cumsum": "cumsum",
    "cond": "cond",
    "loop": "while",
    "quotient": "div",
}


@dataclasses.dataclass(frozen=True)
class Spec:
    """A model: per-sample input shape ``(features,)`` or ``(spatial..., channels)`` and its ops."""

    shape: tuple[int, ...]
    ops: tuple

    @property
    def classes(self) -> int:
        return self.ops[-1].features


def named_ops(ops: tuple, prefix: str = "op") -> list[tuple[str, Any]]:
    """``(name, op)`` for every op of ``ops``, nested ones included (names as in the module)."""
    out = []
    for i, op in enumerate(ops):
        name = f"{prefix}{i}"
        out.append((name, op))
        if isinstance(op, Residual):
            out.extend(named_ops(op.body, f"{name}_"))
        elif isinstance(op, Concat):
            for b, branch in enumerate(op.branches):
                out.extend(named_ops(branch, f"{name}_{b}_"))
    return out


def standalone_batchnorms(ops: tuple) -> int:
    """How many BatchNorms of ``ops`` (nested ones included) do not follow a dense or conv layer."""
    count = 0
    previous = None
    for op in ops:
        if isinstance(op, BatchNorm) and not isinstance(previous, (Dense, Conv)):
            count += 1
        if isinstance(op, Residual):
            count += standalone_batchnorms(op.body)
        elif isinstance(op, Concat):
            count += sum(standalone_batchnorms(branch) for branch in op.branches)
        previous = op
    return count


def describe_spec(spec: Spec) -> str:
    """A compact one-op-per-line description (hypothesis prints the spec too, this is for humans)."""
    lines = [f"input {spec.shape}"]
    for name, op in named_ops(spec.ops):
        depth = name.count("_")
        lines.append("  " * depth + f"{name}: {op}")
    return "\n".join(lines)


# ==================================================================================================
# The two implementations
# ==================================================================================================


def _dims(spatial: int) -> tuple[str, str, str]:
    letters = "DHW"[3 - spatial :]
    return f"N{letters}C", f"{letters}IO", f"N{letters}C"


def _activation(op: Act, x):
    if op.name == "relu":
        return nn.relu(x)
    if op.name == "relu6":
        return nn.relu6(x)
    if op.name == "leaky_relu":
        return nn.leaky_relu(x, negative_slope=op.slope)
    if op.name == "tanh":
        return nn.tanh(x)
    if op.name == "sigmoid":
        return nn.sigmoid(x)
    if op.name == "clip":
        return jnp.clip(x, op.low, op.high)
    raise ValueError(op.name)


def _unsupported(op: Unsupported, x):
    if op.name == "sort":
        return jnp.sort(x, axis=-1)
    if op.name == "cumsum":
        return jnp.cumsum(x, axis=-1)
    if op.name == "cond":
        return jax.lax.cond(x.sum() > 0, lambda v: 0.5 * v, lambda v: v, x)
    if op.name == "loop":  # a while loop with a data-dependent condition (static scans are explained)
        return jax.lax.while_loop(lambda v: jnp.abs(v).sum() > 1e6, lambda v: 0.5 * v, x)
    if op.name == "quotient":
        return x / (1.0 + jnp.sum(jnp.abs(x), axis=-1, keepdims=True))
    raise ValueError(op.name)


def _lax_pool(op: Pool, x):
    window = (1, *op.window, 1)
    strides = (1, *op.strides, 1)
    padding = op.padding if isinstance(op.padding, str) else ((0, 0), *op.padding, (0, 0))
    if op.kind == "max":
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, padding)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, padding)
    if op.kind == "sum":
        return total
    if op.include_pad:
        return total / math.prod(op.window)
    ones = jnp.ones((1, *x.shape[1:]), x.dtype)
    return total / jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, padding)


def _lax_conv_padding(op: Conv, x):
    """Flax's padding modes in plain JAX: ``(padded x, lax padding)``."""
    if op.padding in ("CIRCULAR", "REFLECT", "CAUSAL"):
        dilated = [(k - 1) * d + 1 for k, d in zip(op.kernel, op.dilation, strict=True)]
        if op.padding == "CAUSAL":
            pads = [(0, 0), (dilated[0] - 1, 0), (0, 0)]
            return jnp.pad(x, pads), "VALID"
        pads = [(0, 0), *[((k - 1) // 2, k // 2) for k in dilated], (0, 0)]
        return jnp.pad(x, pads, mode="wrap" if op.padding == "CIRCULAR" else "reflect"), "VALID"
    return x, op.padding


def _flax_pool(op: Pool, x):
    if op.kind == "max":
        return nn.max_pool(x, op.window, op.strides, op.padding)
    if op.kind == "avg":
        return nn.avg_pool(x, op.window, op.strides, op.padding, count_include_pad=op.include_pad)
    return nn.pooling.pool(x, 0.0, jax.lax.add, op.window, op.strides, op.padding)


def _structural(op, x):
    if isinstance(op, Act):
        return _activation(op, x)
    if isinstance(op, Flatten):
        return x.reshape(x.shape[0], -1)
    if isinstance(op, Mean):
        return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
    if isinstance(op, Reshape):
        return x.reshape(x.shape[0], *op.shape)
    if isinstance(op, Unsupported):
        return _unsupported(op, x)
    raise TypeError(op)


def _run(ops: tuple, x, prefix: str, layer) -> Any:
    """Evaluate ``ops``; ``layer(name, op, x)`` evaluates Dense, Conv, BatchNorm and Pool."""
    for i, op in enumerate(ops):
        name = f"{prefix}{i}"
        if isinstance(op, (Dense, Conv, BatchNorm, Pool)):
            x = layer(name, op, x)
        elif isinstance(op, Residual):
            x = x + _run(op.body, x, f"{name}_", layer)
        elif isinstance(op, Concat):
            parts = [_run(branch, x, f"{name}_{b}_", layer) for b, branch in enumerate(op.branches)]
            x = jnp.concatenate(parts, axis=-1)
        else:
            x = _structural(op, x)
    return x


class FuzzNet(nn.Module):
    """A :class:`Spec` as a Flax linen module (``nn.Dense``, ``nn.Conv``, ``nn.BatchNorm``, pooling)."""

    spec: Spec

    @nn.compact
    def __call__(self, x):
        def layer(name, op, x):
            if isinstance(op, Dense):
                return nn.Dense(op.features, use_bias=op.bias != "none", name=name)(x)
            if isinstance(op, Conv):
                return nn.Conv(
                    op.features,
                    op.kernel,
                    strides=op.strides,
                    padding=op.padding,
                    kernel_dilation=op.dilation,
                    feature_group_count=op.groups,
                    use_bias=op.bias != "none",
                    name=name,
                )(x)
            if isinstance(op, BatchNorm):
                return nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name=name)(x)
            return _flax_pool(op, x)

        return _run(self.spec.ops, x, "op", layer)


def jax_apply(spec: Spec, variables: dict, x):
    """A :class:`Spec` in plain ``jax.numpy`` / ``jax.lax`` with an explicit parameter pytree."""
    params, stats = variables["params"], variables.get("batch_stats", {})

    def layer(name, op, x):
        if isinstance(op, Dense):
            w = params[name]["kernel"]
            if op.form == "matmul":
                z = x @ w
            elif op.form == "einsum":
                z = jnp.einsum("...i,io->...o", x, w)
            elif op.form == "dot_general":
                z = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
            else:  # transposed: the data is the right operand
                z = (w.T @ x.T).T
            return z + params[name]["bias"] if op.bias != "none" else z
        if isinstance(op, Conv):
            w = params[name]["kernel"]
            spatial = x.ndim - 2
            x, padding = _lax_conv_padding(op, x)
            if op.layout == "last":
                z = jax.lax.conv_general_dilated(
                    x,
                    w,
                    op.strides,
                    padding,
                    rhs_dilation=op.dilation,
                    dimension_numbers=_dims(spatial),
                    feature_group_count=op.groups,
                )
            else:
                first = (0, x.ndim - 1, *range(1, x.ndim - 1))
                kernel_first = (w.ndim - 1, w.ndim - 2, *range(w.ndim - 2))
                letters = "DHW"[3 - spatial :]
                z = jax.lax.conv_general_dilated(
                    x.transpose(first),
                    w.transpose(kernel_first),
                    op.strides,
                    padding,
                    rhs_dilation=op.dilation,
                    dimension_numbers=(f"NC{letters}", f"OI{letters}", f"NC{letters}"),
                    feature_group_count=op.groups,
                )
                z = z.transpose((0, *range(2, z.ndim), 1))
            return z + params[name]["bias"] if op.bias != "none" else z
        if isinstance(op, BatchNorm):
            mean, var = stats[name]["mean"], stats[name]["var"]
            scale, shift = params[name]["scale"], params[name]["bias"]
            if op.form == "rsqrt":
                return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPSILON)) + shift
            return (x - mean) / jnp.sqrt(var + BN_EPSILON) * scale + shift
        return _lax_pool(op, x)

    return _run(spec.ops, x, "op", layer)


def make_variables(spec: Spec, seed: int) -> dict:
    """Variables for both implementations: He-normal kernels, biases and BatchNorm statistics as
    the ops ask (see :class:`Dense` and :class:`BatchNorm`), from ``numpy.random.default_rng(seed)``."""
    model = FuzzNet(spec)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *spec.shape), jnp.float32))
    ops = dict(named_ops(spec.ops))
    rng = np.random.default_rng(seed)
    params: dict = {}
    stats: dict = {}
    for name in sorted(shapes.get("params", {})):
        op, leaves = ops[name], shapes["params"][name]
        if isinstance(op, BatchNorm):
            (channels,) = leaves["scale"].shape
            mean = rng.normal(0.0, 0.5, channels) if op.stats != "zero" else np.zeros(channels)
            var = rng.uniform(0.5, 2.0, channels)
            scale = rng.uniform(0.5, 1.5, channels) * rng.choice([-1.0, 1.0], channels)
            if op.stats == "any":
                shift = rng.normal(0.0, 0.3, channels)
            elif op.stats == "nonpositive":
                s = scale / np.sqrt(var + BN_EPSILON)
                shift = mean * s - rng.uniform(0.02, 0.3, channels)
            else:
                shift = np.zeros(channels)
            params[name] = {"scale": _f32(scale), "bias": _f32(shift)}
            stats[name] = {"mean": _f32(mean), "var": _f32(var)}
            continue
        kernel_shape = leaves["kernel"].shape
        fan_in = math.prod(kernel_shape[:-1])
        entry = {"kernel": _f32(rng.normal(0.0, math.sqrt(2.0 / fan_in), kernel_shape))}
        if "bias" in leaves:
            size = leaves["bias"].shape
            bias = rng.normal(0.0, 0.3, size)
            entry["bias"] = _f32(-np.abs(bias) if op.bias == "nonpositive" else bias)
        params[name] = entry
    variables = {"params": params}
    if stats:
        variables["batch_stats"] = stats
    return variables


def _f32(a) -> jnp.ndarray:
    return jnp.asarray(np.asarray(a, dtype=np.float32))


def make_inputs(shape: tuple[int, ...], seed: int, kind: str) -> jnp.ndarray:
    """Uniform in [0, 1] (``"box"``) or standard normal (``"normal"``), from their own stream."""
    rng = np.random.default_rng(seed + 1)
    values = rng.uniform(0.0, 1.0, shape) if kind == "box" else rng.normal(0.0, 1.0, shape)
    return jnp.asarray(values.astype(np.float32))


def build(spec: Spec, flavor: str, seed: int):
    """``(fn, variables)`` with ``fn(variables, x)`` the model in the given flavor (``"flax"`` or
    ``"jax"``)."""
    variables = make_variables(spec, seed)
    if flavor == "flax":
        return FuzzNet(spec).apply, variables
    return (lambda v, x: jax_apply(spec, v, x)), variables


# ==================================================================================================
# The strategy
# ==================================================================================================

RELU_LIKE = ("relu", "relu6", "clip0")  # zero exactly where the input is <= 0, else <= the input
EPSILON_ACTS = ("relu", "relu6", "leaky_relu", "tanh", "clip0", "clip")  # sign-preserving, |a| <= |z|
GENERAL_ACTS = (*EPSILON_ACTS, "sigmoid")


def _act(draw, names) -> Act:
    name = draw(st.sampled_from(names))
    if name == "leaky_relu":
        return Act("leaky_relu", slope=draw(st.sampled_from([0.01, 0.2])))
    if name == "clip0":
        return Act("clip", low=0.0, high=draw(st.sampled_from([0.5, 1.0, 2.0])))
    if name == "clip":
        return Act("clip", low=-0.5, high=draw(st.sampled_from([0.5, 1.0])))
    return Act(name)


def _out_size(n: int, k: int, s: int, d: int, padding: Any) -> int:
    """Output length along one axis; ``padding`` a mode or this axis' ``(lo, hi)``."""
    if padding in ("SAME", "CIRCULAR", "REFLECT", "CAUSAL"):  # the last three pad by (k - 1) d
        return -(-n // s)
    if padding != "VALID":
        n = n + padding[0] + padding[1]
    return (n - (k - 1) * d - 1) // s + 1


def _axis_padding(padding: Any, axis: int) -> Any:
    return padding if isinstance(padding, str) else padding[axis]


def _divisors(n: int) -> list[int]:
    return [g for g in range(1, n + 1) if n % g == 0]


class _Draw:
    """Draws ops for one vocabulary, keeping track of the per-sample shape."""

    def __init__(self, draw, mode: str) -> None:
        self.draw = draw
        self.mode = mode

    # --- leaves -----------------------------------------------------------------------------
    def bias(self, followed_by_bn: bool) -> str:
        if self.mode == "general":
            return self.draw(st.sampled_from(["any", "none"]))
        if self.mode == "deep_taylor" and not followed_by_bn:
            # non-positive biases keep z+ conservative (a neuron is never active on its bias alone)
            return self.draw(st.sampled_from(["none", "none", "nonpositive"]))
        return "none"

    def acts(self) -> tuple[str, ...]:
        return {"general": GENERAL_ACTS, "epsilon": EPSILON_ACTS, "deep_taylor": RELU_LIKE}[self.mode]

    def batchnorm(self, after_layer: bool) -> BatchNorm:
        if self.mode == "general":
            stats = self.draw(st.sampled_from(["any", "nonpositive", "zero"]))
        elif self.mode == "deep_taylor":
            stats = "nonpositive" if after_layer else "zero"
        else:
            stats = "zero"
        return BatchNorm(stats, self.draw(st.sampled_from(["rsqrt", "div"])))

    def dense(self, shape, features: int | None = None, bias: str | None = None) -> Dense:
        features = features or self.draw(st.integers(1, MAX_WIDTH))
        forms = ["matmul", "einsum", "dot_general"] + (["transposed"] if len(shape) == 1 else [])
        return Dense(features, bias or "any", self.draw(st.sampled_from(forms)))

    def conv(self, shape, keep_shape: bool) -> Conv:
        draw = self.draw
        *spatial, channels = shape
        groups = draw(st.sampled_from(_divisors(channels)))
        if keep_shape:
            features = channels
            if features % groups:
                groups = 1
        else:
            features = groups * draw(st.integers(1, max(1, MAX_WIDTH // groups)))
        kernel, strides, dilation = [], [], []
        modes = ["SAME", "SAME", "explicit", "CIRCULAR", "REFLECT"]
        if len(spatial) == 1:
            # Flax's CAUSAL padding is a jnp.pad of zeros before a VALID convolution: absorbed into
            # the convolution's padding (test_fuzz.py::test_zero_padding_by_jnp_pad_is_not_a_bound)
            modes.append("CAUSAL")
        padding = draw(st.sampled_from(modes if keep_shape else [*modes, "VALID", "VALID"]))
        pads = []
        for n in spatial:
            k = draw(st.integers(1, min(3, n)))
            d = draw(st.sampled_from([1, 2])) if k > 1 else 1
            if (padding == "VALID" or padding == "REFLECT") and (k - 1) * d + 1 > n:
                d = 1  # VALID: the kernel fits; REFLECT: the pads, (k - 1) d / 2, are < n
            span = (k - 1) * d  # total padding that keeps the length
            if keep_shape:
                low = draw(st.integers(0, span))
                pads.append((low, span - low))
            else:
                # low padding > span (a window in the padding alone) is left out: XLA:CPU computes the
                # transposed convolution (negative padding) wrong, so jax.grad, which the properties
                # compare against, is wrong there (test_fuzz.py::
                # test_xla_conv_transpose_with_negative_low_padding); jaxdtd's rules work around it
                pads.append((draw(st.integers(0, min(2, span))), draw(st.integers(0, 2))))
                if n + sum(pads[-1]) < span + 1:
                    pads[-1] = (span, 0)
            kernel.append(k)
            dilation.append(d)
            strides.append(1 if keep_shape else draw(st.sampled_from([1, 2])))
        if padding == "explicit":
            padding = tuple(pads)
        layout = draw(st.sampled_from(["last", "first"]))
        return Conv(features, tuple(kernel), tuple(strides), padding, tuple(dilation), groups, "any", layout)

    def raw_sums_forbidden(self, first: bool) -> bool:
        """deep_taylor, before the first layer: no sums (average/sum pooling, mean).  Norm would divide
        relevance by the sum, but the first layers' rules (w^2, Flat, z^B) give relevance to inputs
        in no proportion to their values: a sum near 0 (inputs of mixed signs) loses it."""
        return self.mode == "deep_taylor" and first

    def pool(self, shape, first: bool = False) -> Pool:
        draw = self.draw
        spatial = shape[:-1]
        kinds = ["max"] if self.raw_sums_forbidden(first) else ["max", "avg", "sum"]
        kind = draw(st.sampled_from(kinds))
        padding = draw(st.sampled_from(["SAME", "VALID", "explicit"]))
        window = tuple(draw(st.integers(1, min(2, n))) for n in spatial)
        strides = tuple(draw(st.integers(1, 2)) for _ in spatial)
        if padding == "explicit":  # pads < window: every window holds an input entry
            padding = tuple((draw(st.integers(0, w - 1)), draw(st.integers(0, w - 1))) for w in window)
        include_pad = draw(st.booleans()) if kind == "avg" else True
        return Pool(kind, window, strides, padding, include_pad)

    # --- shapes -----------------------------------------------------------------------------
    @staticmethod
    def shape_after(op, shape: tuple[int, ...]) -> tuple[int, ...]:
        if isinstance(op, Dense):
            return (*shape[:-1], op.features)
        if isinstance(op, Conv):
            spatial = tuple(
                _out_size(n, k, s, d, _axis_padding(op.padding, i))
                for i, (n, k, s, d) in enumerate(
                    zip(shape[:-1], op.kernel, op.strides, op.dilation, strict=True)
                )
            )
            return (*spatial, op.features)
        if isinstance(op, Pool):
            spatial = tuple(
                _out_size(n, k, s, 1, _axis_padding(op.padding, i))
                for i, (n, k, s) in enumerate(zip(shape[:-1], op.window, op.strides, strict=True))
            )
            return (*spatial, shape[-1])
        if isinstance(op, Flatten):
            return (math.prod(shape),)
        if isinstance(op, Mean):
            return (shape[-1],)
        if isinstance(op, Reshape):
            return op.shape
        if isinstance(op, Concat):
            parts = [_Draw.shape_after_all(branch, shape) for branch in op.branches]
            return (*shape[:-1], sum(p[-1] for p in parts))
        return shape  # BatchNorm, Act, Residual, Unsupported

    @staticmethod
    def shape_after_all(ops, shape):
        for op in ops:
            shape = _Draw.shape_after(op, shape)
        return shape

    def reshape(self, shape) -> Reshape | None:
        options = []
        size = math.prod(shape)
        if len(shape) == 1:
            options.append((shape[0], 1))  # a signal for a 1-D convolution
            if shape[0] % 2 == 0 and shape[0] > 2:
                options.append((shape[0] // 2, 2))
            if size >= 4 and size % 2 == 0:
                options.append((2, size // 2, 1))
        elif len(shape) == 3:
            options.append((shape[0] * shape[1], shape[2]))  # 2-D -> 1-D
        elif len(shape) == 4:
            options.append((shape[0] * shape[1], shape[2], shape[3]))  # 3-D -> 2-D
        elif len(shape) == 2 and shape[0] % 2 == 0:
            options.append((shape[0] // 2, 2 * shape[1]))
        if not options:
            return None
        return Reshape(self.draw(st.sampled_from(options)))

    # --- blocks -----------------------------------------------------------------------------
    def unit(self, shape, keep_shape: bool, bn_ok: bool = True) -> list:
        """A layer; in the conservation vocabularies followed by what keeps them conservative.

        deep_taylor: layer [-> BatchNorm("nonpositive")] -> relu-like activation, always (an affine
        output that reaches anything but a ReLU could receive relevance where it is < 0, with no
        positive contribution to carry it).  Elsewhere: layer [-> BatchNorm] [-> activation].
        """
        draw = self.draw
        spatial = len(shape) > 1
        use_conv = spatial and draw(st.integers(0, 3)) > 0  # dense on a spatial tensor: 1 in 4
        with_bn = bn_ok and draw(st.integers(0, 3)) == 0
        if use_conv:
            layer = self.conv(shape, keep_shape)
        else:
            layer = self.dense(shape, features=shape[-1] if keep_shape else None)
        layer = dataclasses.replace(layer, bias=self.bias(with_bn))
        ops = [layer]
        if with_bn:
            ops.append(self.batchnorm(after_layer=True))
        if self.mode == "deep_taylor" or draw(st.integers(0, 3)) > 0:
            ops.append(_act(draw, self.acts()))
        return ops

    def step(self, shape, first: bool) -> list:
        """One or a few ops.  ``first``: no layer has been drawn yet (the raw input)."""
        draw = self.draw
        spatial = len(shape) > 1
        choices = ["unit", "unit", "unit", "act", "bn", "residual", "concat"]
        if spatial:
            choices += ["pool", "pool", "mean", "flatten"]
        choices.append("reshape")
        kind = draw(st.sampled_from(choices))
        if kind == "unit":
            return self.unit(shape, keep_shape=False)
        if kind == "act":
            if self.mode == "deep_taylor" and not first:
                # a ReLU of a (non-negative) ReLU output changes nothing; others are not allowed
                return [Act("relu")]
            return [_act(draw, self.acts())]
        if kind == "bn":
            if self.mode == "deep_taylor" and first:
                return []  # a scaling of the raw input would leave the box of z^B
            return [self.batchnorm(after_layer=False)]
        if kind == "residual":
            if draw(st.integers(0, 3)) == 0:  # x + act(x): elementwise, no layer in the body
                if self.mode == "deep_taylor" and first:
                    return []  # 2 x would leave the box of the first layers' input
                return [Residual((_act(draw, self.acts()),))]
            return [Residual(tuple(self.unit(shape, keep_shape=True)))]
        if kind == "concat":
            branches = []
            for _ in range(2):
                if draw(st.booleans()):
                    branches.append(())
                else:
                    branches.append(tuple(self.unit(shape, keep_shape=True)))
            if all(not b for b in branches) and draw(st.integers(0, 3)) > 0:  # [x, x] is 1 in 4
                branches[1] = tuple(self.unit(shape, keep_shape=True))
            # a branch keeps the spatial shape; its own width may differ (a unit keeps it: vary it)
            widened = []
            for branch in branches:
                if branch and draw(st.booleans()):
                    layer = branch[0]
                    new = dataclasses.replace(layer, features=self._width_for(layer, shape))
                    branch = (new, *branch[1:])
                widened.append(branch)
            return [Concat(tuple(widened))]
        if kind == "pool":
            return [self.pool(shape, first)]
        if kind == "mean":
            return [Mean()] if not self.raw_sums_forbidden(first) else [Flatten()]
        if kind == "flatten":
            return [Flatten()]
        reshape = self.reshape(shape)
        return [reshape] if reshape is not None else []

    def _width_for(self, layer, shape) -> int:
        if isinstance(layer, Conv):
            g = layer.groups
            return g * self.draw(st.integers(1, max(1, MAX_WIDTH // g)))
        return self.draw(st.integers(1, MAX_WIDTH))


INPUT_SHAPES = st.one_of(
    st.tuples(st.integers(2, 6)),  # vectors
    st.tuples(st.integers(3, 8), st.integers(1, 3)),  # 1-D signals
    st.tuples(st.integers(3, 6), st.integers(3, 6), st.integers(1, 3)),  # images
    st.tuples(st.integers(2, 4), st.integers(2, 4), st.integers(2, 4), st.integers(1, 2)),  # volumes
)


@st.composite
def models(draw, mode: str = "general", max_steps: int = 4, unsupported: bool = False) -> Spec:
    """A random :class:`Spec` of the vocabulary ``mode`` (module docstring).

    Conservation (``mode="deep_taylor"``): the z+ rule with the bias dropped passes on
    ``R_j zhat_j / stab(zhat_j)`` with ``zhat_j`` the sum of the positive contributions, so relevance is
    lost only at a neuron that receives relevance and has ``zhat_j = 0``.  Every affine layer but the
    last is followed (after an optional BatchNorm whose folded bias is < 0) by a relu-like activation
    (ReLU, ReLU6, clip(0, h)), and biases are <= 0: a neuron receives relevance only where it is
    active (``z_j > 0``; relevance is proportional to the activation everywhere: z+, Norm on sums
    and average/sum pooling, max pooling and structural ops route it to entries equal to it), and
    then ``zhat_j >= z_j - b_j >= z_j > 0``.  The output neuron has ``z_c = f_c > 0`` (checked).
    The first layers (z^B / w^2 / Flat) conserve with positive denominators for inputs in the box
    (z^B: ``zhat_j = sum_i (x_i - l) w+_ij + (x_i - h) w-_ij > 0`` where ``z_j > 0``, for ``l <= 0 <= h``):
    before them only max pooling, reshapes and relu-like activations (which keep the box), no sums
    (:meth:`_Draw.raw_sums_forbidden`).  Standalone BatchNorms (not after a layer) are pure scalings
    (mean = shift = 0: zero stays zero), and a BatchNorm after a layer must be folded into it (not
    after ``(w.T @ x.T).T``, which jaxdtd does not fold: see test_fuzz.py).

    ``mode="epsilon"``: no biases, BatchNorm mean = shift = 0, activations with ``a = 0`` iff ``z = 0``
    and ``|a| <= |z|`` (no sigmoid): LRP-0 passes on ``R_j z_j / z_j`` exactly, and where ``z_j = 0``
    the relevance is 0 anyway.

    ``unsupported=True`` inserts one :class:`Unsupported` op at a random position.
    """
    shape = draw(INPUT_SHAPES)
    builder = _Draw(draw, mode)
    ops: list = []
    current = shape
    first = True
    for _ in range(draw(st.integers(1, max_steps))):
        new = builder.step(current, first)
        for op in new:
            current = builder.shape_after(op, current)
        if any(isinstance(op, (Dense, Conv)) for _, op in named_ops(tuple(new))):
            first = False
        ops.extend(new)
    if len(current) > 1:  # the output is (batch, classes)
        ops.append(
            Flatten() if builder.raw_sums_forbidden(first) else draw(st.sampled_from([Flatten(), Mean()]))
        )
    classes = draw(st.integers(2, 3))
    if unsupported:
        position = draw(st.integers(0, len(ops)))
        ops.insert(position, Unsupported(draw(st.sampled_from(sorted(UNSUPPORTED_PRIMITIVE)))))
    bias = "any" if mode == "general" else "none"
    ops.append(Dense(classes, bias, draw(st.sampled_from(["matmul", "einsum", "dot_general"]))))
    return Spec(shape, tuple(ops))
