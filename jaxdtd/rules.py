"""Relevance rules: frozen dataclasses that state *what* a rule modifies; the math is generic.

Every rule for an affine layer ``z_j = sum_i x_i w_ij + b_j`` (dense or convolution, with any
BatchNorm already folded in) is a list of :class:`Branch` es.  Branch ``k`` modifies the input, the
weights and the bias; :func:`affine_relevance` then computes (zennit's ``BasicHook`` algebra,
Montavon et al. 2017, Sec. 4-5)::

    z_k   = A(x_k; w_k) + b_k                       # modified forward of branch k
    zhat_g = sum_{k in group g} sign_k z_k          # one denominator per group
    s_g   = mask_g * R / stab(zhat_g)               # stab(z) = z + eps * sgn(z), sgn(0) = +1
    R_in  = sum_k coefficient_k * x_k * A^T(s_{g(k)}; w_k)

where ``A^T`` is the transposed linear map (the VJP of the layer with weights ``w_k``).  The
notation and each rule's formula are in ``docs/rules.md``; the semantics are those of
zennit 1.0.  Branches whose input is ``x- = min(x, 0)`` are skipped when the layer input is provably
non-negative (it comes out of a ReLU), and gamma's group for negative outputs when the output's
relevance provably vanishes wherever ``z <= 0`` (the layer feeds a ReLU; :mod:`jaxdtd.vanishing`):
those are the main savings over zennit.  Both skip exact zeros; the result is the same.

Parameter-free operations get an :class:`OperationRule`: :class:`Pass`, :class:`Norm` or
:class:`Gradient`, each of which implements its own backward (:meth:`OperationRule.relevance`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, cast

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "AffineRule",
    "AlphaBeta",
    "Branch",
    "Epsilon",
    "Flat",
    "Gamma",
    "Gradient",
    "Norm",
    "OperationRule",
    "Pass",
    "Rule",
    "Uniform",
    "WSquare",
    "ZBox",
    "ZPlus",
    "affine_relevance",
    "safe_divide",
    "stabilize",
    "sum_to_shape",
]

Array = Any


# --- modifiers: small pure functions so that rules read like their formulas -------------------
def identity(a: Array) -> Array:
    return a


def positive(a: Array) -> Array:
    """``a+ = max(a, 0)``."""
    return jnp.maximum(a, 0)


def negative(a: Array) -> Array:
    """``a- = min(a, 0)``."""
    return jnp.minimum(a, 0)


def ones(a: Array) -> Array:
    return jnp.ones_like(a)


def square(a: Array) -> Array:
    return a * a


def gamma_modifier(a: Array, *, gamma: float, part: Callable[[Array], Array]) -> Array:
    """``a + gamma * part(a)`` with ``part`` one of :func:`positive`, :func:`negative`."""
    return a + gamma * part(a)


def broadcast_bound(x: Array, *, bound: Array) -> Array:
    """A ZBox bound broadcast to the (batched) layer input, in the input's dtype."""
    return jnp.broadcast_to(jnp.asarray(bound, dtype=x.dtype), x.shape)


# --- numerics -----------------------------------------------------------------------------------
def stabilize(z: Array, epsilon: float) -> Array:
    """``stab(z) = z + epsilon * sgn(z)`` with ``sgn(0) = +1`` (zennit's ``Stabilizer``)."""
    return z + epsilon * jnp.where(z >= 0, 1, -1).astype(z.dtype)


def safe_divide(numerator: Array, denominator: Array) -> Array:
    """``numerator / denominator`` that is 0 (never NaN or inf) where the denominator is 0."""
    zero = denominator == 0
    return jnp.where(zero, 0, numerator / jnp.where(zero, 1, denominator))


def _compute_dtype(dtype: Any) -> Any:
    """Denominators are formed in at least float32 (bf16/fp16 relevance would lose conservation)."""
    return jnp.promote_types(dtype, jnp.float32)


