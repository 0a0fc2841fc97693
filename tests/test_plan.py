"""The plan on its own: relevance liveness, the units chosen for each equation, elementwise islands."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jaxdtd as dtd
from jaxdtd import rules as R
from jaxdtd.units import Bind, IslandUnit, LayerUnit, OperationUnit

W = jnp.ones((4, 3))
X = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)


def _plan(fn, composite=None):
    return dtd.trace_plan(fn, composite or R.Epsilon(), (W, X))


def _units(plan):
    return [(type(u).__name__, tuple(e.name for e in u.equations())) for u in plan.units]


def test_units_cover_every_equation_once_in_program_order():
    plan = _plan(lambda w, x: jax.nn.relu(x @ w + 1.0).sum(axis=1))
    assert _units(plan) == [
        ("LayerUnit", ("dot_general", "add")),
        ("OperationUnit", ("max",)),
        ("OperationUnit", ("reduce_sum",)),
    ]
    covered = [e.index for u in plan.units for e in u.equations()]
    assert sorted(covered) == list(range(len(plan.program.equations)))
    assert isinstance(plan.units[0], LayerUnit) and plan.units[0].rule == R.Epsilon()
    assert isinstance(plan.units[2], OperationUnit) and isinstance(plan.units[2].rule, R.Norm)


def test_liveness_excludes_values_behind_stop_gradient():
    def fn(w, x):
        h = x @ w
        scale = jax.lax.stop_gradient(jnp.exp(h).sum(axis=1, keepdims=True))
        return h / scale

    plan = _plan(fn)
    by_name = {e.name: e for e in plan.program.equations}
    assert by_name["dot_general"].outvars[0] in plan.live
    assert by_name["exp"].outvars[0] not in plan.live  # data, but no relevance reaches it
    assert by_name["exp"].outvars[0] in plan.analysis.data
    # the detached branch is bound as it is; the division by a constant is Pass
    assert [name for name, eqns in _units(plan) if "exp" in eqns] == ["Bind"]
    assert [(e.name, type(r).__name__) for e, r, _ in plan.operations] == [("div", "Pass")]


def test_island_has_one_input_one_output_and_its_members():
    plan = _plan(lambda w, x: jax.nn.silu(x @ w) @ jnp.ones((3, 2)))
    islands = [u for u in plan.units if isinstance(u, IslandUnit)]
    assert len(islands) == 1
    (island,) = islands
    assert tuple(e.name for e in island.members) == ("logistic", "mul")
    layer_out = plan.analysis.layers[0].output
    assert island.input == layer_out and island.output == island.members[-1].outvars[0]
    assert island.rule == R.Pass()


def test_an_internal_value_used_outside_splits_the_island():
    """relu(z) feeds both the SiLU and a sum: the ReLU stays an operation of its own and the SiLU is
    an island starting at the ReLU's output (``silu(h) + h`` alone would be one island)."""

    def fn(w, x):
        h = jax.nn.relu(x @ w)
        return jax.nn.silu(h) @ jnp.ones((3, 2)) + h.sum(axis=1, keepdims=True)

    plan = _plan(fn)
    kinds = _units(plan)
    assert ("OperationUnit", ("max",)) in kinds
    assert ("IslandUnit", ("logistic", "mul")) in kinds
    assert ("OperationUnit", ("reduce_sum",)) in kinds

    def whole(w, x):
        h = jax.nn.relu(x @ w)
        return jax.nn.silu(h) + h  # every use of h is elementwise: one island from the layer output

    assert _units(_plan(whole)) == [
        ("LayerUnit", ("dot_general",)),
        ("IslandUnit", ("max", "logistic", "mul", "add")),
    ]


def test_cut_equation_is_bound_as_a_constant():
    comp = dtd.Composite(dense=R.Epsilon(), cuts=[":tanh"])
    plan = dtd.trace_plan(lambda w, x: (jnp.tanh(x) * x) @ w, comp, (W, X))
    (cut,) = [u for u in plan.units if isinstance(u, Bind) and u.cut]
    assert cut.equation.name == "tanh"
    assert cut.equation.outvars[0] not in plan.analysis.data
