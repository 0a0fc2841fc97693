"""Fuzzing: random models from the supported vocabulary, in Flax linen and in plain JAX.

The strategy (``tests/fuzz_models.py``) draws architectures built from dense layers (also on spatial
tensors; plain JAX as ``x @ w``, ``einsum``, ``lax.dot_general`` or ``(w.T @ x.T).T``), 1-, 2- and 3-D
convolutions (stride, SAME/VALID padding, dilation, feature groups; plain JAX channels-last or
channels-first), max / average / sum pooling, activations (relu, relu6, leaky_relu, tanh, sigmoid,
clip), residual ``x + f(x)`` and concatenated branches, inference-mode BatchNorm with random running
statistics, scale and shift (folded into the layer before it, or standalone), flatten, reshape and
the mean over spatial axes.  Weights and inputs come from ``numpy.random.default_rng(seed)``.

Properties, for every preset (EpsilonPlus, EpsilonPlusFlat, EpsilonAlpha2Beta1,
EpsilonAlpha2Beta1Flat, EpsilonGammaBox, DeepTaylor with and without bounds):

* the forward of the transformed function equals the model's;
* the relevance has no NaN or Inf;
* explaining a batch equals explaining each sample as a batch of 1, and ``jax.vmap`` of a
  single-sample explanation;
* no exception at all for the supported vocabulary; an unsupported operation inserted anywhere
  raises ``jaxdtd.UnsupportedOperationError`` naming it, never another exception;
* conservation where the rules guarantee it (DeepTaylor / Flat+z+ on the ``deep_taylor`` vocabulary,
  LRP-0 on the ``epsilon`` vocabulary; see :func:`fuzz_models.models` for why they conserve).

Every example compiles its explanations (all presets in one XLA program, compiled with cheap
optimization settings; ~1 s per program on a CPU core), so CI runs a few dozen examples (the file takes
about a minute on one core).  A longer run, with N examples per test:

    JAXDTD_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/test_fuzz.py

Examples are derandomized (the same in every run); set ``JAXDTD_FUZZ_SEED`` to any integer for a
different, reproducible sequence.  A failing example prints its architecture (``describe_spec``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fuzz_models import (
    UNSUPPORTED_PRIMITIVE,
    Spec,
    Unsupported,
    build,
    describe_spec,
    make_inputs,
    models,
    named_ops,
    standalone_batchnorms,
)
from hypothesis import HealthCheck, assume, given, note, seed, settings
from hypothesis import strategies as st

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd import rules as R

# ==================================================================================================
# Budget
# ==================================================================================================

_SCALE = os.environ.get("JAXDTD_FUZZ_EXAMPLES")
_SEED = os.environ.get("JAXDTD_FUZZ_SEED")


def fuzz_settings(ci_examples: int):
    """``ci_examples`` examples in CI, ``$JAXDTD_FUZZ_EXAMPLES`` when set; reproducible."""
    examples = int(_SCALE) if _SCALE else ci_examples
    decorate = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=_SEED is None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        print_blob=True,
    )
    if _SEED is None:
        return decorate
    return lambda test: seed(int(_SEED))(decorate(test))


#: XLA options for the tiny programs of this file, where compiling, not running, is what costs: all
#: presets of one model compile in ~0.5 s instead of ~2 s at the default settings.  Options this
#: jaxlib does not know are dropped (``compile_fast``).
FAST_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}
_compile_options = dict(FAST_COMPILE)


def compile_fast(fn, *args):
    """``jax.jit(fn)`` lowered for ``args`` and compiled with :data:`FAST_COMPILE`."""
    lowered = jax.jit(fn).lower(*args)
    while True:
        try:
            return lowered.compile(compiler_options=_compile_options)
        except Exception as error:  # an option unknown to this jaxlib: drop it and retry
            unknown = [k for k in _compile_options if f"No such compile option: '{k}'" in str(error)]
            if not unknown:
                raise
            for key in unknown:
                del _compile_options[key]


# ==================================================================================================
# Presets and helpers
# ==================================================================================================


def presets(low: float, high: float) -> dict[str, C.Composite]:
    """Every preset; the boxed ones with bounds ``low <= x <= high`` that hold the inputs."""
    return {
        "EpsilonPlus": C.EpsilonPlus(),
        "EpsilonPlusFlat": C.EpsilonPlusFlat(),
        "EpsilonAlpha2Beta1": C.EpsilonAlpha2Beta1(),
        "EpsilonAlpha2Beta1Flat": C.EpsilonAlpha2Beta1Flat(),
        "EpsilonGammaBox": C.EpsilonGammaBox(low, high),
        "DeepTaylor(low,high)": C.DeepTaylor(low, high),
        "DeepTaylor()": C.DeepTaylor(),
    }


def bounds(x: jnp.ndarray) -> tuple[float, float]:
    """Integer bounds around the inputs (0 and 1 for inputs in [0, 1])."""
    return float(min(0.0, np.floor(np.min(x)))), float(max(1.0, np.ceil(np.max(x))))


def explain_all(fn, composites: dict):
    """``(variables, x, target) -> {name: (R, y)}``: every composite in one program."""

    def run(variables, x, target):
        return {
            name: dtd.explain(fn, variables, x, target=target, composite=composite)
            for name, composite in composites.items()
        }

    return run


def relative_difference(got, want) -> float:
    """Largest difference relative to the largest relevance of the sample (per sample)."""
    got = np.asarray(got, dtype=np.float64).reshape(got.shape[0], -1)
    want = np.asarray(want, dtype=np.float64).reshape(want.shape[0], -1)
    scale = np.abs(want).max(axis=1, keepdims=True) + 1e-30
    return float((np.abs(got - want) / scale).max())


def per_sample_sums(relevance) -> np.ndarray:
    return np.asarray(relevance, dtype=np.float64).reshape(relevance.shape[0], -1).sum(axis=1)


# Samples whose explained score is below this are not checked for conservation (a relative statement
# about a score near 0 measures only the absolute rounding and stabilizer errors).
MIN_SCORE = 0.1
#: batch vs single sample vs vmap, relative to the largest relevance of the sample.  Matrix products
#: of another batch size sum in another order; a rounding difference of ~1e-7 in a denominator that
#: is itself a cancelling sum (a residual add or a dense output of mixed signs, under Norm or
#: Epsilon) comes out larger: observed up to 1.4e-5, where the float32 explanation itself is only 1e-5
#: from the float64 one (batch and single sample then agree to 4e-16).
SAME_RTOL = 1e-4


@st.composite
def cases(draw, mode: str, batch: tuple[int, int] = (2, 3), data: tuple[str, ...] = ("box", "normal")):
    """``(spec, flavor, input kind, seed, targets)``; the batch size is the number of targets."""
    spec = draw(models(mode))
    flavor = draw(st.sampled_from(["flax", "jax"]))
    kind = draw(st.sampled_from(data))
    rng_seed = draw(st.integers(0, 2**31 - 2))
    n = draw(st.integers(*batch))
    targets = draw(st.lists(st.integers(0, spec.classes - 1), min_size=n, max_size=n))
    return spec, flavor, kind, rng_seed, np.asarray(targets, dtype=np.int32)


def setup(spec: Spec, flavor: str, kind: str, rng_seed: int, batch: int):
    note(describe_spec(spec))
    note(f"flavor={flavor} inputs={kind} seed={rng_seed}")
    fn, variables = build(spec, flavor, rng_seed)
    x = make_inputs((batch, *spec.shape), rng_seed, kind)
    return fn, variables, x


def check_flavors_agree(spec: Spec, rng_seed: int, x) -> None:
    """The two implementations are the same model (a check of the fuzz models, not of jaxdtd)."""
    outs = [build(spec, flavor, rng_seed) for flavor in ("flax", "jax")]
    (f1, v1), (f2, v2) = outs
    np.testing.assert_allclose(np.asarray(f1(v1, x)), np.asarray(f2(v2, x)), rtol=1e-4, atol=1e-5)


# ==================================================================================================
# Forward, finiteness, batch == single == vmap, no exception
# ==================================================================================================


def relevance_program(fn, composites: dict, batch: int):
    """``(variables, x, targets) -> (batched, singles, mapped)``, one XLA program: every composite on
    the batch, on each sample as a batch of 1, and ``jax.vmap`` of a single-sample explanation."""
    run = explain_all(fn, composites)

    def program(variables, x, targets):
        batched = run(variables, x, targets)
        singles = [run(variables, x[i : i + 1], targets[i : i + 1]) for i in range(batch)]

        def one(xi, ti):
            return {name: r[0] for name, (r, _) in run(variables, xi[None], ti).items()}

        return batched, singles, jax.vmap(one)(x, targets)

    return program


@fuzz_settings(12)
@given(cases("general"), st.sampled_from(sorted(presets(0.0, 1.0))))
def test_random_models_every_preset(case, name):
    """Every preset on a random model: forward, finiteness, batch == single samples == vmap; and for one
    preset (drawn) ``transform`` itself: its forward (own jit) and ``jax.grad`` of the target score."""
    spec, flavor, kind, rng_seed, targets = case
    fn, variables, x = setup(spec, flavor, kind, rng_seed, len(targets))
    check_flavors_agree(spec, rng_seed, x)
    composites = presets(*bounds(x))

    y_model = np.asarray(compile_fast(fn, variables, x)(variables, x))
    assert np.isfinite(y_model).all()
    program = relevance_program(fn, composites, len(targets))
    batched, singles, mapped = compile_fast(program, variables, x, targets)(variables, x, targets)
    for preset, (relevance, y) in batched.items():
        assert relevance.shape == x.shape and relevance.dtype == x.dtype, preset
        # the same primitives in another XLA program: equal up to float32 rounding of other fusions
        np.testing.assert_allclose(np.asarray(y), y_model, rtol=1e-6, atol=1e-6, err_msg=preset)
        assert np.isfinite(np.asarray(relevance)).all(), f"{preset}: NaN/Inf in relevance"
        for i, single in enumerate(singles):
            np.testing.assert_allclose(
                np.asarray(single[preset][1][0]), np.asarray(y[i]), rtol=1e-5, atol=1e-6
            )
            difference = relative_difference(single[preset][0], relevance[i : i + 1])
            assert difference <= SAME_RTOL, f"{preset}: sample {i} alone differs by {difference:.2e}"
        difference = relative_difference(mapped[preset], relevance)
        assert difference <= SAME_RTOL, f"{preset}: vmap of single samples differs by {difference:.2e}"

    # the printed plan: every layer and operation of the model has a row
    assert str(dtd.describe(fn, variables, x, composite=composites[name]))
    # transform itself, called eagerly (its own jit, default XLA options), and jax.grad through it
    f = dtd.transform(fn, composites[name])
    np.testing.assert_array_equal(np.asarray(f(variables, x)), np.asarray(jax.jit(fn)(variables, x)))
    onehot = jax.nn.one_hot(targets, spec.classes)
    gradient = lambda v, x: jax.grad(lambda x: (f(v, x) * onehot).sum())(x)
    grad = compile_fast(gradient, variables, x)(variables, x)
    difference = relative_difference(grad, batched[name][0])
    assert difference <= SAME_RTOL, f"{name}: jax.grad of transform differs from explain by {difference:.2e}"


# ==================================================================================================
# Unsupported operations: a jaxdtd error naming the primitive, nothing else
# ==================================================================================================


@fuzz_settings(20)
@given(models("general", unsupported=True), st.sampled_from(["flax", "jax"]))
def test_unsupported_operation_raises_a_jaxdtd_error(spec, flavor):
    """An operation without a rule anywhere in a supported model: every preset raises
    ``UnsupportedOperationError`` naming its primitive (when the plan is built, before anything is
    compiled), and nothing else."""
    fn, variables, x = setup(spec, flavor, "box", 0, 2)
    (op,) = [op for _, op in named_ops(spec.ops) if isinstance(op, Unsupported)]
    primitive = UNSUPPORTED_PRIMITIVE[op.name]
    jax.eval_shape(fn, variables, x)  # the model itself is fine
    for name, composite in presets(0.0, 1.0).items():
        with pytest.raises(dtd.UnsupportedOperationError) as info:
            dtd.transform(fn, composite)(variables, x)
        message = str(info.value)
        assert message.startswith("jaxdtd has no relevance rule"), (name, message)
        assert f"primitive '{primitive}'" in message, (name, message)
        assert info.value.primitive == primitive, (name, message)


# ==================================================================================================
# Conservation
# ==================================================================================================

#: z+ everywhere above the first layer, the bias dropped; the first layer Flat (any input).
FLAT_ZPLUS = dtd.Composite(
    first=R.Flat(), conv=R.ZPlus(zero_bias=True), dense=R.ZPlus(zero_bias=True), name="Flat+ZPlus"
)

#: The conservation checks use a negligible stabilizer.  With the presets' 1e-6 every denominator
#: ``d`` loses ``eps / d`` of its relevance, and w^2's ``d = sum_i w_ij^2`` does not grow with the input:
#: a neuron of fan-in 1 with ``|w| = 0.005`` loses 4% (observed: 3.4% of one layer's relevance).
TINY = 1e-9


def with_tiny_stabilizer(composite: C.Composite) -> C.Composite:
    """``composite`` with every stabilizer, Norm's on sums included, set to :data:`TINY`."""

    def tiny(rule):
        return None if rule is None else dataclasses.replace(rule, stabilizer=TINY)

    return dataclasses.replace(
        composite,
        first=tiny(composite.first),
        conv=tiny(composite.conv),
        dense=tiny(composite.dense),
        operations={name: R.Norm(TINY) for name in ("add", "reduce_window_sum", "reduce_sum")},
    )


