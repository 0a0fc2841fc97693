"""Datasets: streaming to a memory-mapped file, and sharded batches that stay sharded."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from models import CNN

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd.dataset import explain_dataset


@pytest.fixture(scope="module")
def setup():
    model = CNN()
    x = jax.random.uniform(jax.random.PRNGKey(0), (10, 8, 8, 3))
    return model, model.init(jax.random.PRNGKey(1), x), np.asarray(x)


def test_streams_batches_to_a_memmap(setup, tmp_path):
    model, variables, x = setup
    comp = C.EpsilonPlusFlat()
    labels = np.arange(10) % 5
    whole, _ = dtd.explain(model.apply, variables, x, target=labels, composite=comp)
    batches = [(x[i : i + 4], labels[i : i + 4]) for i in range(0, 10, 4)]  # last batch is short
    stream = io.StringIO()
    path = tmp_path / "relevance.npy"
    result = explain_dataset(
        model.apply, variables, batches, composite=comp, out=str(path), num_samples=10, stream=stream
    )
    np.testing.assert_allclose(result, whole, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.load(path, mmap_mode="r"), whole, rtol=1e-5, atol=1e-8)
    assert "explaining" in stream.getvalue() and "10/10" in stream.getvalue()
    # in memory, arg-max targets, from a generator
    in_memory = explain_dataset(
        model.apply, variables, (x[i : i + 5] for i in range(0, 10, 5)), composite=comp, progress=False
    )
    argmax, _ = dtd.explain(model.apply, variables, x, composite=comp)
    np.testing.assert_allclose(in_memory, argmax, rtol=1e-5, atol=1e-8)


def test_memmap_needs_no_size_but_checks_num_samples(setup, tmp_path):
    model, variables, x = setup
    # an iterator without len() and no num_samples: the file holds the samples seen
    result = explain_dataset(
        model.apply,
        variables,
        iter([x[:2], x[2:3]]),
        composite=C.EpsilonPlus(),
        out=str(tmp_path / "r.npy"),
        progress=False,
    )
    assert result.shape == np.load(tmp_path / "r.npy").shape == (3, 8, 8, 3)
    with pytest.raises(
        ValueError,
        match=re.escape("explain_dataset: more samples than num_samples=2 (batch ending at sample 4)"),
    ):
        explain_dataset(
            model.apply,
            variables,
            [x[:2], x[2:4]],
            composite=C.EpsilonPlus(),
            out=str(tmp_path / "r.npy"),
            num_samples=2,
            progress=False,
        )


SHARDED = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, "tests")
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxdtd as dtd
    from jaxdtd.dataset import explain_dataset, sharded_explain
    from models import CNN

    assert jax.device_count() == 4, jax.devices()
    model = CNN()
    x = jax.random.uniform(jax.random.PRNGKey(0), (8, 8, 8, 3))
    variables = model.init(jax.random.PRNGKey(1), x)
    comp = dtd.composites.EpsilonGammaBox(0.0, 1.0)
    single, _ = dtd.explain(model.apply, variables, x, target=1, composite=comp)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    xs = jax.device_put(x, sharding)
    relevance, logits = sharded_explain(model.apply, comp, target=1)(variables, xs)
    assert relevance.sharding.is_equivalent_to(xs.sharding, relevance.ndim), relevance.sharding
    assert len(relevance.addressable_shards) == 4
    assert all(s.data.shape == (2, 8, 8, 3) for s in relevance.addressable_shards)
    np.testing.assert_allclose(np.asarray(relevance), np.asarray(single), rtol=1e-5, atol=1e-8)

    streamed = explain_dataset(model.apply, variables, [x[:4], x[4:]], composite=comp,
                               target=lambda b: np.full(len(b), 1), sharding=sharding, progress=False)
    np.testing.assert_allclose(streamed, np.asarray(single), rtol=1e-5, atol=1e-8)
    print("SHARDED OK")
    """
)


def test_sharded_batch_stays_sharded_and_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", SHARDED], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SHARDED OK" in done.stdout
