"""Bad input gets a specific error; zero denominators never give NaN."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import MLP

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd import rules as R


class Quotient(nn.Module):
    @nn.compact
    def __call__(self, x):
        a, b = nn.Dense(4)(x), nn.Dense(4)(x)
        h = a / b  # QUOTIENT_LINE: a division by a data value
        return nn.Dense(2)(h)


class Cumulative(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(jax.lax.cumprod(nn.Dense(3)(x), axis=1))  # CUMPROD_LINE


class ThreeProblems(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4)(x)
        g = h / nn.Dense(4, name="Gate")(x)  # PROBLEM_1
        s = jnp.sort(g, axis=1)  # PROBLEM_2
        c = jax.lax.cumsum(s, axis=1)  # PROBLEM_3
        return nn.Dense(2)(c)


def _line_of(marker: str) -> int:
    with open(__file__) as handle:
        for number, line in enumerate(handle, start=1):
            if marker in line and "_line_of" not in line:
                return number
    raise AssertionError(marker)


_FIX_LINE = (
    "Where a parameter-free rule is right for an operation ({names}), assign it explicitly with "
    "Composite(..., operations={{primitive: rule}}) (rules.Pass(): relevance unchanged through an "
    "elementwise operation of one data operand; rules.Norm(): in proportion to each operand's "
    "contribution, for operations linear in the data; rules.Gradient(): the plain gradient)."
)
_DIVISION_FIX = (
    "Fix: if the divisor should be a constant for the explanation (a normalization), detach it with "
    "jax.lax.stop_gradient"
)


def test_division_by_data_names_primitive_module_and_source_line():
    model, x = Quotient(), jnp.ones((2, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    f = dtd.transform(model.apply, C.EpsilonPlus())
    with pytest.raises(dtd.UnsupportedOperationError) as info:
        f(variables, x)
    where = f"{__file__}:{_line_of('QUOTIENT_LINE')} (Quotient.__call__)"
    assert str(info.value) == "\n".join(
        [
            "jaxdtd has no relevance rule for 1 operation on the explained data:",
            f"  1. primitive 'div' at module 'Quotient', {where}: division by a data-dependent value. "
            + _DIVISION_FIX,
            _FIX_LINE.format(names="'div'"),
        ]
    )
    assert info.value.primitive == "div" and info.value.module_path == "Quotient"
    assert len(info.value.problems) == 1


def test_every_problem_is_listed_in_one_error_with_the_users_line():
    """A division by data, a sort (inside jnp.sort, which JAX wraps in jit) and a cumulative sum:
    one error lists all three, each at the user's line, never '<unknown source>'."""
    model, x = ThreeProblems(), jnp.ones((2, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    with pytest.raises(dtd.UnsupportedOperationError) as info:
        dtd.transform(model.apply, R.Epsilon())(variables, x)
    line = lambda marker: f"{__file__}:{_line_of(marker)} (ThreeProblems.__call__)"
    assert str(info.value) == "\n".join(
        [
            "jaxdtd has no relevance rule for 3 operations on the explained data:",
            f"  1. primitive 'div' at module 'ThreeProblems', {line('PROBLEM_1')}: division by a "
            "data-dependent value. " + _DIVISION_FIX,
            f"  2. primitive 'sort' at module 'ThreeProblems', {line('PROBLEM_2')}: sort of data",
            f"  3. primitive 'cumsum' at module 'ThreeProblems', {line('PROBLEM_3')}: cumulative sum of data",
            _FIX_LINE.format(names="'div', 'sort', 'cumsum'"),
        ]
    )
    assert [p.primitive for p in info.value.problems] == ["div", "sort", "cumsum"]


def test_unsupported_operations_behind_stop_gradient_need_no_rule():
    """Relevance liveness: a branch whose result is detached receives no relevance, so its
    unsupported operations (division by data, a product, a cumulative sum) need no rule."""

    def fn(w, x):
        h = x @ w
        gate = jax.lax.stop_gradient(jax.lax.cumsum(h * h, axis=1) / (1.0 + jnp.abs(h).sum(1, keepdims=True)))
        return (h * gate) @ jnp.ones((3, 2))

    w = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4))
    f = dtd.transform(fn, R.Epsilon(0.0))
    np.testing.assert_allclose(f(w, x), fn(w, x), rtol=1e-6)
    relevance = jax.grad(lambda x: f(w, x)[:, 0].sum())(x)
    # the same as the model with the gate given as a constant
    gate = jax.lax.stop_gradient(
        jax.lax.cumsum((x @ w) ** 2, axis=1) / (1.0 + jnp.abs(x @ w).sum(1, keepdims=True))
    )
    g = dtd.transform(lambda w, x: ((x @ w) * gate) @ jnp.ones((3, 2)), R.Epsilon(0.0))
    np.testing.assert_allclose(relevance, jax.grad(lambda x: g(w, x)[:, 0].sum())(x), rtol=1e-6)
    assert dtd.trace_plan(fn, R.Epsilon(0.0), (w, x)).layer_rules[0][1] == R.Epsilon(0.0)