@fuzz_settings(10)
@given(cases("deep_taylor", batch=(2, 4)))
def test_deep_taylor_family_conserves(case):
    """DeepTaylor(0, 1) (z^B first, inputs in [0, 1]), DeepTaylor() (w^2 first) and Flat + z+ on the
    ``deep_taylor`` vocabulary (``fuzz_models.models``): per sample with ``f_c(x) > MIN_SCORE`` the
    relevance sums to ``f_c(x)``, to 1e-5 relative (float32 rounding; stabilizer :data:`TINY`).  On
    inputs in [0, 1] and without standalone BatchNorms (whose negative scales make values negative, and
    Norm on their sums then gives negative shares) the relevance is also positive: every factor of z+,
    z^B (in the box), w^2, Flat and Norm on non-negative sums is >= 0."""
    spec, flavor, kind, rng_seed, _ = case
    fn, variables, x = setup(spec, flavor, kind, rng_seed, len(case[4]))
    score = np.asarray(jax.jit(fn)(variables, x), dtype=np.float64).max(axis=1)
    keep = score > MIN_SCORE
    assume(keep.any())
    composites = {"DeepTaylor()": C.DeepTaylor(), "Flat+ZPlus": FLAT_ZPLUS}
    if kind == "box":
        composites["DeepTaylor(0,1)"] = C.DeepTaylor(0.0, 1.0)
    composites = {name: with_tiny_stabilizer(c) for name, c in composites.items()}
    out = compile_fast(explain_all(fn, composites), variables, x, None)(variables, x, None)
    for name, (relevance, _) in out.items():
        assert np.isfinite(np.asarray(relevance)).all(), name
        sums = per_sample_sums(relevance)
        np.testing.assert_allclose(sums[keep], score[keep], rtol=1e-5, atol=0, err_msg=name)
        if kind == "box" and standalone_batchnorms(spec.ops) == 0:
            # z^B computes x sum(w s) - h sum(w- s): a rounding error may show as a tiny negative value
            r = np.asarray(relevance, dtype=np.float64).reshape(x.shape[0], -1)[keep]
            floor = -1e-6 * score[keep][:, None]
            assert (r >= floor).all(), f"{name}: negative relevance {r.min()} for scores {score[keep]}"


