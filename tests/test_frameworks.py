"""One CNN, three frameworks: Flax linen, Flax NNX and plain jax.numpy / jax.lax, same weights.

Conv3x3(4, SAME) -> ReLU -> maxpool 2 -> Conv3x3(6, SAME) -> ReLU -> avgpool 2 -> flatten -> Dense(10)
-> ReLU -> Dense(5) (``models.CNN``), inputs NHWC (3, 8, 8, 3) in [0, 1].  jaxdtd sees only the traced
primitives, so forward values and relevance must agree across the frameworks for every composite.  NNX
is explained through ``jaxdtd.from_nnx`` and through ``nnx.split`` / ``nnx.merge`` by hand (whole state,
and ``nnx.split(model, nnx.Param, ...)`` with only the parameters as the argument).

Path globs (``Composite(layers=...)``) match a layer's module path (Flax linen's name stack, e.g.
``CNN/Dense_1``) or the pytree path of its weight within the explained function's arguments, with the
argument index dropped:

* linen ``model.apply(variables, x)``: module ``CNN/Dense_1``, weight ``params/Dense_1/kernel``;
* NNX ``apply_fn(state, x)``: module path empty (NNX has no name stack), weight ``dense1/kernel/value``
  (attribute names of the module, then the ``Variable``'s ``value`` field);
* plain ``fn(params, x)``: the dict keys, e.g. ``dense1/w``.

Equinox and Haiku are not installed in this environment and not tested.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models import CNN

import jaxdtd
from jaxdtd import composites as C
from jaxdtd import rules as R

CLASSES = 5
# Forward values and relevance must agree to float32 rounding: |a - b| <= 1e-6 * max|b| (+ rtol 1e-5).
RTOL, ATOL_SCALE = 1e-5, 1e-6


# ==================================================================================================
# The model in three frameworks
# ==================================================================================================


class NNXCNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv0 = nnx.Conv(3, 4, (3, 3), padding="SAME", rngs=rngs)
        self.conv1 = nnx.Conv(4, 6, (3, 3), padding="SAME", rngs=rngs)
        self.dense0 = nnx.Linear(24, 10, rngs=rngs)
        self.dense1 = nnx.Linear(10, CLASSES, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv0(x))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        x = nnx.relu(self.conv1(x))
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.dense0(x))
        return self.dense1(x)


def lax_cnn(params: dict, x: jnp.ndarray) -> jnp.ndarray:
    """The same network with jax.lax primitives only (no Flax)."""

    def conv(p, x):
        return (
            jax.lax.conv_general_dilated(
                x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            + p["b"]
        )

    window = (1, 2, 2, 1)
    x = jax.nn.relu(conv(params["conv0"], x))
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, window, "VALID")
    x = jax.nn.relu(conv(params["conv1"], x))
    x = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, window, "VALID") / 4.0
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(jnp.dot(x, params["dense0"]["w"]) + params["dense0"]["b"])
    return jnp.dot(x, params["dense1"]["w"]) + params["dense1"]["b"]


LINEN_NAMES = {"conv0": "Conv_0", "conv1": "Conv_1", "dense0": "Dense_0", "dense1": "Dense_1"}


@pytest.fixture(scope="module")
def setup():
    """Random weights with non-zero biases of both signs (Flax initializes biases to 0, which would hide
    bias handling), copied into all three frameworks."""
    rng = np.random.default_rng(0)
    shapes = {"conv0": (3, 3, 3, 4), "conv1": (3, 3, 4, 6), "dense0": (24, 10), "dense1": (10, CLASSES)}
    plain = {}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[:-1]))
        plain[name] = {
            "w": jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), shape), jnp.float32),
            "b": jnp.asarray(rng.normal(0, 0.1, shape[-1]), jnp.float32),
        }
    x = jnp.asarray(rng.uniform(0, 1, (3, 8, 8, 3)), jnp.float32)

    linen_vars = {"params": {LINEN_NAMES[k]: {"kernel": v["w"], "bias": v["b"]} for k, v in plain.items()}}
    # the linen layout is exactly the one models.CNN initializes
    init = CNN().init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, linen_vars)

    model = NNXCNN(nnx.Rngs(0))
    for name, p in plain.items():
        layer = getattr(model, name)
        layer.kernel[...] = p["w"]
        layer.bias[...] = p["b"]
    return {"plain": plain, "linen": linen_vars, "nnx": model, "x": x}


def frameworks(setup) -> dict:
    """name -> (fn, weights): the explained function and its first argument."""
    model = setup["nnx"]
    apply_fn, state = jaxdtd.from_nnx(model)
    graphdef, split_state = nnx.split(model)
    param_graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def merged(state, x):
        return nnx.merge(graphdef, state)(x)

    def merged_params(params, x):  # only the Params are an argument; anything else is a constant
        return nnx.merge(param_graphdef, params, rest)(x)

    return {
        "linen": (CNN().apply, setup["linen"]),
        "nnx_from_nnx": (apply_fn, state),
        "nnx_split_merge": (merged, split_state),
        "nnx_split_params": (merged_params, params),
        "lax": (lax_cnn, setup["plain"]),
    }


def assert_close(got, want, what: str):
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL_SCALE * np.abs(want).max(), err_msg=what)


# ==================================================================================================
# Forward values and relevance agree
# ==================================================================================================


def test_forward_identical(setup):
    x = setup["x"]
    results = {name: fn(w, x) for name, (fn, w) in frameworks(setup).items()}
    for name, y in results.items():
        assert y.shape == (3, CLASSES)
        assert_close(y, results["linen"], f"forward {name} vs linen")
        # and the transformed function keeps the forward values
        fn, w = frameworks(setup)[name]
        assert_close(jaxdtd.transform(fn, C.EpsilonPlusFlat())(w, x), y, f"transformed forward {name}")


COMPOSITES = {
    "EpsilonGammaBox": lambda: C.EpsilonGammaBox(0.0, 1.0),
    "EpsilonPlusFlat": C.EpsilonPlusFlat,
    "DeepTaylor": lambda: C.DeepTaylor(0.0, 1.0),
    "DeepTaylor_wsquare": C.DeepTaylor,
}


@pytest.mark.parametrize("composite_name", sorted(COMPOSITES))
def test_relevance_identical(setup, composite_name):
    x = setup["x"]
    composite = COMPOSITES[composite_name]()
    target = jnp.array([0, 3, 4])
    results = {}
    for name, (fn, w) in frameworks(setup).items():
        relevance, y = jaxdtd.explain(fn, w, x, target=target, composite=composite)
        assert relevance.shape == x.shape
        results[name] = relevance
    reference = results["linen"]
    assert np.abs(np.asarray(reference)).max() > 0
    for name, relevance in results.items():
        assert_close(relevance, reference, f"{composite_name}: {name} vs linen")


def test_nnx_grad_of_transform_equals_explain(setup):
    """The jax.grad form on NNX (through from_nnx) gives explain's relevance; the module is untouched."""
    model, x = setup["nnx"], setup["x"]
    before = jax.tree.map(np.asarray, nnx.state(model))
    apply_fn, state = jaxdtd.from_nnx(model)
    f = jaxdtd.transform(apply_fn, C.EpsilonGammaBox(0.0, 1.0))
    onehot = jax.nn.one_hot(2, CLASSES)
    relevance = jax.grad(lambda v: (f(state, v) * onehot).sum())(x)
    want, _ = jaxdtd.explain(apply_fn, state, x, target=2, composite=C.EpsilonGammaBox(0.0, 1.0))
    assert_close(relevance, want, "grad vs explain")
    after = jax.tree.map(np.asarray, nnx.state(model))
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_jit_on_nnx(setup):
    """explain under jax.jit with the NNX state as a traced argument."""
    apply_fn, state = jaxdtd.from_nnx(setup["nnx"])
    x = setup["x"]
    composite = C.EpsilonPlusFlat()
    eager, _ = jaxdtd.explain(apply_fn, state, x, target=1, composite=composite)
    jitted, _ = jax.jit(lambda s, v: jaxdtd.explain(apply_fn, s, v, target=1, composite=composite))(state, x)
    assert_close(jitted, eager, "jit vs eager")


