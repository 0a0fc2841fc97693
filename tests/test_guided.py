"""Explanation-guided training (jaxdtd.guided): the confounder, the penalty, and its effect."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdtd import guided


def test_confound_writes_the_label_into_the_corner_only_when_correlated():
    images = np.zeros((3, 8, 8, 1), np.float32)
    labels = np.array([0, 4, 9])
    marked = guided.confound(images, labels, correlated=True)
    np.testing.assert_allclose(
        marked[:, 0:2, 0:2, 0], np.broadcast_to((labels / 9.0)[:, None, None], (3, 2, 2))
    )
    assert marked[:, 2:].sum() == 0 and marked[:, :, 2:].sum() == 0
    random = guided.confound(np.zeros((200, 8, 8, 1)), np.zeros(200, int), correlated=False)
    assert len(np.unique(random[:, 0, 0, 0])) == 10  # all ten levels, not the label


def test_mark_share_is_the_fraction_of_absolute_relevance_in_the_mark():
    relevance = jnp.zeros((2, 8, 8, 1)).at[0, 0, 1].set(-3.0).at[0, 5, 5].set(1.0).at[1].set(1.0)
    np.testing.assert_allclose(guided.mark_share(relevance), [0.75, 4 / 64], rtol=1e-6)


def test_the_relevance_penalty_moves_the_model_off_the_confounder():
    report = guided.run(penalty=10.0, epochs=6, progress=False)
    plain, penalised = report["penalty 0"], report["penalty 10"]
    assert plain["accuracy_confounded"] > plain["accuracy"] + 0.05  # the plain model reads the mark
    assert penalised["mark_share"] < 0.5 * plain["mark_share"]
    assert penalised["accuracy"] > plain["accuracy"]
