"""The primitive registry: everything the engine knows about a JAX primitive, in one place.

For each primitive (keyed by its canonical name; aliases such as ``pjit`` -> ``jit`` or ``copy_p`` ->
``copy`` are resolved in :data:`ALIASES`) a :class:`PrimitiveInfo` says

* how relevance passes through it (``relevance``: a classifier that returns the operation rule for an
  equation, or :class:`Unsupported` with the reason and a fix that is correct),
* how it transforms signs (``sign``: is the result provably ``>= 0`` given which operands are),
* whether it keeps zeros (``keeps_zero``: under :class:`~jaxdtd.rules.Pass`, does a zero data
  operand give a zero result entry; the vanishing analysis),
* whether its gradient only routes relevance to the entries it copies (``routes``: reshapes,
  selections, max pooling),
* whether it is an element-preserving rearrangement that may sit inside an affine layer's chain
  (``view``) or be followed when looking for the weight leaf of a layer (``weight_view``),
* whether it acts entry by entry (``elementwise``: the building blocks of elementwise islands),
* whether it is a linear primitive that forms affine layers (``linear``: ``"dense"`` or ``"conv"``),
* or whether it is a nested call whose callee is inlined (``call_param``).

The table is filled by families, one line per group of primitives, in the style of
``jax.experimental.jet``: :func:`structural`, :func:`selection`, :func:`boolean`,
:func:`elementwise_unary`, :func:`shift`, :func:`extremum`, :func:`multilinear`, :func:`reduction`,
:func:`nested_call`, :func:`unsupported`.  Adding a primitive is one line here; the rest of the engine
only asks :func:`lookup`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from . import rules as R

__all__ = [
    "ALIASES",
    "REGISTRY",
    "Context",
    "PrimitiveInfo",
    "Unsupported",
    "boolean",
    "canonical_name",
    "elementwise_unary",
    "extremum",
    "keeps_zero_always",
    "keeps_zero_never",
    "lookup",
    "multilinear",
    "nested_call",
    "reduction",
    "selection",
    "shift",
    "structural",
    "unsupported",
]


@dataclasses.dataclass(frozen=True)
class Unsupported:
    """No rule applies: ``reason`` says why, ``fix`` what the user can do (or ``""``)."""

    reason: str
    fix: str = ""


@dataclasses.dataclass(frozen=True)
class Context:
    """What a classifier may ask about an equation: which operands are data (carry relevance) and
    which depend on the explained input at all (a comparison of the data is dependent, not data)."""

    data: tuple[bool, ...]
    dependent: tuple[bool, ...]

    @property
    def n_data(self) -> int:
        return sum(self.data)


Classifier = Callable[[Any, Context], "R.Rule | Unsupported"]
#: ``sign(eqn, non_negative)`` with ``non_negative(atom) -> bool`` for each operand
SignRule = Callable[[Any, Callable[[Any], bool]], bool]
#: ``keeps_zero(eqn, v, constant)``: with ``constant(atom) -> ndarray | None``
ZeroRule = Callable[[Any, Any, Callable[[Any], Any]], bool]

_GRADIENT = R.Gradient()
_PASS = R.Pass()
_NORM = R.Norm()


# --- sign rules -----------------------------------------------------------------------------------
def _all_operands(eqn: Any, non_negative: Callable[[Any], bool]) -> bool:
    return all(non_negative(a) for a in eqn.invars)


def _never(eqn: Any, non_negative: Callable[[Any], bool]) -> bool:
    return False


def _always_non_negative(eqn: Any, non_negative: Callable[[Any], bool]) -> bool:
    return True


def _cases(eqn: Any, non_negative: Callable[[Any], bool]) -> bool:  # select_n: not the predicate
    return all(non_negative(a) for a in eqn.invars[1:])


def _first_two(eqn: Any, non_negative: Callable[[Any], bool]) -> bool:  # pad: operand, padding value
    return non_negative(eqn.invars[0]) and non_negative(eqn.invars[1])


def _max_sign(eqn: Any, non_negative: Callable[[Any], bool]) -> bool:
    return any(non_negative(a) for a in eqn.invars)


def _clamp_sign(eqn: Any, non_negative: Callable[[Any], bool]) -> bool:  # clamp(low, x, high)
    return non_negative(eqn.invars[0]) or non_negative(eqn.invars[1])


# --- zero rules (does v == 0 give out == 0 under Pass?) ---------------------------------------------
def keeps_zero_always(eqn: Any, v: Any, constant: Callable[[Any], Any]) -> bool:
    return True


def keeps_zero_never(eqn: Any, v: Any, constant: Callable[[Any], Any]) -> bool:
    return False


def _zero_numerator(eqn: Any, v: Any, constant: Callable[[Any], Any]) -> bool:
    return eqn.invars[0] == v


def _zero_extremum(eqn: Any, v: Any, constant: Callable[[Any], Any]) -> bool:
    others = [a for a in eqn.invars if a != v]
    if len(others) != 1:
        return False
    c = constant(others[0])
    return c is not None and bool(np.all(c <= 0) if eqn.name == "max" else np.all(c >= 0))


def _zero_clamp(eqn: Any, v: Any, constant: Callable[[Any], Any]) -> bool:
    if len(eqn.invars) != 3 or eqn.invars[1] != v:
        return False
    low, high = constant(eqn.invars[0]), constant(eqn.invars[2])
    return low is not None and high is not None and bool(np.all(low <= 0) and np.all(high >= 0))


def _zero_integer_pow(eqn: Any, v: Any, constant: Callable[[Any], Any]) -> bool:
    return eqn.params.get("y", 0) > 0


# --- classifiers ------------------------------------------------------------------------------------
def _always(rule: R.Rule) -> Classifier:
    return lambda eqn, ctx: rule


def _reject(reason: str, fix: str = "") -> Classifier:
    return lambda eqn, ctx: Unsupported(reason, fix)


def _pass_or(reason: str, fix: str = "") -> Classifier:
    """Pass for one data operand (``x * c``, ``max(x, 0)``); otherwise unsupported."""
    return lambda eqn, ctx: _PASS if ctx.n_data == 1 else Unsupported(reason, fix)


def _pass_or_norm(eqn: Any, ctx: Context) -> R.Rule:
    # a shift by a constant passes relevance; the sum of two data values (residual) is Norm
    return _NORM if ctx.n_data > 1 else _PASS


def _pass_or_gradient(eqn: Any, ctx: Context) -> R.Rule:
    # max(x, 0) is a ReLU (Pass); max of two data values routes relevance like max pooling
    return _PASS if ctx.n_data == 1 else _GRADIENT


def _clamp_rule(eqn: Any, ctx: Context) -> R.Rule:
    return _PASS if list(ctx.data) == [False, True, False] else _GRADIENT


def _divide(eqn: Any, ctx: Context) -> R.Rule | Unsupported:
    if list(ctx.data) == [True, False]:
        return _PASS
    return Unsupported(
        "division by a data-dependent value",
        "if the divisor should be a constant for the explanation (a normalization), detach it with "
        "jax.lax.stop_gradient",
    )


def _select(eqn: Any, ctx: Context) -> R.Rule:
    # jnp.where on a constant mask selects entries (the gradient routes relevance to them); on a
    # comparison of the data it is an activation (hard_tanh, leaky_relu, elu), handled as an
    # elementwise island with one data operand, or Pass when only one case is data
    if ctx.dependent[0] and sum(ctx.data[1:]) == 1:
        return _PASS
    return _GRADIENT


def _cast(eqn: Any, ctx: Context) -> R.Rule | Unsupported:
    new_dtype = np.dtype(eqn.params["new_dtype"])
    if jnp.issubdtype(new_dtype, jnp.inexact):  # jnp: bfloat16 and the float8 types are inexact too
        return _GRADIENT
    return Unsupported(
        f"a cast of the explained data to {new_dtype} (out of floating point) cuts the relevance path, "
        "so every input behind it would get zero relevance",
        "keep the data in floating point (e.g. jnp.round(x * 255) / 255 instead of "
        "(x * 255).astype(jnp.uint8)), or cut the value explicitly with jax.lax.stop_gradient",
    )


_UNIFORM = R.Uniform()


def _product(eqn: Any, ctx: Context) -> R.Rule:
    """``a * b``: Pass with a constant factor; the uniform rule for a product of two data values
    (a gate, ``h * sigmoid(g)`` across branches)."""
    return _PASS if ctx.n_data == 1 else _UNIFORM


def _contraction(eqn: Any, ctx: Context) -> R.Rule | Unsupported:
    """A ``dot_general`` or convolution that is not an affine layer (those have a parameter as the
    other operand): both operands data (``q @ k.T``, ``A @ v``) -> the uniform rule; one data operand
    and a detached computed one (CP-LRP's ``stop_gradient(A) @ v``) -> Norm, LRP-epsilon on the
    linear map with the computed operand held constant (never a dense-layer rule)."""
    if eqn.name == "conv_general_dilated" and not ctx.data[0]:
        return Unsupported(
            "a convolution whose kernel, not its input, is the explained data",
            "explain the convolution's input instead (argnums)",
        )
    if all(ctx.data):
        return _UNIFORM
    return _NORM


# --- the table --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PrimitiveInfo:
    """What the engine knows about one primitive (see the module docstring)."""

    name: str
    relevance: Classifier
    sign: SignRule = _never
    keeps_zero: ZeroRule = keeps_zero_never
    routes: bool = False
    view: bool = False
    weight_view: bool = False
    elementwise: bool = False
    linear: str | None = None
    call_param: str | None = None


REGISTRY: dict[str, PrimitiveInfo] = {}

#: Other names of the same primitive in some JAX versions.
ALIASES: dict[str, str] = {
    "pjit": "jit",
    "copy_p": "copy",
    "scatter_add": "scatter-add",
    "core_call": "closed_call",
    "remat": "remat2",
    "checkpoint": "remat2",
}


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def lookup(primitive: Any) -> PrimitiveInfo | None:
    """The registry entry of a primitive (object or name), or ``None`` if jaxdtd does not know it."""
    name = primitive if isinstance(primitive, str) else primitive.name
    return REGISTRY.get(canonical_name(name))


def _register(names: Sequence[str], **info: Any) -> None:
    for name in names:
        REGISTRY[name] = PrimitiveInfo(name=name, **info)


def structural(*names: str, view: bool = False, weight_view: bool = False, sign: SignRule = _all_operands):
    """Rearrangements: their gradient routes relevance to the entries they copy; sign kept."""
    _register(names, relevance=_always(_GRADIENT), sign=sign, routes=True, view=view, weight_view=weight_view)


def selection(*names: str, sign: SignRule = _all_operands) -> None:
    """Winner-takes-all reductions (max pooling): the gradient routes relevance to the winner."""
    _register(names, relevance=_always(_GRADIENT), sign=sign, routes=True)


def boolean(*names: str) -> None:
    """Comparisons and predicates: their results are not floating point and carry no relevance."""
    _register(names, relevance=_always(_GRADIENT), routes=True, elementwise=True)


def elementwise_unary(*names: str, sign: SignRule = _never, keeps_zero: ZeroRule = keeps_zero_never) -> None:
    """Elementwise nonlinearities of one operand: Pass (the identity rule of LXT and zennit)."""
    _register(names, relevance=_always(_PASS), sign=sign, keeps_zero=keeps_zero, elementwise=True)


def shift(*names: str) -> None:
    """Sums: Pass when shifting by a constant, Norm for a sum of data values (residuals)."""
    _register(names, relevance=_pass_or_norm, sign=_all_operands, elementwise=True)


def extremum(*names: str, sign: SignRule) -> None:
    """``max``/``min``: Pass against a constant (ReLU), the gradient between data values."""
    _register(
        names,
        relevance=_pass_or_gradient,
        sign=sign,
        keeps_zero=_zero_extremum,
        routes=True,
        elementwise=True,
    )


def multilinear(name: str, kind: str | None = None, *, relevance: Classifier, **info: Any) -> None:
    """Products: ``mul``, and the linear primitives that form affine layers (``kind``)."""
    _register((name,), relevance=relevance, linear=kind, **info)


def reduction(*names: str) -> None:
    """Sums over axes or windows (sum and average pooling): Norm."""
    _register(names, relevance=_always(_NORM), sign=_all_operands)


def nested_call(name: str, param: str) -> None:
    """A call whose callee (``eqn.params[param]``) is inlined by :func:`jaxdtd.trace.flatten`."""
    _register((name,), relevance=_reject("a nested call left in the program"), call_param=param)


def unsupported(name: str, reason: str, fix: str = "") -> None:
    """A primitive no relevance rule applies to when its operand is data."""
    _register((name,), relevance=_reject(reason, fix))


structural("reshape", "squeeze", "expand_dims", "transpose", "copy", view=True, weight_view=True)
structural("broadcast_in_dim", "slice", "dynamic_slice", "rev", "split", "concatenate", "stack")
structural("reduce_precision", "sharding_constraint", "optimization_barrier")
structural("pad", sign=_first_two)
structural("gather", sign=lambda eqn, nn: nn(eqn.invars[0]))
_register(
    ("convert_element_type",),
    relevance=_cast,
    sign=_all_operands,
    routes=True,
    weight_view=True,
    elementwise=True,
)
_register(("select_n",), relevance=_select, sign=_cases, routes=True, elementwise=True)
selection("reduce_max", "reduce_min", "reduce_window_max", "reduce_window_min", "argmax", "argmin")
boolean("eq", "ne", "gt", "ge", "lt", "le", "is_finite", "not", "and", "or", "xor")
elementwise_unary(
    "neg",
    "sin",
    "tan",
    "atan",
    "asin",
    "sinh",
    "asinh",
    "atanh",
    "erf",
    "erf_inv",
    keeps_zero=keeps_zero_always,
)
elementwise_unary(
    "tanh", "expm1", "log1p", "cbrt", "sign", "floor", "ceil", "round", keeps_zero=keeps_zero_always
)
elementwise_unary("abs", "sqrt", "square", keeps_zero=keeps_zero_always, sign=_always_non_negative)
elementwise_unary("exp", "exp2", "logistic", "rsqrt", "erfc", "cosh", sign=_always_non_negative)
elementwise_unary("log", "cos", "acos", "acosh")
elementwise_unary(
    "integer_pow",
    keeps_zero=_zero_integer_pow,
    sign=lambda eqn, non_negative: eqn.params["y"] % 2 == 0 or non_negative(eqn.invars[0]),
)
shift("add", "add_any")
_register(("sub",), relevance=_pass_or_norm, elementwise=True)
extremum("max", sign=_max_sign)
extremum("min", sign=_all_operands)
_register(
    ("clamp",), relevance=_clamp_rule, sign=_clamp_sign, keeps_zero=_zero_clamp, routes=True, elementwise=True
)
multilinear(
    "mul",
    relevance=_product,
    sign=_all_operands,
    keeps_zero=keeps_zero_always,
    elementwise=True,
)
multilinear("div", relevance=_divide, sign=_all_operands, keeps_zero=_zero_numerator, elementwise=True)
multilinear(
    "pow", relevance=_pass_or("a power whose exponent depends on the explained input"), elementwise=True
)
multilinear("dot_general", "dense", relevance=_contraction)
multilinear("conv_general_dilated", "conv", relevance=_contraction)
reduction("reduce_sum", "reduce_window_sum")
for _name, _param in (
    ("jit", "jaxpr"),
    ("closed_call", "call_jaxpr"),
    ("custom_jvp_call", "call_jaxpr"),
    ("custom_vjp_call", "call_jaxpr"),
    ("custom_vjp_call_jaxpr", "fun_jaxpr"),
    ("remat2", "jaxpr"),
):
    nested_call(_name, _param)
unsupported("cond", "data-dependent control flow", "compute both branches and select with jnp.where instead")
unsupported("while", "data-dependent loop", "unroll the loop in Python")
unsupported(
    "scan",
    "a scan whose body jaxdtd could not plan",
    "scans are explained by planning their body (jaxdtd.units.ScanUnit); this one was not",
)
unsupported("scatter", "scatter of data")
unsupported("scatter-add", "scatter of data")
unsupported("sort", "sort of data")
unsupported("cumsum", "cumulative sum of data")
unsupported("stop_gradient", "stop_gradient is handled by the analysis (it cuts the data)")
