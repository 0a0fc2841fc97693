"""Shared fixtures: the small linen CNN of ``tests/models.py`` with its variables and input.

Module-scoped (as the copies they replace were): every test file builds its own model instance, so the
transform caches keyed by ``model.apply`` are never shared between files.
"""

import pathlib
import sys

import jax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from models import CNN  # noqa: E402 - needs the sys.path entry above


def cnn_setup(batch: int):
    """``(model, variables, x)``: ``CNN()`` initialised with ``PRNGKey(0)`` on ``x``, a batch of
    ``batch`` uniform [0, 1) NHWC 8x8x3 images drawn with ``PRNGKey(1)``."""
    model = CNN()
    x = jax.random.uniform(jax.random.PRNGKey(1), (batch, 8, 8, 3))
    return model, model.init(jax.random.PRNGKey(0), x), x


@pytest.fixture(scope="module")
def cnn():
    """The CNN on a batch of 2 images."""
    return cnn_setup(2)


@pytest.fixture(scope="module")
def cnn_batch3():
    """The CNN on a batch of 3 images (same seeds as :func:`cnn`; tests/test_transform.py)."""
    return cnn_setup(3)