# --- rule types -----------------------------------------------------------------------------------
class Rule:
    """Base class of every rule.  Rules are frozen dataclasses holding hyper-parameters only."""

    @property
    def proportional_to_input(self) -> bool:
        """True when every input relevance is ``x_k * (...)`` with ``x_k`` one of ``x``, ``x+``,
        ``x-``: then an input entry equal to 0 gets relevance 0 (:mod:`jaxdtd.vanishing`)."""
        return False


@dataclasses.dataclass(frozen=True)
class Branch:
    """One modified copy of an affine layer (see the module docstring).

    ``bias=None`` drops the bias in this branch.  ``negative_input`` marks branches that vanish
    when the layer input is non-negative (their input modifier is ``x-``).  ``combination=(a, c)``
    declares that the weight and bias modifiers are ``a w + c w+`` and ``a b + c b+``; on
    non-negative inputs this lets :func:`affine_relevance` share one forward pass with the positive
    weights and two transposed passes among all branches (see :func:`_combined_relevance`).
    """

    input: Callable[[Array], Array]
    weight: Callable[[Array], Array]
    bias: Callable[[Array], Array] | None
    group: int = 0
    sign: float = 1.0
    coefficient: float = 1.0
    negative_input: bool = False
    combination: tuple[float, float] | None = None

    @property
    def reproduces_forward(self) -> bool:
        """True when ``z_k`` equals the layer's own output, so the forward need not be recomputed."""
        return self.input is identity and self.weight is identity and self.bias is identity


class AffineRule(Rule):
    """A rule for dense and convolution layers: subclasses declare :meth:`branches`.

    Every affine rule has a ``stabilizer`` (the ``epsilon`` of ``stab(z) = z + epsilon sgn(z)`` for
    all its denominators) and ``zero_bias`` (drop the bias in every branch); concrete rules declare
    them as dataclass fields (or, where they are fixed by the rule, as properties).
    """

    stabilizer: float
    zero_bias: bool

    def branches(self) -> tuple[Branch, ...]:
        raise NotImplementedError

    @property
    def proportional_to_input(self) -> bool:
        return all(b.input in (identity, positive, negative) for b in self.branches())

    def masks(self, output: Array) -> Sequence[Array] | None:
        """Optional per-group masks on the layer's original output ``z`` (used by :class:`Gamma`)."""
        return None

    def negative_output_groups(self) -> frozenset[int]:
        """Groups whose mask is 0 wherever ``z > 0``: they receive no relevance when the relevance
        of the layer's output vanishes wherever ``z <= 0`` (a layer followed by a ReLU)."""
        return frozenset()

    def validate_input(self, shape: tuple[int, ...], where: str) -> None:
        """Raise a clear error if the rule cannot act on a layer input of this shape."""


