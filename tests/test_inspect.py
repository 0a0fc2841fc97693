"""describe() shows the discovered layers; ledger() measures relevance in and out of each."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd import rules as R


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3))(x)))
        x = nn.BatchNorm(use_running_average=True, name="lonely_bn")(jnp.mean(x, axis=(1, 2)))
        return nn.Dense(3)(x)


def test_describe_lists_layers_shapes_rules_and_operations(cnn):
    model, variables, x = cnn
    description = dtd.describe(model.apply, variables, x, composite=C.EpsilonGammaBox(0.0, 1.0))
    assert [
        (r.module_path, r.primitive, r.input_shape, r.output_shape, r.rule.split("(")[0], r.reason)
        for r in description.layers
    ] == [
        ("CNN/Conv_0", "conv_general_dilated", (2, 8, 8, 3), (2, 8, 8, 4), "ZBox", "first"),
        ("CNN/Conv_1", "conv_general_dilated", (2, 4, 4, 4), (2, 4, 4, 6), "Gamma", "conv"),
        ("CNN/Dense_0", "dot_general", (2, 24), (2, 10), "Epsilon", "dense"),
        ("CNN/Dense_1", "dot_general", (2, 10), (2, 5), "Epsilon", "dense"),
    ]
    assert ("max", "Pass", 3) in description.operations
    assert ("reduce_window_max", "Gradient", 1) in description.operations
    assert ("reduce_window_sum", "Norm", 1) in description.operations  # average pool, /4 fused into it
    text = str(description)
    assert "CNN/Conv_1" in text and "params/Conv_1/kernel" in text and "input >= 0" in text


def test_describe_reports_folded_batchnorm():
    model = BNNet()
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 6, 6, 2))
    variables = model.init(jax.random.PRNGKey(1), x)
    description = dtd.describe(model.apply, variables, x, composite=C.EpsilonPlus())
    assert [(r.module_path, r.folded) for r in description.layers] == [
        ("BNNet/Conv_0", True),
        ("BNNet/Dense_0", False),
    ]
    # a BatchNorm with no affine layer before it is a shift and a scale by constants: Pass
    assert ("sub", "Pass", 1) in description.operations and ("mul", "Pass", 1) in description.operations


def test_ledger_conservative_layers_absorb_nothing(cnn):
    model, variables, x = cnn
    book = dtd.ledger(model.apply, variables, x, target=1, composite=C.DeepTaylor(0.0, 1.0))
    logits = model.apply(variables, x)
    np.testing.assert_allclose(book.output, logits[:, 1], rtol=1e-6)
    np.testing.assert_allclose(book.entering[-1], book.output, rtol=1e-6)  # the top layer gets f_c
    np.testing.assert_allclose(book.leaving[0], book.input, rtol=1e-6)  # the first layer feeds the input
    positive = book.output > 0
    np.testing.assert_allclose(book.absorbed[:, positive], 0.0, atol=1e-4 * book.output[positive].max())
    assert "CNN/Dense_1" in str(book)


def test_ledger_shows_where_epsilon_absorbs(cnn):
    model, variables, x = cnn
    comp = C.Composite(
        conv=R.ZPlus(zero_bias=True),
        dense=R.Epsilon(zero_bias=True),
        layers={"*/Dense_0": R.Epsilon(1.0, zero_bias=True)},
    )
    book = dtd.ledger(model.apply, variables, x, target=0, composite=comp)
    absorbed = np.abs(book.absorbed).sum(1)
    assert absorbed[2] > 10 * max(absorbed[0], absorbed[1], absorbed[3])  # only Dense_0 (epsilon=1)
    # what leaves a layer enters the one below it (sequential net)
    np.testing.assert_allclose(book.leaving[1:], book.entering[:-1], rtol=1e-5, atol=1e-9)
    # ledger's input relevance equals explain's
    relevance, _ = dtd.explain(model.apply, variables, x, target=0, composite=comp)
    np.testing.assert_allclose(book.input, relevance.reshape(2, -1).sum(1), rtol=1e-5)