#: LRP-0 everywhere: Epsilon(0) on every layer, Norm(0) on sums, average/sum pooling and means.
LRP0 = dtd.Composite(
    dense=R.Epsilon(0.0),
    conv=R.Epsilon(0.0),
    operations={"add": R.Norm(0.0), "reduce_window_sum": R.Norm(0.0), "reduce_sum": R.Norm(0.0)},
    name="LRP-0",
)


@fuzz_settings(10)
@given(cases("epsilon", batch=(2, 4), data=("normal",)))
def test_lrp0_conserves(case):
    """LRP-0 on the bias-free ``epsilon`` vocabulary: each layer passes on ``R_j z_j / z_j``, each Norm
    ``R s / s``, so the input relevance sums to ``f_c(x)`` exactly up to rounding.  Rounding errors of
    mixed-sign sums scale with the magnitude of the terms: allowed ``1e-4 (|f_c| + sum_i |R_i|)``."""
    spec, flavor, kind, rng_seed, targets = case
    fn, variables, x = setup(spec, flavor, kind, rng_seed, len(targets))
    y = np.asarray(jax.jit(fn)(variables, x), dtype=np.float64)
    score = y[np.arange(len(targets)), targets]
    keep = np.abs(score) > MIN_SCORE
    assume(keep.any())
    out = compile_fast(explain_all(fn, {"LRP-0": LRP0}), variables, x, targets)(variables, x, targets)
    relevance, _ = out["LRP-0"]
    assert np.isfinite(np.asarray(relevance)).all()
    sums = per_sample_sums(relevance)
    magnitude = np.abs(np.asarray(relevance, dtype=np.float64)).reshape(x.shape[0], -1).sum(axis=1)
    error = np.abs(sums - score)[keep]
    bound = 1e-4 * (np.abs(score) + magnitude)[keep]
    assert (error <= bound).all(), f"sum R - f_c = {error} > {bound}"


