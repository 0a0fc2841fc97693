"""Taps, seeds and cuts: relevance read out at, started at, or stopped at intermediate values."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd import rules as R


def test_taps_equal_what_the_ledger_measures(cnn):
    model, variables, x = cnn
    comp = C.EpsilonPlus()
    relevance, y, tapped = dtd.explain(model.apply, variables, x, target=1, composite=comp, taps=["*"])
    book = dtd.ledger(model.apply, variables, x, target=1, composite=comp)
    assert list(tapped) == ["CNN/Conv_0", "CNN/Conv_1", "CNN/Dense_0", "CNN/Dense_1"]
    for k, name in enumerate(tapped):
        per_sample = np.asarray(tapped[name]).reshape(x.shape[0], -1).sum(1)
        np.testing.assert_allclose(per_sample, book.entering[k], rtol=1e-5, atol=1e-6)
    plain, _ = dtd.explain(model.apply, variables, x, target=1, composite=comp)
    np.testing.assert_allclose(relevance, plain, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(y, model.apply(variables, x), rtol=1e-6)
    # the relevance arriving at the output layer is its own output times the one-hot target
    np.testing.assert_allclose(tapped["CNN/Dense_1"], y * jax.nn.one_hot(1, 5), rtol=1e-6)


def test_taps_are_batched_and_jit_able(cnn):
    model, variables, x = cnn
    comp = C.EpsilonPlusFlat()

    def per_layer(x):
        return dtd.explain(model.apply, variables, x, target=0, composite=comp, taps=["*/Conv_1"])[2]

    eager = per_layer(x)["CNN/Conv_1"]
    np.testing.assert_allclose(jax.jit(per_layer)(x)["CNN/Conv_1"], eager, rtol=1e-5, atol=1e-7)
    one = jax.vmap(lambda s: per_layer(s[None])["CNN/Conv_1"][0])(x)
    np.testing.assert_allclose(one, eager, rtol=1e-5, atol=1e-7)
    assert eager.shape == (x.shape[0], 4, 4, 6)


def test_a_tap_that_matches_nothing_names_what_exists(cnn):
    model, variables, x = cnn
    with pytest.raises(
        ValueError, match=re.escape("tap '*/Conv_9' matches no layer or module; module paths:")
    ):
        dtd.explain(model.apply, variables, x, composite=C.EpsilonPlus(), taps=["*/Conv_9"])


class TextModel(nn.Module):
    """Token ids -> embeddings -> a small ReLU MLP on the mean over tokens."""

    def setup(self):
        self.Embed_0 = nn.Embed(11, 6)
        self.Dense_0, self.Dense_1 = nn.Dense(8), nn.Dense(3)

    def __call__(self, ids):
        return self.from_embeddings(self.Embed_0(ids))

    def from_embeddings(self, e):
        return self.Dense_1(nn.relu(self.Dense_0(e)).mean(axis=1))


def test_seed_at_embedding_equals_relevance_of_the_embeddings():
    model = TextModel()
    ids = jnp.array([[1, 4, 2, 7], [3, 3, 9, 0]])
    variables = model.init(jax.random.PRNGKey(0), ids)
    comp = C.Composite(dense=R.Epsilon(1e-3))
    relevance, y = dtd.explain(model.apply, variables, ids, target=2, composite=comp, seeds=["*/Embed_0"])
    assert list(relevance) == ["TextModel/Embed_0"]
    embeddings = jnp.take(variables["params"]["Embed_0"]["embedding"], ids, axis=0)
    from_embeddings = lambda v, e: model.apply(v, e, method=TextModel.from_embeddings)
    direct, y_direct = dtd.explain(from_embeddings, variables, embeddings, target=2, composite=comp)
    np.testing.assert_allclose(relevance["TextModel/Embed_0"], direct, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(y, y_direct, rtol=1e-6)
    # integer ids are otherwise rejected as an explained input
    with pytest.raises(TypeError, match="relevance is defined for floating-point inputs only"):
        dtd.explain(model.apply, variables, ids, target=2, composite=comp)


class GatedMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4, name="Dense_0")(x)
        gate = nn.sigmoid(nn.Dense(4, name="Gate")(x))
        return nn.Dense(2, name="Dense_1")(h * gate)


def test_cut_makes_a_value_a_constant_without_editing_the_model():
    model, x = GatedMLP(), jax.random.normal(jax.random.PRNGKey(1), (3, 5))
    variables = model.init(jax.random.PRNGKey(0), x)
    uncut = dtd.trace_plan(model.apply, C.Composite(dense=R.Epsilon()), (variables, x))
    assert [type(rule).__name__ for eqn, rule, _ in uncut.operations if eqn.name == "mul"] == ["Uniform"]
    cut = C.Composite(dense=R.Epsilon(), cuts=["*/Gate"])
    relevance, y = dtd.explain(model.apply, variables, x, target=0, composite=cut)
    np.testing.assert_allclose(y, model.apply(variables, x), rtol=1e-6)

    def detached(v, x):  # the same model with the gate detached by hand
        p = v["params"]
        h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
        gate = jax.lax.stop_gradient(jax.nn.sigmoid(x @ p["Gate"]["kernel"] + p["Gate"]["bias"]))
        return (h * gate) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]

    expected, _ = dtd.explain(detached, variables, x, target=0, composite=C.Composite(dense=R.Epsilon()))
    np.testing.assert_allclose(relevance, expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(TypeError, match="Composite.cuts must be a sequence of pattern strings"):
        C.Composite(cuts="*/Gate")


def test_cut_by_primitive_blocks_relevance_through_it():
    fn = lambda w, x: (jnp.tanh(x) + x) @ w
    w, x = jnp.ones((3, 2)), jnp.array([[0.5, -1.0, 2.0]])
    cut = C.Composite(dense=R.Epsilon(0.0), cuts=[":tanh"])
    relevance, _ = dtd.explain(fn, w, x, target=0, composite=cut, argnums=1)
    # tanh(x) is a constant now, so the sum is a shift of x by a constant: Pass hands x all of it
    detached = lambda w, x: (jax.lax.stop_gradient(jnp.tanh(x)) + x) @ w
    expected, _ = dtd.explain(detached, w, x, target=0, composite=C.Composite(dense=R.Epsilon(0.0)))
    np.testing.assert_allclose(relevance, expected, rtol=1e-6)
    np.testing.assert_allclose(relevance, (jnp.tanh(x) + x) * w[:, 0], rtol=1e-5)