def _check_non_negative(rule: str, **values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise TypeError(f"{rule}: {name} must be a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{rule}: {name} must be a finite number >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Epsilon(AffineRule):
    """LRP-epsilon: ``R_i = x_i sum_j w_ij R_j / stab_eps(z_j)``, ``z_j = sum_i x_i w_ij + b_j``.

    ``Epsilon(0)`` is LRP-0 (where ``z_j = 0`` the relevance is dropped, never NaN).
    """

    epsilon: float = 1e-6
    zero_bias: bool = False

    def __post_init__(self) -> None:
        _check_non_negative("Epsilon", epsilon=self.epsilon)

    @property
    def stabilizer(self) -> float:  # type: ignore[override]
        return self.epsilon

    def branches(self) -> tuple[Branch, ...]:
        return (Branch(identity, identity, identity, combination=(1.0, 0.0)),)


@dataclasses.dataclass(frozen=True)
class ZPlus(AffineRule):
    """z+ rule (= AlphaBeta(1, 0)): ``zhat_j = sum_i (x+_i w+_ij + x-_i w-_ij) + b+_j``;
    ``R_i = x+_i sum_j w+_ij s_j + x-_i sum_j w-_ij s_j`` with ``s_j = R_j / stab(zhat_j)``."""

    stabilizer: float = 1e-6
    zero_bias: bool = False

    def __post_init__(self) -> None:
        _check_non_negative("ZPlus", stabilizer=self.stabilizer)

    def branches(self) -> tuple[Branch, ...]:
        return (
            Branch(positive, positive, positive, combination=(0.0, 1.0)),
            Branch(negative, negative, None, negative_input=True),
        )


@dataclasses.dataclass(frozen=True)
class AlphaBeta(AffineRule):
    """alpha-beta rule: positive and negative contributions normalized separately,
    ``R_i = alpha * R_i^+ - beta * R_i^-`` (docs/rules.md).  Requires ``alpha - beta = 1``, both >= 0."""

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6
    zero_bias: bool = False

    def __post_init__(self) -> None:
        _check_non_negative("AlphaBeta", alpha=self.alpha, beta=self.beta, stabilizer=self.stabilizer)
        if abs(self.alpha - self.beta - 1.0) > 1e-12:
            raise ValueError(
                f"AlphaBeta: alpha - beta must equal 1 for the rule to be conservative, got "
                f"alpha={self.alpha!r}, beta={self.beta!r} (alpha - beta = {self.alpha - self.beta!r})"
            )

    def branches(self) -> tuple[Branch, ...]:
        a, b = float(self.alpha), float(self.beta)
        return (
            # no ``combination``: the negative group's denominator y - (A(x; w+) + b+) would cancel
            Branch(positive, positive, positive, group=0, coefficient=a),
            Branch(negative, negative, None, group=0, coefficient=a, negative_input=True),
            Branch(positive, negative, negative, group=1, coefficient=-b),
            Branch(negative, positive, None, group=1, coefficient=-b, negative_input=True),
        )


@dataclasses.dataclass(frozen=True)
class Gamma(AffineRule):
    """Generalized gamma rule (zennit): favour positive contributions by ``gamma``.

    ``zu_j = sum_i [x+ (w + g w+) + x- (w + g w-)] + b + g b+`` takes the relevance of neurons with
    ``z_j > 0``, ``zd_j = sum_i [x+ (w + g w-) + x- (w + g w+)] + b + g b-`` that of ``z_j < 0``.
    ``Gamma(0)`` is LRP-0 on positive and negative outputs alike.
    """

    gamma: float = 0.25
    stabilizer: float = 1e-6
    zero_bias: bool = False

    def __post_init__(self) -> None:
        _check_non_negative("Gamma", gamma=self.gamma, stabilizer=self.stabilizer)

    def branches(self) -> tuple[Branch, ...]:
        g = float(self.gamma)
        up = functools.partial(gamma_modifier, gamma=g, part=positive)
        down = functools.partial(gamma_modifier, gamma=g, part=negative)
        return (
            Branch(positive, up, up, group=0, combination=(1.0, g)),  # w + g w+
            Branch(negative, down, None, group=0, negative_input=True),
            Branch(positive, down, down, group=1, combination=(1.0 + g, -g)),  # w + g w- = (1+g) w - g w+
            Branch(negative, up, None, group=1, negative_input=True),
        )

    def masks(self, output: Array) -> Sequence[Array]:
        return (output > 0, output < 0)

    def negative_output_groups(self) -> frozenset[int]:
        return frozenset({1})


@dataclasses.dataclass(frozen=True, eq=False)
class ZBox(AffineRule):
    """z^B rule for inputs bounded by ``low <= x <= high`` (Montavon et al. 2017, Sec. 5.3):
    ``R_i = x_i sum_j w_ij s_j - l_i sum_j w+_ij s_j - h_i sum_j w-_ij s_j`` with
    ``zhat_j = sum_i (x_i w_ij - l_i w+_ij - h_i w-_ij)`` (the bias cancels).

    ``low`` and ``high`` are scalars or arrays broadcastable to one sample of the layer input
    (e.g. ``(H, W, C)`` or ``(C,)`` for NHWC images).  A convolution's padding is never a bound.
    """

    low: Any = 0.0
    high: Any = 1.0
    stabilizer: float = 1e-6
    zero_bias: bool = False

    def __post_init__(self) -> None:
        _check_non_negative("ZBox", stabilizer=self.stabilizer)
        for name in ("low", "high"):
            value = getattr(self, name)
            if value is None:
                raise ValueError(f"ZBox: {name} must be a number or an array, got None")
            if not isinstance(value, jax.core.Tracer):
                array = np.asarray(value)
                if not jnp.issubdtype(array.dtype, jnp.number) or not np.all(np.isfinite(array)):
                    raise ValueError(f"ZBox: {name} must be finite numbers, got {value!r}")
        low, high = self.low, self.high
        if not isinstance(low, jax.core.Tracer) and not isinstance(high, jax.core.Tracer):
            low_a, high_a = np.asarray(low), np.asarray(high)
            try:
                np.broadcast_shapes(low_a.shape, high_a.shape)
            except ValueError:
                raise ValueError(
                    f"ZBox: low of shape {low_a.shape} and high of shape {high_a.shape} do not broadcast"
                ) from None
            if np.any(low_a > high_a):
                raise ValueError("ZBox: low must be <= high everywhere")

    def _key(self) -> tuple[Any, ...]:
        """Value identity of the bounds (so equal rules share caches); traced bounds by identity."""
        parts: list[Any] = []
        for bound in (self.low, self.high):
            if isinstance(bound, jax.core.Tracer):
                parts.append(id(bound))
            else:
                array = np.asarray(bound)
                parts.append((array.shape, str(array.dtype), array.tobytes()))
        return (*parts, self.stabilizer, self.zero_bias)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def validate_input(self, shape: tuple[int, ...], where: str) -> None:
        shape = tuple(shape)
        for name in ("low", "high"):
            bound_shape = tuple(np.shape(getattr(self, name)))
            try:
                ok = np.broadcast_shapes(bound_shape, shape) == shape
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(
                    f"ZBox: {name} has shape {bound_shape}, which does not broadcast to one sample "
                    f"of shape {shape[1:]} (layer input of shape {shape}) at {where}"
                )

    def branches(self) -> tuple[Branch, ...]:
        low = functools.partial(broadcast_bound, bound=self.low)
        high = functools.partial(broadcast_bound, bound=self.high)
        return (
            Branch(identity, identity, identity, sign=1.0, coefficient=1.0),
            Branch(low, positive, positive, sign=-1.0, coefficient=-1.0),
            Branch(high, negative, negative, sign=-1.0, coefficient=-1.0),
        )


@dataclasses.dataclass(frozen=True)
class WSquare(AffineRule):
    """w^2 rule (Montavon et al. 2017, Sec. 5.1): ``R_i = sum_j w_ij^2 R_j / stab(sum_i w_ij^2 + b_j^2)``.

    Independent of the input values; for a padded convolution only in-bounds taps count.
    zennit squares the bias too; ``zero_bias=True`` drops it.
    """

    stabilizer: float = 1e-6
    zero_bias: bool = False

    def __post_init__(self) -> None:
        _check_non_negative("WSquare", stabilizer=self.stabilizer)

    def branches(self) -> tuple[Branch, ...]:
        return (Branch(ones, square, square),)


@dataclasses.dataclass(frozen=True)
class Flat(AffineRule):
    """Flat rule: relevance spread uniformly over connected inputs,
    ``R_i = sum_{j connected to i} R_j / stab(n_j)`` with ``n_j`` the number of (in-bounds) inputs of ``j``.
    The bias is always dropped."""

    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        _check_non_negative("Flat", stabilizer=self.stabilizer)

    @property
    def zero_bias(self) -> bool:  # type: ignore[override]
        return True

    def branches(self) -> tuple[Branch, ...]:
        return (Branch(ones, ones, None),)


class OperationRule(Rule):
    """A rule for a parameter-free operation ``y = f(x_1, ..., x_n)`` on data values.

    :meth:`relevance` is the rule's whole math: given ``f`` (as a function of its data operands),
    the data operands, the output and the output's relevance, it returns the relevance of each data
    operand.  The interpreter wraps it in a :func:`jax.custom_vjp` and nothing else.
    """

    #: the relevance is the operation's own VJP, so the interpreter binds it as it is (no wrapper)
    is_gradient: ClassVar[bool] = False
    #: ``R_out`` is handed to the (single) data operand unchanged
    is_identity: ClassVar[bool] = False

    def relevance(
        self, f: Callable[..., Array], inputs: Sequence[Array], output: Array, relevance: Array
    ) -> tuple[Array, ...]:
        raise NotImplementedError

    def for_affine_layer(self) -> AffineRule | None:
        """The rule this rule means on an affine layer (``None``: the plain gradient)."""
        raise TypeError(
            f"{type(self).__name__}() cannot act on an affine layer (its output has another shape "
            "than its input); use Epsilon, ZPlus, ... or Gradient()"
        )


def sum_to_shape(r: Array, shape: Sequence[int]) -> Array:
    """Relevance of a broadcast operand: ``r`` summed over the dimensions it was broadcast along."""
    shape = tuple(shape)
    if r.shape == shape:
        return r
    lead = r.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, size in enumerate(shape) if size == 1 and r.shape[lead + i] != 1
    )
    return jnp.sum(r, axis=axes).reshape(shape)


@dataclasses.dataclass(frozen=True)
class Pass(OperationRule):
    """Pass (identity rule): ``R_x = R_y`` for an elementwise operation of one data operand
    (activations, shifts and scalings by constants, any elementwise island); a broadcast operand
    gets the sum over the broadcast dimensions."""

    is_identity: ClassVar[bool] = True

    def relevance(
        self, f: Callable[..., Array], inputs: Sequence[Array], output: Array, relevance: Array
    ) -> tuple[Array, ...]:
        (x,) = inputs
        return (sum_to_shape(relevance, x.shape).astype(x.dtype),)


@dataclasses.dataclass(frozen=True)
class Norm(OperationRule):
    """Norm: relevance in proportion to contribution, for sums of data values and average pooling:
    ``R_i = x_i sum_j (d f_j / d x_i) R_j / stab(f_j(x))``, the division in at least float32, and
    ``R_i = 0`` exactly where the sum is 0 (also for an infinite ``x_i``: a ``-inf`` attention mask).
    On an affine layer it is ``Epsilon(stabilizer)``."""

    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        _check_non_negative("Norm", stabilizer=self.stabilizer)

    @property
    def proportional_to_input(self) -> bool:
        return True

    def relevance(
        self, f: Callable[..., Array], inputs: Sequence[Array], output: Array, relevance: Array
    ) -> tuple[Array, ...]:
        compute = _compute_dtype(relevance.dtype)
        s = safe_divide(relevance.astype(compute), stabilize(output.astype(compute), self.stabilizer))
        _, pullback = jax.vjp(f, *inputs)
        grads = pullback(s.astype(output.dtype))
        # an input that receives nothing gets exactly 0, also where it is infinite (a -inf mask
        # added before a softmax: x = -inf, x * 0 would be NaN)
        return tuple(jnp.where(g == 0, 0, x * g).astype(x.dtype) for x, g in zip(inputs, grads, strict=True))

    def for_affine_layer(self) -> AffineRule:
        return Epsilon(self.stabilizer)


@dataclasses.dataclass(frozen=True)
class Uniform(OperationRule):
    """The uniform rule for products of data values (AttnLRP, Achtibat et al. 2024, Prop. 3.3), with
    LRP-epsilon on the product: each of the ``n`` data operands of a multilinear ``y = f(x_1..x_n)``
    (``a * b``, ``q @ k.T``, ``A @ v``) gets an equal share,

    ``R_i = (1/n) x_i sum_j (d f_j / d x_i) R_j / stab(f_j(x))``,

    so ``R_a = R_b = R_y / 2`` for an elementwise ``y = a * b`` and, for ``S = Q K^T``,
    ``R_Q,ad = 1/2 sum_b Q_ad K_bd R_S,ab / S_ab``.  ``stabilizer = 0`` (AttnLRP, LXT) is LRP-0
    with safe division.  With one data operand (a product with a constant) it is :class:`Norm`.
    Only multilinear operations may use it: on a sum it would halve the relevance."""

    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        _check_non_negative("Uniform", stabilizer=self.stabilizer)

    @property
    def proportional_to_input(self) -> bool:
        return True

    def relevance(
        self, f: Callable[..., Array], inputs: Sequence[Array], output: Array, relevance: Array
    ) -> tuple[Array, ...]:
        shares = Norm(self.stabilizer).relevance(f, inputs, output, relevance)
        return tuple((r / len(inputs)).astype(r.dtype) for r in shares)

    def for_affine_layer(self) -> AffineRule:
        return Epsilon(self.stabilizer)


@dataclasses.dataclass(frozen=True)
class Gradient(OperationRule):
    """The plain gradient (vector-Jacobian product) of the operation or layer:
    ``R_i = sum_j (d f_j / d x_i) R_j``."""

    is_gradient: ClassVar[bool] = True

    def relevance(
        self, f: Callable[..., Array], inputs: Sequence[Array], output: Array, relevance: Array
    ) -> tuple[Array, ...]:
        _, pullback = jax.vjp(f, *inputs)
        return tuple(pullback(relevance))

    def for_affine_layer(self) -> None:
        return None


# --- the one generic function ---------------------------------------------------------------------
def affine_relevance(
    rule: AffineRule,
    linear: Callable[[Array, Array], Array],
    x: Array,
    kernel: Array,
    bias: Array | None,
    output: Array,
    relevance: Array,
    *,
    non_negative_input: bool = False,
    positive_output_relevance: bool = False,
) -> Array:
    """Input relevance of an affine layer ``z = linear(x, kernel) + bias`` under ``rule``.

    ``output`` is the layer's forward value ``z`` and ``relevance`` the relevance ``R`` of its
    outputs.  ``linear`` must be linear in its first argument (a ``dot_general`` or a convolution).
    See the module docstring for the formula.  Two facts proven by the caller let it skip work
    whose result is exactly zero: ``non_negative_input`` (``x >= 0``: the ``x-`` branches vanish)
    and ``positive_output_relevance`` (``R = 0`` wherever ``z <= 0``: the groups of
    :meth:`AffineRule.negative_output_groups` vanish).
    """
    dropped_groups = rule.negative_output_groups() if positive_output_relevance else frozenset()
    branches = [
        b
        for b in rule.branches()
        if not (non_negative_input and b.negative_input) and b.group not in dropped_groups
    ]
    if non_negative_input and _combinable(rule, branches, bias):
        return _combined_relevance(rule, branches, linear, x, kernel, bias, output, relevance)
    compute = _compute_dtype(relevance.dtype)
    groups: dict[int, Array] = {}
    pullbacks = []
    for branch in branches:
        x_k = branch.input(x)
        w_k = branch.weight(kernel)
        if branch.reproduces_forward and not rule.zero_bias:
            z_k, pullback = output, jax.linear_transpose(lambda v, w=w_k: linear(v, w), x_k)
        else:
            z_k, vjp = jax.vjp(lambda v, w=w_k: linear(v, w), x_k)
            pullback = vjp
            if branch.bias is not None and bias is not None and not rule.zero_bias:
                z_k = z_k + branch.bias(bias)
        term = branch.sign * z_k.astype(compute)
        groups[branch.group] = term if branch.group not in groups else groups[branch.group] + term
        pullbacks.append((branch, x_k, pullback))

    scaled = {g: s.astype(relevance.dtype) for g, s in _scaled(rule, groups, output, relevance).items()}

    result: Array = None  # the first branch's term (every rule has a branch)
    for branch, x_k, pullback in pullbacks:
        (g,) = pullback(scaled[branch.group])
        term = x_k * g
        if branch.coefficient != 1.0:
            term = branch.coefficient * term
        result = term if result is None else result + term
    return result.astype(x.dtype)


def _scaled(rule: AffineRule, groups: dict[int, Array], output: Array, relevance: Array) -> dict[int, Array]:
    """``s_g = mask_g * R / stab(zhat_g)`` per denominator group, in at least float32."""
    # masks come from the layer's original output, bias included even with zero_bias (as zennit)
    masks = rule.masks(output)
    scaled: dict[int, Array] = {}
    for group, denominator in groups.items():
        s = safe_divide(relevance.astype(denominator.dtype), stabilize(denominator, rule.stabilizer))
        scaled[group] = s * masks[group] if masks is not None else s
    return scaled


def _combinable(rule: AffineRule, branches: Sequence[Branch], bias: Array | None) -> bool:
    """Branches that :func:`_combined_relevance` can evaluate: inputs ``x`` (= ``x+`` here), weights
    ``a w + c w+``; with the bias dropped only ``a = 0`` (``A(x; w) = y - b`` would cancel)."""
    for branch in branches:
        if branch.combination is None or branch.input not in (identity, positive):
            return False
        dropped = rule.zero_bias or branch.bias is None
        if dropped and bias is not None and branch.combination[0] != 0.0:
            return False
    return True


def _combination(branch: Branch) -> tuple[float, float]:
    """``branch.combination``, set on every branch :func:`_combinable` accepts."""
    return cast(tuple[float, float], branch.combination)


def _combined_relevance(
    rule: AffineRule,
    branches: Sequence[Branch],
    linear: Callable[[Array, Array], Array],
    x: Array,
    kernel: Array,
    bias: Array | None,
    output: Array,
    relevance: Array,
) -> Array:
    """:func:`affine_relevance` for non-negative inputs and branches with weights ``a_k w + c_k w+``.

    By linearity in the weights, with ``y`` the layer output and ``P = A(x; w+) + b+``::

        z_k  = a_k y + c_k P                                   (bias kept)
        R_in = x * [A^T(sum_k coef_k a_k s_k; w) + A^T(sum_k coef_k c_k s_k; w+)]

    so every rule of this form (Epsilon, z+, gamma) costs at most one extra forward pass
    (``A(x; w+)``) and two transposed passes, whatever its number of branches.  With a single
    denominator group (``s_k = s``) the two transposed passes are one, with the weights
    ``(sum_k coef_k a_k) w + (sum_k coef_k c_k) w+``: gamma on a layer followed by a ReLU costs what
    z+ costs.
    """
    compute = _compute_dtype(relevance.dtype)
    plus_kernel = positive(kernel)
    need_plus = any(_combination(b)[1] != 0.0 for b in branches)
    # x+ = x here; forming it anew lets XLA lay the convolution's input out when the backward
    # needs it instead of keeping a second layout of x alive from the forward pass (ResNet-50:
    # temp memory 1.7x -> 1.0x that of the gradient with the plain scheduler)
    # None only when no branch has c != 0, so no branch reads it
    plus: Array = linear(positive(x), plus_kernel).astype(compute) if need_plus else None
    bias_plus = None if bias is None else positive(bias).astype(compute)
    y = output.astype(compute)
    groups: dict[int, Array] = {}
    for branch in branches:
        a, c = _combination(branch)
        keep_bias = not rule.zero_bias and branch.bias is not None and bias is not None
        z_k: Array = 0.0
        if a != 0.0:
            z_k = a * (y if (keep_bias or bias is None) else y - bias.astype(compute))
        if c != 0.0:
            z_k = z_k + c * (plus + bias_plus if keep_bias else plus)
        term = branch.sign * z_k
        groups[branch.group] = term if branch.group not in groups else groups[branch.group] + term
    scaled = _scaled(rule, groups, output, relevance)
    if len(scaled) == 1:
        (s,) = scaled.values()
        a = sum(b.coefficient * _combination(b)[0] for b in branches)
        c = sum(b.coefficient * _combination(b)[1] for b in branches)
        weights = kernel if c == 0.0 else plus_kernel if a == 0.0 else a * kernel + c * plus_kernel
        factor = a if c == 0.0 else c if a == 0.0 else 1.0
        if factor != 1.0:
            s = factor * s
        transpose = jax.linear_transpose(lambda v: linear(v, weights), x)
        (g,) = transpose(s.astype(relevance.dtype))
        return (x * g).astype(x.dtype)
    result = 0.0
    for part, weights in ((0, kernel), (1, plus_kernel)):
        terms = [
            b.coefficient * _combination(b)[part] * scaled[b.group] for b in branches if _combination(b)[part]
        ]
        if not terms:  # no branch uses these weights
            continue
        transpose = jax.linear_transpose(lambda v, w=weights: linear(v, w), x)
        (g,) = transpose(sum(terms).astype(relevance.dtype))
        result = result + g
    return (x * result).astype(x.dtype)
