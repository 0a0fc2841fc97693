"""Every shape of affine layer the engine groups, against the explicit-Jacobian reference.

Convolutions in 1, 2 and 3 dimensions with stride, padding, dilation, feature groups (depthwise)
and input dilation (transposed convolution); ``dot_general`` with several contraction dimensions
and with the data on either side; plus the nested calls the tracer must inline.
"""

from __future__ import annotations

import functools
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matrix_reference import relevance as reference

import jaxdtd as dtd
from jaxdtd import rules as R

RULES = {
    "epsilon": (R.Epsilon(1e-6), {}),
    "epsilon_big": (R.Epsilon(0.5), {"eps": 0.5}),
    "zplus": (R.ZPlus(), {}),
    "zplus_nobias": (R.ZPlus(zero_bias=True), {"zero_bias": True}),
    "alphabeta": (R.AlphaBeta(2.0, 1.0), {}),
    "alphabeta_3_2": (R.AlphaBeta(3.0, 2.0), {"alpha": 3.0, "beta": 2.0}),
    "gamma": (R.Gamma(0.25), {}),
    "gamma_nobias": (R.Gamma(1.0, zero_bias=True), {"gamma": 1.0, "zero_bias": True}),
    "zbox": (R.ZBox(-2.0, 3.0), {"low": -2.0, "high": 3.0}),
    "wsquare": (R.WSquare(), {}),
    "flat": (R.Flat(), {}),
}


def conv(x, w, *, strides, padding, lhs_dilation=None, rhs_dilation=None, groups=1, spec):
    return jax.lax.conv_general_dilated(
        x,
        w,
        strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=spec,
        feature_group_count=groups,
    )


rng = np.random.default_rng(0)
LAYERS = {
    "conv1d_stride2_same": (
        functools.partial(conv, strides=(2,), padding="SAME", spec=("NWC", "WIO", "NWC")),
        (2, 7, 2),
        (3, 2, 3),
    ),
    "conv2d_dilated_grouped": (
        functools.partial(
            conv,
            strides=(1, 1),
            padding=((1, 2), (0, 1)),
            rhs_dilation=(2, 1),
            groups=2,
            spec=("NHWC", "HWIO", "NHWC"),
        ),
        (2, 5, 4, 4),
        (2, 2, 2, 4),
    ),
    "conv2d_depthwise_nchw": (
        functools.partial(conv, strides=(2, 1), padding="SAME", groups=3, spec=("NCHW", "OIHW", "NCHW")),
        (1, 3, 5, 4),
        (3, 1, 3, 3),
    ),
    "conv3d": (
        functools.partial(conv, strides=(1, 2, 1), padding="SAME", spec=("NDHWC", "DHWIO", "NDHWC")),
        (1, 3, 4, 3, 2),
        (2, 2, 2, 2, 2),
    ),
    "conv_transpose": (
        functools.partial(
            conv, strides=(1, 1), padding=((1, 1), (1, 1)), lhs_dilation=(2, 2), spec=("NHWC", "HWIO", "NHWC")
        ),
        (1, 3, 3, 2),
        (2, 2, 2, 2),
    ),
    "dense_two_contractions": (lambda x, w: jnp.einsum("bij,ijk->bk", x, w), (3, 2, 4), (2, 4, 5)),
    "dense_data_on_rhs": (lambda x, w: jnp.einsum("ki,bi->bk", w, x), (3, 4), (5, 4)),
    "dense_with_batch_axes": (lambda x, w: jnp.einsum("bti,io->bto", x, w), (2, 3, 4), (4, 3)),
}


def layer_case(name):
    linear, x_shape, w_shape = LAYERS[name]
    local = np.random.default_rng(zlib.crc32(name.encode()))
    x = jnp.asarray(local.normal(size=x_shape), jnp.float32)
    w = jnp.asarray(local.normal(size=w_shape), jnp.float32)
    out_shape = jax.eval_shape(linear, x, w).shape
    feature_axis = 1 if name == "conv2d_depthwise_nchw" else -1
    b_shape = [1] * len(out_shape)
    b_shape[feature_axis] = out_shape[feature_axis]
    b = jnp.asarray(local.normal(size=b_shape) * 0.5, jnp.float32)
    ct = jnp.asarray(local.normal(size=out_shape), jnp.float32)
    return linear, x, w, b, ct


