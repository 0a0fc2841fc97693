"""Concept relevance propagation (jaxdtd.crp) against zennit-crp 0.6.0 and by its own properties.

The golden file ``tests/reference/golden_crp.npz`` holds zennit-crp's results on the PyTorch twin of
``tests.models.CNN`` (``tests/reference/generate_golden_crp.py``; float64, NHWC): concept relevances,
conditional heatmaps, start-layer and single-neuron heatmaps, and the feature visualization
(RelMax/ActMax) of 32 samples with their reference heatmaps.  zennit-crp's layer ``"Conv_1"`` is the
pattern ``"*/Conv_1"`` here.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd import crp
from tests.models import CNN, params_from_flat

GOLDEN = Path(__file__).parent / "reference" / "golden_crp.npz"
LAYERS = ("Conv_0", "Conv_1", "Dense_0")
PATTERNS = tuple(f"*/{name}" for name in LAYERS)
COMPOSITES = {"EpsilonPlus": C.EpsilonPlus, "EpsilonAlpha2Beta1": C.EpsilonAlpha2Beta1}
TOL = dict(rtol=1e-9, atol=1e-13)


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN, allow_pickle=False) as archive:
        data = {key: archive[key] for key in archive.files}
    with jax.enable_x64(True):
        flat = {k: v for k, v in data.items() if k.startswith("params/")}
        variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params_from_flat(flat))
        yield data, variables, np.asarray(data["x"], np.float64)


def _conditions(encoded) -> list[dict]:
    """zennit-crp's conditions (JSON) with our layer patterns; neuron keys back to ints."""
    out = []
    for text in encoded:
        cond = {}
        for key, value in json.loads(str(text)).items():
            if isinstance(value, dict):
                value = {int(c): n for c, n in value.items()}
            cond[key if key == "y" else f"*/{key}"] = value
        out.append(cond)
    return out


@pytest.mark.parametrize("case", list(COMPOSITES))
def test_plain_attribution_matches_zennit_crp(golden, case):
    data, variables, x = golden
    result = crp.attribute(
        CNN().apply,
        variables,
        x[:4],
        conditions=[{"y": jnp.asarray(data["label"][:4])}],
        composite=COMPOSITES[case](),
        record=PATTERNS,
    )
    np.testing.assert_allclose(result.heatmap[0], data[f"{case}/input_relevance"], **TOL)
    for name, pattern in zip(LAYERS, PATTERNS, strict=True):
        np.testing.assert_allclose(result.relevances[pattern][0], data[f"{case}/relevances/{name}"], **TOL)
        np.testing.assert_allclose(result.activations[pattern], data[f"{case}/activations/{name}"], **TOL)
        np.testing.assert_allclose(
            result.concepts(pattern)[0], data[f"{case}/concept_relevance/{name}"], **TOL
        )
        np.testing.assert_allclose(
            result.concepts(pattern, abs_norm=True)[0],
            data[f"{case}/concept_relevance_absnorm/{name}"],
            **TOL,
        )


@pytest.mark.parametrize("case", list(COMPOSITES))
def test_conditional_heatmaps_match_zennit_crp(golden, case):
    data, variables, x = golden
    conditions = _conditions(data[f"{case}/cond/conditions"])
    result = crp.attribute(
        CNN().apply, variables, x[:1], conditions=conditions, composite=COMPOSITES[case](), record=PATTERNS
    )
    np.testing.assert_allclose(result.heatmap[:, 0], data[f"{case}/cond/input_relevance"], **TOL)
    for name, pattern in zip(LAYERS, PATTERNS, strict=True):
        np.testing.assert_allclose(
            result.relevances[pattern][:, 0], data[f"{case}/cond/relevances/{name}"], **TOL
        )