# ==================================================================================================
# Layer paths and path globs
# ==================================================================================================

EXPECTED_PATHS = {
    # name: [(module_path, param_path) for conv0, conv1, dense0, dense1]
    "linen": [(f"CNN/{n}", f"params/{n}/kernel") for n in ("Conv_0", "Conv_1", "Dense_0", "Dense_1")],
    "nnx_from_nnx": [("", f"{n}/kernel/value") for n in ("conv0", "conv1", "dense0", "dense1")],
    "nnx_split_merge": [("", f"{n}/kernel/value") for n in ("conv0", "conv1", "dense0", "dense1")],
    "nnx_split_params": [("", f"{n}/kernel/value") for n in ("conv0", "conv1", "dense0", "dense1")],
    "lax": [("", f"{n}/w") for n in ("conv0", "conv1", "dense0", "dense1")],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PATHS))
def test_layer_paths(setup, name):
    fn, w = frameworks(setup)[name]
    plan = jaxdtd.trace_plan(fn, C.EpsilonPlusFlat(), (w, setup["x"]))
    got = [(layer.module_path, layer.param_path) for layer, _, _ in plan.layer_rules]
    assert got == EXPECTED_PATHS[name]
    assert [layer.kind for layer, _, _ in plan.layer_rules] == ["conv", "conv", "dense", "dense"]
    assert [why for _, _, why in plan.layer_rules] == ["first", "conv", "dense", "dense"]


