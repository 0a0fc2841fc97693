"""Composites as an ordered list of selector -> rule maps (first match wins)."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd import rules as R
from jaxdtd import selectors as S


def _rules(fn, args, composite):
    plan = dtd.trace_plan(fn, composite, args)
    return [(layer.module_path, rule, why) for layer, rule, why in plan.layer_rules]


def test_keywords_are_shorthands_for_selector_entries(cnn):
    model, variables, x = cnn
    keywords = C.Composite(
        first=R.Flat(), conv=R.ZPlus(), dense=R.Epsilon(0.1), layers={"*/Dense_1": R.Epsilon(0.25)}
    )
    explicit = C.Composite(
        rules=[
            (S.Path("*/Dense_1"), R.Epsilon(0.25)),
            (S.First(), R.Flat()),
            (S.LayerKind("conv"), R.ZPlus()),
            (S.LayerKind("dense"), R.Epsilon(0.1)),
        ]
    )
    assert _rules(model.apply, (variables, x), keywords) == _rules(model.apply, (variables, x), explicit)
    assert _rules(model.apply, (variables, x), explicit) == [
        ("CNN/Conv_0", R.Flat(), "first"),
        ("CNN/Conv_1", R.ZPlus(), "conv"),
        ("CNN/Dense_0", R.Epsilon(0.1), "dense"),
        ("CNN/Dense_1", R.Epsilon(0.25), "layers['*/Dense_1']"),
    ]
    a, _ = dtd.explain(model.apply, variables, x, target=1, composite=keywords)
    b, _ = dtd.explain(model.apply, variables, x, target=1, composite=explicit)
    np.testing.assert_array_equal(a, b)


def test_first_match_wins_and_explicit_rules_come_before_keywords(cnn):
    model, variables, x = cnn
    comp = C.Composite(
        rules=[(S.LayerKind("conv") & S.Path("*/Conv_1"), R.Gamma(0.5)), (S.Default(), R.Epsilon(0.01))],
        conv=R.ZPlus(),
    )
    assert [(rule, why) for _, rule, why in _rules(model.apply, (variables, x), comp)] == [
        (R.Epsilon(0.01), "default"),
        (R.Gamma(0.5), "conv & layers['*/Conv_1']"),
        (R.Epsilon(0.01), "default"),
        (R.Epsilon(0.01), "default"),
    ]


class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(4, name="Inner")(x))
        return nn.Dense(3, name="Outer")(jnp.tanh(h))


def test_glob_times_primitive_selects_operations_inside_a_module():
    model, x = Two(), jax.random.normal(jax.random.PRNGKey(1), (2, 5))
    variables = model.init(jax.random.PRNGKey(0), x)
    plain = C.Composite(dense=R.Epsilon())
    inside = C.Composite(dense=R.Epsilon(), rules=[(S.Path("Two") & S.Primitive("tanh"), R.Gradient())])
    description = dtd.describe(model.apply, variables, x, composite=inside)
    assert description.operation_reasons == (("tanh", "Gradient", "layers['Two'] & operations['tanh']", 2),)
    assert "tanh x2: Gradient (layers['Two'] & operations['tanh'])" in str(description)
    assert dtd.describe(model.apply, variables, x, composite=plain).operation_reasons == (
        ("tanh", "Pass", "registry", 2),
    )
    r_inside, _ = dtd.explain(model.apply, variables, x, target=0, composite=inside)
    r_plain, _ = dtd.explain(model.apply, variables, x, target=0, composite=plain)
    assert not np.allclose(r_inside, r_plain)
    # a glob that selects no operation leaves the registry's rule
    elsewhere = C.Composite(dense=R.Epsilon(), rules=[(S.Path("Other") & S.Primitive("tanh"), R.Gradient())])
    r_elsewhere, _ = dtd.explain(model.apply, variables, x, target=0, composite=elsewhere)
    np.testing.assert_array_equal(r_elsewhere, r_plain)


def test_unit_kind_selects_elementwise_islands():
    fn = lambda w, x: jax.nn.silu(x) @ w
    w = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5))
    comp = C.Composite(dense=R.Epsilon(0.0), rules=[(S.UnitKind("island"), R.Gradient())])
    relevance, _ = dtd.explain(fn, w, x, target=0, composite=comp)
    # the gradient through the SiLU: the dense layer's LRP-0 relevance of h, times dh/dx
    h = jax.nn.silu(x)
    r_h = h * w[:, 0] * (h @ w)[:, :1] / (h @ w)[:, :1]
    expected = jax.vmap(lambda xi, ri: jax.vjp(jax.nn.silu, xi)[1](ri)[0])(x, r_h)
    np.testing.assert_allclose(relevance, expected, rtol=1e-5, atol=1e-6)
    description = dtd.describe(fn, w, x, composite=comp)
    assert description.operation_reasons == (("island(logistic+mul)", "Gradient", "unit['island']", 1),)


def test_rules_that_do_not_apply_are_skipped_and_bad_entries_rejected(cnn):
    model, variables, x = cnn
    # Pass cannot act on a layer: the entry is skipped for layers, the next one wins
    comp = C.Composite(rules=[(S.UnitKind("layer"), R.Pass()), (S.Default(), R.Epsilon())])
    assert {why for _, _, why in _rules(model.apply, (variables, x), comp)} == {"default"}
    assert {rule for _, rule, _ in _rules(model.apply, (variables, x), comp)} == {R.Epsilon()}
    with pytest.raises(TypeError, match=re.escape("Composite.rules[0] must be a (selector, rule) pair")):
        C.Composite(rules=[("*/Dense_1", R.Epsilon())])
    with pytest.raises(ValueError, match="LayerKind: kind must be 'dense' or 'conv'"):
        S.LayerKind("attention")
    # Pass on an operation that is not elementwise (max pooling) is a problem, not a wrong heatmap
    pooled = C.Composite(dense=R.Epsilon(), conv=R.Epsilon(), operations={"reduce_window_max": R.Pass()})
    with pytest.raises(
        dtd.UnsupportedOperationError,
        match=re.escape("primitive 'reduce_window_max' at module 'CNN'")
        + ".*"
        + re.escape("Pass() needs an elementwise operation (operand (2, 8, 8, 4), result (2, 4, 4, 4))"),
    ):
        dtd.trace_plan(model.apply, pooled, (variables, x))
