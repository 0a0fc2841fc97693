"""Composites: rule assignment, precedence, globs, the first layer, and the presets' rules."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd import rules as R


def assignment(fn, composite, args, argnums=1):
    plan = dtd.trace_plan(fn, composite, args, argnums=argnums)
    return [(layer.module_path, layer.param_path, rule, why) for layer, rule, why in plan.layer_rules]


def test_layers_found_in_execution_order_with_paths(cnn):
    model, variables, x = cnn
    rows = assignment(model.apply, C.EpsilonPlusFlat(), (variables, x))
    assert [(m, p) for m, p, _, _ in rows] == [
        ("CNN/Conv_0", "params/Conv_0/kernel"),
        ("CNN/Conv_1", "params/Conv_1/kernel"),
        ("CNN/Dense_0", "params/Dense_0/kernel"),
        ("CNN/Dense_1", "params/Dense_1/kernel"),
    ]
    assert [type(r).__name__ for _, _, r, _ in rows] == ["Flat", "ZPlus", "Epsilon", "Epsilon"]
    assert [why for *_, why in rows] == ["first", "conv", "dense", "dense"]


def test_precedence_glob_over_first_over_kind_over_default(cnn):
    model, variables, x = cnn
    comp = C.Composite(
        first=R.Flat(),
        conv=R.ZPlus(),
        default=R.Epsilon(0.5),
        layers={"*/Conv_0": R.Gamma(0.5), "params/Dense_1/*": R.AlphaBeta(1.0, 0.0)},
    )
    rows = assignment(model.apply, comp, (variables, x))
    assert [(type(r).__name__, why) for _, _, r, why in rows] == [
        ("Gamma", "layers['*/Conv_0']"),  # glob beats first
        ("ZPlus", "conv"),
        ("Epsilon", "default"),  # no dense rule
        ("AlphaBeta", "layers['params/Dense_1/*']"),  # weight-path glob
    ]
    # first glob in order wins
    rows = assignment(
        model.apply, C.Composite(layers=[("*Dense*", R.ZPlus()), ("*", R.Flat())]), (variables, x)
    )
    assert [type(r).__name__ for _, _, r, _ in rows] == ["Flat", "Flat", "ZPlus", "ZPlus"]
    # nothing matches: plain gradient
    rows = assignment(model.apply, C.Composite(conv=R.ZPlus()), (variables, x))
    assert [why for *_, why in rows] == ["conv", "conv", "gradient", "gradient"]


def test_glob_assignment_changes_the_heatmap(cnn):
    model, variables, x = cnn
    base = C.EpsilonPlus()
    tweaked = C.Composite(conv=R.ZPlus(), dense=R.Epsilon(), layers={"*/Dense_0": R.Epsilon(10.0)})
    r1, _ = dtd.explain(model.apply, variables, x, target=0, composite=base)
    r2, _ = dtd.explain(model.apply, variables, x, target=0, composite=tweaked)
    assert not np.allclose(r1, r2)
    assert abs(float(r2.sum())) < abs(float(r1.sum()))  # a large epsilon absorbs relevance


class TwoStem(nn.Module):
    """Two convolutions read the input (Inception-style): both are "first" layers."""

    @nn.compact
    def __call__(self, x):
        a = nn.relu(nn.Conv(2, (3, 3), name="stem_a")(x))
        b = nn.relu(nn.Conv(2, (1, 1), name="stem_b")(x))
        h = jnp.concatenate([a, b], axis=-1)
        h = nn.relu(nn.Conv(3, (3, 3), name="body")(h))
        return nn.Dense(2, name="head")(h.mean(axis=(1, 2)))


def test_first_layer_is_every_layer_reading_the_input_directly():
    model = TwoStem()
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 6, 6, 1))
    variables = model.init(jax.random.PRNGKey(1), x)
    rows = assignment(model.apply, C.EpsilonGammaBox(0.0, 1.0), (variables, x))
    assert [(m, type(r).__name__) for m, _, r, _ in rows] == [
        ("TwoStem/stem_a", "ZBox"),
        ("TwoStem/stem_b", "ZBox"),
        ("TwoStem/body", "Gamma"),
        ("TwoStem/head", "Epsilon"),
    ]
    # the concat, global mean (Norm) and the rules still conserve with DeepTaylor on bias-free weights
    variables = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if "bias" in jax.tree_util.keystr(p) else v * 2.0, variables
    )
    logits = model.apply(variables, x)
    c = int(jnp.argmax(logits[0]))
    relevance, _ = dtd.explain(model.apply, variables, x, target=c, composite=C.DeepTaylor(0.0, 1.0))
    positive = logits[:, c] > 0
    np.testing.assert_allclose(relevance.reshape(2, -1).sum(1)[positive], logits[positive, c], rtol=1e-4)


def test_single_rule_is_that_rule_on_dense_and_conv(cnn):
    model, variables, x = cnn
    rows = assignment(model.apply, R.Gamma(0.1), (variables, x))
    assert all(r == R.Gamma(0.1) for _, _, r, _ in rows)


@pytest.mark.parametrize(
    ("preset", "first", "conv", "dense"),
    [
        (C.EpsilonPlus(), None, R.ZPlus(), R.Epsilon()),
        (C.EpsilonPlusFlat(), R.Flat(), R.ZPlus(), R.Epsilon()),
        (C.EpsilonAlpha2Beta1(), None, R.AlphaBeta(2.0, 1.0), R.Epsilon()),
        (C.EpsilonAlpha2Beta1Flat(), R.Flat(), R.AlphaBeta(2.0, 1.0), R.Epsilon()),
        (C.DeepTaylor(), R.WSquare(zero_bias=True), R.ZPlus(zero_bias=True), R.ZPlus(zero_bias=True)),
    ],
)
def test_presets_are_the_rules_of_rules_md(preset, first, conv, dense):
    assert (preset.first, preset.conv, preset.dense) == (first, conv, dense)


def test_box_presets():
    dt = C.DeepTaylor(low=-1.0, high=2.0)
    assert (
        isinstance(dt.first, R.ZBox) and dt.first.zero_bias and (dt.first.low, dt.first.high) == (-1.0, 2.0)
    )
    egb = C.EpsilonGammaBox(0.0, 1.0)
    assert isinstance(egb.first, R.ZBox) and egb.conv == R.Gamma(0.25) and egb.dense == R.Epsilon()


def test_norm_on_an_affine_layer_is_epsilon_with_its_stabilizer(cnn):
    model, variables, x = cnn
    r_norm, _ = dtd.explain(model.apply, variables, x, target=1, composite=R.Norm(1e-3))
    r_eps, _ = dtd.explain(model.apply, variables, x, target=1, composite=R.Epsilon(1e-3))
    np.testing.assert_allclose(r_norm, r_eps, rtol=1e-6)


def test_non_negative_inputs_are_detected(cnn):
    """Layers after a ReLU (and pooling) skip the x- branches; the first layer does not."""
    model, variables, x = cnn
    plan = dtd.trace_plan(model.apply, C.EpsilonPlus(), (variables, x))
    assert [layer.non_negative_input for layer, _, _ in plan.layer_rules] == [False, True, True, True]