# A glob per framework that selects the last dense layer (and, for NNX, only through the weight path).
GLOBS = {
    "linen": ["*/Dense_1", "params/Dense_1/*"],
    "nnx_from_nnx": ["dense1/*", "dense1/kernel/value", "*1/kernel*"],
    "nnx_split_merge": ["dense1/*"],
    "nnx_split_params": ["dense1/kernel/value"],
    "lax": ["dense1/w"],
}


def targeted(pattern: str) -> C.Composite:
    """EpsilonGammaBox with Epsilon(0.25) on the layers matching ``pattern``."""
    return C.Composite(
        first=R.ZBox(0.0, 1.0),
        conv=R.Gamma(0.25),
        dense=R.Epsilon(1e-6),
        layers={pattern: R.Epsilon(0.25)},
    )


def test_path_globs_target_the_same_layer_in_every_framework(setup):
    x = setup["x"]
    fws = frameworks(setup)
    results = {}
    for name, patterns in GLOBS.items():
        fn, w = fws[name]
        for pattern in patterns:
            plan = jaxdtd.trace_plan(fn, targeted(pattern), (w, x))
            hits = [
                (layer.param_path, rule) for layer, rule, why in plan.layer_rules if why.startswith("layers")
            ]
            if pattern == "*1/kernel*":  # also matches conv1: globs match the whole path, '*' spans '/'
                assert [p for p, _ in hits] == ["conv1/kernel/value", "dense1/kernel/value"]
                continue
            assert len(hits) == 1 and hits[0][1] == R.Epsilon(0.25), (name, pattern, hits)
            relevance, _ = jaxdtd.explain(fn, w, x, target=1, composite=targeted(pattern))
            results[f"{name} {pattern}"] = relevance
    reference = results["linen */Dense_1"]
    for key, relevance in results.items():
        assert_close(relevance, reference, key)
    # the glob took effect: Epsilon(0.25) on the last layer changes the heatmap
    plain, _ = jaxdtd.explain(CNN().apply, setup["linen"], x, target=1, composite=C.EpsilonGammaBox(0.0, 1.0))
    assert np.abs(np.asarray(plain) - np.asarray(reference)).max() > 1e-3 * np.abs(np.asarray(plain)).max()


def test_nnx_module_path_globs_match_nothing(setup):
    """NNX has no name stack: a linen-style module glob does not select any NNX layer."""
    fn, w = frameworks(setup)["nnx_from_nnx"]
    with pytest.warns(UserWarning, match=r"pattern\(s\) '\*/Dense_1' match no layer"):
        plan = jaxdtd.trace_plan(fn, targeted("*/Dense_1"), (w, setup["x"]))
    assert not any(why.startswith("layers") for _, _, why in plan.layer_rules)
