"""Scans are explained natively: the body of a ``scan`` (``jax.lax.scan``, ``nn.scan``) is planned as a
program of its own and evaluated inside a ``jax.lax.scan``; the relevance equals that of the same
model written as a Python loop, bit for bit or to float32 rounding, under jit and vmap."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import Block

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd import rules as R
from jaxdtd.interpret import ScanUnit

KEYS = jax.random.split(jax.random.PRNGKey(0), 4)
PARAMS = (
    0.5 * jax.random.normal(KEYS[0], (3, 5, 5)),
    0.1 * jax.random.normal(KEYS[1], (3, 5)),
    jax.random.normal(KEYS[2], (5, 2)),
)
X = jax.random.normal(KEYS[3], (4, 5))


def looped(p, x):
    w, b, head = p
    for i in range(w.shape[0]):
        x = jax.nn.relu(x @ w[i] + b[i])
    return x @ head


def scanned(p, x):
    w, b, head = p
    x, _ = jax.lax.scan(lambda h, wb: (jax.nn.relu(h @ wb[0] + wb[1]), None), x, (w, b))
    return x @ head


def scanned_with_outputs(p, x):
    """The per-step outputs (ys) feed the result too."""
    w, b, head = p
    x, hs = jax.lax.scan(lambda h, wb: (jax.nn.relu(h @ wb[0] + wb[1]),) * 2, x, (w, b))
    return (x + hs.sum(0)) @ head


def looped_with_outputs(p, x):
    w, b, head = p
    total = 0.0
    for i in range(w.shape[0]):
        x = jax.nn.relu(x @ w[i] + b[i])
        total = total + x
    return (x + total) @ head


def _relevance(fn, composite, params=PARAMS, x=X):
    f = dtd.transform(fn, composite)
    return np.asarray(jax.grad(lambda x: f(params, x)[:, 0].sum())(x))


COMPOSITES = {
    "EpsilonPlus": C.EpsilonPlus(),
    "ZPlus": C.Composite(dense=R.ZPlus()),
    "AlphaBeta": C.Composite(dense=R.AlphaBeta(2.0, 1.0)),
    "AttnLRP": C.AttnLRP(),
}


@pytest.mark.parametrize("name", COMPOSITES)
def test_scan_equals_loop(name):
    np.testing.assert_array_equal(_relevance(scanned, COMPOSITES[name]), _relevance(looped, COMPOSITES[name]))
    the_plan = dtd.trace_plan(scanned, COMPOSITES[name], (PARAMS, X))
    (unit,) = [u for u in the_plan.units if isinstance(u, ScanUnit)]
    assert len(unit.body.layer_rules) == 1  # one layer, planned once, run three times
    operations = dtd.describe(scanned, PARAMS, X, composite=COMPOSITES[name]).operations
    assert ("scan", "body: 1 layers, 1 operations", 1) in operations


def test_scan_outputs_carry_relevance_too():
    """Equal to float32 rounding: ``hs.sum(0)`` is one three-term sum where the loop adds two terms
    twice (another order of additions, and Norm's stabilizer acts once instead of twice)."""
    np.testing.assert_allclose(
        _relevance(scanned_with_outputs, C.EpsilonPlus()),
        _relevance(looped_with_outputs, C.EpsilonPlus()),
        rtol=2e-5,
        atol=1e-6,
    )


def test_scan_under_jit_and_vmap():
    f = dtd.transform(scanned, C.EpsilonPlus())
    eager = jax.grad(lambda x: f(PARAMS, x)[:, 0].sum())(X)
    jitted = jax.jit(jax.grad(lambda x: f(PARAMS, x)[:, 0].sum()))(X)
    mapped = jax.vmap(jax.grad(lambda x: f(PARAMS, x[None])[0, 0]))(X)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(mapped, eager, rtol=1e-5, atol=1e-7)


def test_reverse_scan_and_unroll():
    def reverse(p, x):
        w, b, head = p
        step = lambda h, wb: (jax.nn.relu(h @ wb[0] + wb[1]), None)
        return jax.lax.scan(step, x, (w, b), reverse=True, unroll=2)[0] @ head

    def reverse_loop(p, x):
        w, b, head = p
        for i in reversed(range(w.shape[0])):
            x = jax.nn.relu(x @ w[i] + b[i])
        return x @ head

    np.testing.assert_array_equal(
        _relevance(reverse, C.EpsilonPlus()), _relevance(reverse_loop, C.EpsilonPlus())
    )


class ScannedBlocks(nn.Module):
    """Two transformer blocks run by ``nn.scan`` (the layer stack of JAX LLM code)."""

    @nn.compact
    def __call__(self, x, mask):
        stack = nn.scan(
            lambda block, h, _: (block(h, mask), None),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=2,
        )
        x, _ = stack(Block(), x, None)
        return x


def _unstacked(variables, i):
    return {"params": jax.tree_util.tree_map(lambda p: p[i], variables["params"]["Block_0"])}


@pytest.mark.parametrize("composite", ["AttnLRP", "CPLRP"])
def test_flax_nn_scan_of_attention_blocks_equals_the_loop(composite):
    model = ScannedBlocks()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], jnp.float32)
    variables = model.init(jax.random.PRNGKey(1), x, mask)
    block = Block()

    def loop(v, x):
        for i in range(2):
            x = block.apply(_unstacked(v, i), x, mask)
        return x

    readout = jax.random.normal(jax.random.PRNGKey(3), (8,))
    comp = getattr(C, composite)()
    scan_f = dtd.transform(lambda v, x: model.apply(v, x, mask) @ readout, comp)
    loop_f = dtd.transform(lambda v, x: loop(v, x) @ readout, comp)
    np.testing.assert_allclose(scan_f(variables, x), loop_f(variables, x), rtol=1e-5, atol=1e-6)
    r_scan = jax.grad(lambda x: scan_f(variables, x).sum())(x)
    r_loop = jax.grad(lambda x: loop_f(variables, x).sum())(x)
    np.testing.assert_allclose(r_scan, r_loop, rtol=1e-4, atol=1e-6)


