"""Shared fixtures: the small linen CNN of ``tests/models.py`` with its variables and input.

Module-scoped (as the copies they replace were): every test file builds its own model instance, so the
transform caches keyed by ``model.apply`` are never shared between files.

The suite is bound by XLA compilation (hundreds of small programs, each run a few times), so it
compiles with LLVM's optimisations off (``XLA_FLAGS``, set before JAX starts its backend, inherited
by the notebook kernels and subprocesses the tests start): a third less time on the CPU and the same
IEEE operations, so every tolerance holds.  An ``XLA_FLAGS`` already set is kept and extended.
Benchmarks never run under this file: their numbers are those of the optimised build.
"""

import os
import pathlib
import sys

import pytest

FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_flags, *(f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in _flags)]
).strip()

import jax  # noqa: E402 - after XLA_FLAGS

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
