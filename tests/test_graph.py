"""jaxdtd.graph.analyse: which values are data, which are provably non-negative, and the affine layers
(linear primitive + bias/BatchNorm chain) with their module and parameter paths."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from models import CNN, MLP

from jaxdtd import graph as G
from jaxdtd import trace as T
from jaxdtd.api import _leaf_name


def analysed(fn, args: tuple, argnums: tuple[int, ...] = (1,)) -> tuple[T.Program, G.Analysis]:
    """Trace ``fn(*args)`` and analyse it with the leaves of ``args[argnums]`` explained and the
    others named by their paths (the mapping of jaxdtd.api._build_plan)."""
    program, _ = T.trace(fn, args)
    leaves = jax.tree_util.tree_flatten_with_path(args)[0]
    assert len(leaves) == len(program.invars)
    explained, leaf_names = set(), {}
    for var, (path, _) in zip(program.invars, leaves, strict=True):
        if path[0].idx in argnums:
            explained.add(var)
        else:
            leaf_names[var] = _leaf_name(path)
    return program, G.analyse(program, explained, leaf_names)


def indices(program: T.Program, name: str) -> list[int]:
    return [eqn.index for eqn in program.equations if eqn.name == name]


def layer_rows(analysis: G.Analysis) -> list[tuple]:
    return [
        (
            layer.kind,
            tuple(op.op for op in layer.chain),
            layer.module_path,
            layer.param_path,
            layer.first,
            layer.non_negative_input,
            layer.folds_scale,
        )
        for layer in analysis.layers
    ]


def check_layer_bookkeeping(analysis: G.Analysis) -> None:
    """Each layer ends at its last equation (``layer_at``); the linear op and all chain ops but the
    last are absorbed into it; layers are numbered in order."""
    absorbed = set()
    for position, layer in enumerate(analysis.layers):
        assert layer.index == position
        last = layer.chain[-1].equation if layer.chain else layer.linear
        assert layer.output == last.outvars[0]
        assert layer.input == layer.linear.invars[layer.data_position]
        assert analysis.layer_at[last.index] is layer
        if layer.chain:
            absorbed |= {layer.linear.index} | {op.equation.index for op in layer.chain[:-1]}
    assert set(analysis.layer_at) == {
        (layer.chain[-1].equation if layer.chain else layer.linear).index for layer in analysis.layers
    }
    assert analysis.absorbed == absorbed


# ==================================================================================================
# Data and non-negativity
# ==================================================================================================


def test_data_is_what_depends_on_the_explained_input():
    def fn(w, x):
        h = x @ w
        stopped = jax.lax.stop_gradient(h)
        through_int = x.astype(jnp.int32).astype(jnp.float32)
        return h + stopped, stopped * 2.0, jnp.argmax(x, axis=-1), through_int, w * 2.0, x

    program, analysis = analysed(fn, (jnp.ones((4, 3)), jnp.ones((2, 4))))
    w, x = program.invars
    assert x in analysis.data and w not in analysis.data
    assert [out in analysis.data for out in program.outvars] == [True, False, False, False, False, True]
    assert [e.name for e in program.equations if e.outvars[0] in analysis.data] == ["dot_general", "add"]
    assert analysis.data == {x} | {
        e.outvars[0] for e in program.equations if e.name in ("dot_general", "add")
    }


def test_an_integer_explained_input_is_not_data():
    program, analysis = analysed(lambda x: x * 2, (jnp.ones((2,), jnp.int32),), argnums=(0,))
    assert analysis.data == frozenset() and analysis.non_negative == frozenset()
    assert analysis.layers == ()


def test_non_negative_values():
    def fn(x):
        r = jax.nn.relu(x)
        return {
            "x": x,
            "relu": r,
            "relu6": jax.nn.relu6(x),
            "maximum_0": jnp.maximum(x, 0.0),
            "clip_0_1": jnp.clip(x, 0.0, 1.0),
            "maxpool_relu": nn.max_pool(r, (2, 2), strides=(2, 2)),
            "avgpool_relu": nn.avg_pool(r, (2, 2), strides=(2, 2)),
            "maxpool_x": nn.max_pool(x, (2, 2), strides=(2, 2)),
            "reshape_relu": r.reshape(2, -1),
            "transpose_relu": r.T,
            "sum_relu": r.sum(),
            "concat_relu_abs": jnp.concatenate([r, jnp.abs(x)]),
            "concat_relu_x": jnp.concatenate([r, x]),
            "abs": jnp.abs(x),
            "exp": jnp.exp(x),
            "sigmoid": jax.nn.sigmoid(x),
            "sqrt_relu": jnp.sqrt(r),
            "relu_times_2": r * 2.0,
            "relu_times_minus_2": r * -2.0,
            "relu_plus_relu": r + r,
            "relu_minus_1": r - 1.0,
            "x_minus_1": x - 1.0,
            "minimum_relu_3": jnp.minimum(r, 3.0),
            "minimum_x_3": jnp.minimum(x, 3.0),
        }

    program, analysis = analysed(fn, (jnp.ones((2, 4, 4, 3)),), argnums=(0,))
    outputs = dict(zip(sorted(jax.eval_shape(fn, jnp.ones((2, 4, 4, 3)))), program.outvars, strict=True))
    negative_possible = {"x", "maxpool_x", "concat_relu_x", "relu_times_minus_2", "relu_minus_1"}
    negative_possible |= {"x_minus_1", "minimum_x_3"}
    assert {k for k, v in outputs.items() if v not in analysis.non_negative} == negative_possible
    assert all(v in analysis.data for v in outputs.values())
    assert analysis.non_negative <= analysis.data


# ==================================================================================================
# Affine layers
# ==================================================================================================


def test_mlp_dense_layers_group_their_bias_add():
    model = MLP()
    x = jnp.ones((2, 4))
    program, analysis = analysed(model.apply, (model.init(jax.random.PRNGKey(0), x), x))
    check_layer_bookkeeping(analysis)
    assert layer_rows(analysis) == [
        ("dense", ("add",), "MLP/Dense_0", "params/Dense_0/kernel", True, False, False),
        ("dense", ("add",), "MLP/Dense_1", "params/Dense_1/kernel", False, True, False),
        ("dense", ("add",), "MLP/Dense_2", "params/Dense_2/kernel", False, True, False),
    ]
    assert [layer.linear.index for layer in analysis.layers] == indices(program, "dot_general")
    assert sorted(analysis.layer_at) == indices(program, "add")
    assert sorted(analysis.absorbed) == indices(program, "dot_general")
    assert analysis.layers[0].input == program.invars[-1]  # x is the last leaf of (variables, x)
    assert all(layer.data_position == 0 for layer in analysis.layers)


def test_cnn_layers_inputs_and_shapes():
    model = CNN()
    x = jnp.ones((2, 8, 8, 3))
    program, analysis = analysed(model.apply, (model.init(jax.random.PRNGKey(0), x), x))
    check_layer_bookkeeping(analysis)
    assert layer_rows(analysis) == [
        ("conv", ("add",), "CNN/Conv_0", "params/Conv_0/kernel", True, False, False),
        ("conv", ("add",), "CNN/Conv_1", "params/Conv_1/kernel", False, True, False),  # maxpool of relu
        ("dense", ("add",), "CNN/Dense_0", "params/Dense_0/kernel", False, True, False),  # avgpool, reshape
        ("dense", ("add",), "CNN/Dense_1", "params/Dense_1/kernel", False, True, False),
    ]
    assert [layer.input_shape for layer in analysis.layers] == [(2, 8, 8, 3), (2, 4, 4, 4), (2, 24), (2, 10)]
    assert [layer.linear.name for layer in analysis.layers] == [
        "conv_general_dilated",
        "conv_general_dilated",
        "dot_general",
        "dot_general",
    ]


class ConvBN(nn.Module):
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), use_bias=self.use_bias, name="conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(x))
        return nn.Dense(2, name="head")(x.mean(axis=(1, 2)))


def test_batchnorm_in_inference_mode_is_folded_into_the_conv():
    model = ConvBN()
    x = jnp.ones((2, 5, 5, 3))
    program, analysis = analysed(model.apply, (model.init(jax.random.PRNGKey(0), x), x))
    check_layer_bookkeeping(analysis)
    # conv, + bias, - mean, * scale / sqrt(var + eps), + shift
    assert layer_rows(analysis) == [
        ("conv", ("add", "sub", "mul", "add"), "ConvBN/conv", "params/conv/kernel", True, False, True),
        ("dense", ("add",), "ConvBN/head", "params/head/kernel", False, True, False),
    ]
    conv = analysis.layers[0]
    assert [op.equation.name_stack for op in conv.chain] == ["ConvBN/conv"] + ["ConvBN/bn"] * 3
    assert [op.const_position for op in conv.chain] == [1, 1, 1, 1]
    # the statistics' own arithmetic (broadcasts, var + eps, rsqrt, * scale) is not data
    constant = {
        e.name for e in program.equations if e.name_stack == "ConvBN/bn" and e.outvars[0] not in analysis.data
    }
    assert constant == {"broadcast_in_dim", "add", "rsqrt", "reshape", "mul"}
    head = analysis.layers[1]
    assert analysis.absorbed == {
        conv.linear.index,
        *(op.equation.index for op in conv.chain[:3]),
        head.linear.index,
    }


def test_batchnorm_without_conv_bias():
    model = ConvBN(use_bias=False)
    x = jnp.ones((2, 5, 5, 3))
    _, analysis = analysed(model.apply, (model.init(jax.random.PRNGKey(0), x), x))
    check_layer_bookkeeping(analysis)
    assert [
        (layer.kind, tuple(op.op for op in layer.chain), layer.folds_scale) for layer in analysis.layers
    ] == [
        ("conv", ("sub", "mul", "add"), True),
        ("dense", ("add",), False),
    ]


def test_a_scale_that_varies_over_pixels_is_not_folded():
    mask = jnp.linspace(0.5, 1.5, 25).reshape(1, 5, 5, 1)

    class Masked(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3, 3), name="conv")(x) * mask

    model = Masked()
    x = jnp.ones((2, 5, 5, 3))
    program, analysis = analysed(model.apply, (model.init(jax.random.PRNGKey(0), x), x))
    check_layer_bookkeeping(analysis)
    assert layer_rows(analysis) == [
        ("conv", ("add",), "Masked/conv", "params/conv/kernel", True, False, False)
    ]
    (product,) = [e for e in program.equations if e.name == "mul"]
    assert product.index not in analysis.absorbed and product.outvars[0] in analysis.data


def test_vmapped_layer_keeps_the_transpose_before_its_bias():
    """``jax.vmap`` of ``w @ x + b`` computes ``dot_general(w, xs)``, transposes the batch axis to the
    front and then adds the bias: the transpose is a view inside the layer.  Without a bias add after
    it, the transpose is not part of the layer."""
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(3)}
    xs = jnp.ones((2, 4))
    with_bias = lambda p, xs: jax.vmap(lambda p, x: p["w"] @ x + p["b"], in_axes=(None, 0))(p, xs)
    program, analysis = analysed(with_bias, (params, xs))
    check_layer_bookkeeping(analysis)
    (layer,) = analysis.layers
    assert (layer.kind, layer.data_position, layer.param_path) == ("dense", 1, "w")
    assert [(op.op, op.equation.name) for op in layer.chain] == [("view", "transpose"), ("add", "add")]
    assert not layer.folds_scale
    assert analysis.absorbed == {layer.linear.index, layer.chain[0].equation.index}
    assert layer.output == program.outvars[0]

    no_bias = lambda p, xs: jax.vmap(lambda p, x: p["w"] @ x, in_axes=(None, 0))(p, xs)
    program, analysis = analysed(no_bias, (params, xs))
    check_layer_bookkeeping(analysis)
    (layer,) = analysis.layers
    assert layer.chain == () and analysis.absorbed == frozenset()
    assert layer.output == layer.linear.outvars[0] != program.outvars[0]
    assert indices(program, "transpose") == [layer.linear.index + 1]


class TwoStem(nn.Module):
    """Inception-like: two convolutions read the (normalised) input, a third reads their concat."""

    @nn.compact
    def __call__(self, x):
        x = (x - 0.5) / 0.25
        a = nn.relu(nn.Conv(2, (3, 3), name="stem_a")(x))
        b = nn.relu(nn.Conv(2, (1, 1), name="stem_b")(x))
        h = nn.relu(nn.Conv(3, (3, 3), name="body")(jnp.concatenate([a, b], axis=-1)))
        return nn.Dense(2, name="head")(h.mean(axis=(1, 2)))


def test_first_layers_are_all_layers_before_any_other_layer():
    model = TwoStem()
    x = jnp.ones((2, 6, 6, 1))
    _, analysis = analysed(model.apply, (model.init(jax.random.PRNGKey(0), x), x))
    check_layer_bookkeeping(analysis)
    assert [(layer.module_path, layer.first, layer.non_negative_input) for layer in analysis.layers] == [
        ("TwoStem/stem_a", True, False),
        ("TwoStem/stem_b", True, False),
        ("TwoStem/body", False, True),
        ("TwoStem/head", False, True),
    ]
    assert analysis.layers[0].input == analysis.layers[1].input  # both read the normalised x


def test_linear_ops_between_two_data_values_are_not_layers():
    def fn(w, x):
        gram = x @ x.T  # both operands data: not a layer
        return gram @ w

    program, analysis = analysed(fn, (jnp.ones((2, 3)), jnp.ones((2, 4))))
    check_layer_bookkeeping(analysis)
    first_dot, second_dot = indices(program, "dot_general")
    (layer,) = analysis.layers
    assert layer.linear.index == second_dot
    assert layer.param_path == ""  # w is a whole argument: its key path is empty
    assert layer.first  # no layer before it
    assert program.equations[first_dot].outvars[0] in analysis.data


def test_conv_whose_kernel_is_the_data_is_not_a_layer():
    image = jnp.ones((1, 1, 5, 5))

    def fn(x):  # x (OIHW) used as the kernel of a fixed image
        return jax.lax.conv_general_dilated(image, x, (1, 1), "VALID")

    program, analysis = analysed(fn, (jnp.ones((2, 1, 3, 3)),), argnums=(0,))
    assert indices(program, "conv_general_dilated") == [0]
    assert analysis.layers == () and program.outvars[0] in analysis.data


def test_param_paths_of_a_plain_pytree():
    """Paths of the argument leaves a kernel comes from, also through a transpose; a computed or
    closed-over kernel has none."""
    closed_over = jnp.ones((4, 3))

    def fn(p, x):
        return (
            x @ p["layer"]["kernel"] + p["layer"]["bias"],
            x @ p["transposed"].T,
            x @ (2.0 * p["layer"]["kernel"]),
            x @ closed_over,
            x @ p["list"][1],
        )

    params = {
        "layer": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)},
        "transposed": jnp.ones((3, 4)),
        "list": [jnp.ones(1), jnp.ones((4, 3))],
    }
    program, analysis = analysed(fn, (params, jnp.ones((2, 4))))
    check_layer_bookkeeping(analysis)
    assert [(layer.param_path, tuple(op.op for op in layer.chain)) for layer in analysis.layers] == [
        ("layer/kernel", ("add",)),
        ("transposed", ()),
        ("", ()),
        ("", ()),
        ("list/1", ()),
    ]
    assert [layer.module_path for layer in analysis.layers] == [""] * 5
    assert all(layer.first for layer in analysis.layers)
