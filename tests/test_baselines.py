"""Attribution baselines against known answers: linear models (where every method has a closed form),
completeness of integrated gradients, and the root point of the simple Taylor decomposition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import MLP

import jaxdtd
from jaxdtd import baselines as B

N, H, W, C = 3, 4, 5, 2


def numpy_init(model, x, seed):
    """Variables with the shapes of ``model.init`` drawn by NumPy (fan-in scaled kernels, non-zero
    biases): ``model.init`` would compile a random-number program per parameter shape."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)

    def draw(s):
        scale = 1.0 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.1
        return jnp.asarray(rng.normal(0.0, scale, s.shape), s.dtype)

    return jax.tree_util.tree_map(draw, shapes)


def normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def linear(params, x):
    """Two classes, ``f_k(x) = sum(w_k * x) + b_k`` on NHWC images."""
    return jnp.einsum("nhwc,khwc->nk", x, params["w"]) + params["b"]


@pytest.fixture(scope="module")
def lin():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(2, H, W, C)), jnp.float32), "b": jnp.array([-2.0, 0.5])}
    x = jnp.asarray(rng.uniform(size=(N, H, W, C)), jnp.float32)
    return params, x


def _w0(params):
    return jnp.broadcast_to(params["w"][0], (N, H, W, C))


def test_gradient_of_linear_is_w(lin):
    params, x = lin
    g, y = B.gradient(linear, params, x, target=0)
    np.testing.assert_allclose(g, _w0(params), rtol=1e-6)
    np.testing.assert_allclose(y, linear(params, x), rtol=1e-6)
    g1, _ = B.gradient(linear, params, x, target=jnp.array([1, 1, 1]))
    np.testing.assert_allclose(g1, jnp.broadcast_to(params["w"][1], x.shape), rtol=1e-6)


def test_gradient_x_input_and_sensitivity_of_linear(lin):
    params, x = lin
    gi, _ = B.gradient_x_input(linear, params, x, target=0)
    np.testing.assert_allclose(gi, _w0(params) * x, rtol=1e-6)
    np.testing.assert_allclose(gi.sum((1, 2, 3)), linear(params, x)[:, 0] - params["b"][0], rtol=1e-5)
    s, _ = B.sensitivity(linear, params, x, target=0)
    np.testing.assert_allclose(s, _w0(params) ** 2, rtol=1e-6)


def test_target_none_is_argmax(lin):
    params, x = lin
    y = linear(params, x)
    g, _ = B.gradient(linear, params, x)
    expected = params["w"][jnp.argmax(y, axis=-1)]
    np.testing.assert_allclose(g, expected, rtol=1e-6)


@pytest.mark.parametrize("method", ["midpoint", "trapezoid"])
@pytest.mark.parametrize("baseline", [None, 0.25, "array"])
def test_integrated_gradients_of_linear_is_exact(lin, method, baseline):
    params, x = lin
    if baseline == "array":
        baseline = jnp.linspace(-1.0, 1.0, H * W * C).reshape(H, W, C)
    base = 0.0 if baseline is None else baseline
    R, _ = B.integrated_gradients(linear, params, x, target=0, baseline=baseline, steps=5, method=method)
    np.testing.assert_allclose(R, _w0(params) * (x - base), rtol=1e-5, atol=1e-6)
    # completeness, exact for a linear model
    f = linear(params, x)[:, 0]
    f_base = linear(params, jnp.broadcast_to(jnp.asarray(base, x.dtype), x.shape))[:, 0]
    np.testing.assert_allclose(R.sum((1, 2, 3)), f - f_base, rtol=1e-5, atol=1e-5)


def test_integrated_gradients_completeness_on_relu_mlp():
    model = MLP(features=(32, 32, 5))
    x = normal(1, (8, 6))
    variables = numpy_init(model, x, 2)
    y = model.apply(variables, x)
    target = jnp.argmax(y, axis=-1)
    R, out = B.integrated_gradients(model.apply, variables, x, target=target, steps=64)
    np.testing.assert_allclose(out, y, rtol=1e-6)
    take = jnp.take_along_axis
    delta = take(y, target[:, None], 1)[:, 0] - take(model.apply(variables, 0 * x), target[:, None], 1)[:, 0]
    err = jnp.abs(R.sum(-1) - delta)
    assert float(jnp.max(err / jnp.abs(delta))) < 0.03, (err, delta)


def test_integrated_gradients_chunked_equals_all_at_once(lin):
    model = MLP()
    x = normal(3, (4, 6))
    variables = numpy_init(model, x, 4)
    R_all, _ = B.integrated_gradients(model.apply, variables, x, steps=10, method="trapezoid")
    R_chunk, _ = B.integrated_gradients(model.apply, variables, x, steps=10, method="trapezoid", batch_size=4)
    np.testing.assert_allclose(R_chunk, R_all, rtol=1e-5, atol=1e-7)


