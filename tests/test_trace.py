"""jaxdtd.trace: ``trace``/``flatten`` turn a function into one flat program (nested calls inlined,
variables renumbered, literals and closed-over arrays as ``Constant``), name stacks and source lines."""

from __future__ import annotations

import functools
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import MLP

from jaxdtd import trace as T


def _line_of(marker: str) -> int:
    with open(__file__) as handle:
        for number, line in enumerate(handle, start=1):
            if marker in line and "_line_of" not in line:
                return number
    raise AssertionError(marker)


def names(program: T.Program) -> list[str]:
    return [eqn.name for eqn in program.equations]


def check_well_formed(program: T.Program) -> None:
    """Equations are numbered in order; every variable is an int defined once (an invar or one
    equation's outvar) before it is read; every other operand is a Constant."""
    defined = set(program.invars)
    assert len(defined) == len(program.invars) == len(program.in_avals)
    for position, eqn in enumerate(program.equations):
        assert eqn.index == position
        assert len(eqn.invars) == len(eqn.in_avals) and len(eqn.outvars) == len(eqn.out_avals)
        for atom in eqn.invars:
            assert isinstance(atom, T.Constant) or atom in defined, (eqn.name, atom)
        for var in eqn.outvars:
            assert isinstance(var, int) and var not in defined, (eqn.name, var)
            defined.add(var)
    assert len(program.outvars) == len(program.out_avals)
    for atom in program.outvars:
        assert isinstance(atom, T.Constant) or atom in defined


# ==================================================================================================
# Inlining nested calls
# ==================================================================================================


def test_a_jaxpr_called_twice_is_inlined_with_distinct_variables():
    double = jax.jit(lambda a: a * 2.0)

    def fn(x):
        return double(x) + double(x + 1.0)

    closed = jax.make_jaxpr(fn)(jnp.ones(3))
    calls = [eqn for eqn in closed.jaxpr.eqns if eqn.primitive.name in ("jit", "pjit")]
    assert len(calls) == 2 and calls[0].params["jaxpr"] is calls[1].params["jaxpr"]  # one jaxpr, two uses
    program = T.flatten(closed)
    check_well_formed(program)
    assert names(program) == ["mul", "add", "mul", "add"]
    first, shift, second, total = program.equations
    assert first.invars[0] == shift.invars[0] == program.invars[0]
    assert second.invars[0] == shift.outvars[0]
    assert first.outvars != second.outvars
    assert total.invars == (first.outvars[0], second.outvars[0])
    assert program.outvars == total.outvars
    assert names(T.trace(fn, (jnp.ones(3),))[0]) == names(program)


def _custom_jvp(f):
    g = jax.custom_jvp(f)
    g.defjvp(lambda primals, tangents: (f(*primals), tangents[0]))
    return g


def _custom_vjp(f):
    g = jax.custom_vjp(f)
    g.defvjp(lambda *args: (f(*args), None), lambda _, ct: (ct, ct))
    return g


@pytest.mark.parametrize(
    "wrap",
    [
        jax.jit,
        jax.checkpoint,
        functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable),
        _custom_jvp,
        _custom_vjp,
        lambda f: jax.jit(jax.checkpoint(_custom_jvp(jax.jit(f)))),
    ],
    ids=["jit", "checkpoint", "checkpoint_policy", "custom_jvp", "custom_vjp", "nested"],
)
def test_nested_calls_are_inlined(wrap):
    body = lambda x, w: jnp.tanh(x * w) + 1.0
    program, out_tree = T.trace(lambda x, w: wrap(body)(x, w) * 3.0, (jnp.ones(3), jnp.ones(3)))
    check_well_formed(program)
    assert names(program) == ["mul", "tanh", "add", "mul"]
    product, tanh, shift, scale = program.equations
    assert product.invars == program.invars
    assert tanh.invars == product.outvars and shift.invars[0] == tanh.outvars[0]
    assert scale.invars[0] == shift.outvars[0] and program.outvars == scale.outvars
    assert out_tree == jax.tree_util.tree_structure(0)


def test_relu_custom_jvp_is_its_max_and_relu6_its_max_and_min():
    program, _ = T.trace(jax.nn.relu, (jnp.ones((2, 3)),))
    check_well_formed(program)
    (relu,) = program.equations
    assert relu.name == "max" and relu.invars[0] == program.invars[0]
    assert isinstance(relu.invars[1], T.Constant) and float(np.asarray(relu.invars[1].value)) == 0.0
    assert program.outvars == relu.outvars
    program, _ = T.trace(jax.nn.relu6, (jnp.ones((2, 3)),))
    assert names(program) == ["max", "min"]
    assert float(np.asarray(program.equations[1].invars[1].value)) == 6.0