# ==================================================================================================
# Minimal reproducers of what the fuzzer found (kept out of the random strategy, see fuzz_models)
# ==================================================================================================


def test_batchnorm_after_a_transposed_layer_is_folded():
    """``relu((x @ w) * s) @ u`` and the same with ``(w.T @ x.T).T``: one function, one heatmap.  With the
    scale folded (``x @ w``) DeepTaylor(0, 1) conserves, ``R = [1, 1]`` for ``f(x) = 2``; unfolded, the
    z^B denominator of the first layer is ``sum(x w - h w-) = -2 + 2 = 0`` and all relevance is lost."""
    w, s, u = jnp.array([[-1.0], [-1.0]]), jnp.array([-1.0]), jnp.array([[1.0]])
    x = jnp.array([[1.0, 1.0]])
    composite = C.DeepTaylor(0.0, 1.0)
    direct, y = dtd.explain(lambda p, x: jax.nn.relu((x @ w) * s) @ u, None, x, target=0, composite=composite)
    np.testing.assert_allclose(np.asarray(direct), [[1.0, 1.0]], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y), [[2.0]])
    transposed, _ = dtd.explain(
        lambda p, x: jax.nn.relu((w.T @ x.T).T * s) @ u, None, x, target=0, composite=composite
    )
    np.testing.assert_allclose(np.asarray(transposed), np.asarray(direct), rtol=1e-5)  # was [[0, 0]]