def jacobian_matrix(linear, x, w):
    flat = lambda v: linear(v.reshape(x.shape), w).reshape(-1)
    return np.asarray(jax.jacobian(flat)(x.reshape(-1)), np.float64).T  # (inputs, outputs)


@pytest.mark.parametrize("rule_name", list(RULES))
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_layer_rule_matches_explicit_jacobian(layer_name, rule_name):
    linear, x, w, b, ct = layer_case(layer_name)
    rule, kwargs = RULES[rule_name]
    fn = lambda w, b, x: linear(x, w) + b
    f = dtd.transform(fn, rule, argnums=2)
    y = fn(w, b, x)
    np.testing.assert_allclose(f(w, b, x), y, rtol=1e-6)
    got = jax.grad(lambda x: (f(w, b, x) * ct).sum())(x)
    M = jacobian_matrix(linear, x, w)
    M_ones = jacobian_matrix(linear, x, jnp.ones_like(w))
    bias = np.broadcast_to(np.asarray(b), y.shape).reshape(-1)
    R_out = (np.asarray(y, np.float64) * np.asarray(ct, np.float64)).reshape(-1)
    want = reference(
        rule_name.split("_")[0].replace("big", ""),
        np.asarray(x).reshape(-1),
        M,
        bias,
        R_out,
        M_ones=M_ones,
        **kwargs,
    )
    np.testing.assert_allclose(np.asarray(got).reshape(-1), want, rtol=2e-4, atol=2e-5 * np.abs(want).max())


def test_flax_dense_general_and_conv_transpose_are_layers():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.DenseGeneral(features=(2, 3), axis=-1, name="dg")(x)
            h = nn.relu(h).reshape(x.shape[0], 1, 1, 6)
            h = nn.ConvTranspose(2, (2, 2), strides=(2, 2), name="up")(h)
            return nn.Dense(3, name="out")(nn.relu(h).reshape(x.shape[0], -1))

    model = Net()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4))
    variables = model.init(jax.random.PRNGKey(1), x)
    plan = dtd.trace_plan(model.apply, dtd.composites.EpsilonPlus(), (variables, x))
    assert [(layer.module_path, layer.kind, type(rule).__name__) for layer, rule, _ in plan.layer_rules] == [
        ("Net/dg", "dense", "Epsilon"),
        ("Net/up", "conv", "ZPlus"),
        ("Net/out", "dense", "Epsilon"),
    ]


@jax.custom_vjp
def custom_double(x):
    return 2.0 * x


custom_double.defvjp(lambda x: (2.0 * x, None), lambda _, g: (2.0 * g,))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda f: f,
        jax.jit,
        jax.checkpoint,
        lambda f: lambda x: jax.jit(jax.checkpoint(f))(x),
    ],
    ids=["plain", "jit", "remat", "jit_of_remat"],
)
def test_nested_calls_are_inlined(wrap):
    w1 = jnp.array([[1.0, -1.0, 0.5], [2.0, 1.0, -1.0]])
    w2 = jnp.array([[1.0], [2.0], [-0.5]])

    def inner(x):
        return custom_double(jax.nn.relu(x @ w1))  # custom_jvp (relu) and custom_vjp inside

    fn = lambda x: wrap(inner)(x) @ w2
    f = dtd.transform(fn, R.Epsilon(0.0), argnums=0)
    x = jnp.array([[1.0, 0.5]])
    np.testing.assert_allclose(f(x), fn(x), rtol=1e-6)
    relevance = jax.grad(lambda x: f(x).sum())(x)
    # LRP-0 on two bias-free layers (Pass through relu and the custom scaling) is exactly conservative
    np.testing.assert_allclose(relevance.sum(), fn(x).sum(), rtol=1e-5)
    plan = dtd.trace_plan(fn, R.Epsilon(0.0), (x,), argnums=0)
    assert len(plan.layer_rules) == 2


def test_same_jitted_function_called_twice_gets_separate_layers():
    w = jnp.array([[1.0, 2.0], [3.0, -1.0]])
    layer = jax.jit(lambda x: x @ w)
    fn = lambda x: layer(jax.nn.relu(layer(x))).sum(-1, keepdims=True)
    plan = dtd.trace_plan(fn, R.ZPlus(), (jnp.ones((1, 2)),), argnums=0)
    assert len(plan.layer_rules) == 2
    assert [layer.first for layer, _, _ in plan.layer_rules] == [True, False]
