"""Misuse and edge cases: each gets a specific error, a warning or the right result, never silence.

Targets out of range, non-finite inputs, short last batches and interrupted runs of
``explain_dataset``, empty batches, static (non-array) and keyword arguments, non-function
``fn``, ledgers of models whose arrays are not batch-major, traced ZBox bounds, composite globs
that match nothing and inputs outside the ZBox box.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import types
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from models import CNN, MLP

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd import rules as R


class Net(nn.Module):
    """Dense(8) -> ReLU -> Dense(4): four classes."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.relu(nn.Dense(8)(x)))


@pytest.fixture(scope="module")
def net():
    model = Net()
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 6))
    return model, model.init(jax.random.PRNGKey(1), x), x


@pytest.fixture(scope="module")
def cnn4():
    model = CNN()
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3))
    return model, model.init(jax.random.PRNGKey(0), x), x


# --- 1. targets ----------------------------------------------------------------------------------
def test_target_out_of_range_raises_naming_the_valid_range(net):
    model, variables, x = net
    comp = C.EpsilonPlus()
    for bad in (10, 4, -1):
        with pytest.raises(
            ValueError,
            match=re.escape(
                f"explain: target {bad} is out of range: the output has 4 classes, valid targets are 0..3"
            ),
        ):
            dtd.explain(model.apply, variables, x, target=bad, composite=comp)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "explain: target out of range at sample(s) [1, 3]: [7, -1]; the output has 4 classes, "
            "valid targets are 0..3"
        ),
    ):
        dtd.explain(model.apply, variables, x, target=np.array([0, 7, 2, -1]), composite=comp)
    # the edges of the range are fine
    R_last, y = dtd.explain(model.apply, variables, x, target=jnp.array([3, 0, 3, 0]), composite=comp)
    np.testing.assert_allclose(R_last.sum(1), y[np.arange(4), [3, 0, 3, 0]], rtol=1e-4, atol=1e-5)


def test_target_dtype_and_shape_messages(net):
    model, variables, x = net
    comp = C.EpsilonPlus()
    expected = "an int in 0..3 or an integer array of shape (4,) (one class index per sample)"
    cases = [
        (jnp.array([0.0, 1.0, 2.0, 3.0]), "an array of dtype float32 and shape (4,)"),
        (1.0, "1.0 of type float"),
        (True, "True of type bool"),
        (np.array([True, False, True, False]), "an array of dtype bool and shape (4,)"),
        ("cat", "'cat' of type str"),
    ]
    for target, got in cases:
        with pytest.raises(TypeError, match=re.escape(f"explain: target must be {expected}, got {got}")):
            dtd.explain(model.apply, variables, x, target=target, composite=comp)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "explain: target of shape (3,) does not match the output of shape (4, 4): give one class "
            "index per sample, shape (4,), or a single index"
        ),
    ):
        dtd.explain(model.apply, variables, x, target=jnp.array([0, 1, 2]), composite=comp)
    with pytest.raises(ValueError, match=re.escape("explain: target of shape (4, 1) does not match")):
        dtd.explain(model.apply, variables, x, target=np.zeros((4, 1), int), composite=comp)


