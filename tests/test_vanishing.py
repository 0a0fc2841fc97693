"""The static analysis of where relevance vanishes (jaxdtd.vanishing) and the work it saves.

Gamma's second denominator group (outputs z < 0) is dropped only where the relevance of z provably
vanishes wherever z <= 0; the heatmaps must equal those computed without the analysis."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import CNN

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd import interpret
from jaxdtd import rules as R
from jaxdtd.units import LayerUnit

jax.config.update("jax_enable_x64", False)

KEY = jax.random.PRNGKey(0)


def _params():
    k = jax.random.split(KEY, 4)
    return {
        "w0": jax.random.normal(k[0], (6, 8)),
        "b0": 0.3 * jax.random.normal(k[1], (8,)),
        "w1": jax.random.normal(k[2], (8, 3)),
        "b1": 0.1 * jax.random.normal(k[3], (3,)),
    }


X = jax.random.normal(jax.random.PRNGKey(1), (5, 6))


def _two_layers(act, combine=None):
    def net(p, x):
        z = x @ p["w0"] + p["b0"]
        h = act(z)
        y = h @ p["w1"] + p["b1"]
        return y if combine is None else combine(y, z, h)

    return net


def _found(net, composite) -> list[bool]:
    plan = dtd.trace_plan(net, composite, (_params(), X))
    return [u.positive_output_relevance for u in plan.units if isinstance(u, LayerUnit)]


def _gamma_then(second):
    return C.Composite(layers=[("*w0*", R.Gamma(0.5)), ("*w1*", second)])


GAMMA = R.Gamma(0.5)


@pytest.mark.parametrize(
    ("act", "second", "expected"),
    [
        (jax.nn.relu, GAMMA, True),
        (jax.nn.relu6, GAMMA, True),
        (lambda z: jnp.clip(z, 0.0, 6.0), GAMMA, True),
        (lambda z: jnp.maximum(z, 0.0), R.Epsilon(), True),
        (lambda z: jnp.tanh(jax.nn.relu(z)), R.ZPlus(), True),
        (lambda z: 2.0 * jax.nn.relu(z), R.AlphaBeta(), True),
        (jax.nn.leaky_relu, GAMMA, False),  # not zero for z < 0
        (lambda z: jnp.maximum(z, -1.0), GAMMA, False),
        (lambda z: jax.nn.sigmoid(jax.nn.relu(z)), GAMMA, False),  # sigmoid(0) = 1/2
        (lambda z: jax.nn.relu(z) + 1.0, GAMMA, False),  # a shift passes relevance to zeros
        (jax.nn.relu, R.Flat(), False),  # Flat gives relevance to inputs that are 0
        (jax.nn.relu, R.WSquare(), False),
        (jax.nn.relu, R.ZBox(-1.0, 1.0), False),
    ],
    ids=[
        "relu",
        "relu6",
        "clip",
        "max0-epsilon",
        "tanh-relu",
        "scaled-relu",
        "leaky",
        "max-1",
        "sigmoid",
        "shift",
        "flat",
        "wsquare",
        "zbox",
    ],
)
def test_layers_found_for_activation_and_next_rule(act, second, expected):
    assert _found(_two_layers(act), _gamma_then(second)) == [expected, False]  # the logits never


def test_next_layer_with_the_plain_gradient_breaks_it():
    composite = C.Composite(layers=[("*w0*", GAMMA)])  # w1: no rule, the gradient
    assert _found(_two_layers(jax.nn.relu), composite)[0] is False


@pytest.mark.parametrize(
    ("combine", "expected"),
    [
        (lambda y, z, h: (y, h), True),  # relevance y * c on h vanishes where h does
        (lambda y, z, h: (y, z), False),  # z itself is an output: R_z = z * c
        (lambda y, z, h: y + (h + z).sum(-1, keepdims=True), False),  # z also feeds a sum
        (lambda y, z, h: y + h.max(-1, keepdims=True), True),  # max routes to entries equal to it
        (lambda y, z, h: y + h.sum(-1, keepdims=True), True),  # Norm: R_in = h * (...)
    ],
    ids=["h-output", "z-output", "z-residual", "h-max", "h-sum"],
)
def test_other_consumers(combine, expected):
    assert _found(_two_layers(jax.nn.relu, combine), _gamma_then(GAMMA))[0] is expected


def _no_analysis(monkeypatch):
    monkeypatch.setattr(interpret, "layers_with_vanishing_negative_relevance", lambda *a: frozenset())


def _heatmaps(fn, variables, x, composite, n_out):
    f = dtd.transform(fn, composite)
    return jax.jit(lambda x: jax.grad(lambda x: f(variables, x)[:, :n_out].sum())(x))(x)


CASES = {
    "mlp-gamma": (_two_layers(jax.nn.relu), _gamma_then(GAMMA)),
    "mlp-gamma-then-flat": (_two_layers(jax.nn.relu), _gamma_then(R.Flat())),
    "mlp-gamma-leaky": (_two_layers(jax.nn.leaky_relu), _gamma_then(GAMMA)),
    "mlp-gamma-residual": (_two_layers(jax.nn.relu, lambda y, z, h: y + z[:, :3]), _gamma_then(GAMMA)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_heatmaps_equal_those_without_the_analysis(case, monkeypatch):
    net, composite = CASES[case]
    fast = _heatmaps(net, _params(), X, composite, 3)
    _no_analysis(monkeypatch)
    slow = _heatmaps(net, _params(), X, composite, 3)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6)
    assert np.abs(slow).max() > 0


def _cnn():
    model = CNN()
    x = jax.random.normal(KEY, (3, 8, 8, 3))
    return model, model.init(jax.random.PRNGKey(2), x), x


def test_cnn_gamma_equal_and_cheaper(monkeypatch):
    model, variables, x = _cnn()
    composite = C.EpsilonGammaBox(-3.0, 3.0)
    plan = dtd.trace_plan(model.apply, composite, (variables, x))
    assert [u.positive_output_relevance for u in plan.units if isinstance(u, LayerUnit)] == [
        True,  # Conv_0 (z^B; no group to drop, but the fact holds)
        True,  # Conv_1 (gamma)
        True,  # Dense_0 (epsilon)
        False,  # logits
    ]

    def convolutions(fn):
        jaxpr = jax.make_jaxpr(lambda x: jax.grad(lambda x: fn(variables, x)[:, 0].sum())(x))(x)
        return str(jaxpr).count("conv_general_dilated")

    fast = _heatmaps(model.apply, variables, x, composite, 5)
    fast_convs = convolutions(dtd.transform(model.apply, composite))
    _no_analysis(monkeypatch)
    slow = _heatmaps(model.apply, variables, x, composite, 5)
    slow_convs = convolutions(dtd.transform(model.apply, composite))
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6)
    assert fast_convs == slow_convs - 1  # Conv_1: one transposed pass instead of two


def test_resnet_block_output_conv_keeps_both_groups(monkeypatch):
    from jaxdtd.models import classic

    model = classic.ResNet18(num_classes=4, width=8)  # the structure of the real one, 1/8 of the channels
    x = jax.random.uniform(KEY, (2, 16, 16, 3))
    variables = model.init(jax.random.PRNGKey(3), x)
    composite = C.EpsilonGammaBox(0.0, 1.0)
    plan = dtd.trace_plan(model.apply, composite, (variables, x))
    found = {u.layer.module_path: u.positive_output_relevance for u in plan.units if isinstance(u, LayerUnit)}
    # the stem and each block's first conv feed a ReLU; the second conv and the projection
    # shortcut feed the residual sum (whose relevance goes to negative addends too); head: logits
    expected = {path: path.endswith(("stem_conv", "conv1")) for path in found}
    assert found == expected
    assert sum(expected.values()) == 9
    fast = _heatmaps(model.apply, variables, x, composite, 4)
    _no_analysis(monkeypatch)
    slow = _heatmaps(model.apply, variables, x, composite, 4)
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-6 * float(np.abs(slow).max()))


def test_vmap_keeps_the_weights_unbatched():
    """The backward ties each layer's weights to its incoming relevance (so that XLA computes the
    modified weights only when needed); under vmap the weights must not become batched, or every
    convolution would turn into a grouped one."""
    model, variables, x = _cnn()
    f = dtd.transform(model.apply, C.EpsilonGammaBox(-3.0, 3.0))

    def one(x1):
        return jax.grad(lambda x1: f(variables, x1[None])[0, 1])(x1)

    jaxpr = str(jax.make_jaxpr(jax.vmap(one))(x))
    assert "conv_general_dilated" in jaxpr
    assert "feature_group_count=1" in jaxpr and "feature_group_count=3" not in jaxpr
    batched = jax.vmap(one)(x)
    looped = jnp.stack([one(x[i]) for i in range(x.shape[0])])
    np.testing.assert_allclose(batched, looped, rtol=1e-5, atol=1e-6)
