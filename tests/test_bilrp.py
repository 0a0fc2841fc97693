"""BiLRP (jaxdtd.bilrp): the matrix of feature-pair relevances of a dot-product similarity.

Known answers: on a bias-free linear embedding ``phi(x) = x W`` LRP-0 gives ``R^m_i = x_i W_im``, so
the matrix is ``x_i x'_j (W W^T)_ij`` in closed form; on a bias-free ReLU network under LRP-0 every
per-dimension explanation is conservative, so the matrix sums to the similarity; and on any model it
equals the brute-force double loop over embedding dimensions of ``dtd.explain``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdtd as dtd
from jaxdtd import rules
from tests.models import tiny_bert


class Embedding(nn.Module):
    widths: tuple[int, ...] = (6, 5)
    bias: bool = False

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.widths):
            x = nn.Dense(width, use_bias=self.bias, name=f"Dense_{i}")(x)
            if i < len(self.widths) - 1:
                x = nn.relu(x)
        return x


def _model(widths, bias=False, n=3, features=4):
    model = Embedding(widths, bias)
    x = jax.random.normal(jax.random.PRNGKey(1), (n, features))
    x_prime = jax.random.normal(jax.random.PRNGKey(2), (n, features))
    return model, model.init(jax.random.PRNGKey(0), x), x, x_prime


def _per_feature(relevance):
    return relevance.reshape(relevance.shape[0], -1)


def test_linear_embedding_has_the_closed_form():
    model, variables, x, x_prime = _model((5,))
    matrix, similarity = dtd.bilrp(
        model.apply, variables, x, x_prime, rules.Epsilon(0.0), reduce=_per_feature
    )
    W = variables["params"]["Dense_0"]["kernel"]
    expected = x[:, :, None] * x_prime[:, None, :] * (W @ W.T)[None]
    np.testing.assert_allclose(matrix, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        similarity, jnp.sum(model.apply(variables, x) * model.apply(variables, x_prime), -1), rtol=1e-6
    )


def test_conservative_explanations_give_a_matrix_that_sums_to_the_similarity():
    model, variables, x, x_prime = _model((7, 6, 5))
    matrix, similarity = dtd.bilrp(
        model.apply, variables, x, x_prime, rules.Epsilon(0.0), reduce=_per_feature
    )
    np.testing.assert_allclose(matrix.sum((1, 2)), similarity, rtol=1e-4)


@pytest.mark.parametrize("chunk", [None, 2])
def test_equals_the_brute_force_double_loop(chunk):
    model, variables, x, x_prime = _model((7, 5), bias=True)
    composite = dtd.composites.EpsilonPlus()
    matrix, _ = jax.jit(
        lambda v, a, b: dtd.bilrp(model.apply, v, a, b, composite, reduce=_per_feature, chunk=chunk)
    )(variables, x, x_prime)
    expected = np.zeros((3, 4, 4))
    for m in range(5):
        r, _ = dtd.explain(model.apply, variables, x, target=m, composite=composite)
        r_prime, _ = dtd.explain(model.apply, variables, x_prime, target=m, composite=composite)
        for i in range(4):
            for j in range(4):
                expected[:, i, j] += np.asarray(r[:, i] * r_prime[:, j])
    np.testing.assert_allclose(matrix, expected, rtol=1e-5, atol=1e-7)


def test_random_projection_explains_the_projected_similarity():
    model, variables, x, x_prime = _model((7, 6, 5))
    key = jax.random.PRNGKey(7)
    matrix, similarity = dtd.bilrp(
        model.apply,
        variables,
        x,
        x_prime,
        rules.Epsilon(0.0),
        reduce=_per_feature,
        projection=64,
        key=key,
        chunk=16,
    )
    P = jax.random.normal(key, (5, 64)) / jnp.sqrt(64.0)
    projected = jnp.sum((model.apply(variables, x) @ P) * (model.apply(variables, x_prime) @ P), -1)
    np.testing.assert_allclose(similarity, projected, rtol=1e-5)
    np.testing.assert_allclose(matrix.sum((1, 2)), similarity, rtol=1e-4)
    with pytest.raises(ValueError, match=r"bilrp: projection needs a PRNG key"):
        dtd.bilrp(model.apply, variables, x, x_prime, rules.Epsilon(0.0), projection=8)


def test_token_by_token_matrix_of_a_text_model_from_its_ids():
    """A tiny BERT fed token ids: relevance seeded at the word embeddings, reduced per token."""
    model = tiny_bert()
    ids = jnp.array([[1, 5, 7, 2, 0]])
    ids_prime = jnp.array([[1, 9, 4, 6, 2]])
    variables = model.init(jax.random.PRNGKey(0), ids)
    matrix, similarity = dtd.bilrp(
        model.apply, variables, ids, ids_prime, dtd.composites.AttnLRP(), seeds=["*/word_embeddings"], chunk=4
    )
    assert matrix.shape == (1, 5, 5)
    expected = np.zeros((1, 5, 5))
    for m in range(8):
        r, _ = dtd.explain(
            model.apply,
            variables,
            ids,
            target=m,
            composite=dtd.composites.AttnLRP(),
            seeds=["*/word_embeddings"],
        )
        r_prime, _ = dtd.explain(
            model.apply,
            variables,
            ids_prime,
            target=m,
            composite=dtd.composites.AttnLRP(),
            seeds=["*/word_embeddings"],
        )
        (r,), (r_prime,) = r.values(), r_prime.values()
        expected += np.einsum("nf,ng->nfg", r.sum(-1), r_prime.sum(-1))
    np.testing.assert_allclose(matrix, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        similarity, jnp.sum(model.apply(variables, ids) * model.apply(variables, ids_prime), -1), rtol=1e-5
    )