def test_jitted_explain_with_traced_target_equals_eager(net):
    model, variables, x = net
    comp = C.EpsilonPlus()
    labels = jnp.array([3, 1, 0, 2])
    eager, y_eager = dtd.explain(model.apply, variables, x, target=labels, composite=comp)
    jitted = jax.jit(lambda v, x, t: dtd.explain(model.apply, v, x, target=t, composite=comp))
    R_jit, y_jit = jitted(variables, x, labels)
    np.testing.assert_allclose(R_jit, eager, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(y_jit, y_eager, rtol=1e-6)
    assert np.abs(np.asarray(eager)).sum(1).min() > 0
    # documented: a traced out-of-range index cannot be checked and gives zero relevance for that sample
    R_bad, _ = jitted(variables, x, jnp.array([3, 9, 0, 2]))
    assert np.all(np.asarray(R_bad[1]) == 0) and np.all(np.asarray(R_bad[0]) == np.asarray(eager[0]))
    # a concrete target closed over by the jitted function is still checked
    with pytest.raises(ValueError, match=re.escape("explain: target 9 is out of range")):
        jax.jit(lambda v, x: dtd.explain(model.apply, v, x, target=9, composite=comp))(variables, x)


# --- 2. NaN / Inf inputs ------------------------------------------------------------------------
def _with_nonfinite(x):
    return jnp.asarray(x).at[1, 2].set(jnp.nan).at[3, 0].set(jnp.inf)


def test_nonfinite_input_raises_naming_the_samples(net):
    model, variables, x = net
    bad = _with_nonfinite(x)
    message = (
        "explain: input has NaN or Inf in sample(s) [1, 3] of 4; its relevance would be NaN "
        "(clean or mask those samples first)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        dtd.explain(model.apply, variables, bad, composite=C.EpsilonPlus())
    with pytest.raises(ValueError, match=re.escape(message)):
        dtd.explain(model.apply, variables, np.asarray(bad), composite=None)
    # opting out computes, and the relevance of those samples is NaN
    R_bad, _ = dtd.explain(model.apply, variables, bad, composite=C.EpsilonPlus(), check_finite=False)
    assert np.isnan(np.asarray(R_bad[1])).any() and np.isfinite(np.asarray(R_bad)[[0, 2]]).all()


def test_nonfinite_input_under_jit_with_checkify(net):
    model, variables, x = net
    bad = _with_nonfinite(x)
    comp = C.EpsilonPlus()
    # documented: without the opt-in check a jitted explain cannot raise; those samples get NaN
    R_plain, _ = jax.jit(lambda v, x: dtd.explain(model.apply, v, x, composite=comp))(variables, bad)
    assert np.isnan(np.asarray(R_plain[3])).any() and np.isfinite(np.asarray(R_plain[0])).all()
    checked = checkify.checkify(
        jax.jit(lambda v, x: dtd.explain(model.apply, v, x, composite=comp, check_finite=True))
    )
    err, (R_checked, _) = checked(variables, bad)
    assert err.get() == "explain: input has NaN or Inf in 2 sample(s), the first is sample 1 (`check` failed)"
    err, (R_ok, _) = checked(variables, x)
    assert err.get() is None
    np.testing.assert_allclose(R_ok, dtd.explain(model.apply, variables, x, composite=comp)[0], rtol=1e-6)


def test_explain_dataset_checks_each_batch(net):
    model, variables, x = net
    bad = _with_nonfinite(x)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "explain_dataset: input has NaN or Inf in sample(s) [3] (batch 1, samples 2..3); their "
            "relevance would be NaN"
        ),
    ):
        dtd.explain_dataset(
            model.apply, variables, [x[:2], bad[2:]], composite=C.EpsilonPlus(), progress=False
        )
    with pytest.raises(
        ValueError,
        match=re.escape(
            "explain_dataset: target out of range at sample(s) [3] (batch 1): [4]; the output has 4 "
            "classes, valid targets are 0..3"
        ),
    ):
        dtd.explain_dataset(
            model.apply,
            variables,
            [(x[:2], np.array([0, 1])), (x[2:], np.array([3, 4]))],
            composite=C.EpsilonPlus(),
            progress=False,
        )


# --- 3. a short last batch ----------------------------------------------------------------------
def test_short_last_batch_file_holds_exactly_the_samples_seen(cnn4, tmp_path):
    model, variables, _ = cnn4
    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(5), (10, 8, 8, 3)))
    comp = C.EpsilonPlusFlat()
    whole, _ = dtd.explain(model.apply, variables, x, composite=comp)
    out = tmp_path / "relevance.npy"
    batches = [x[0:4], x[4:8], x[8:10]]  # len() known, no num_samples
    result = dtd.explain_dataset(
        model.apply, variables, batches, composite=comp, out=str(out), progress=False
    )
    on_disk = np.load(out)
    assert on_disk.shape == (10, 8, 8, 3) and result.shape == (10, 8, 8, 3)
    np.testing.assert_allclose(on_disk, whole, rtol=1e-5, atol=1e-8)
    assert sorted(os.listdir(tmp_path)) == ["relevance.npy"]  # no partial or progress file left
    # an iterator without len() needs no num_samples either
    result = dtd.explain_dataset(
        model.apply, variables, iter(batches), composite=comp, out=str(out), progress=False
    )
    assert np.load(out).shape == (10, 8, 8, 3)
    np.testing.assert_allclose(result, whole, rtol=1e-5, atol=1e-8)