def _temp_bytes(fn, *args) -> int:
    """XLA's temporary buffer size of the compiled ``fn`` (a compile-time analysis, not a timing)."""
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def test_remat_in_a_scan_body_is_kept_and_memory_grows_like_the_gradients():
    """``lax.scan(jax.checkpoint(body))``: the relevance step is checkpointed too (``ScanUnit.remat``),
    so the relevance program's temporary memory stays within 1.3x the checkpointed gradient's at
    every depth and grows with the depth like it; without the checkpoint both save every
    iteration's residuals (the relevance rules save a few more: within 1.6x)."""
    key = jax.random.split(jax.random.PRNGKey(7), 3)
    x = jax.random.normal(key[2], (32, 64))
    head = jax.random.normal(key[1], (64, 2))

    def body(h, w):
        return jnp.tanh(jax.nn.relu(h @ w) @ w.T) * h, None

    def model(checkpointed):
        def scanned_model(p, x):
            x, _ = jax.lax.scan(jax.checkpoint(body) if checkpointed else body, x, p[0])
            return x @ p[1]

        return scanned_model

    memory = {}
    for checkpointed in (False, True):
        fn = model(checkpointed)
        f = dtd.transform(fn, C.EpsilonPlus())
        for layers in (4, 16):
            params = (0.3 * jax.random.normal(key[0], (layers, 64, 64)), head)
            rel = _temp_bytes(jax.grad(lambda x, params=params, f=f: f(params, x)[:, 0].sum()), x)
            grad = _temp_bytes(jax.grad(lambda x, params=params, fn=fn: fn(params, x)[:, 0].sum()), x)
            memory[checkpointed, layers] = rel, grad
        unit = [u for u in dtd.trace_plan(fn, C.EpsilonPlus(), (params, x)).units if isinstance(u, ScanUnit)]
        assert len(unit) == 1 and (unit[0].remat is not None) == checkpointed
    for layers in (4, 16):
        rel, grad = memory[True, layers]
        assert rel <= 1.3 * grad, (layers, rel, grad)
        plain_rel, plain_grad = memory[False, layers]
        assert plain_rel <= 1.6 * plain_grad, (layers, plain_rel, plain_grad)
    (rel4, grad4), (rel16, grad16) = memory[True, 4], memory[True, 16]
    assert rel16 - rel4 <= 1.3 * (grad16 - grad4) + 4096, memory
    assert memory[True, 16][0] < 0.5 * memory[False, 16][0], memory  # the carries only, not every residual