def test_smoothgrad_without_noise_is_gradient():
    model = MLP()
    x = normal(5, (4, 6))
    variables = numpy_init(model, x, 6)
    g, y = B.gradient(model.apply, variables, x, target=1)
    sg, y2 = B.smoothgrad(model.apply, variables, x, target=1, noise=0.0, n_samples=4)
    np.testing.assert_allclose(sg, g, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(y2, y)
    # with noise it differs, deterministically given the key
    a, _ = B.smoothgrad(model.apply, variables, x, target=1, noise=0.5, key=jax.random.key(7))
    b, _ = B.smoothgrad(model.apply, variables, x, target=1, noise=0.5, key=jax.random.key(7))
    c, _ = B.smoothgrad(model.apply, variables, x, target=1, noise=0.5, key=jax.random.key(8))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not np.allclose(a, g) and not np.allclose(a, c)


def test_smoothgrad_of_linear_is_w_for_any_noise(lin):
    params, x = lin
    sg, _ = B.smoothgrad(linear, params, x, target=0, noise=0.3, n_samples=3)
    np.testing.assert_allclose(sg, _w0(params), rtol=1e-5)


def test_simple_taylor_finds_the_root_of_a_linear_model(lin):
    params, x = lin
    w = jnp.abs(params["w"])  # w.x > 0, so f(t x) = t w.x - 2 has its root at t = 2 / w.x
    params = {"w": w, "b": jnp.array([-2.0, 0.0])}
    wx = jnp.einsum("nhwc,hwc->n", x, w[0])
    assert bool(jnp.all(wx > 2.0))
    t, x0 = B.taylor_root(linear, params, x, target=0)
    np.testing.assert_allclose(t, 2.0 / wx, rtol=1e-5)
    np.testing.assert_allclose(linear(params, x0)[:, 0], 0.0, atol=1e-5)
    R, y = B.simple_taylor(linear, params, x, target=0)
    np.testing.assert_allclose(R, (x - x0) * w[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(R.sum((1, 2, 3)), y[:, 0], rtol=1e-5)  # f(x0) = 0: sum R = f(x)


def test_simple_taylor_without_root_falls_back_to_zero(lin):
    params, x = lin
    params = {"w": jnp.abs(params["w"]), "b": jnp.array([2.0, 0.0])}  # f(t x) >= 2 on the segment
    t, x0 = B.taylor_root(linear, params, x, target=0)
    np.testing.assert_array_equal(t, 0.0)
    np.testing.assert_array_equal(x0, 0.0)
    R, y = B.simple_taylor(linear, params, x, target=0)
    np.testing.assert_allclose(R, x * params["w"][0], rtol=1e-6)
    np.testing.assert_allclose(R.sum((1, 2, 3)), y[:, 0] - 2.0, rtol=1e-5)
    # an explicit root
    R0, _ = B.simple_taylor(linear, params, x, target=0, root=0.5)
    np.testing.assert_allclose(R0, (x - 0.5) * params["w"][0], rtol=1e-5, atol=1e-6)


def test_simple_taylor_at_a_root_is_zero():
    w = {"w": jnp.ones((2, 2, 2, 1)), "b": jnp.zeros(2)}
    x = jnp.zeros((1, 2, 2, 1))
    t, _ = B.taylor_root(linear, w, x, target=0)
    np.testing.assert_array_equal(t, 1.0)
    R, _ = B.simple_taylor(linear, w, x, target=0)
    np.testing.assert_array_equal(R, 0.0)


def test_simple_taylor_root_of_relu_mlp_is_a_root():
    model = MLP(features=(16, 16, 3))
    x = normal(9, (16, 6))
    variables = numpy_init(model, x, 10)
    level = jnp.median(model.apply(variables, x)[:, 0])  # half the samples lie across from f(0)
    f = lambda v, x: model.apply(v, x)[:, :1] - level
    fx, f0 = f(variables, x)[:, 0], f(variables, 0 * x)[:, 0]
    t, x0 = B.taylor_root(f, variables, x, target=0)
    crosses = np.asarray(fx * f0 < 0)
    assert crosses.any()
    np.testing.assert_allclose(f(variables, x0)[crosses, 0], 0.0, atol=1e-4)
    assert bool(jnp.all((t >= 0) & (t <= 1)))


def test_jit_equals_eager_and_tuple_argnums(lin):
    params, x = lin
    for method in (B.gradient, B.sensitivity, B.simple_taylor, B.integrated_gradients, B.smoothgrad):
        eager, _ = method(linear, params, x, target=0)
        jitted, _ = jax.jit(lambda p, x, m=method: m(linear, p, x, target=0))(params, x)
        np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)

    def two_inputs(params, a, b):
        return linear(params, a) + linear(params, b)

    (ga, gb), _ = B.gradient(two_inputs, params, x, 2 * x, target=0, argnums=(1, 2))
    np.testing.assert_allclose(ga, _w0(params), rtol=1e-6)
    np.testing.assert_allclose(gb, _w0(params), rtol=1e-6)
    (ia, ib), _ = B.integrated_gradients(two_inputs, params, x, 2 * x, target=0, argnums=(1, 2), steps=3)
    np.testing.assert_allclose(ia + ib, 3 * x * _w0(params), rtol=1e-5, atol=1e-6)


def test_errors(lin):
    params, x = lin
    with pytest.raises(TypeError, match="floating-point"):
        B.gradient(linear, params, x.astype(jnp.int32))
    with pytest.raises(ValueError, match="method"):
        B.integrated_gradients(linear, params, x, method="simpson")
    with pytest.raises(ValueError, match="n_samples"):
        B.smoothgrad(linear, params, x, n_samples=0)


def test_gradient_is_explain_without_composite():
    model = MLP()
    x = normal(11, (4, 6))
    variables = numpy_init(model, x, 12)
    g, y = B.gradient(model.apply, variables, x)
    R, y2 = jaxdtd.explain(model.apply, variables, x, composite=None)
    np.testing.assert_allclose(g, R, rtol=1e-6)
    np.testing.assert_allclose(y, y2, rtol=1e-6)
