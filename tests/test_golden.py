"""jaxdtd against zennit 1.0: golden files made by tests/reference/generate_golden.py.

Every rule and preset on an MLP and on a CNN with max and average pooling, with negative inputs
reaching the first layer.  Pass criterion: relative L2 error < 1e-4 (float32 vs zennit in float64).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from golden_cases import CASE_COMPOSITES, HIGH, LOW
from models import CNN, MLP, params_from_flat

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd import rules as R

HERE = pathlib.Path(__file__).parent / "reference"


def case_composite(case: str, golden) -> object:
    if case == "zbox_array_first_epsilon":  # bounds stored in the golden file
        low, high = jnp.asarray(golden["zbox_low"]), jnp.asarray(golden["zbox_high"])
        return C.Composite(first=R.ZBox(low, high), dense=R.Epsilon(), conv=R.Epsilon())
    return CASE_COMPOSITES[case]


def load(name: str):
    return dict(np.load(HERE / f"golden_{name}.npz", allow_pickle=False))


MODELS = {"mlp": MLP(), "cnn": CNN()}
CASES = [(m, str(c)) for m in MODELS for c in load(m)["cases"]]


def test_every_preset_and_rule_is_covered():
    for model in MODELS:
        cases = set(load(model)["cases"].tolist())
        assert {
            "EpsilonPlus",
            "EpsilonPlusFlat",
            "EpsilonAlpha2Beta1",
            "EpsilonAlpha2Beta1Flat",
            "EpsilonGammaBox",
            "DeepTaylor",
            "DeepTaylorBox",
        } <= cases
        assert {
            "epsilon",
            "zplus",
            "alphabeta_2_1",
            "gamma_0.25",
            "wsquare",
            "flat",
            "zbox_first_epsilon",
        } <= cases


@pytest.mark.parametrize("model_name", list(MODELS))
def test_forward_matches_torch(model_name):
    golden = load(model_name)
    variables = params_from_flat({k: v for k, v in golden.items() if k.startswith("params/")})
    logits = MODELS[model_name].apply(variables, jnp.asarray(golden["x"]))
    np.testing.assert_allclose(np.asarray(logits), golden["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("model_name", "case"), CASES, ids=[f"{m}-{c}" for m, c in CASES])
def test_relevance_matches_zennit(model_name, case):
    golden = load(model_name)
    variables = params_from_flat({k: v for k, v in golden.items() if k.startswith("params/")})
    x = jnp.asarray(golden["x"])
    relevance, _ = dtd.explain(
        MODELS[model_name].apply,
        variables,
        x,
        target=jnp.asarray(golden["target"]),
        composite=case_composite(case, golden),
    )
    expected = golden[f"relevance/{case}"]
    error = np.linalg.norm(np.asarray(relevance, np.float64) - expected) / np.linalg.norm(expected)
    assert error < 1e-4, f"{model_name}/{case}: relative L2 error {error:.2e}"


def test_jit_matches_eager_on_golden_cnn():
    golden = load("cnn")
    variables = params_from_flat({k: v for k, v in golden.items() if k.startswith("params/")})
    x = jnp.asarray(golden["x"])
    comp = C.EpsilonGammaBox(LOW, HIGH)
    eager, _ = dtd.explain(CNN().apply, variables, x, composite=comp)
    jitted, _ = jax.jit(lambda v, x: dtd.explain(CNN().apply, v, x, composite=comp))(variables, x)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-7)
