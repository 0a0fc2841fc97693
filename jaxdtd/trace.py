"""Tracing: turn a JAX function into one flat list of equations.

``jax.make_jaxpr`` gives a jaxpr whose equations may hold nested calls (``jit``, ``closed_call``,
``custom_jvp_call`` such as ``jax.nn.relu``, ``custom_vjp_call``, ``remat``).  Relevance rules act on
the primitives inside those calls, so :func:`flatten` inlines every nested call into a single list of
:class:`Equation` whose variables are renumbered with plain integers (a jaxpr reused by two calls
gets distinct variables for each use).  Module paths come from the equations' name stacks, which
linen fills with the module path (``"CNN/Conv_0"``); inlining concatenates the stacks.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from jax.extend import core as jcore

__all__ = ["Constant", "Equation", "Program", "flatten", "source_line", "trace"]

#: Nested-call primitives and the parameter that holds the callee.  A callee is a ``ClosedJaxpr``
#: or an open ``Jaxpr`` (remat); its invars line up with the equation's invars.
_CALL_PARAMS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "remat": "jaxpr",
}


@dataclasses.dataclass(frozen=True)
class Constant:
    """A value known at trace time: a jaxpr literal or a closed-over constant."""

    value: Any


@dataclasses.dataclass(frozen=True)
class Equation:
    """One primitive application of the flattened program."""

    index: int
    primitive: Any
    params: dict
    invars: tuple  # tuple[int | Constant, ...]
    outvars: tuple[int, ...]
    in_avals: tuple
    out_avals: tuple
    name_stack: str
    source_info: Any

    @property
    def name(self) -> str:
        return self.primitive.name


@dataclasses.dataclass(frozen=True)
class Program:
    """A flattened jaxpr: inputs, equations in execution order, outputs."""

    invars: tuple[int, ...]
    in_avals: tuple
    equations: tuple[Equation, ...]
    outvars: tuple  # tuple[int | Constant, ...]
    out_avals: tuple


def _join(prefix: str, suffix: str) -> str:
    if prefix and suffix:
        return f"{prefix}/{suffix}"
    return prefix or suffix


def flatten(closed: jcore.ClosedJaxpr) -> Program:
    """Inline every nested call of ``closed`` into one :class:`Program`."""
    counter = iter(range(1 << 62))
    equations: list[Equation] = []

    def read(env: dict, atom) -> Any:
        if isinstance(atom, jcore.Literal):
            return Constant(atom.val)
        return env[atom]

    def emit(jaxpr: jcore.Jaxpr, env: dict, prefix: str) -> None:
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            stack = _join(prefix, str(eqn.source_info.name_stack))
            inputs = [read(env, v) for v in eqn.invars]
            callee_param = _CALL_PARAMS.get(name)
            callee = eqn.params.get(callee_param) if callee_param else None
            if callee is not None:
                if isinstance(callee, jcore.ClosedJaxpr):
                    inner, consts = callee.jaxpr, callee.consts
                else:
                    inner, consts = callee, ()
                inner_env = {v: Constant(c) for v, c in zip(inner.constvars, consts)}
                inner_env.update(zip(inner.invars, inputs))
                emit(inner, inner_env, stack)
                for outer, result in zip(eqn.outvars, inner.outvars):
                    env[outer] = read(inner_env, result)
                continue
            outs = []
            for v in eqn.outvars:
                ident = next(counter)
                env[v] = ident
                outs.append(ident)
            equations.append(
                Equation(
                    index=len(equations),
                    primitive=eqn.primitive,
                    params=dict(eqn.params),
                    invars=tuple(inputs),
                    outvars=tuple(outs),
                    in_avals=tuple(v.aval for v in eqn.invars),
                    out_avals=tuple(v.aval for v in eqn.outvars),
                    name_stack=stack,
                    source_info=eqn.source_info,
                )
            )

    env: dict = {v: Constant(c) for v, c in zip(closed.jaxpr.constvars, closed.consts)}
    invars = []
    for v in closed.jaxpr.invars:
        ident = next(counter)
        env[v] = ident
        invars.append(ident)
    emit(closed.jaxpr, env, "")
    outvars = tuple(read(env, v) for v in closed.jaxpr.outvars)
    return Program(
        invars=tuple(invars),
        in_avals=tuple(v.aval for v in closed.jaxpr.invars),
        equations=tuple(equations),
        outvars=outvars,
        out_avals=tuple(v.aval for v in closed.jaxpr.outvars),
    )


_LIBRARY_DIRS = tuple(
    os.sep + name + os.sep for name in ("jax", "jaxlib", "flax", "equinox", "haiku", "jaxdtd", "optax")
)


def source_line(source_info: Any) -> str:
    """The innermost frame of user code that created an equation, as ``file:line (function)``."""
    traceback = getattr(source_info, "traceback", None)
    if traceback is None:
        return "<unknown source>"
    fallback = None
    for frame in traceback.frames:
        location = f"{frame.file_name}:{frame.line_num} ({frame.function_name})"
        if fallback is None and os.sep + "jax" + os.sep not in frame.file_name:
            fallback = location
        if not any(d in frame.file_name for d in _LIBRARY_DIRS):
            return location
    return fallback or "<unknown source>"


def trace(fn: Any, args: tuple) -> tuple[Program, Any]:
    """Trace ``fn(*args)`` on abstract values and flatten it; returns the program and the output
    tree structure.  Tracing on shapes, not values, makes it work for tracers under jit and vmap."""
    abstract = jax.tree_util.tree_map(_abstract, args)
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*abstract)
    return flatten(closed), jax.tree_util.tree_structure(out_shape)


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    aval = jax.typeof(leaf)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False))
