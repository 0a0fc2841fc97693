"""Architectural pieces that need no model changes: NNX BatchNorm in eval mode, ReLU6 / clipping,
padding layers, dropout in deterministic mode, residual sums, concatenation, global mean."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd import rules as R


class NNXConvBN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 3, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(3, rngs=rngs)
        self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn(self.conv(x)))
        return self.head(h.mean(axis=(1, 2)))


def test_nnx_batchnorm_in_eval_mode_is_folded_like_by_hand():
    model = NNXConvBN(nnx.Rngs(0))
    key = jax.random.PRNGKey(1)
    model.bn.mean[...] = jax.random.normal(key, (3,)) * 0.3
    model.bn.var[...] = jax.random.uniform(key, (3,), minval=0.5, maxval=2.0)
    model.bn.scale[...] = jnp.array([-1.2, 0.7, 1.5])
    model.bn.bias[...] = jnp.array([0.1, -0.2, 0.3])
    model.eval()
    x = jax.random.uniform(jax.random.PRNGKey(2), (2, 5, 5, 2))
    apply_fn, state = dtd.from_nnx(model)
    rows = dtd.describe(apply_fn, state, x, composite=C.EpsilonPlus()).layers
    assert [r.folded for r in rows] == [True, False]

    s = model.bn.scale[...] / jnp.sqrt(model.bn.var[...] + model.bn.epsilon)
    kernel = model.conv.kernel[...] * s
    bias = (model.conv.bias[...] - model.bn.mean[...]) * s + model.bn.bias[...]

    def folded(params, x):
        h = jax.lax.conv_general_dilated(
            x, params["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = jax.nn.relu(h + params["b"])
        return h.mean(axis=(1, 2)) @ params["w"] + params["c"]

    params = {"k": kernel, "b": bias, "w": model.head.kernel[...], "c": model.head.bias[...]}
    np.testing.assert_allclose(folded(params, x), apply_fn(state, x), rtol=1e-5, atol=1e-6)
    for comp in (C.EpsilonPlus(), C.EpsilonGammaBox(0.0, 1.0), C.DeepTaylor(0.0, 1.0)):
        want, _ = dtd.explain(folded, params, x, target=1, composite=comp)
        got, _ = dtd.explain(apply_fn, state, x, target=1, composite=comp)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(jnp.abs(want).max()))


def test_relu6_and_clipping_pass_relevance_even_where_saturated():
    w = jnp.array([[2.0, 1.0]])
    for act in (jax.nn.relu6, lambda z: jnp.clip(z, 0.0, 6.0)):
        fn = lambda x, act=act: act(x @ w) @ jnp.array([[1.0], [1.0]])
        x = jnp.array([[4.0]])  # hidden: (8 -> 6 saturated, 4)
        f = dtd.transform(fn, R.Epsilon(0.0), argnums=0)
        relevance = jax.grad(lambda x, f=f: f(x).sum())(x)
        # out = 10; hidden relevance (6, 4) passes through ReLU6 unchanged (the gradient would drop the 6);
        # the first layer hands all of it to x
        np.testing.assert_allclose(relevance, [[10.0]], rtol=1e-6)


class Everything(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # a padding layer
        a = nn.relu(nn.Conv(3, (3, 3), padding="VALID", name="a")(x))
        b = nn.relu(nn.Conv(3, (1, 1), padding="VALID", name="b")(x))
        a = nn.Dropout(0.5, deterministic=True)(a)
        h = a + b[:, 1:-1, 1:-1]  # residual-style sum of two data values: Norm
        h = jnp.concatenate([h, nn.relu(nn.Conv(2, (3, 3), padding="SAME", name="c")(h))], axis=-1)
        return nn.Dense(2, name="head")(h.mean(axis=(1, 2)))


def test_pad_dropout_residual_concat_mean_without_model_changes():
    model = Everything()
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 6, 6, 1))
    variables = model.init(jax.random.PRNGKey(1), x)
    variables = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if "bias" in jax.tree_util.keystr(p) else 2.0 * jnp.abs(v), variables
    )  # positive weights and no bias: every unit is active, every rule conserves
    description = dtd.describe(model.apply, variables, x, composite=R.Epsilon(0.0))
    ops = {(name, rule) for name, rule, _ in description.operations}
    assert {("pad", "Gradient"), ("add", "Norm"), ("concatenate", "Gradient"), ("reduce_sum", "Norm")} <= ops
    logits = model.apply(variables, x)
    relevance, _ = dtd.explain(model.apply, variables, x, target=0, composite=R.Epsilon(0.0))
    np.testing.assert_allclose(relevance.reshape(2, -1).sum(1), logits[:, 0], rtol=1e-5)


def test_stack_is_structural():
    w = jnp.array([[1.0, 2.0], [3.0, -1.0]])
    fn = lambda x: jnp.stack([x @ w, 2.0 * (x @ w)], axis=-1).reshape(x.shape[0], -1)
    x = jnp.array([[1.0, 1.0]])
    relevance, y = dtd.explain(fn, x, target=2, composite=R.Epsilon(0.0), argnums=0)
    np.testing.assert_allclose(relevance.sum(), y[0, 2], rtol=1e-6)
