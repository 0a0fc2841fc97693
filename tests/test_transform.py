"""dtd.transform: forward values, the VJP as relevance, argnums, and composition with JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import MLP

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd import rules as R


def onehot_score(f, variables, c, n=5):
    return lambda x: (f(variables, x) * jax.nn.one_hot(c, n)).sum()


@pytest.mark.parametrize(
    "composite",
    [C.DeepTaylor(0.0, 1.0), C.EpsilonPlusFlat(), C.EpsilonGammaBox(0.0, 1.0), R.Epsilon(), None],
    ids=["DeepTaylor", "EpsilonPlusFlat", "EpsilonGammaBox", "Epsilon", "None"],
)
def test_forward_values_identical(cnn_batch3, composite):
    model, variables, x = cnn_batch3
    f = dtd.transform(model.apply, composite)
    np.testing.assert_allclose(f(variables, x), model.apply(variables, x), rtol=1e-6, atol=0)


def test_none_is_the_plain_gradient(cnn_batch3):
    model, variables, x = cnn_batch3
    f = dtd.transform(model.apply, None)
    got = jax.grad(onehot_score(f, variables, 2))(x)
    want = jax.grad(onehot_score(model.apply, variables, 2))(x)
    np.testing.assert_array_equal(got, want)


def test_gradient_everywhere_is_the_gradient_times_output():
    """Gradient on affine layers and (overriding Pass) on ReLU's max: the VJP is the gradient,
    scaled by the initial relevance y_c.  With Pass kept on ReLU it is not: Pass hands relevance
    to inactive units too, where the gradient is zero."""
    model = MLP()
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 6))
    variables = model.init(jax.random.PRNGKey(0), x)
    f = dtd.transform(model.apply, C.Composite(default=R.Gradient(), operations={"max": R.Gradient()}))
    # the initial relevance is y * ct, so the result is the gradient scaled by f_c
    c = 1
    y = model.apply(variables, x)[:, c]
    got = jax.grad(onehot_score(f, variables, c))(x)
    want = jax.grad(onehot_score(model.apply, variables, c))(x)
    np.testing.assert_allclose(got, want * y[:, None], rtol=1e-5, atol=1e-7)
    passing = dtd.transform(model.apply, R.Gradient())
    assert not np.allclose(jax.grad(onehot_score(passing, variables, c))(x), got)


def test_relevance_conservation_deep_taylor_bias_free_cnn(cnn_batch3):
    model, variables, x = cnn_batch3
    variables = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if "bias" in jax.tree_util.keystr(p) else v, variables
    )
    variables = jax.tree_util.tree_map(lambda v: v * 3.0, variables)  # O(1) activations
    f = dtd.transform(model.apply, C.DeepTaylor(0.0, 1.0))
    y = model.apply(variables, x)
    for c in range(5):
        relevance = jax.grad(onehot_score(f, variables, c))(x)
        total = relevance.reshape(3, -1).sum(1)
        positive = y[:, c] > 1e-3
        np.testing.assert_allclose(total[positive], y[positive, c], rtol=1e-5)
        assert (relevance[positive] >= 0).all()
        assert (relevance[y[:, c] < 0] <= 0).all()  # a negative score spreads negative relevance


def test_explain_matches_grad_and_targets(cnn_batch3):
    model, variables, x = cnn_batch3
    comp = C.EpsilonPlusFlat()
    f = dtd.transform(model.apply, comp)
    target = jnp.array([0, 3, 4])
    relevance, logits = dtd.explain(model.apply, variables, x, target=target, composite=comp)
    want = jax.grad(lambda x: (f(variables, x) * jax.nn.one_hot(target, 5)).sum())(x)
    np.testing.assert_allclose(relevance, want, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(logits, model.apply(variables, x), rtol=1e-6)
    # scalar target and default (arg-max) target
    r_scalar, _ = dtd.explain(model.apply, variables, x, target=3, composite=comp)
    np.testing.assert_allclose(r_scalar[1], relevance[1], rtol=1e-6, atol=1e-8)
    r_default, _ = dtd.explain(model.apply, variables, x, composite=comp)
    r_argmax, _ = dtd.explain(model.apply, variables, x, target=jnp.argmax(logits, -1), composite=comp)
    np.testing.assert_array_equal(r_default, r_argmax)


def test_jit_of_function_and_of_grad_equals_eager(cnn_batch3):
    model, variables, x = cnn_batch3
    f = dtd.transform(model.apply, C.EpsilonGammaBox(0.0, 1.0))
    np.testing.assert_allclose(jax.jit(f)(variables, x), f(variables, x), rtol=1e-6)
    grad = jax.grad(onehot_score(f, variables, 1))
    np.testing.assert_allclose(jax.jit(grad)(x), grad(x), rtol=1e-5, atol=1e-8)
    jitted_explain = jax.jit(
        lambda v, x: dtd.explain(model.apply, v, x, target=1, composite=C.DeepTaylor(0.0, 1.0))
    )
    eager, _ = dtd.explain(model.apply, variables, x, target=1, composite=C.DeepTaylor(0.0, 1.0))
    np.testing.assert_allclose(jitted_explain(variables, x)[0], eager, rtol=1e-5, atol=1e-8)


def test_vmap_over_single_samples_equals_batch(cnn_batch3):
    model, variables, x = cnn_batch3
    comp = C.EpsilonPlusFlat()
    batched, _ = dtd.explain(model.apply, variables, x, target=2, composite=comp)

    def single(sample):
        r, _ = dtd.explain(model.apply, variables, sample[None], target=2, composite=comp)
        return r[0]

    np.testing.assert_allclose(jax.vmap(single)(x), batched, rtol=1e-5, atol=1e-8)


def test_inside_lax_scan_over_batches(cnn_batch3):
    model, variables, x = cnn_batch3
    comp = C.DeepTaylor(0.0, 1.0)
    batches = jnp.stack([x, x[::-1], x * 0.5])

    def body(carry, batch):
        r, logits = dtd.explain(model.apply, variables, batch, target=0, composite=comp)
        return carry + r.sum(), r

    total, scanned = jax.lax.scan(body, 0.0, batches)
    for i in range(3):
        eager, _ = dtd.explain(model.apply, variables, batches[i], target=0, composite=comp)
        np.testing.assert_allclose(scanned[i], eager, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(total, scanned.sum(), rtol=1e-5)


def test_weights_get_zero_cotangent(cnn_batch3):
    model, variables, x = cnn_batch3
    f = dtd.transform(model.apply, C.EpsilonPlusFlat())
    grads = jax.grad(lambda v: (f(v, x) * jax.nn.one_hot(1, 5)).sum())(variables)
    for leaf in jax.tree_util.tree_leaves(grads):
        assert (leaf == 0).all()


def test_argnums_zero_for_single_argument_function():
    w = jnp.array([[1.0, -1.0], [2.0, 0.5]])
    fn = lambda x: jax.nn.relu(x @ w) @ jnp.ones((2, 1))
    f = dtd.transform(fn, R.Epsilon(0.0), argnums=0)
    x = jnp.array([[1.0, 2.0]])
    relevance = jax.grad(lambda x: f(x).sum())(x)
    # hidden: z = (5, 0) -> relu (5, 0); out = 5. R_hidden = (5, 0); R_x = x_i w_i0 * 5 / 5 = (1, 4)
    np.testing.assert_allclose(relevance, [[1.0, 4.0]], rtol=1e-6)


def test_tuple_argnums_explains_several_inputs():
    wa, wb = jnp.array([[1.0], [2.0]]), jnp.array([[3.0]])
    fn = lambda a, b: a @ wa + b @ wb  # residual-style add of two data values: Norm
    f = dtd.transform(fn, R.Epsilon(0.0), argnums=(0, 1))
    a, b = jnp.array([[1.0, 1.0]]), jnp.array([[1.0]])
    ra, rb = jax.grad(lambda a, b: f(a, b).sum(), argnums=(0, 1))(a, b)
    # out = 3 + 3 = 6; Norm splits 3/3; R_a = (1, 2), R_b = (3,)
    np.testing.assert_allclose(ra, [[1.0, 2.0]], rtol=1e-6)
    np.testing.assert_allclose(rb, [[3.0]], rtol=1e-6)
    (ra2, rb2), _ = dtd.explain(fn, a, b, target=0, composite=R.Epsilon(0.0), argnums=(0, 1))
    np.testing.assert_allclose(ra2, ra)
    np.testing.assert_allclose(rb2, rb)


def test_pytree_input_and_output():
    w = jnp.array([[1.0, 2.0]])

    def fn(params, inputs):
        return {"logits": inputs["a"] @ params["w"] + inputs["b"] @ params["w"]}

    f = dtd.transform(fn, R.Epsilon(0.0))
    inputs = {"a": jnp.array([[1.0]]), "b": jnp.array([[3.0]])}
    out = f({"w": w}, inputs)
    np.testing.assert_allclose(out["logits"], [[4.0, 8.0]])
    rel = jax.grad(lambda i: (f({"w": w}, i)["logits"] * jnp.array([0.0, 1.0])).sum())(inputs)
    np.testing.assert_allclose(rel["a"], [[2.0]], rtol=1e-6)
    np.testing.assert_allclose(rel["b"], [[6.0]], rtol=1e-6)


def test_traced_once_per_signature(cnn_batch3, monkeypatch):
    model, variables, x = cnn_batch3
    import jaxdtd.api as api

    calls = []
    original = api._build_plan
    monkeypatch.setattr(api, "_build_plan", lambda *a: calls.append(1) or original(*a))
    f = dtd.transform(model.apply, C.EpsilonPlus())
    f(variables, x)
    f(variables, x + 1.0)
    assert len(calls) == 1
    f(variables, x[:2])
    assert len(calls) == 2


def test_stop_gradient_on_data_is_a_constant():
    """x + stop_gradient(x): the stopped copy is a constant shift, so all relevance reaches x."""
    fn = lambda x: (x + jax.lax.stop_gradient(x)) @ jnp.ones((2, 1))
    f = dtd.transform(fn, R.Epsilon(0.0), argnums=0)
    x = jnp.array([[1.0, 3.0]])
    relevance = jax.grad(lambda x: f(x).sum())(x)
    np.testing.assert_allclose(relevance.sum(), 8.0, rtol=1e-6)


def test_batchnorm_style_scale_is_folded_into_kernel():
    """z = (x @ W + b) * s + t with a negative scale: ZPlus must see the folded weights W * s."""
    w = jnp.array([[1.0, -2.0], [3.0, 1.0]])
    s = jnp.array([-1.0, 2.0])
    fn = lambda x: (x @ w + jnp.array([0.5, 0.0])) * s + jnp.array([0.0, 1.0])
    x = jnp.array([[2.0, 1.0]])
    f = dtd.transform(fn, R.ZPlus(zero_bias=True), argnums=0)
    relevance = jax.grad(lambda x: (f(x) * jnp.array([1.0, 0.0])).sum())(x)
    # folded column 0: w' = (-1, -3); positive part 0 -> z+ = 0: relevance dropped; output is -5.5
    np.testing.assert_allclose(relevance, [[0.0, 0.0]], atol=1e-6)
    relevance = jax.grad(lambda x: (f(x) * jnp.array([0.0, 1.0])).sum())(x)
    # folded column 1: w' = (-4, 2); z+ = x1 * 2 = 2; y = (-4 + 1) * 2 + 1 = -5; R_x1 = 1 * 2 * -5 / 2
    np.testing.assert_allclose(relevance, [[0.0, -5.0]], rtol=1e-5)
    plan = dtd.trace_plan(fn, R.ZPlus(), (x,), argnums=0)
    ((layer, rule, why),) = plan.layer_rules
    assert layer.folds_scale and len(layer.chain) == 3 and why == "dense"


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_models_match_float32(cnn_batch3, dtype):
    """Denominators are formed in float32, so bf16/fp16 relevance tracks the float32 relevance."""
    model, variables, x = cnn_batch3
    low = jax.tree_util.tree_map(lambda a: a.astype(dtype), variables)
    for comp in (C.EpsilonGammaBox(0.0, 1.0), C.DeepTaylor(0.0, 1.0), C.EpsilonPlusFlat()):
        r32, _ = dtd.explain(model.apply, variables, x, target=0, composite=comp)
        r16, y16 = dtd.explain(model.apply, low, x.astype(dtype), target=0, composite=comp)
        assert r16.dtype == dtype and y16.dtype == dtype
        error = jnp.linalg.norm(r16.astype(jnp.float32) - r32) / jnp.linalg.norm(r32)
        assert error < 3e-2, (comp.name, float(error))
