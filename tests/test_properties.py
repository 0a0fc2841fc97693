"""Property tests (hypothesis) on random ReLU networks written as plain JAX functions.

Hypothesis draws the architecture (depth, widths, padding, stride, pooling, batch size, target class)
and one integer seed; weights and inputs come from ``numpy.random.default_rng(seed)``, so a failing
example shrinks to a small architecture and replays exactly.

Properties:

* DeepTaylor(0, 1) on inputs in [0, 1] and DeepTaylor() (w^2) on unbounded inputs: per sample the input
  relevance sums to ``f_c(x)`` where ``f_c(x) > 0.1`` and has the sign of ``f_c(x)`` (>= 0), for MLPs and
  CNNs with He-scaled weights and non-positive biases (see :func:`nonpositive_bias` for why the biases
  matter).  Conservation holds to 1e-5 relative with a negligible stabilizer, and to 1e-4 with the
  preset's 1e-6, which loses ~1e-6 per neuron that carries relevance (see :func:`check_deep_taylor`);
* ``Epsilon(zero_bias=True)`` on every layer is conservative with biases of any sign, except for
  relevance that reaches a neuron active on its bias alone (see :func:`bias_dominated`);
* explaining a batch equals explaining each sample alone, for several composites;
* ``jax.vmap`` of a single-sample explanation (``x[None]``) equals the batched explanation.

Budgets are small (each example compiles its explanation: ~0.2-1 s); the file runs in 30-40 s on
two CPU cores.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import jaxdtd
from jaxdtd import composites as C
from jaxdtd import rules as R

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# Samples whose explained score is below this are skipped by the conservation checks: a relative
# statement about a score near 0 measures only the absolute rounding and stabilizer errors.
MIN_SCORE = 0.1
CONSERVATION_RTOL = 1e-5


# ==================================================================================================
# Random networks
# ==================================================================================================


def he_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> jnp.ndarray:
    return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape), dtype=jnp.float32)


def nonpositive_bias(rng: np.random.Generator, size: int) -> jnp.ndarray:
    """Biases <= 0.

    Why DeepTaylor needs them for exact conservation: every layer above the first uses z+ with the bias
    dropped, i.e. ``zhat_j = sum_i x_i w+_ij`` over its non-negative (post-ReLU) inputs, and relevance is
    lost exactly where a neuron receives relevance but has ``zhat_j = 0``.  A hidden neuron receives
    relevance only if it is active (its relevance is proportional to its activation ``x_j``), and the
    output neuron receives ``f_c(x)``, which we require to be > 0.  In both cases
    ``z_j = sum_i x_i w_ij + b_j > 0``; with ``b_j <= 0`` this gives ``sum_i x_i w_ij > 0`` and hence
    ``zhat_j = sum_i x_i w+_ij >= sum_i x_i w_ij >= z_j > 0``.  A positive bias could make a neuron active
    on the bias alone, with no positive contribution from its inputs to carry its relevance.  The same
    argument holds for the first layer under z^B with ``0 <= x <= 1``: its denominator is
    ``sum_i (x_i w_ij - w-_ij) >= sum_i x_i w_ij >= z_j`` (every term ``x w+ + (x - 1) w-`` is >= 0), and
    under w^2, whose denominator ``sum_i w_ij^2`` does not depend on the input at all.
    """
    return jnp.asarray(-np.abs(rng.normal(0.0, 0.2, size=size)), dtype=jnp.float32)


def any_bias(rng: np.random.Generator, size: int) -> jnp.ndarray:
    return jnp.asarray(rng.normal(0.0, 0.5, size=size), dtype=jnp.float32)


def dense(layer: dict, x: jnp.ndarray, record: list | None) -> jnp.ndarray:
    """``x @ w + b``; with ``record`` given, also appends ``(z, z - b)``: the pre-activation with and
    without its bias (used to find neurons that are active on their bias alone)."""
    linear = x @ layer["w"]
    if record is not None:
        record.append((linear + layer["b"], linear))
    return linear + layer["b"]


def mlp_apply(params: list[dict], x: jnp.ndarray, record: list | None = None) -> jnp.ndarray:
    """Dense -> ReLU -> ... -> Dense, as plain jax.numpy."""
    for layer in params[:-1]:
        x = jax.nn.relu(dense(layer, x, record))
    return dense(params[-1], x, record)


def make_mlp(seed: int, sizes: tuple[int, ...], bias: str) -> list[dict]:
    rng = np.random.default_rng(seed)
    draw_bias = nonpositive_bias if bias == "nonpositive" else any_bias
    return [
        {"w": he_normal(rng, (n_in, n_out), n_in), "b": draw_bias(rng, n_out)}
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
    ]


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    features: int
    kernel: int
    stride: int
    padding: str  # "SAME" or "VALID"
    pool: str | None  # "max", "avg" or None


@dataclasses.dataclass(frozen=True)
class CNNSpec:
    size: int  # input height = width
    channels: int
    convs: tuple[ConvSpec, ...]
    hidden: int | None  # optional hidden dense layer before the output layer
    classes: int


def _conv_out(size: int, kernel: int, stride: int, padding: str) -> int:
    return -(-size // stride) if padding == "SAME" else (size - kernel) // stride + 1


def cnn_apply(spec: CNNSpec, params: dict, x: jnp.ndarray, record: list | None = None) -> jnp.ndarray:
    """(Conv -> ReLU -> [pool]) x n -> flatten -> [Dense -> ReLU] -> Dense, with jax.lax convolutions."""
    for i, conv in enumerate(spec.convs):
        linear = jax.lax.conv_general_dilated(
            x,
            params[f"conv{i}"]["w"],
            (conv.stride, conv.stride),
            conv.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if record is not None:
            record.append((linear + params[f"conv{i}"]["b"], linear))
        x = jax.nn.relu(linear + params[f"conv{i}"]["b"])
        if conv.pool == "max":
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        elif conv.pool == "avg":
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    if spec.hidden is not None:
        x = jax.nn.relu(dense(params["hidden"], x, record))
    return dense(params["out"], x, record)


def make_cnn(seed: int, spec: CNNSpec, bias: str) -> dict:
    rng = np.random.default_rng(seed)
    draw_bias = nonpositive_bias if bias == "nonpositive" else any_bias
    params = {}
    size, channels = spec.size, spec.channels
    for i, conv in enumerate(spec.convs):
        fan_in = conv.kernel * conv.kernel * channels
        params[f"conv{i}"] = {
            "w": he_normal(rng, (conv.kernel, conv.kernel, channels, conv.features), fan_in),
            "b": draw_bias(rng, conv.features),
        }
        size = _conv_out(size, conv.kernel, conv.stride, conv.padding)
        if conv.pool is not None:
            size //= 2
        channels = conv.features
    flat = size * size * channels
    if spec.hidden is not None:
        params["hidden"] = {"w": he_normal(rng, (flat, spec.hidden), flat), "b": draw_bias(rng, spec.hidden)}
        flat = spec.hidden
    params["out"] = {"w": he_normal(rng, (flat, spec.classes), flat), "b": draw_bias(rng, spec.classes)}
    return params


@st.composite
def mlp_sizes(draw) -> tuple[int, ...]:
    """(inputs, hidden..., classes) with 1-3 hidden layers of widths 2-16."""
    n_in = draw(st.integers(2, 12))
    hidden = draw(st.lists(st.integers(2, 16), min_size=1, max_size=3))
    classes = draw(st.integers(2, 5))
    return (n_in, *hidden, classes)


@st.composite
def cnn_specs(draw) -> CNNSpec:
    """1-2 conv layers (3x3 or 2x2, SAME or VALID, stride 1 or 2, optional max/avg pooling), then dense.

    Choices that would leave no spatial extent are repaired (SAME instead of VALID, no pooling) rather
    than rejected, so that no example is wasted.
    """
    size = draw(st.integers(4, 9))
    channels = draw(st.integers(1, 3))
    convs = []
    current = size
    for _ in range(draw(st.integers(1, 2))):
        kernel = draw(st.sampled_from([3, 2]))
        stride = draw(st.sampled_from([1, 2]))
        padding = draw(st.sampled_from(["SAME", "VALID"]))
        if padding == "VALID" and current < kernel:
            padding = "SAME"
        current = _conv_out(current, kernel, stride, padding)
        pool = draw(st.sampled_from([None, "max", "avg"]))
        if current < 2:
            pool = None
        if pool is not None:
            current //= 2
        convs.append(ConvSpec(draw(st.integers(2, 6)), kernel, stride, padding, pool))
    hidden = draw(st.one_of(st.none(), st.integers(2, 12)))
    return CNNSpec(size, channels, tuple(convs), hidden, draw(st.integers(2, 5)))


def inputs(seed: int, shape: tuple[int, ...], kind: str) -> jnp.ndarray:
    """Inputs from their own stream (seed + 1): uniform in [0, 1] ("box") or standard normal."""
    rng = np.random.default_rng(seed + 1)
    values = rng.uniform(0.0, 1.0, size=shape) if kind == "box" else rng.normal(0.0, 1.5, size=shape)
    return jnp.asarray(values, dtype=jnp.float32)


def network(kind: str, seed: int, arch, bias: str, batch: int, data: str):
    """``(fn, params, x)`` for an MLP (``arch`` = sizes) or a CNN (``arch`` = CNNSpec)."""
    if kind == "mlp":
        return mlp_apply, make_mlp(seed, arch, bias), inputs(seed, (batch, arch[0]), data)
    fn = functools.partial(cnn_apply, arch)
    shape = (batch, arch.size, arch.size, arch.channels)
    return fn, make_cnn(seed, arch, bias), inputs(seed, shape, data)


def n_classes(kind: str, arch) -> int:
    return arch[-1] if kind == "mlp" else arch.classes


@st.composite
def networks(draw, bias: str, data: str, batch: st.SearchStrategy[int]):
    kind = draw(st.sampled_from(["mlp", "cnn"]))
    arch = draw(mlp_sizes() if kind == "mlp" else cnn_specs())
    seed = draw(st.integers(0, 2**31 - 2))
    fn, params, x = network(kind, seed, arch, bias, draw(batch), data)
    target = draw(st.integers(0, n_classes(kind, arch) - 1))
    return fn, params, x, target


def explainer(fn, composite):
    """``(params, x, target) -> jaxdtd.explain(fn, params, x, target=target, composite=composite)`` under
    ``jax.jit``: one compilation per input shape instead of an eager dispatch per primitive (about 4x
    faster on these tiny networks)."""
    return jax.jit(lambda p, v, c: jaxdtd.explain(fn, p, v, target=c, composite=composite))


def explain(fn, params, x, target, composite):
    return explainer(fn, composite)(params, x, target)


def per_sample_sums(relevance: jnp.ndarray) -> np.ndarray:
    return np.asarray(relevance, dtype=np.float64).reshape(relevance.shape[0], -1).sum(axis=1)


# ==================================================================================================
# DeepTaylor: conservation and positivity
# ==================================================================================================


def deep_taylor(low=None, high=None, stabilizer: float = 1e-6) -> C.Composite:
    """The DeepTaylor preset; with another stabilizer also on average pooling (Norm), so that every
    denominator of the explanation uses it."""
    composite = C.DeepTaylor(low, high, stabilizer=stabilizer)
    if stabilizer == 1e-6:
        return composite
    return dataclasses.replace(composite, operations={"reduce_window_sum": R.Norm(stabilizer)})


def check_deep_taylor(low, high, fn, params, x):
    """Explain each sample's arg-max class (the one most likely to have ``f_c(x) > 0``).

    Conservation is checked twice:

    * with a negligible stabilizer (1e-9) to 1e-5 relative: then the only error is float32 rounding of
      sums of non-negative terms (observed <= 3.4e-7 over 400 random networks);
    * with the preset's stabilizer 1e-6 to 1e-4 relative.  Every neuron k that carries relevance loses
      ``R_k eps / (zhat_k + eps) ~ eps * s_k`` (``s_k = R_k / zhat_k``, the factor it passes down, which is
      O(1) here), so the loss is about ``eps`` times the number of such neurons: not negligible
      against 1e-5 with tens of neurons (observed up to 1.9e-5 relative), well inside 1e-4.

    Samples with ``f_c(x) <= MIN_SCORE`` are skipped before explaining (cheap rejection).
    """
    score = np.asarray(fn(params, x), dtype=np.float64).max(axis=1)
    keep = score > MIN_SCORE
    assume(keep.any())
    for stabilizer, rtol in ((1e-9, CONSERVATION_RTOL), (1e-6, 1e-4)):
        relevance, y = explain(fn, params, x, None, deep_taylor(low, high, stabilizer))
        assert relevance.shape == x.shape
        np.testing.assert_allclose(np.asarray(y, dtype=np.float64).max(axis=1), score, rtol=1e-6)
        sums = per_sample_sums(relevance)
        np.testing.assert_allclose(sums[keep], score[keep], rtol=rtol, atol=0, err_msg=f"eps={stabilizer}")
        # Positive: every factor of the propagation is >= 0, so R has the sign of f_c(x) (also for
        # f_c < 0, where conservation need not hold: the output neuron may have no positive
        # contribution).  ZBox computes x * sum(w s) - h * sum(w- s), a difference of two sums whose
        # exact value is >= 0, so rounding may show as a tiny value of the wrong sign: allow 1e-6.
        r = np.asarray(relevance, dtype=np.float64).reshape(x.shape[0], -1)
        signed = r * np.sign(score)[:, None]
        floor = -1e-6 * np.abs(score)[:, None]
        assert (signed >= floor).all(), f"relevance of the wrong sign: {signed.min()} for scores {score}"


@settings(max_examples=8, **SETTINGS)  # each example compiles its own network (~8 s); the fuzzer adds more
@given(networks(bias="nonpositive", data="box", batch=st.integers(2, 6)))
def test_deep_taylor_box_conserves_and_is_positive(net):
    fn, params, x, _ = net
    check_deep_taylor(0.0, 1.0, fn, params, x)


@settings(max_examples=5, **SETTINGS)
@given(networks(bias="nonpositive", data="normal", batch=st.integers(2, 6)))
def test_deep_taylor_wsquare_conserves_and_is_positive(net):
    # w^2 on the first layer: R_i = sum_j w_ij^2 s_j with s_j >= 0, non-negative for any input.
    fn, params, x, _ = net
    check_deep_taylor(None, None, fn, params, x)


# ==================================================================================================
# Epsilon without bias: conservative for biases of any sign (except bias-only neurons)
# ==================================================================================================


# A neuron passes on R_j * zz_j / stab(zz_j): with |zz_j| >= MARGIN it loses at most 1e-6 / MARGIN
# (3e-5) of R_j to the stabilizer.
MARGIN = 3e-2


def bias_dominated(fn, params, x, target) -> np.ndarray:
    """Per sample: does a neuron that may receive relevance have (almost) no contribution from its inputs?

    "May receive relevance": the explained output neuron, and every active hidden neuron (an inactive
    one has a zero activation, and the Epsilon rule above hands it relevance in proportion to it).
    Such a neuron is active on its bias alone (e.g. all of its inputs are zero after a ReLU); with the
    bias dropped its relevance has nowhere to go and is lost.  That is the rule, not a bug (zennit's
    ``zero_params='bias'`` does the same), so the conservation property excludes these samples.
    """
    record: list = []
    fn(params, x, record=record)
    bad = np.zeros(x.shape[0], dtype=bool)
    for z, zz in record[:-1]:
        weak = (np.asarray(z) > 0) & (np.abs(np.asarray(zz)) < MARGIN)
        bad |= weak.reshape(x.shape[0], -1).any(axis=1)
    _, zz_out = record[-1]
    return bad | (np.abs(np.asarray(zz_out)[:, target]) < MARGIN)


@settings(max_examples=12, **SETTINGS)
@given(networks(bias="any", data="normal", batch=st.integers(1, 6)))
def test_epsilon_zero_bias_conserves(net):
    """``Epsilon(zero_bias=True)`` everywhere: each layer passes on ``R_j * zz_j / stab(zz_j)`` with
    ``zz_j = sum_i x_i w_ij`` (bias dropped), so the input relevance sums to ``f_c(x)`` up to the
    stabilizer and rounding, wherever no neuron is active on its bias alone (see
    :func:`bias_dominated`; skipped).

    Tolerance: relevances of mixed signs cancel, so float32 rounding error scales with the magnitude of
    the terms, ``sum_i |R_i|``, not with ``|f_c|``; and with ``|zz_j| >= MARGIN`` every neuron loses at
    most ``1e-6 / MARGIN ~ 3e-5`` of its relevance to the stabilizer.  We therefore allow
    ``1e-4 * (|f_c| + sum_i |R_i|)`` and skip samples with ``|f_c| <= 0.1`` (where a relative statement
    is meaningless).  Observed over 500 random networks: at most 1.5e-5 of that scale (3.7e-6 with the
    stabilizer at 1e-9, i.e. rounding alone); with MARGIN = 1e-2 up to 5.6e-5.
    """
    fn, params, x, target = net
    score = np.asarray(fn(params, x)[:, target], dtype=np.float64)
    keep = (np.abs(score) > MIN_SCORE) & ~bias_dominated(fn, params, x, target)
    assume(keep.any())
    relevance, y = explain(fn, params, x, target, R.Epsilon(zero_bias=True))
    np.testing.assert_allclose(np.asarray(y[:, target]), score, rtol=1e-6, atol=1e-6)
    sums = per_sample_sums(relevance)
    magnitude = np.abs(np.asarray(relevance, dtype=np.float64)).reshape(x.shape[0], -1).sum(axis=1)
    error = np.abs(sums - score)[keep]
    bound = 1e-4 * (np.abs(score) + magnitude)[keep]
    assert (error <= bound).all(), f"error {error} > bound {bound}"


def test_epsilon_zero_bias_loses_relevance_of_bias_only_neurons():
    """The case excluded above, pinned down: a hidden layer that is dead for a sample leaves the output
    neuron with only its bias, ``zz_c = 0``, and the whole score is lost (relevance 0, not NaN)."""
    params = [
        {"w": jnp.array([[1.0], [1.0]]), "b": jnp.array([-10.0])},  # dead for inputs in [0, 1]
        {"w": jnp.array([[2.0, -1.0]]), "b": jnp.array([0.5, 0.25])},
    ]
    x = jnp.array([[0.5, 0.25], [1.0, 1.0]])
    relevance, y = explain(mlp_apply, params, x, 0, R.Epsilon(zero_bias=True))
    np.testing.assert_allclose(np.asarray(y[:, 0]), [0.5, 0.5])
    assert np.all(np.asarray(relevance) == 0.0)
    assert bias_dominated(mlp_apply, params, x, 0).all()


# ==================================================================================================
# Batched == per sample; vmap == batched
# ==================================================================================================

COMPOSITES = {
    "EpsilonPlusFlat": C.EpsilonPlusFlat(),
    "EpsilonGammaBox(0,1)": C.EpsilonGammaBox(0.0, 1.0),
    "DeepTaylor(0,1)": C.DeepTaylor(0.0, 1.0),
    "AlphaBeta": R.AlphaBeta(2.0, 1.0),
}


def assert_same_relevance(got, want, what: str):
    """Equal up to float32 rounding of differently ordered reductions (a batch of 1 and a batch of n may
    take different matmul kernels), relative to the largest relevance of the sample.  Observed over 160
    random networks x 4 composites: at most 1.2e-5 (a rounding difference divided by a small
    denominator); 0 for most CNNs."""
    got = np.asarray(got, dtype=np.float64).reshape(got.shape[0], -1)
    want = np.asarray(want, dtype=np.float64).reshape(want.shape[0], -1)
    scale = np.abs(want).max(axis=1, keepdims=True) + 1e-12
    error = np.abs(got - want) / scale
    assert error.max() <= 1e-4, f"{what}: max relative difference {error.max()}"


@settings(max_examples=8, **SETTINGS)
@given(networks(bias="any", data="box", batch=st.integers(2, 5)), st.sampled_from(sorted(COMPOSITES)))
def test_batch_equals_single_samples(net, name):
    fn, params, x, target = net
    composite = COMPOSITES[name]
    run = explainer(fn, composite)  # compiles once for the batch, once for a batch of 1
    batched, y = run(params, x, target)
    for i in range(x.shape[0]):
        single, y1 = run(params, x[i : i + 1], target)
        np.testing.assert_allclose(np.asarray(y1[0]), np.asarray(y[i]), rtol=1e-5, atol=1e-5)
        assert_same_relevance(single, batched[i : i + 1], f"{name}, sample {i}")


@settings(max_examples=6, **SETTINGS)
@given(
    networks(bias="any", data="box", batch=st.integers(2, 5)),
    st.sampled_from(sorted(COMPOSITES)),
    st.data(),
)
def test_vmap_of_single_sample_equals_batch(net, name, data):
    fn, params, x, _ = net
    composite = COMPOSITES[name]
    classes = fn(params, x[:1]).shape[-1]
    targets = jnp.asarray(
        data.draw(st.lists(st.integers(0, classes - 1), min_size=x.shape[0], max_size=x.shape[0])),
        dtype=jnp.int32,
    )

    def explain_one(xi, ci):
        relevance, _ = jaxdtd.explain(fn, params, xi[None], target=ci, composite=composite)
        return relevance[0]

    batched, _ = explain(fn, params, x, targets, composite)
    assert_same_relevance(jax.jit(jax.vmap(explain_one))(x, targets), batched, f"{name}, vmap of explain")

    # the same through jax.grad of the transformed function
    f = jaxdtd.transform(fn, composite)

    def grad_one(xi, ci):
        onehot = jax.nn.one_hot(ci, classes)
        return jax.grad(lambda v: (f(params, v[None])[0] * onehot).sum())(xi)

    assert_same_relevance(jax.jit(jax.vmap(grad_one))(x, targets), batched, f"{name}, vmap of grad")
