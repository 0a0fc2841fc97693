"""The same CNN written in Flax linen, Equinox and Haiku gets identical relevance.

jaxdtd works on the jaxpr, so the framework does not matter: Equinox's layers (per-sample, vmapped,
OIHW kernels) and Haiku's (``hk.transform``) reach the same primitives as linen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import CNN

import jaxdtd as dtd
from jaxdtd import composites as C

eqx = pytest.importorskip("equinox", reason="pip install 'jaxdtd[frameworks]' for the Equinox tests")
hk = pytest.importorskip("haiku", reason="pip install 'jaxdtd[frameworks]' for the Haiku tests")

COMPOSITES = {
    "EpsilonGammaBox": C.EpsilonGammaBox(0.0, 1.0),
    "EpsilonPlusFlat": C.EpsilonPlusFlat(),
    "DeepTaylor": C.DeepTaylor(0.0, 1.0),
}


@pytest.fixture(scope="module")
def linen():
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 3))
    variables = CNN().init(jax.random.PRNGKey(1), x)
    variables = jax.tree_util.tree_map(lambda a: a + 0.05, variables)  # non-zero biases
    return x, variables


def haiku_model(params_from):
    def forward(x):
        h = jax.nn.relu(hk.Conv2D(4, 3, padding="SAME", name="conv0")(x))
        h = hk.max_pool(h, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        h = jax.nn.relu(hk.Conv2D(6, 3, padding="SAME", name="conv1")(h))
        h = hk.avg_pool(h, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        h = h.reshape(h.shape[0], -1)
        h = jax.nn.relu(hk.Linear(10, name="dense0")(h))
        return hk.Linear(5, name="dense1")(h)

    model = hk.without_apply_rng(hk.transform(forward))
    p = params_from["params"]
    params = {
        "conv0": {"w": p["Conv_0"]["kernel"], "b": p["Conv_0"]["bias"]},
        "conv1": {"w": p["Conv_1"]["kernel"], "b": p["Conv_1"]["bias"]},
        "dense0": {"w": p["Dense_0"]["kernel"], "b": p["Dense_0"]["bias"]},
        "dense1": {"w": p["Dense_1"]["kernel"], "b": p["Dense_1"]["bias"]},
    }
    return model.apply, params


def equinox_model(params_from):
    class EqxCNN(eqx.Module):
        conv0: eqx.nn.Conv2d
        conv1: eqx.nn.Conv2d
        dense0: eqx.nn.Linear
        dense1: eqx.nn.Linear

        def __init__(self, key):
            k = jax.random.split(key, 4)
            self.conv0 = eqx.nn.Conv2d(3, 4, 3, padding=1, key=k[0])
            self.conv1 = eqx.nn.Conv2d(4, 6, 3, padding=1, key=k[1])
            self.dense0 = eqx.nn.Linear(24, 10, key=k[2])
            self.dense1 = eqx.nn.Linear(10, 5, key=k[3])

        def __call__(self, x):  # one sample, HWC like linen; Equinox convolves CHW
            h = x.transpose(2, 0, 1)
            h = eqx.nn.MaxPool2d(2, 2)(jax.nn.relu(self.conv0(h)))
            h = eqx.nn.AvgPool2d(2, 2)(jax.nn.relu(self.conv1(h)))
            h = h.transpose(1, 2, 0).reshape(-1)
            return self.dense1(jax.nn.relu(self.dense0(h)))

    p = params_from["params"]
    model = EqxCNN(jax.random.PRNGKey(3))
    model = eqx.tree_at(
        lambda m: (m.conv0.weight, m.conv0.bias, m.conv1.weight, m.conv1.bias,
                   m.dense0.weight, m.dense0.bias, m.dense1.weight, m.dense1.bias),
        model,
        (p["Conv_0"]["kernel"].transpose(3, 2, 0, 1), p["Conv_0"]["bias"][:, None, None],
         p["Conv_1"]["kernel"].transpose(3, 2, 0, 1), p["Conv_1"]["bias"][:, None, None],
         p["Dense_0"]["kernel"].T, p["Dense_0"]["bias"], p["Dense_1"]["kernel"].T, p["Dense_1"]["bias"]),
    )  # fmt: skip
    params, static = eqx.partition(model, eqx.is_array)

    def apply(params, x):
        return jax.vmap(eqx.combine(params, static))(x)

    return apply, params


@pytest.mark.parametrize("framework", ["haiku", "equinox"])
@pytest.mark.parametrize("name", list(COMPOSITES))
def test_same_relevance_as_linen(linen, framework, name):
    x, variables = linen
    apply, params = (haiku_model if framework == "haiku" else equinox_model)(variables)
    np.testing.assert_allclose(apply(params, x), CNN().apply(variables, x), rtol=1e-5, atol=1e-6)
    want, _ = dtd.explain(CNN().apply, variables, x, target=2, composite=COMPOSITES[name])
    got, _ = dtd.explain(apply, params, x, target=2, composite=COMPOSITES[name])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(jnp.abs(want).max()))


def test_layers_are_named_by_their_weight_paths(linen):
    x, variables = linen
    for framework, expected in (
        ("haiku", ["conv0/w", "conv1/w", "dense0/w", "dense1/w"]),
        ("equinox", ["conv0/weight", "conv1/weight", "dense0/weight", "dense1/weight"]),
    ):
        apply, params = (haiku_model if framework == "haiku" else equinox_model)(variables)
        rows = dtd.describe(apply, params, x, composite=C.EpsilonPlus()).layers
        assert [r.param_path for r in rows] == expected
        # a glob on the weight path assigns a rule, whatever the framework
        comp = C.Composite(
            conv=C.EpsilonPlus().conv,
            dense=C.EpsilonPlus().dense,
            layers={f"{expected[3].split('/')[0]}/*": dtd.rules.Epsilon(0.5)},
        )
        assert dtd.describe(apply, params, x, composite=comp).layers[3].rule.startswith("Epsilon(epsilon=0.5")
