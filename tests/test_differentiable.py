"""Differentiable explanations: the relevance is a differentiable function of the weights and the input.

``jax.grad`` of a loss on the heatmap, with respect to the parameters or the input, must be the true
derivative of the relevance map.  Checked against an explicit LRP written in plain JAX (every layer
as its explicit Jacobian matrix, rules.md's formulas), whose derivative JAX takes directly, and against
central finite differences in float64, under ``jit``.  The first-order VJP with respect to the weights
stays zero (they are constants of the rules).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdtd as dtd
from jaxdtd import composites as C
from tests.models import CNN, MLP, tiny_bert

TARGET = 2


def stab(z, eps=1e-6):
    return z + eps * jnp.where(z >= 0, 1.0, -1.0)


def conv(a, kernel):
    return jax.lax.conv_general_dilated(a, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def matrix(linear, a):
    """The explicit matrix ``M`` of a linear map of one sample: ``linear(a).ravel() == a.ravel() @ M``."""
    return jax.jacobian(linear)(a).reshape(-1, a.size).T


def zplus(a, M, b, R):
    """ZPlus (rules.md): ``R_i = x+_i sum_j w+_ij s_j + x-_i sum_j w-_ij s_j``, ``s = R / stab(zhat)``."""
    Mp, Mn = jnp.maximum(M, 0), jnp.minimum(M, 0)
    ap, an = jnp.maximum(a, 0), jnp.minimum(a, 0)
    s = R / stab(ap @ Mp + an @ Mn + jnp.maximum(b, 0))
    return ap * (Mp @ s) + an * (Mn @ s)


def epsilon(a, M, b, R, eps=1e-6):
    """Epsilon (rules.md): ``R_i = x_i sum_j w_ij R_j / stab(z_j)``."""
    return a * (M @ (R / stab(a @ M + b, eps)))


def reference_cnn(variables, x):
    """EpsilonPlus on :class:`tests.models.CNN` for one sample ``x`` (8, 8, 3), written out: conv layers
    ZPlus and dense layers Epsilon through their explicit matrices, ReLU Pass, max pooling by its
    gradient, average pooling Norm (``R_i = x_i sum_j P_ij R_j / stab(f_j)``)."""
    p = variables["params"]
    k0, b0 = p["Conv_0"]["kernel"], p["Conv_0"]["bias"]
    k1, b1 = p["Conv_1"]["kernel"], p["Conv_1"]["bias"]
    w2, b2 = p["Dense_0"]["kernel"], p["Dense_0"]["bias"]
    w3, b3 = p["Dense_1"]["kernel"], p["Dense_1"]["bias"]

    def maxpool(a):
        return nn.max_pool(a[None], (2, 2), strides=(2, 2))[0]

    def avgpool(a):
        return nn.avg_pool(a[None], (2, 2), strides=(2, 2))[0]

    # forward
    M0 = matrix(lambda a: conv(a[None], k0)[0], x)
    z0 = (x.ravel() @ M0).reshape(8, 8, 4) + b0
    a0 = jax.nn.relu(z0)
    p0 = maxpool(a0)
    M1 = matrix(lambda a: conv(a[None], k1)[0], p0)
    z1 = (p0.ravel() @ M1).reshape(4, 4, 6) + b1
    a1 = jax.nn.relu(z1)
    P = matrix(avgpool, a1)
    f = a1.ravel() @ P
    z2 = f @ w2 + b2
    a2 = jax.nn.relu(z2)
    z3 = a2 @ w3 + b3
    # backward
    R = z3 * jax.nn.one_hot(TARGET, 5, dtype=z3.dtype)
    R = epsilon(a2, w3, b3, R)
    R = epsilon(f, w2, b2, R)
    R = a1.ravel() * (P @ (R / stab(f)))  # Norm
    R = zplus(p0.ravel(), M1, jnp.tile(b1, 16), R)
    _, pool_vjp = jax.vjp(maxpool, a0)
    (R,) = pool_vjp(R.reshape(p0.shape))  # gradient: all to the arg-max
    return zplus(x.ravel(), M0, jnp.tile(b0, 64), R.ravel()).reshape(x.shape)


def _cnn64():
    model = CNN()
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 3), jnp.float64)
    variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), model.init(jax.random.PRNGKey(0), x))
    return model, variables, x


def _loss(relevance, u):
    """A loss on a heatmap that depends on every pixel non-linearly (the shape of a guided-training
    penalty)."""
    return jnp.sum(jnp.sin(relevance) * u) + jnp.sum((relevance * u) ** 2)


@pytest.fixture(scope="module")
def x64():
    with jax.enable_x64(True):
        yield


def test_gradient_of_the_heatmap_equals_the_explicit_lrp(x64):
    model, variables, x = _cnn64()
    u = jax.random.normal(jax.random.PRNGKey(3), x.shape, jnp.float64)

    def ours(v, x):
        relevance, _ = dtd.explain(model.apply, v, x, target=TARGET, composite=C.EpsilonPlus())
        return _loss(relevance, u)

    def reference(v, x):
        return _loss(jax.vmap(reference_cnn, (None, 0))(v, x), u)

    relevance, _ = dtd.explain(model.apply, variables, x, target=TARGET, composite=C.EpsilonPlus())
    np.testing.assert_allclose(
        relevance, jax.vmap(reference_cnn, (None, 0))(variables, x), rtol=1e-10, atol=1e-12
    )

    got = jax.jit(jax.grad(ours, argnums=(0, 1)))(variables, x)
    want = jax.grad(reference, argnums=(0, 1))(variables, x)
    leaves_got, leaves_want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert all(float(jnp.abs(w).max()) > 0 for w in leaves_want)  # every parameter matters
    for g, w in zip(leaves_got, leaves_want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-10 * float(jnp.abs(w).max()))


def _directional_fd(fn, point, direction, h=1e-7):
    """Central difference of ``fn`` along ``direction``.  ``h`` is small because the relevance is only
    piecewise smooth (ReLU, max pooling and the rules' sign masks switch nearby); at 1e-7 the float64
    round-off is still far below the 1e-5 tolerance."""
    plus = jax.tree_util.tree_map(lambda p, d: p + h * d, point, direction)
    minus = jax.tree_util.tree_map(lambda p, d: p - h * d, point, direction)
    return (fn(plus) - fn(minus)) / (2 * h)


def _tree_dot(a, b):
    return sum(
        float(jnp.vdot(x, y))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def _random_like(tree, key):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves, strict=True)]
    )


@pytest.mark.parametrize(
    "composite",
    [
        C.EpsilonGammaBox(low=-4.0, high=4.0),
        C.EpsilonAlpha2Beta1(),
        C.EpsilonPlusFlat(),
    ],
    ids=["EpsilonGammaBox", "EpsilonAlpha2Beta1", "EpsilonPlusFlat"],
)
def test_parameter_gradient_matches_finite_differences(x64, composite):
    model, variables, x = _cnn64()
    u = jax.random.normal(jax.random.PRNGKey(3), x.shape, jnp.float64)

    @jax.jit
    def loss(v):
        relevance, _ = dtd.explain(model.apply, v, x, target=TARGET, composite=composite)
        return _loss(relevance, u)

    direction = _random_like(variables, jax.random.PRNGKey(5))
    grad = jax.jit(jax.grad(loss))(variables)
    assert _tree_dot(grad, grad) > 0
    np.testing.assert_allclose(
        _tree_dot(grad, direction), _directional_fd(loss, variables, direction), rtol=1e-5
    )


def test_input_gradient_matches_finite_differences(x64):
    model, variables, x = _cnn64()
    u = jax.random.normal(jax.random.PRNGKey(3), x.shape, jnp.float64)

    def loss(x):
        relevance, _ = dtd.explain(
            model.apply, variables, x, target=TARGET, composite=C.EpsilonGammaBox(-4.0, 4.0)
        )
        return _loss(relevance, u)

    direction = jax.random.normal(jax.random.PRNGKey(6), x.shape, jnp.float64)
    grad = jax.jit(jax.grad(loss))(x)
    np.testing.assert_allclose(jnp.vdot(grad, direction), _directional_fd(loss, x, direction), rtol=1e-5)


def test_attention_relevance_is_differentiable(x64):
    """AttnLRP through a tiny BERT (LayerNorm, softmax, the fused attention core): parameter gradient
    of a loss on the token relevance against finite differences."""
    model = tiny_bert()
    ids = jnp.array([[1, 5, 7, 2, 0, 0]])
    mask = jnp.array([[1, 1, 1, 1, 0, 0]])
    variables = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64), model.init(jax.random.PRNGKey(0), ids, mask)
    )
    u = jax.random.normal(jax.random.PRNGKey(3), (1, 6, 8), jnp.float64)

    def score(v, ids, mask):
        return model.apply(v, ids, mask)[:, :3]

    @jax.jit
    def loss(v):
        relevance, _ = dtd.explain(
            score, v, ids, mask, target=1, composite=C.AttnLRP(), seeds=["*/word_embeddings"]
        )
        (r,) = relevance.values()
        return _loss(r, u)

    direction = _random_like(variables, jax.random.PRNGKey(5))
    grad = jax.grad(loss)(variables)
    assert _tree_dot(grad, grad) > 0
    np.testing.assert_allclose(
        _tree_dot(grad, direction), _directional_fd(loss, variables, direction), rtol=1e-5
    )


def test_first_order_vjp_of_the_weights_stays_zero():
    model = MLP()
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 6))
    variables = model.init(jax.random.PRNGKey(0), x)
    f = dtd.transform(model.apply, C.EpsilonPlus())
    grads = jax.jit(jax.grad(lambda v, x: f(v, x)[:, TARGET].sum(), argnums=(0, 1)))(variables, x)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(grads[0]))
    relevance, _ = dtd.explain(model.apply, variables, x, target=TARGET, composite=C.EpsilonPlus())
    np.testing.assert_array_equal(grads[1], relevance)


def test_gradient_of_the_heatmap_under_vmap_equals_per_sample(x64):
    model, variables, x = _cnn64()

    def per_sample(v, x):
        relevance, _ = dtd.explain(model.apply, v, x[None], target=TARGET, composite=C.EpsilonPlus())
        return jnp.sum(relevance**2)

    batched = jax.jit(jax.vmap(jax.grad(per_sample), (None, 0)))(variables, x)
    for i in range(len(x)):
        single = jax.grad(per_sample)(variables, x[i])
        for b, s in zip(jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(single), strict=True):
            np.testing.assert_allclose(b[i], s, rtol=1e-10, atol=1e-14)
