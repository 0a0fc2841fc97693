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
from collections.abc import Sequence
from typing import Any

import jax
from jax._src import source_info_util
from jax.extend import core as jcore

from .primitives import lookup

__all__ = ["Constant", "Equation", "Program", "flatten", "source_line", "trace"]


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
    #: source infos of the nested calls this equation was inlined from, innermost first (a
    #: primitive inside ``jax.nn.silu``, which JAX wraps in ``jit``, points at the user's call)
    call_sites: tuple = ()

    @property
    def name(self) -> str:
        return self.primitive.name

    def bind(self, values: Any) -> list[Any]:
        """Apply the primitive to ``values`` with the same parameters, under the model's own source
        info and name stack (errors and XLA profiles of the relevance program point at model code)."""
        stack = source_info_util.current_name_stack()
        for scope in filter(None, self.name_stack.split("/")):
            stack = stack.extend(scope)
        with source_info_util.user_context(self.source_info.traceback, name_stack=stack):
            out = self.primitive.bind(*values, **self.params)
        return list(out) if self.primitive.multiple_results else [out]

    @property
    def source(self) -> str:
        """The user's source line that created this equation (see :func:`source_line`)."""
        return source_line(self.source_info, self.call_sites)


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


def flatten(closed: jcore.ClosedJaxpr, prefix: str = "", call_sites: tuple = ()) -> Program:
    """Inline every nested call of ``closed`` into one :class:`Program`; ``prefix`` and
    ``call_sites`` are those of the equation whose body ``closed`` is (a ``scan``'s)."""
    counter = iter(range(1 << 62))
    equations: list[Equation] = []

    def read(env: dict, atom) -> Any:
        if isinstance(atom, jcore.Literal):
            return Constant(atom.val)
        return env[atom]

    def emit(jaxpr: jcore.Jaxpr, env: dict, prefix: str, call_sites: tuple) -> None:
        for eqn in jaxpr.eqns:
            stack = _join(prefix, str(eqn.source_info.name_stack))
            inputs = [read(env, v) for v in eqn.invars]
            info = lookup(eqn.primitive)
            callee_param = info.call_param if info is not None else None
            callee = eqn.params.get(callee_param) if callee_param else None
            if callee is not None:
                if isinstance(callee, jcore.ClosedJaxpr):
                    inner, consts = callee.jaxpr, callee.consts
                else:
                    inner, consts = callee, ()
                inner_env = {v: Constant(c) for v, c in zip(inner.constvars, consts, strict=True)}
                inner_env.update(zip(inner.invars, inputs, strict=True))
                emit(inner, inner_env, stack, (eqn.source_info, *call_sites))
                for outer, result in zip(eqn.outvars, inner.outvars, strict=True):
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
                    call_sites=call_sites,
                )
            )

    env: dict = {v: Constant(c) for v, c in zip(closed.jaxpr.constvars, closed.consts, strict=True)}
    invars = []
    for v in closed.jaxpr.invars:
        ident = next(counter)
        env[v] = ident
        invars.append(ident)
    emit(closed.jaxpr, env, prefix, call_sites)
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


def _user_frame(source_info: Any) -> tuple[str | None, str | None]:
    """(innermost user frame, innermost frame outside jax itself) of one source info."""
    traceback = getattr(source_info, "traceback", None)
    if traceback is None:
        return None, None
    fallback = None
    for frame in traceback.frames:
        location = f"{frame.file_name}:{frame.line_num} ({frame.function_name})"
        if fallback is None and os.sep + "jax" + os.sep not in frame.file_name:
            fallback = location
        if not any(d in frame.file_name for d in _LIBRARY_DIRS):
            return location, fallback
    return None, fallback


def _created_in_library(source_info: Any) -> bool:
    traceback = getattr(source_info, "traceback", None)
    frames: Sequence[Any] = traceback.frames if traceback is not None else ()
    return bool(frames) and any(d in frames[0].file_name for d in _LIBRARY_DIRS)


def source_line(source_info: Any, call_sites: tuple = ()) -> str:
    """The innermost frame of user code that created an equation, as ``file:line (function)``.

    JAX wraps library functions such as ``jax.nn.silu`` in ``jit`` and caches their traces, so the
    frames of an equation created inside one may hold no user code, or the code that traced it
    first; for such equations the call sites they were inlined from (innermost first) decide."""
    own, fallback = _user_frame(source_info)
    searched = (*call_sites, source_info) if _created_in_library(source_info) else (source_info, *call_sites)
    for info in searched:
        location, library = _user_frame(info) if info is not source_info else (own, fallback)
        if location is not None:
            return location
        fallback = fallback or library
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