# --- 4. resuming an interrupted run -------------------------------------------------------------
INTERRUPTED = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, "tests")
    import jax, numpy as np
    import jaxdtd as dtd
    from models import MLP

    model = MLP()
    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (22, 6)))
    variables = model.init(jax.random.PRNGKey(1), x[:1])

    def batches():
        for i in range(0, 22, 4):
            if i == 12:
                time.sleep(600)  # the test kills the process here, after three batches
            yield x[i : i + 4]

    dtd.explain_dataset(model.apply, variables, batches(), composite=dtd.composites.EpsilonPlus(),
                        out=sys.argv[1], target=lambda b: np.arange(len(b)) % 5, progress=False)
    """
)


def _mlp_dataset():
    model = MLP()
    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (22, 6)))
    return model, model.init(jax.random.PRNGKey(1), x[:1]), x


def _labels(x, size=4):
    return np.concatenate([np.arange(len(x[i : i + size])) % 5 for i in range(0, len(x), size)])


def test_resume_after_the_process_was_killed(tmp_path):
    out = tmp_path / "relevance.npy"
    partial, progress = tmp_path / "relevance.npy.partial", tmp_path / "relevance.npy.progress.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED, str(out)], cwd=root, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            state = json.loads(progress.read_text()) if progress.exists() else {}
            if state.get("done") == 12:
                break
            assert proc.poll() is None, "the run ended before it could be interrupted"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.05)
        assert state["batches"] == [4, 4, 4]
        assert not out.exists()  # out never exists half-written
        assert np.load(partial).shape == (12, 6)  # and the partial file claims what it holds
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists() and np.load(partial).shape == (12, 6)

    model, variables, x = _mlp_dataset()
    calls = []

    def target(b):
        calls.append(len(b))
        return np.arange(len(b)) % 5

    comp = C.EpsilonPlus()
    result = dtd.explain_dataset(
        model.apply,
        variables,
        (x[i : i + 4] for i in range(0, 22, 4)),
        composite=comp,
        out=str(out),
        target=target,
        progress=False,
    )
    assert calls == [4, 4, 2]  # only the batches not done before the kill were explained
    uninterrupted, _ = dtd.explain(model.apply, variables, x, target=_labels(x), composite=comp)
    np.testing.assert_allclose(np.load(out), uninterrupted, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result, uninterrupted, rtol=1e-5, atol=1e-7)
    assert not partial.exists() and not progress.exists()


def test_resume_checks_the_batches_and_can_start_afresh(tmp_path):
    model, variables, x = _mlp_dataset()
    comp = C.EpsilonPlus()
    out = tmp_path / "r.npy"
    partial, progress = f"{out}.partial", f"{out}.progress.json"

    def interrupted():
        yield x[0:4]
        yield x[4:8]
        raise RuntimeError("interrupted")

    run = lambda batches, **kw: dtd.explain_dataset(  # noqa: E731
        model.apply, variables, batches, composite=comp, out=str(out), progress=False, **kw
    )
    with pytest.raises(RuntimeError, match="interrupted"):
        run(interrupted())
    assert not out.exists() and np.load(partial).shape == (8, 6)
    assert json.load(open(progress))["done"] == 8
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"explain_dataset: cannot resume {partial}: batch 0 has shape (3, 6), the interrupted run's "
            "batch 0 had 4 samples of shape (6,); iterate the same batches, or pass resume=False"
        ),
    ):
        run([x[0:3], x[3:10]])
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"explain_dataset: cannot resume {partial}: the interrupted run explained 2 batches, batches "
            "now yields only 1; iterate the same batches, or pass resume=False"
        ),
    ):
        run([x[0:4]])
    argmax, _ = dtd.explain(model.apply, variables, x, composite=comp)
    resumed = run([x[0:4], x[4:8], x[8:11]])
    np.testing.assert_allclose(resumed, argmax[:11], rtol=1e-5, atol=1e-7)
    # resume=False starts afresh, whatever a previous run left
    with pytest.raises(RuntimeError, match="interrupted"):
        run(interrupted())
    fresh = run([x[0:3], x[3:10]], resume=False)
    assert np.load(out).shape == (10, 6)
    np.testing.assert_allclose(fresh, argmax[:10], rtol=1e-5, atol=1e-7)
    assert not os.path.exists(partial) and not os.path.exists(progress)


# --- 5. empty batches ---------------------------------------------------------------------------
def test_empty_batch_gives_empty_results(net, cnn4):
    model, variables, x = net
    f = dtd.transform(model.apply, C.EpsilonPlus())
    x0 = x[:0]
    assert f(variables, x0).shape == (0, 4)
    R0, y0 = dtd.explain(model.apply, variables, x0, composite=C.EpsilonPlus())
    assert R0.shape == (0, 6) and y0.shape == (0, 4)
    assert jax.grad(lambda x: f(variables, x).sum())(x0).shape == (0, 6)
    # a model that cannot itself run on an empty batch (x.reshape(x.shape[0], -1)): zeros of the shape
    # its batch axis gives, eagerly and under jit
    model, variables, x = cnn4
    x0 = x[:0]
    for explain in (dtd.explain, jax.jit(dtd.explain, static_argnums=0, static_argnames="composite")):
        R0, y0 = explain(model.apply, variables, x0, composite=C.EpsilonGammaBox(0.0, 1.0))
        assert R0.shape == (0, 8, 8, 3) and y0.shape == (0, 5) and y0.dtype == jnp.float32
    f = dtd.transform(model.apply, C.EpsilonPlus())
    assert jax.grad(lambda x: f(variables, x).sum())(x0).shape == (0, 8, 8, 3)
    # an empty batch in a dataset is skipped over naturally
    result = dtd.explain_dataset(model.apply, variables, [x, x0], composite=C.EpsilonPlus(), progress=False)
    assert result.shape == (2, 8, 8, 3)


# --- 6. static and keyword arguments ------------------------------------------------------------
class Switch(nn.Module):
    """A model with a ``train`` flag (dropout), a ``mode`` string and an optional activation."""

    @nn.compact
    def __call__(self, x, train: bool, mode: str = "relu", activation=None):
        h = nn.Dense(8)(x)
        h = nn.Dropout(0.5, deterministic=not train)(h)
        h = nn.relu(h) if mode == "relu" else nn.leaky_relu(h, 0.3)
        if activation is not None:
            h = activation(h)
        return nn.Dense(4)(h)


class Unhashable:
    __hash__ = None  # type: ignore[assignment]


def test_static_positional_and_keyword_arguments(net):
    _, _, x = net
    x = x * 2 - 1
    model = Switch()
    variables = model.init(jax.random.PRNGKey(2), x, False)
    comp = C.EpsilonPlus()
    f = dtd.transform(model.apply, comp)
    relu = model.apply(variables, x, False)
    leaky = model.apply(variables, x, False, "leaky")
    assert np.abs(np.asarray(relu - leaky)).max() > 1e-3
    np.testing.assert_allclose(f(variables, x, False), relu, rtol=1e-6)
    np.testing.assert_allclose(f(variables, x, False, "leaky"), leaky, rtol=1e-6)  # mode is in the cache key
    np.testing.assert_allclose(f(variables, x, train=False, mode="leaky"), leaky, rtol=1e-6)
    np.testing.assert_allclose(
        f(variables, x, False, "relu", jax.nn.relu6),
        model.apply(variables, x, False, "relu", jax.nn.relu6),
        rtol=1e-6,
    )
    # relevance with static arguments equals that of the function with them bound
    bound = lambda v, x: model.apply(v, x, False, "leaky")  # noqa: E731
    expected, _ = dtd.explain(bound, variables, x, target=1, composite=comp)
    got, _ = dtd.explain(model.apply, variables, x, False, "leaky", target=1, composite=comp)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8)
    by_keyword = jax.grad(lambda x: f(variables, x, train=False, mode="leaky")[:, 1].sum())(x)
    np.testing.assert_allclose(by_keyword, expected, rtol=1e-6, atol=1e-8)
    under_jit = jax.jit(lambda v, x: f(v, x, False, mode="leaky"))(variables, x)
    np.testing.assert_allclose(under_jit, leaky, rtol=1e-6)
    # array leaves of keyword arguments are data: train=True with a dropout key
    rngs = {"dropout": jax.random.PRNGKey(5)}
    dropped = model.apply(variables, x, True, rngs=rngs)
    assert np.abs(np.asarray(dropped - relu)).max() > 1e-3
    np.testing.assert_allclose(f(variables, x, True, rngs=rngs), dropped, rtol=1e-6)
    # describe and ledger take static positional arguments too
    assert [r.module_path for r in dtd.describe(model.apply, variables, x, False, composite=comp).layers] == [
        "Switch/Dense_0",
        "Switch/Dense_1",
    ]
    with pytest.raises(
        TypeError,
        match=re.escape(
            "of type Unhashable: not an array, so it is a static value (closed over when tracing and part "
            "of the cache key), and static values must be hashable; pass it as an array or make it hashable"
        ),
    ):
        f(variables, x, False, "relu", Unhashable())


# --- 7. fn must be a function -------------------------------------------------------------------
def test_transform_rejects_modules_and_non_functions(net):
    model, variables, x = net
    with pytest.raises(
        TypeError,
        match=re.escape("jaxdtd.transform: fn must be a function such as model.apply, got 42 of type int"),
    ):
        dtd.transform(42)
    with pytest.raises(
        TypeError,
        match=re.escape(
            "jaxdtd.transform: got the Flax linen module Net itself; pass its apply function: "
            "f = dtd.transform(model.apply, composite), called as f(variables, x)"
        ),
    ):
        dtd.transform(model, C.EpsilonPlus())
    with pytest.raises(TypeError, match=re.escape("jaxdtd.transform: got the Flax linen module Net itself")):
        dtd.explain(model, variables, x, composite=C.EpsilonPlus())
    from flax import nnx

    with pytest.raises(
        TypeError,
        match=re.escape(
            "jaxdtd.transform: got the Flax NNX module Linear; split it first: apply_fn, state = "
            "dtd.from_nnx(module); f = dtd.transform(apply_fn, composite), called as f(state, x)"
        ),
    ):
        dtd.transform(nnx.Linear(6, 4, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match=re.escape("(it has an .apply: pass fn.apply)")):
        dtd.transform(types.SimpleNamespace(apply=model.apply))
    with pytest.raises(
        TypeError,
        match=re.escape(
            "composite must be a jaxdtd.composites.Composite, a jaxdtd rule or None, got 'EpsilonPlus'"
        ),
    ):
        dtd.transform(model.apply, "EpsilonPlus")


# --- 8. ledger on arrays that are not batch-major ------------------------------------------------
def _after_conv(w, h):
    return jax.nn.relu(h).reshape(h.shape[0], -1) @ w["d"] + w["db"]


def _after_resize(w, z):
    dims = ("NHWC", "HWIO", "NHWC")
    h = jax.lax.conv_general_dilated(z, w["k"], (1, 1), "SAME", dimension_numbers=dims) + w["b"]
    return _after_conv(w, h)


def _resize_net(w, x):
    b, height, width, c = x.shape
    return _after_resize(w, jax.image.resize(x, (b, 2 * height, 2 * width, c), "linear"))


@pytest.mark.parametrize("batch", [3, 8])  # 8: the batch equals the resized height (no crash, wrong sums)
def test_ledger_reduces_each_layer_over_its_own_batch_axis(batch):
    keys = jax.random.split(jax.random.PRNGKey(3), 5)
    w = {
        "k": jax.random.normal(keys[0], (3, 3, 2, 3)) * 0.5,
        "b": jax.random.normal(keys[1], (3,)) * 0.1,
        "d": jax.random.normal(keys[2], (8 * 8 * 3, 4)) * 0.2,
        "db": jax.random.normal(keys[3], (4,)) * 0.1,
    }
    x = jax.random.uniform(keys[4], (batch, 4, 4, 2))
    comp = C.EpsilonPlus()
    book = dtd.ledger(_resize_net, w, x, target=1, composite=comp)
    primitives = [row.primitive for row in book.layers]
    assert primitives == ["dot_general", "dot_general", "conv_general_dilated", "dot_general"]
    assert book.entering.shape == book.leaving.shape == (4, batch)
    # direct computation: explain the network after the resize and after the conv
    z = jax.image.resize(x, (batch, 8, 8, 2), "linear")
    h = jax.lax.conv_general_dilated(z, w["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = h + w["b"]
    R_z, y = dtd.explain(_after_resize, w, z, target=1, composite=comp)
    R_h, _ = dtd.explain(_after_conv, w, h, target=1, composite=comp)
    R_x, _ = dtd.explain(_resize_net, w, x, target=1, composite=comp)
    scale = float(np.abs(np.asarray(y[:, 1])).max())
    np.testing.assert_allclose(book.output, y[:, 1], rtol=1e-5)
    np.testing.assert_allclose(book.entering[3], y[:, 1], rtol=1e-5)
    np.testing.assert_allclose(book.entering[2], R_h.sum((1, 2, 3)), rtol=1e-4, atol=1e-6 * scale)
    np.testing.assert_allclose(book.leaving[2], R_z.sum((1, 2, 3)), rtol=1e-4, atol=1e-6 * scale)
    np.testing.assert_allclose(book.entering[1], book.leaving[2], rtol=1e-4, atol=1e-6 * scale)
    np.testing.assert_allclose(book.leaving[0], R_x.sum((1, 2, 3)), rtol=1e-4, atol=1e-6 * scale)
    np.testing.assert_allclose(book.input, R_x.sum((1, 2, 3)), rtol=1e-4, atol=1e-6 * scale)


def _after_merge(w, h, batch):
    return jax.nn.relu(h).reshape(batch, -1) @ w["d"]


def _merged_net(w, x):
    b, p, c = x.shape
    return _after_merge(w, x.reshape(b * p, c) @ w["a"], b)  # the batch merged with the positions


def test_ledger_when_the_batch_is_merged_with_another_axis():
    keys = jax.random.split(jax.random.PRNGKey(4), 3)
    w = {"a": jax.random.normal(keys[0], (3, 5)), "d": jax.random.normal(keys[1], (4 * 5, 3))}
    x = jax.random.uniform(keys[2], (3, 4, 3))
    comp = C.EpsilonPlus()
    book = dtd.ledger(_merged_net, w, x, target=2, composite=comp)
    h = x.reshape(12, 3) @ w["a"]
    R_h, y = dtd.explain(_after_merge, w, h, 3, target=2, composite=comp)  # 3: a static argument
    R_x, _ = dtd.explain(_merged_net, w, x, target=2, composite=comp)
    np.testing.assert_allclose(book.output, y[:, 2], rtol=1e-5)
    np.testing.assert_allclose(book.entering[1], y[:, 2], rtol=1e-5)
    np.testing.assert_allclose(book.entering[0], R_h.reshape(3, -1).sum(1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(book.leaving[0], R_x.sum((1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(book.input, R_x.sum((1, 2)), rtol=1e-4, atol=1e-6)


# --- 9. traced ZBox bounds ------------------------------------------------------------------------
def test_traced_zbox_bounds_under_jit_and_vmap(net):
    model, variables, x = net
    x = x * 1.5 - 0.25
    eager = lambda lo, hi: dtd.explain(model.apply, variables, x, composite=C.EpsilonGammaBox(lo, hi))[0]  # noqa: E731
    jitted = jax.jit(
        lambda lo, hi, x: dtd.explain(model.apply, variables, x, composite=C.EpsilonGammaBox(lo, hi))[0]
    )
    for lo, hi in ((-0.25, 1.25), (-1.0, 2.0)):  # twice: nothing stale is cached between traces
        np.testing.assert_allclose(jitted(lo, hi, x), eager(lo, hi), rtol=1e-5, atol=1e-7)
    lo6, hi6 = jnp.linspace(-1.0, -0.25, 6), jnp.linspace(1.25, 2.0, 6)  # per feature
    np.testing.assert_allclose(jitted(lo6, hi6, x), eager(lo6, hi6), rtol=1e-5, atol=1e-7)
    # per-sample bounds under vmap
    lows, highs = jnp.array([-0.25, -1.0]), jnp.array([1.25, 2.0])
    per_sample = jax.vmap(
        lambda lo, hi, xi: dtd.explain(model.apply, variables, xi[None], composite=C.DeepTaylor(lo, hi))[0][0]
    )(lows, highs, x[:2])
    for i in range(2):
        expected, _ = dtd.explain(
            model.apply, variables, x[i : i + 1], composite=C.DeepTaylor(float(lows[i]), float(highs[i]))
        )
        np.testing.assert_allclose(per_sample[i], expected[0], rtol=1e-5, atol=1e-7)


# --- 10. globs that match nothing, inputs outside the box -----------------------------------------
def test_unmatched_glob_warns_with_the_existing_paths(cnn4):
    model, variables, x = cnn4
    comp = C.Composite(dense=R.Epsilon(), conv=R.ZPlus(), layers={"*/Dense_9": R.Epsilon(0.25)})
    assert comp.unmatched_patterns([]) == ("*/Dense_9",)
    message = (
        "jaxdtd: Composite.layers pattern(s) '*/Dense_9' match no layer; the layers' module paths are "
        "['CNN/Conv_0', 'CNN/Conv_1', 'CNN/Dense_0', 'CNN/Dense_1'] and their weight paths "
        "['params/Conv_0/kernel', 'params/Conv_1/kernel', 'params/Dense_0/kernel', 'params/Dense_1/kernel']"
    )
    with pytest.warns(UserWarning, match=re.escape(message)):
        dtd.explain(model.apply, variables, x, composite=comp)
    with pytest.warns(UserWarning, match=re.escape(message)):
        dtd.describe(model.apply, variables, x, composite=comp)
    matched = C.Composite(
        dense=R.Epsilon(), layers={"*/Dense_1": R.Epsilon(0.25), "params/Conv_*": R.ZPlus()}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = dtd.describe(model.apply, variables, x, composite=matched).layers
    assert [r.reason for r in rows] == ["layers['params/Conv_*']"] * 2 + ["dense", "layers['*/Dense_1']"]


def test_input_outside_the_zbox_box_warns(cnn4):
    model, variables, x = cnn4
    outside = x * 2 - 0.5
    lo, hi = float(outside.min()), float(outside.max())
    message = (
        "explain: the input of layer 'CNN/Conv_0' (params/Conv_0/kernel) lies outside the ZBox box "
        f"[0, 1]: its values range over [{lo:.6g}, {hi:.6g}]; the z^B rule assumes low <= x <= high, "
        "so give the bounds of the input's actual range"
    )
    with pytest.warns(UserWarning, match=re.escape(message)):
        dtd.explain(model.apply, variables, outside, composite=C.EpsilonGammaBox(0.0, 1.0))
    with pytest.warns(
        UserWarning,
        match=re.escape("lies outside the ZBox box of per-element bounds (low in [0, 0], high in [1, 1])"),
    ):
        dtd.explain(model.apply, variables, outside, composite=C.DeepTaylor(jnp.zeros(3), jnp.ones(3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dtd.explain(model.apply, variables, x, composite=C.EpsilonGammaBox(0.0, 1.0))  # inside: silent
        dtd.explain(model.apply, variables, outside, composite=C.EpsilonGammaBox(lo, hi))