# ==================================================================================================
# Variables, constants, avals
# ==================================================================================================


def test_invars_follow_the_flattened_arguments_and_outputs_keep_their_tree():
    args = ({"b": jnp.ones((2,)), "a": jnp.zeros((2,), jnp.int32)}, 1.0)
    fn = lambda d, s: {"sum": d["a"] + d["b"] * s, "same": (d["b"],), "lit": 2.0}
    program, out_tree = T.trace(fn, args)
    check_well_formed(program)
    a, b, s = program.invars  # leaves in flatten order: dict keys sorted, then the scalar
    assert [(tuple(v.shape), str(v.dtype)) for v in program.in_avals] == [
        ((2,), "int32"),
        ((2,), "float32"),
        ((), "float32"),
    ]
    assert program.in_avals[2].weak_type  # a Python float stays weakly typed
    assert out_tree == jax.tree_util.tree_structure({"sum": 0, "same": (0,), "lit": 0})
    lit, same, total = program.outvars  # output leaves in flatten order: "lit", "same", "sum"
    assert isinstance(lit, T.Constant) and float(np.asarray(lit.value)) == 2.0
    assert same == b  # an argument returned as is is the invar itself
    assert names(program) == ["convert_element_type", "mul", "convert_element_type", "add"]
    strong_s, product, float_a, add = program.equations
    assert strong_s.invars == (s,) and product.invars == (b, strong_s.outvars[0])
    assert float_a.invars == (a,) and add.invars == (float_a.outvars[0], product.outvars[0])
    assert add.outvars == (total,)
    assert [str(aval.dtype) for aval in program.out_avals] == ["float32", "float32", "float32"]