def test_cast_out_of_floating_point_on_the_data_path_raises():
    def quantised(w, x):
        x = (x * 255).astype(jnp.uint8).astype(jnp.float32) / 255  # CAST_LINE
        return x @ w

    w, x = jnp.ones((3, 2)), jnp.full((2, 3), 0.5)
    with pytest.raises(dtd.UnsupportedOperationError) as info:
        dtd.transform(quantised, R.Epsilon())(w, x)
    message = str(info.value)
    assert (
        f"primitive 'convert_element_type' at module '<top level>', {__file__}:{_line_of('CAST_LINE')} "
        "(test_cast_out_of_floating_point_on_the_data_path_raises.<locals>.quantised): a cast of the "
        "explained data to uint8 (out of floating point) cuts the relevance path, so every input "
        "behind it would get zero relevance. Fix: keep the data in floating point"
    ) in message
    # a cast between floating-point types keeps the relevance path (bfloat16 too: not a numpy float)
    expected = jax.grad(lambda x: dtd.transform(lambda w, x: x @ w, R.Epsilon())(w, x)[:, 0].sum())(x)
    for dtype in (jnp.float16, jnp.bfloat16):
        half = lambda w, x, dtype=dtype: x.astype(dtype).astype(jnp.float32) @ w
        relevance = jax.grad(lambda x, half=half: dtd.transform(half, R.Epsilon())(w, x)[:, 0].sum())(x)
        np.testing.assert_allclose(relevance, expected, rtol=1e-6)