@pytest.mark.parametrize("layer", ["Conv_1", "Dense_0"])
def test_start_layer_and_single_neuron_heatmaps_match_zennit_crp(golden, layer):
    data, variables, x = golden
    for kind in ("start", "start_rf"):
        conditions = _conditions(data[f"EpsilonPlus/{kind}/{layer}/conditions"])
        result = crp.attribute(
            CNN().apply,
            variables,
            x[:1],
            conditions=conditions,
            composite=C.EpsilonPlus(),
            start=f"*/{layer}",
        )
        np.testing.assert_allclose(
            result.heatmap[:, 0], data[f"EpsilonPlus/{kind}/{layer}/input_relevance"], **TOL
        )
        np.testing.assert_allclose(result.output, data["EpsilonPlus/activations/" + layer][:1], **TOL)


def test_concept_atlas_matches_zennit_crp_feature_visualization(golden):
    data, variables, x = golden
    label = data["label"]
    batches = [(x[i : i + 8], label[i : i + 8]) for i in range(0, 32, 8)]
    atlas = crp.concept_atlas(
        CNN().apply, variables, batches, PATTERNS, composite=C.EpsilonPlus(), progress=False
    )
    for mode in ("relevance", "activation"):
        for name, pattern in zip(LAYERS, PATTERNS, strict=True):
            ranking = getattr(atlas, mode)[pattern]
            prefix = f"EpsilonPlus/fv/{mode}/{name}/"
            distinct, unique = data[prefix + "distinct"], data[prefix + "rf_unique"]
            assert distinct.mean() > 0.35  # most orders are meaningful, not ties
            np.testing.assert_allclose(ranking.values, data[prefix + "rel_c_sorted"], **TOL)
            np.testing.assert_array_equal(ranking.samples[distinct], data[prefix + "d_c_sorted"][distinct])
            both = distinct & unique
            np.testing.assert_array_equal(ranking.neurons[both], data[prefix + "rf_c_sorted"][both])
        for kind in ("rf", "channel"):
            for concept in (0, 3):
                prefix = f"EpsilonPlus/fv_ref/{mode}/{kind}/{concept}/"
                indices, heatmaps = atlas.reference_heatmaps(
                    CNN().apply,
                    variables,
                    x,
                    "*/Conv_1",
                    concept,
                    C.EpsilonPlus(),
                    mode,
                    count=4,
                    rf=kind == "rf",
                )
                np.testing.assert_array_equal(indices, data[prefix + "sample_index"])
                np.testing.assert_allclose(heatmaps.sum(-1), data[prefix + "heatmaps"], **TOL)


# --- properties (float32, no golden file) ---------------------------------------------------------
@pytest.fixture(scope="module")
def cnn():
    model = CNN()
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 3))
    return model, model.init(jax.random.PRNGKey(0), x), x


def test_channel_heatmaps_sum_to_the_explanation(cnn):
    model, variables, x = cnn
    conditions = [{"y": 2, "*/Conv_1": [c]} for c in range(6)]
    result = crp.attribute(model.apply, variables, x, conditions=conditions, composite=C.EpsilonPlus())
    relevance, _ = dtd.explain(model.apply, variables, x, target=2, composite=C.EpsilonPlus())
    np.testing.assert_allclose(result.heatmap.sum(0), relevance, rtol=1e-5, atol=1e-6)
    # each conditional heatmap sums to its concept's relevance (ZPlus below Conv_1 is conservative
    # up to the bias and stabilizer)
    concepts = crp.concept_relevance(result.relevances["*/Conv_1"].sum(0))
    np.testing.assert_allclose(result.heatmap.sum((2, 3, 4)).T, concepts, rtol=0.05, atol=1e-4)


def test_jit_and_chunked_conditions_equal_eager(cnn):
    model, variables, x = cnn
    conditions = [{"y": [1], "*/Conv_0": [c]} for c in range(4)] + [{"y": [0, 3], "*/Dense_0": [2, 5]}]

    def run(v, x, batch_size=None):
        result = crp.attribute(
            model.apply, v, x, conditions=conditions, composite=C.EpsilonGammaBox(-4.0, 4.0),
            record=["*/Conv_1"], batch_size=batch_size,
        )  # fmt: skip
        return result.heatmap, result.relevances["*/Conv_1"]

    eager = run(variables, x)
    jitted = jax.jit(run)(variables, x)
    chunked = run(variables, x, batch_size=2)
    for a, b, c in zip(eager, jitted, chunked, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-7)