def _padded_wider_than_the_kernel():
    """``(x, padded, explicit)``: a 1-D convolution with padding ``(2, 0)`` and kernel 2 (its first
    window lies in the padding), and the same convolution of ``jnp.pad(x, 2, 0)`` with VALID padding."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 1)), dtype=jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(2, 1, 4)), dtype=jnp.float32)
    numbers = ("NWC", "WIO", "NWC")

    def padded(p, x):
        return jax.lax.conv_general_dilated(x, w, (1,), ((2, 0),), dimension_numbers=numbers).sum(1)

    def explicit(p, x):
        x = jnp.pad(x, ((0, 0), (2, 0), (0, 0)))
        return jax.lax.conv_general_dilated(x, w, (1,), "VALID", dimension_numbers=numbers).sum(1)

    return x, padded, explicit


@pytest.mark.xfail(
    jax.__version_info__ < (0, 12),  # fixed in the XLA of jaxlib 0.12: there the test passes
    strict=True,
    reason="XLA:CPU computes f32 convolutions with negative low padding wrong (out-of-bounds reads, "
    "openxla/xla#48713); the transpose of a convolution whose low padding exceeds (k - 1) * dilation "
    "has such padding, so jax.grad is wrong for it (jaxdtd's rules work around it: see the next test)",
)
def test_xla_conv_transpose_with_negative_low_padding():
    """The two forms of :func:`_padded_wider_than_the_kernel` are one function, but their gradients
    differ on CPU: the gradient of the second input entry is that of the first."""
    x, padded, explicit = _padded_wider_than_the_kernel()
    np.testing.assert_allclose(np.asarray(padded(None, x)), np.asarray(explicit(None, x)), rtol=1e-6)
    grads = {
        name: jax.grad(lambda x, f=f: f(None, x)[:, 0].sum())(x)
        for name, f in (("padded", padded), ("explicit", explicit))
    }
    np.testing.assert_allclose(np.asarray(grads["padded"]), np.asarray(grads["explicit"]), rtol=1e-5)


def test_a_convolution_padded_wider_than_its_kernel_gets_exact_relevance():
    """The convolution of the test above, padded ``(2, 0)`` with a kernel of 2: jax.grad is wrong for
    it on XLA:CPU, but jaxdtd's rules transpose it as an explicit pad and a convolution padded
    ``(1, 0)`` (``AffineLayer.apply_linear``), so its relevance equals that of the explicitly padded
    form, which is exact (LRP-0 on this bias-free linear map is gradient x input)."""
    x, padded, explicit = _padded_wider_than_the_kernel()
    exact = x * jax.grad(lambda x: explicit(None, x)[:, 0].sum())(x)
    for f in (padded, explicit):
        for composite in (R.Epsilon(0.0), C.EpsilonPlusFlat()):
            relevance, y = dtd.explain(f, None, x, target=0, composite=composite)
            np.testing.assert_allclose(np.asarray(y), np.asarray(explicit(None, x)), rtol=1e-5, atol=1e-6)
            if composite == R.Epsilon(0.0):
                np.testing.assert_allclose(np.asarray(relevance), np.asarray(exact), rtol=1e-4, atol=1e-6)
    flat = [dtd.explain(f, None, x, target=0, composite=C.EpsilonPlusFlat())[0] for f in (padded, explicit)]
    np.testing.assert_allclose(np.asarray(flat[0]), np.asarray(flat[1]), rtol=1e-5, atol=1e-6)
    # the explicit pad is absorbed into the convolution's padding (then handled as the padded one)
    layer = dtd.trace_plan(explicit, R.Epsilon(0.0), (None, x)).layer_rules[0][0]
    assert layer.linear.params["padding"] == ((2, 0),)


class CausalNet(nn.Module):
    """Conv(1, kernel 2, ones, no bias) -> Dense(1, ones, no bias): ``f(x) = 2 x_0 + x_1``."""

    padding: Any

    @nn.compact
    def __call__(self, x):
        ones = nn.initializers.ones
        h = nn.Conv(1, (2,), padding=self.padding, use_bias=False, kernel_init=ones)(x)
        return nn.Dense(1, use_bias=False, kernel_init=ones)(h.reshape(h.shape[0], -1))


@pytest.mark.parametrize("composite", [C.DeepTaylor(), FLAT_ZPLUS], ids=["DeepTaylor()", "Flat+ZPlus"])
def test_zero_padding_by_jnp_pad_is_not_a_bound(composite):
    """``nn.Conv(padding="CAUSAL")`` (``jnp.pad`` then a VALID convolution) and ``nn.Conv(padding=((1, 0),))``
    are one function; on ``x = [1, 1]`` both rules conserve ``f(x) = 3``.  (Before the pad was absorbed
    into the convolution's padding, w^2 and Flat handed the padded zero relevance, which pad's gradient
    then dropped: ``R = [1.5, 1]``, sum 2.5.)"""
    x = jnp.ones((1, 2, 1))
    sums = {}
    for padding in ("CAUSAL", ((1, 0),)):
        model = CausalNet(padding)
        variables = model.init(jax.random.PRNGKey(0), x)
        relevance, y = dtd.explain(model.apply, variables, x, target=0, composite=composite)
        np.testing.assert_allclose(np.asarray(y), [[3.0]])
        sums[str(padding)] = float(relevance.sum())
    np.testing.assert_allclose(sums["((1, 0),)"], 3.0, rtol=1e-5)
    np.testing.assert_allclose(sums["CAUSAL"], 3.0, rtol=1e-5)  # is 2.5


@pytest.mark.parametrize(
    "composite",
    [C.EpsilonPlusFlat(), C.EpsilonGammaBox(-3.0, 3.0), C.DeepTaylor(-3.0, 3.0), C.EpsilonAlpha2Beta1()],
    ids=["EpsilonPlusFlat", "EpsilonGammaBox", "DeepTaylor", "EpsilonAlpha2Beta1"],
)
def test_a_scale_after_a_channels_first_convolution_transposed_back_is_folded(composite):
    """``conv(x) * s + b`` in NHWC, and the same convolution computed channels-first (``NCHW``) and
    transposed back before the per-channel scale and shift (a BatchNorm): one function, one heatmap."""
    key = jax.random.split(jax.random.PRNGKey(3), 5)
    x = jax.random.uniform(key[0], (2, 5, 5, 3), minval=-3.0, maxval=3.0)
    w = jax.random.normal(key[1], (3, 3, 3, 4))  # HWIO
    s, b = jax.random.normal(key[2], (4,)), 0.1 * jax.random.normal(key[3], (4,))
    head = jax.random.normal(key[4], (5 * 5 * 4, 2))

    def nhwc(p, x):
        z = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(z * s + b).reshape(x.shape[0], -1) @ head

    def nchw(p, x):
        z = jax.lax.conv_general_dilated(
            x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), (1, 1), "SAME",
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
        )  # fmt: skip
        return jax.nn.relu(z.transpose(0, 2, 3, 1) * s + b).reshape(x.shape[0], -1) @ head

    direct, y = dtd.explain(nhwc, None, x, target=1, composite=composite)
    transposed, y_t = dtd.explain(nchw, None, x, target=1, composite=composite)
    np.testing.assert_allclose(np.asarray(y_t), np.asarray(y), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(transposed), np.asarray(direct), rtol=1e-4, atol=1e-5)
    plan = dtd.trace_plan(nchw, composite, (None, x))
    assert plan.layer_rules[0][0].folds_scale


@pytest.mark.parametrize(
    "composite",
    [C.EpsilonPlusFlat(), C.EpsilonGammaBox(-3.0, 3.0), C.DeepTaylor(-3.0, 3.0), C.EpsilonAlpha2Beta1()],
    ids=["EpsilonPlusFlat", "EpsilonGammaBox", "DeepTaylor", "EpsilonAlpha2Beta1"],
)
def test_a_scale_after_a_layer_reshaped_to_channels_is_folded(composite):
    """A dense layer whose output is reshaped to ``(B, H, W, C)`` before a per-channel scale and shift
    (a BatchNorm after a decoder's projection), and the same layer written as one ``einsum`` to
    ``(B, H, W, C)``: one function, one heatmap.  A scale along a merged dimension is not folded."""
    key = jax.random.split(jax.random.PRNGKey(4), 5)
    x = jax.random.uniform(key[0], (3, 6), minval=-3.0, maxval=3.0)
    w = jax.random.normal(key[1], (6, 2, 2, 4))
    s, b = jax.random.normal(key[2], (4,)), 0.1 * jax.random.normal(key[3], (4,))
    head = jax.random.normal(key[4], (16, 2))

    def einsum(p, x):
        z = jnp.einsum("bi,ihwc->bhwc", x, w)
        return jax.nn.relu(z * s + b).reshape(x.shape[0], -1) @ head

    def reshaped(p, x):
        z = (x @ w.reshape(6, 16)).reshape(x.shape[0], 2, 2, 4)
        return jax.nn.relu(z * s + b).reshape(x.shape[0], -1) @ head

    direct, y = dtd.explain(einsum, None, x, target=1, composite=composite)
    viewed, y_v = dtd.explain(reshaped, None, x, target=1, composite=composite)
    np.testing.assert_allclose(np.asarray(y_v), np.asarray(y), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(viewed), np.asarray(direct), rtol=1e-4, atol=1e-5)
    assert dtd.trace_plan(reshaped, composite, (None, x)).layer_rules[0][0].folds_scale
    # a factor along a part of the split feature axis is per-feature too; one that varies along a
    # dimension mixing the batch into the features is not, and stays a scaling of the output
    along_h = lambda p, x: ((x @ w.reshape(6, 16)).reshape(3, 2, 8) * jnp.array([1.0, -2.0])[:, None]).sum(
        (1, 2)
    )
    mixed = lambda p, x: (
        ((x @ w.reshape(6, 16)).reshape(48) * jnp.linspace(0.5, 1.5, 48)).reshape(3, 16).sum(1)
    )
    for fn, folds in ((along_h, True), (mixed, False)):
        plan = dtd.trace_plan(lambda p, x, fn=fn: fn(p, x)[:, None], composite, (None, x))
        assert plan.layer_rules[0][0].folds_scale == folds


class PaddedConvNet(nn.Module):
    """Two convolutions whose zero padding is written as ``jnp.pad`` (``hand=True``) or given to the
    convolution (``hand=False``): one function."""

    hand: bool

    @nn.compact
    def __call__(self, x):
        pads = ((0, 0), (1, 1), (2, 0), (0, 0))
        if self.hand:
            h = nn.Conv(4, (3, 3), padding="VALID")(jnp.pad(x, pads))
        else:
            h = nn.Conv(4, (3, 3), padding=((1, 1), (2, 0)))(x)
        h = jax.nn.relu(h)
        if self.hand:
            h = nn.Conv(3, (2, 2), padding="VALID")(jnp.pad(h, ((0, 0), (1, 0), (0, 1), (0, 0))))
        else:
            h = nn.Conv(3, (2, 2), padding=((1, 0), (0, 1)))(h)
        return nn.Dense(2)(jax.nn.relu(h).reshape(h.shape[0], -1))


@pytest.mark.parametrize(
    "composite",
    [C.EpsilonPlusFlat(), C.EpsilonGammaBox(0.0, 1.0), C.DeepTaylor(0.0, 1.0), C.EpsilonAlpha2Beta1()],
    ids=["EpsilonPlusFlat", "EpsilonGammaBox", "DeepTaylor", "EpsilonAlpha2Beta1"],
)
def test_jnp_pad_before_a_convolution_gives_the_relevance_of_the_padded_convolution(composite):
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 5, 4, 2))
    variables = PaddedConvNet(False).init(jax.random.PRNGKey(1), x)
    results = {}
    for hand in (True, False):
        R, y = dtd.explain(PaddedConvNet(hand).apply, variables, x, target=1, composite=composite)
        results[hand] = np.asarray(R), np.asarray(y)
    np.testing.assert_allclose(results[True][1], results[False][1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "head",
    [
        lambda x: jax.nn.leaky_relu(jnp.sum(x, axis=1) / 2.0),
        lambda x: jax.nn.leaky_relu(nn.avg_pool(x, (2,), strides=(2,))).reshape(x.shape[0], -1),
    ],
    ids=["sum/2", "avg_pool"],
)
def test_mean_then_leaky_relu(head):
    """A Norm whose constant scaling is fused after it (sum / n: jnp.mean, average pooling) feeding an
    elementwise island (leaky_relu): the scaling belongs to the Norm (found by the fuzzer)."""
    x = jnp.ones((2, 4, 1))
    fn = lambda p, x: head(x) @ jnp.ones((head(x).shape[-1], 2))
    relevance, y = dtd.explain(fn, None, x, target=0, composite=R.Epsilon())
    np.testing.assert_allclose(np.asarray(y), np.asarray(fn(None, x)))
    assert np.isfinite(np.asarray(relevance)).all()