def test_literals_and_closed_over_arrays_become_constants():
    table = jnp.arange(3.0)
    inner = jax.jit(lambda a: a * table)  # closed over inside a nested call
    program, _ = T.trace(lambda x: inner(x) + table - 1.0, (jnp.ones(3),))
    check_well_formed(program)
    assert names(program) == ["mul", "add", "sub"]
    product, add, sub = program.equations
    assert product.invars[0] == program.invars[0]
    assert add.invars[0] == product.outvars[0] and sub.invars[0] == add.outvars[0]
    assert all(isinstance(eqn.invars[1], T.Constant) for eqn in program.equations)
    np.testing.assert_array_equal(product.invars[1].value, [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(add.invars[1].value, [0.0, 1.0, 2.0])
    one = np.asarray(sub.invars[1].value)
    assert one.shape == () and one.dtype == np.float32 and float(one) == 1.0


def test_trace_of_tracers_gives_the_program_of_concrete_values():
    """Tracing runs on shapes, so it works on the tracers of an enclosing jit or vmap."""
    model = MLP()
    x = jnp.ones((2, 4))
    variables = model.init(jax.random.PRNGKey(0), x)

    def summary(program):
        return [(e.name, e.name_stack, tuple(e.out_avals[0].shape)) for e in program.equations]

    seen = []

    def inside(v, x):
        seen.append(T.trace(model.apply, (v, x))[0])
        return x

    jax.jit(inside)(variables, x)
    jax.vmap(inside, in_axes=(None, 0))(variables, x)
    eager_batch, _ = T.trace(model.apply, (variables, x))
    eager_single, _ = T.trace(model.apply, (variables, x[0]))
    assert summary(seen[0]) == summary(eager_batch)
    assert summary(seen[1]) == summary(eager_single)
    assert [tuple(a.shape) for a in seen[1].in_avals][-1] == (4,)


# ==================================================================================================
# Name stacks
# ==================================================================================================


def test_linen_name_stacks_are_module_paths():
    model = MLP()
    x = jnp.ones((2, 4))
    program, _ = T.trace(model.apply, (model.init(jax.random.PRNGKey(0), x), x))
    assert [(e.name, e.name_stack) for e in program.equations] == [
        ("dot_general", "MLP/Dense_0"),
        ("reshape", "MLP/Dense_0"),
        ("add", "MLP/Dense_0"),
        ("max", "MLP"),
        ("dot_general", "MLP/Dense_1"),
        ("reshape", "MLP/Dense_1"),
        ("add", "MLP/Dense_1"),
        ("max", "MLP"),
        ("dot_general", "MLP/Dense_2"),
        ("reshape", "MLP/Dense_2"),
        ("add", "MLP/Dense_2"),
    ]


@jax.jit
def _scaled(h):
    with jax.named_scope("helper_scope"):
        return h * 3.0


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _scaled(nn.Dense(2, name="inner")(x))


class _Outer(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = _Block(name="block")(x)
        return nn.remat(nn.Dense)(2, name="rem")(x)


def test_inlining_concatenates_name_stacks():
    """The caller's stack prefixes the callee's: a jit with a named scope called from a submodule,
    and a rematerialised submodule."""
    model = _Outer()
    x = jnp.ones((1, 3))
    program, _ = T.trace(model.apply, (model.init(jax.random.PRNGKey(0), x), x))
    assert [(e.name, e.name_stack) for e in program.equations] == [
        ("dot_general", "_Outer/block/inner"),
        ("reshape", "_Outer/block/inner"),
        ("add", "_Outer/block/inner"),
        ("mul", "_Outer/block/helper_scope"),
        ("dot_general", "_Outer/rem"),
        ("reshape", "_Outer/rem"),
        ("add", "_Outer/rem"),
    ]


# ==================================================================================================
# Source lines
# ==================================================================================================


def _scaled_sine(x):
    return jnp.sin(x) * 2.0  # SCALED_SINE_LINE


@jax.jit
def _jitted_cosine(x):
    return jnp.cos(x)  # JITTED_COSINE_LINE


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(x)  # NET_DENSE_LINE


def test_source_line_is_the_users_line():
    program, _ = T.trace(lambda x: _jitted_cosine(_scaled_sine(x)), (jnp.ones(3),))
    sine = f"{__file__}:{_line_of('SCALED_SINE_LINE')} (_scaled_sine)"
    cosine = f"{__file__}:{_line_of('JITTED_COSINE_LINE')} (_jitted_cosine)"
    assert [(e.name, T.source_line(e.source_info)) for e in program.equations] == [
        ("sin", sine),
        ("mul", sine),
        ("cos", cosine),
    ]


def test_source_line_skips_flax_frames():
    model = _Net()
    x = jnp.ones((1, 3))
    program, _ = T.trace(model.apply, (model.init(jax.random.PRNGKey(0), x), x))
    line = f"{__file__}:{_line_of('NET_DENSE_LINE')} (_Net.__call__)"
    assert [(e.name, T.source_line(e.source_info)) for e in program.equations] == [
        ("dot_general", line),
        ("reshape", line),
        ("add", line),
    ]


def _frame(path: str, line: int, function: str):
    return types.SimpleNamespace(file_name=path, line_num=line, function_name=function)


def test_source_line_of_hand_made_source_infos():
    assert T.source_line(types.SimpleNamespace(traceback=None)) == "<unknown source>"
    assert T.source_line(object()) == "<unknown source>"
    site = os.sep + os.path.join("venv", "site-packages")
    user = os.sep + os.path.join("home", "me", "net.py")
    frames = [  # innermost first, as JAX records them
        _frame(os.path.join(site, "jax", "_src", "core.py"), 705, "Primitive.bind"),
        _frame(os.path.join(site, "flax", "linen", "linear.py"), 287, "Dense.__call__"),
        _frame(os.path.join(site, "jaxdtd", "api.py"), 10, "transform"),
        _frame(user, 7, "Net.__call__"),
        _frame(os.sep + os.path.join("home", "me", "main.py"), 3, "<module>"),
    ]
    info = types.SimpleNamespace(traceback=types.SimpleNamespace(frames=frames))
    assert T.source_line(info) == f"{user}:7 (Net.__call__)"


class _SiluNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jax.nn.silu(x)  # SILU_LINE


class _RematNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.remat(nn.Dense)(2)(x)  # REMAT_LINE


@pytest.mark.xfail(
    not hasattr(T.Equation, "source"),
    raises=AttributeError,
    strict=True,
    reason="needs Equation.source (source_line with the call sites an equation was inlined from): the "
    "traceback of an op traced inside a library's jit/remat body stops at that body, so "
    "source_line(eqn.source_info) alone gives '<unknown source>' (silu) or a flax file (remat)",
)
@pytest.mark.parametrize(
    ("model", "marker"), [(_SiluNet(), "SILU_LINE"), (_RematNet(), "REMAT_LINE")], ids=["silu", "remat"]
)
def test_source_of_an_op_inside_a_library_call_is_the_callers_line(model, marker):
    x = jnp.ones((1, 3))
    program, _ = T.trace(model.apply, (model.init(jax.random.PRNGKey(0), x), x))
    expected = f"{__file__}:{_line_of(marker)} ({type(model).__name__}.__call__)"
    assert [e.source for e in program.equations] == [expected] * len(program.equations)