def test_traced_composite_bounds_and_traced_labels(cnn):
    model, variables, x = cnn
    labels = jnp.array([0, 3, 1])

    def run(low, labels):
        result = crp.attribute(
            model.apply, variables, x, composite=C.EpsilonGammaBox(low, 4.0),
            conditions=[{"y": labels, "*/Conv_0": [1, 2]}],
        )  # fmt: skip
        return result.heatmap

    eager = crp.attribute(
        model.apply,
        variables,
        x,
        composite=C.EpsilonGammaBox(-4.0, 4.0),
        conditions=[{"y": labels, "*/Conv_0": [1, 2]}],
    ).heatmap
    np.testing.assert_allclose(jax.jit(run)(-4.0, labels), eager, rtol=1e-5, atol=1e-7)
    one_class = jax.jit(
        lambda k: (
            crp.attribute(model.apply, variables, x, composite=C.EpsilonPlus(), conditions=[{"y": k}]).heatmap
        )
    )(jnp.int32(3))
    relevance, _ = dtd.explain(model.apply, variables, x, target=3, composite=C.EpsilonPlus())
    np.testing.assert_allclose(one_class[0], relevance, rtol=1e-5, atol=1e-7)


def test_top_concepts_rank_the_concept_relevance(cnn):
    model, variables, x = cnn
    channels, values = crp.top_concepts(
        model.apply, variables, x, layer="*/Conv_1", target=1, composite=C.EpsilonPlus(), k=3
    )
    result = crp.attribute(
        model.apply, variables, x, conditions=[{"y": 1}], composite=C.EpsilonPlus(), record=["*/Conv_1"]
    )
    scores = np.asarray(result.concepts("*/Conv_1", abs_norm=True)[0])
    np.testing.assert_array_equal(channels, np.argsort(-scores, axis=-1)[:, :3])
    np.testing.assert_allclose(values, np.take_along_axis(scores, np.asarray(channels), -1), rtol=1e-6)


def test_crop_box_is_the_region_above_the_threshold():
    heatmap = np.zeros((8, 8))
    heatmap[2, 3], heatmap[5, 6], heatmap[7, 0] = 1.0, -0.5, 0.05
    assert crp.crop_box(heatmap) == (2, 6, 3, 7)
    assert crp.crop_box(heatmap, threshold=0.01) == (2, 8, 0, 7)
    assert crp.crop_box(np.zeros((4, 5, 3))) == (0, 4, 0, 5)


def test_bad_conditions_name_what_is_wrong(cnn):
    model, variables, x = cnn
    comp = C.EpsilonPlus()
    with pytest.raises(
        ValueError, match=r"condition '\*/Conv_1': channel 6 is not an index of the layer's 6 channels"
    ):
        crp.attribute(model.apply, variables, x, conditions=[{"y": 0, "*/Conv_1": [6]}], composite=comp)
    with pytest.raises(
        ValueError, match=r"neuron \{1: 16\} is outside the layer's output of shape \(4, 4, 6\)"
    ):
        crp.attribute(model.apply, variables, x, conditions=[{"*/Conv_1": {1: 16}}], composite=comp)
    with pytest.raises(
        ValueError, match=r"condition '\*/Conv_\*' must choose one layer or module, it chooses 2"
    ):
        crp.attribute(model.apply, variables, x, conditions=[{"*/Conv_*": [0]}], composite=comp)
    with pytest.raises(
        ValueError, match=r"with start='\*/Conv_1' relevance starts at that layer; a condition's 'y'"
    ):
        crp.attribute(model.apply, variables, x, conditions=[{"y": 0}], composite=comp, start="*/Conv_1")
    with pytest.raises(ValueError, match=r"condition 'y': class\(es\) \[5\] are not in 0..4"):
        crp.attribute(model.apply, variables, x, conditions=[{"y": [5]}], composite=comp)
    with pytest.raises(
        ValueError, match=r"paired=True needs one condition per sample, got 2 conditions for 3"
    ):
        crp.attribute(
            model.apply, variables, x, conditions=[{"*/Conv_1": [0]}] * 2, composite=comp, paired=True
        )
