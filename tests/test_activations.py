"""Every activation of ``jax.nn`` and ``flax.linen`` gets its documented rule or a named error.

Elementwise activations get Pass (the identity rule): the relevance at the activation's input equals
the relevance arriving at its output, however the activation is written (``max``, ``clip``,
``jnp.where`` as in ``hard_tanh`` and ``leaky_relu``, a product with a function of the same value as
in SiLU and GELU: an elementwise island).  The reference is the relevance of the layer after the
activation, computed on the activation's output directly.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdtd as dtd
from jaxdtd import rules as R
from jaxdtd.units import Bind, IslandUnit

ELEMENTWISE = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "leaky_relu": jax.nn.leaky_relu,
    "elu": jax.nn.elu,
    "celu": jax.nn.celu,
    "selu": jax.nn.selu,
    "gelu_erf": lambda v: jax.nn.gelu(v, approximate=False),
    "gelu_tanh": lambda v: jax.nn.gelu(v, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.swish,
    "hard_silu": jax.nn.hard_silu,
    "hard_swish": jax.nn.hard_swish,
    "mish": jax.nn.mish,
    "softplus": jax.nn.softplus,
    "soft_sign": jax.nn.soft_sign,
    "sparse_plus": jax.nn.sparse_plus,
    "squareplus": jax.nn.squareplus,
    "sigmoid": jax.nn.sigmoid,
    "hard_sigmoid": jax.nn.hard_sigmoid,
    "sparse_sigmoid": jax.nn.sparse_sigmoid,
    "log_sigmoid": jax.nn.log_sigmoid,
    "tanh": jax.nn.tanh,
    "hard_tanh": jax.nn.hard_tanh,
    "clip": lambda v: jnp.clip(v, -1.0, 1.0),
    "abs": jnp.abs,
    "sin": jnp.sin,
    "linen.relu": nn.relu,
    "linen.gelu": nn.gelu,
    "linen.silu": nn.silu,
    "linen.elu": nn.elu,
    "linen.leaky_relu": nn.leaky_relu,
    "linen.hard_tanh": nn.hard_tanh,
    "linen.softplus": nn.softplus,
    "linen.selu": nn.selu,
    "linen.celu": nn.celu,
    "linen.hard_swish": nn.hard_swish,
    "linen.log_sigmoid": nn.log_sigmoid,
}

W = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
# large inputs, so that saturating activations (hard_tanh, relu6, hard_sigmoid) saturate
X = 3.0 * jax.random.normal(jax.random.PRNGKey(1), (4, 6))


def _relevance(fn, x):
    f = dtd.transform(fn, R.Epsilon(0.0))
    return jax.grad(lambda v: f(W, v)[:, 0].sum())(x)


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_elementwise_activation_gets_pass(name):
    act = ELEMENTWISE[name]
    relevance = _relevance(lambda w, v: act(v) @ w, X)
    at_output = _relevance(lambda w, h: h @ w, act(X))
    np.testing.assert_allclose(relevance, at_output, rtol=1e-5, atol=1e-6)
    assert not np.allclose(at_output, 0.0)


def test_hard_tanh_passes_relevance_of_saturated_units():
    """hard_tanh is a clip written with jnp.where: its saturated units keep their relevance (as with
    jnp.clip), instead of losing it to the plain gradient of the where."""
    clipped = _relevance(lambda w, v: jnp.clip(v, -1.0, 1.0) @ w, X)
    np.testing.assert_array_equal(_relevance(lambda w, v: jax.nn.hard_tanh(v) @ w, X), clipped)
    saturated = np.abs(np.asarray(X)) > 1.0
    assert saturated.any() and np.abs(np.asarray(clipped))[saturated].max() > 0


def test_island_is_one_unit_in_describe():
    description = dtd.describe(lambda w, v: jax.nn.silu(v) @ w, W, X, composite=R.Epsilon())
    assert description.operations == (("island(logistic+mul)", "Pass", 1),)


def test_where_on_a_constant_mask_routes_relevance():
    """jnp.where with a mask that does not depend on the input selects entries: the gradient routes
    relevance to the kept ones (an activation would pass it everywhere)."""
    mask = jnp.array([True, False, True, True, False, True])
    relevance = _relevance(lambda w, v: jnp.where(mask, v, 0.0) @ w, X)
    np.testing.assert_array_equal(np.asarray(relevance)[:, ~np.asarray(mask)], 0.0)


@pytest.mark.parametrize(
    ("name", "act", "unit"),
    [
        ("glu", lambda v: jax.nn.glu(jnp.concatenate([v, v[:, ::-1]], axis=1)), "Uniform"),
        ("softmax", jax.nn.softmax, "softmax"),
        ("linen.softmax", nn.softmax, "softmax"),
        ("standardize", jax.nn.standardize, "rsqrt cut"),
    ],
)
def test_non_elementwise_activations_get_their_transformer_rule(name, act, unit):
    """GLU's product: the uniform rule; softmax: one softmax unit; standardize: its standard
    deviation is a constant (a cut ``rsqrt``), the centering is kept."""
    the_plan = dtd.trace_plan(lambda w, v: act(v) @ w, R.Epsilon(), (W, X))
    if unit == "Uniform":
        assert [type(r).__name__ for e, r, _ in the_plan.operations if e.name == "mul"] == ["Uniform"]
    elif unit == "softmax":
        assert [u.kind for u in the_plan.unfused_units() if isinstance(u, IslandUnit)] == ["softmax"]
    else:
        assert [u.equation.name for u in the_plan.units if isinstance(u, Bind) and u.cut] == ["rsqrt"]
    assert np.all(np.isfinite(_relevance(lambda w, v: act(v) @ w, X)))


@pytest.mark.parametrize(
    ("name", "act", "primitive", "reason"),
    [
        ("l1-normalize", lambda v: v / jnp.abs(v).sum(axis=1, keepdims=True), "div", "division by a data"),
        ("cumsum", lambda v: jnp.cumsum(v, axis=1), "cumsum", "cumulative sum"),
    ],
)
def test_non_elementwise_operation_without_rule_gets_a_named_error(name, act, primitive, reason):
    with pytest.raises(dtd.UnsupportedOperationError, match=rf"primitive '{primitive}'.*{reason}"):
        _relevance(lambda w, v: act(v) @ w, X)