def test_unknown_primitive_and_explicit_fallback():
    model, x = Cumulative(), jnp.ones((2, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    with pytest.raises(
        dtd.UnsupportedOperationError, match=r"primitive 'cumprod' at module 'Cumulative'.*unknown operation"
    ):
        dtd.transform(model.apply, R.Epsilon())(variables, x)
    with pytest.raises(dtd.UnsupportedOperationError, match=f"test_errors.py:{_line_of('CUMPROD_LINE')}"):
        dtd.transform(model.apply, R.Epsilon())(variables, x)
    # an explicit rule makes it work: Pass hands the relevance through unchanged
    f = dtd.transform(model.apply, C.Composite(dense=R.Epsilon(0.0), operations={"cumprod": R.Pass()}))
    np.testing.assert_allclose(f(variables, x), model.apply(variables, x), rtol=1e-6)
    relevance = jax.grad(lambda x: f(variables, x)[:, 0].sum())(x)
    assert np.isfinite(np.asarray(relevance)).all()


def test_data_dependent_control_flow_is_rejected():
    def fn(x):
        return jax.lax.cond(x.sum() > 0, lambda v: v * 2.0, lambda v: v, x) @ jnp.ones((3, 1))

    with pytest.raises(dtd.UnsupportedOperationError, match=r"primitive 'cond'.*data-dependent control flow"):
        dtd.transform(fn, R.Epsilon(), argnums=0)(jnp.ones((1, 3)))


@pytest.mark.parametrize(
    ("make", "error", "pattern"),
    [
        (
            lambda: R.AlphaBeta(2.0, 2.0),
            ValueError,
            r"AlphaBeta: alpha - beta must equal 1 .*alpha=2.0, beta=2.0",
        ),
        (
            lambda: R.AlphaBeta(0.5, -0.5),
            ValueError,
            r"AlphaBeta: beta must be a finite number >= 0, got -0.5",
        ),
        (lambda: R.Epsilon(-1.0), ValueError, r"Epsilon: epsilon must be a finite number >= 0, got -1.0"),
        (lambda: R.Epsilon(float("nan")), ValueError, r"Epsilon: epsilon must be a finite number >= 0"),
        (lambda: R.Epsilon("0.1"), TypeError, r"Epsilon: epsilon must be a number, got str"),
        (lambda: R.Gamma(-0.25), ValueError, r"Gamma: gamma must be a finite number >= 0, got -0.25"),
        (lambda: R.ZPlus(stabilizer=-1e-6), ValueError, r"ZPlus: stabilizer must be a finite number >= 0"),
        (lambda: R.ZBox(1.0, 0.0), ValueError, r"ZBox: low must be <= high everywhere"),
        (lambda: R.ZBox(None, 1.0), ValueError, r"ZBox: low must be a number or an array, got None"),
        (
            lambda: R.ZBox(np.zeros(3), np.ones(4)),
            ValueError,
            r"ZBox: low of shape \(3,\) and high of shape \(4,\)",
        ),
        (lambda: C.DeepTaylor(low=0.0), ValueError, r"DeepTaylor: give both low and high"),
        (
            lambda: C.Composite(dense=R.Pass()),
            TypeError,
            r"Composite.dense: Pass\(\) cannot act on an affine layer",
        ),
        (
            lambda: C.Composite(operations={"sin": R.Epsilon()}),
            TypeError,
            r"Composite.operations\['sin'\] must be an operation rule \(Pass\(\), Norm\(\), Uniform\(\) or "
            r"Gradient\(\)\), got Epsilon\(epsilon=1e-06, zero_bias=False\)",
        ),
        (
            lambda: C.Composite(layers={"*": "zplus"}),
            TypeError,
            r"Composite.layers\['\*'\] must be a jaxdtd rule",
        ),
        (
            lambda: dtd.transform(lambda x: x, "zplus"),
            TypeError,
            r"composite must be a jaxdtd.composites.Composite",
        ),
        (lambda: dtd.transform(lambda x: x, R.ZPlus(), argnums=1.5), TypeError, r"argnums must be an int"),
    ],
)
def test_invalid_construction(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()


def test_argnums_out_of_range(cnn):
    model, variables, x = cnn
    f = dtd.transform(model.apply, C.EpsilonPlus(), argnums=2)
    with pytest.raises(
        ValueError,
        match=re.escape("argnums=2 is out of range for a function called with 2 positional argument(s)"),
    ):
        f(variables, x)
    with pytest.raises(ValueError, match="argnums=3 is out of range"):
        dtd.explain(model.apply, variables, x, composite=C.EpsilonPlus(), argnums=3)


def test_integer_input_is_rejected(cnn):
    model, variables, _ = cnn
    f = dtd.transform(model.apply, C.EpsilonPlus())
    with pytest.raises(
        TypeError,
        match=r"explained argument 1 has the argument itself of dtype int32; "
        r"relevance is defined for floating-point inputs",
    ):
        f(variables, jnp.ones((2, 8, 8, 3), jnp.int32))


def test_zbox_bounds_that_do_not_broadcast_to_a_sample(cnn):
    model, variables, x = cnn
    f = dtd.transform(model.apply, C.EpsilonGammaBox(jnp.zeros(5), jnp.ones(5)))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "ZBox: low has shape (5,), which does not broadcast to one sample of shape (8, 8, 3) "
            "(layer input of shape (2, 8, 8, 3)) at layer 'CNN/Conv_0' (params/Conv_0/kernel)"
        ),
    ):
        f(variables, x)
    # per-channel and per-pixel bounds are fine
    for low in (jnp.zeros(3), jnp.zeros((8, 8, 3)), jnp.zeros((8, 1, 3))):
        dtd.transform(model.apply, C.EpsilonGammaBox(low, low + 1.0))(variables, x)


def test_target_shape_must_match(cnn):
    model, variables, x = cnn
    with pytest.raises(
        ValueError, match=r"target of shape \(3,\) does not match the output of shape \(2, 5\)"
    ):
        dtd.explain(model.apply, variables, x, target=jnp.array([0, 1, 2]), composite=C.EpsilonPlus())
    with pytest.raises(TypeError, match=re.escape("got an array of dtype float32 and shape (2,)")):
        dtd.explain(model.apply, variables, x, target=jnp.array([0.0, 1.0]), composite=C.EpsilonPlus())


PRESETS = {
    "DeepTaylor": C.DeepTaylor(0.0, 1.0),
    "DeepTaylorW2": C.DeepTaylor(),
    "EpsilonPlus": C.EpsilonPlus(),
    "EpsilonPlusFlat": C.EpsilonPlusFlat(),
    "EpsilonGammaBox": C.EpsilonGammaBox(0.0, 1.0),
    "EpsilonAlpha2Beta1": C.EpsilonAlpha2Beta1(),
    "EpsilonAlpha2Beta1Flat": C.EpsilonAlpha2Beta1Flat(),
    "LRP0": R.Epsilon(0.0),
    "Gamma": R.Gamma(0.25),
    "WSquare": R.WSquare(),
    "Flat": R.Flat(),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_zero_input_and_dead_network_give_no_nan(cnn, name):
    model, variables, x = cnn
    composite = PRESETS[name]
    zero_bias = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if "bias" in jax.tree_util.keystr(p) else v, variables
    )
    dead = jax.tree_util.tree_map_with_path(
        lambda p, v: (
            -jnp.ones_like(v)
            if "Conv_0" in jax.tree_util.keystr(p) and "bias" in jax.tree_util.keystr(p)
            else v
        ),
        variables,
    )
    for v, inputs in ((zero_bias, jnp.zeros_like(x)), (variables, jnp.zeros_like(x)), (dead, x)):
        relevance, _ = dtd.explain(model.apply, v, inputs, target=0, composite=composite)
        assert np.isfinite(np.asarray(relevance)).all(), name


def test_mlp_dead_relu_gives_no_nan():
    model = MLP()
    x = jnp.zeros((2, 6))
    variables = model.init(jax.random.PRNGKey(0), x)
    variables = jax.tree_util.tree_map(jnp.zeros_like, variables)
    for composite in PRESETS.values():
        relevance, logits = dtd.explain(model.apply, variables, x, target=1, composite=composite)
        assert np.isfinite(np.asarray(relevance)).all()
        assert (relevance == 0).all()


class TrainBN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(3, (3, 3))(x)
        return nn.BatchNorm(use_running_average=False)(x).mean(axis=(1, 2))


def test_batchnorm_in_training_mode_says_how_to_switch_it_off():
    model, x = TrainBN(), jnp.ones((2, 4, 4, 1))
    variables = model.init(jax.random.PRNGKey(0), x)
    fn = lambda v, x: model.apply(v, x, mutable=["batch_stats"])[0]
    with pytest.raises(dtd.UnsupportedOperationError) as info:
        dtd.transform(fn, C.EpsilonPlus())(variables, x)
    message = str(info.value)
    assert "module 'TrainBN/BatchNorm_0'" in message
    assert "BatchNorm in training mode" in message and "use_running_average=True" in message
    assert "model.eval()" in message


@pytest.mark.parametrize(
    ("fn", "primitive", "reason"),
    [
        (
            lambda x: jax.lax.while_loop(lambda v: v.sum() < 10.0, lambda v: v * 2.0, x),
            "while",
            "data-dependent loop",
        ),
        (lambda x: jnp.sort(x, axis=-1), "sort", "sort of data"),
        (lambda x: jax.lax.cumsum(x, axis=1), "cumsum", "cumulative sum of data"),
        (lambda x: jnp.zeros((1, 3)).at[:, jnp.array([0, 1])].set(x[:, :2]), "scatter", "scatter of data"),
        (lambda x: jax.lax.cummax(x, axis=1), "cummax", "unknown operation"),
    ],
    ids=["while", "sort", "cumsum", "scatter", "cummax"],
)
def test_unsupported_data_operations(fn, primitive, reason):
    model = lambda x: fn(x) @ jnp.ones((3, 1))
    with pytest.raises(dtd.UnsupportedOperationError, match=rf"primitive '{primitive}'.*{reason}"):
        dtd.transform(model, R.Epsilon(), argnums=0)(jnp.ones((1, 3)))


def _nnx_batchnorm_in_training_mode():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin, self.bn = nnx.Linear(5, 3, rngs=rngs), nnx.BatchNorm(3, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.lin(x))

    model = Net(nnx.Rngs(0))
    model.train()
    return dtd.from_nnx(model)


def _haiku_batchnorm_in_training_mode():
    hk = pytest.importorskip("haiku")

    def forward(x):
        return hk.BatchNorm(True, True, 0.9)(hk.Linear(3)(x), is_training=True)

    net = hk.transform_with_state(forward)
    params, state = net.init(jax.random.PRNGKey(0), jnp.ones((4, 5)))
    return (lambda p, x: net.apply(p, state, None, x)[0]), params


def _equinox_batchnorm_in_training_mode():
    eqx = pytest.importorskip("equinox")
    linear = eqx.nn.Linear(5, 3, key=jax.random.PRNGKey(0))
    norm, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch")

    def apply(model, x):
        h = jax.vmap(model[0])(x)
        return jax.vmap(model[1], axis_name="batch", in_axes=(0, None), out_axes=(0, None))(h, state)[0]

    return apply, (linear, norm)


@pytest.mark.parametrize(
    "make",
    [_nnx_batchnorm_in_training_mode, _haiku_batchnorm_in_training_mode, _equinox_batchnorm_in_training_mode],
    ids=["nnx", "haiku", "equinox"],
)
def test_batchnorm_in_training_mode_hint_in_every_framework(make):
    apply, variables = make()
    with pytest.raises(dtd.UnsupportedOperationError) as info:
        dtd.transform(apply, R.Epsilon())(variables, jax.random.normal(jax.random.PRNGKey(1), (4, 5)))
    message = str(info.value)
    assert "This looks like a BatchNorm in training mode" in message
    assert (
        "model.eval() in NNX, eqx.nn.inference_mode(model) in Equinox, is_training=False in Haiku" in message
    )
