"""Every relevance rule on hand-made tiny layers, against an exact reference in fractions.

The reference (``exact_reference.py``) re-implements ``reference/rules.md`` as explicit double sums over
the taps ``(i, j, w_ij)`` of each layer, in :class:`fractions.Fraction`, stabilizer included
(``eps = 1/10**6`` exactly).  Nothing is shared with the engine but the formulas.

Data are small dyadic numbers (multiples of 1/4, once 2^-10), so every forward value and every
denominator is exact in float32 as well; only the divisions of the backward pass round.  The comparison
therefore holds to ``rtol = 1e-5`` plus a term proportional to the size of the terms that were summed
(``Relevance.scale``): that term only matters where terms cancel, e.g. when a stabilized zero denominator
makes them ~1e6.  Measured errors stay below 5% of the allowed bound (17% for average pooling).

Layout of this file: data and layers; reference pipelines per model; the rule table; checks of the
reference itself (hand values, conservation); then the engine tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from fractions import Fraction

import exact_reference as ref
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from exact_reference import Relevance, q

# Tolerances: |got - want| <= RTOL |want| + SCALE_TOL * scale + ATOL  (see module docstring).
RTOL = 1e-5
SCALE_TOL = 1e-6
ATOL = 1e-6


@pytest.fixture(scope="module")
def dtd():
    """The engine, imported lazily so that the reference checks run on their own."""
    import jaxdtd

    return jaxdtd


# ==================================================================================================
# Data (all values dyadic: exact in float32)
# ==================================================================================================

# Dense 3 -> 2: mixed signs, one zero weight (Flat must still count it), mixed-sign bias.
W = [[1.0, -0.5], [-1.5, 2.0], [0.5, 0.0]]
B = [0.5, -1.0]
# Samples with positive, negative and zero entries; sample 2 gives z_1 = 0 exactly (Gamma's masks).
X_DENSE = [[1.0, -2.0, 0.0], [0.5, 1.5, -1.0], [2.0, 1.0, 0.5]]
DENSE_LOW = [-1.0, -3.0, -0.5]  # per-feature ZBox bounds, broadcastable to one sample (3,)
DENSE_HIGH = [2.0, 1.0, 0.5]
SCALAR_LOW, SCALAR_HIGH = -2.0, 2.0

# 1-D convolution, NWC input (2, 4, 2), WIO kernel (3, 2, 2), stride 1, padding SAME = (1, 1).
X_CONV1 = [
    [[1.0, 0.5], [-2.0, 1.0], [0.0, -1.0], [1.5, 0.0]],
    [[-0.5, 2.0], [1.0, 0.0], [0.25, -1.5], [-1.0, 1.0]],
]
K_CONV1 = [
    [[1.0, -0.5], [0.5, 0.0]],  # k = 0: [c_in][c_out]
    [[-1.0, 1.0], [0.0, -1.5]],  # k = 1
    [[2.0, 0.5], [-0.5, 1.0]],
]  # k = 2
B_CONV1 = [0.25, -0.5]
CONV_LOW = [-2.0, -1.5]  # per input channel, broadcastable to one sample (4, 2)
CONV_HIGH = [2.0, 2.5]

# 2-D convolution, NHWC input (1, 3, 3, 2), HWIO kernel (2, 2, 2, 2), stride 2, padding 1 on every side:
# the four outputs see 1, 2, 2 and 4 in-bounds taps (times 2 channels).
X_CONV2 = [
    [
        [[1.0, -1.0], [0.0, 2.0], [-0.5, 0.5]],
        [[2.0, 0.0], [-1.5, 1.0], [1.0, -2.0]],
        [[0.0, 0.5], [0.25, -1.0], [-1.0, 1.5]],
    ]
]
K_CONV2 = [
    [[[1.0, -0.5], [0.5, 1.0]], [[-1.0, 2.0], [0.0, -0.5]]],
    [[[0.5, 0.0], [-2.0, 1.0]], [[1.5, -1.0], [1.0, 0.25]]],
]
B_CONV2 = [-0.25, 0.5]
CONV2_LOW = [-2.0, -2.5]
CONV2_HIGH = [2.5, 2.0]

# Two-layer MLP 3 -> 3 -> 2.  Hidden unit 2 is dead (pre-activation < 0) for every sample of X_DENSE and
# unit 1 for samples 0 and 2; W2's row 2 is non-zero, so WSquare/Flat/ZBox send relevance to the dead
# unit, and Pass (not the gradient) hands it on to the first layer.
W1 = [[1.0, -1.0, 0.5], [0.5, 1.0, -0.5], [-1.0, 0.5, 1.0]]
B1 = [0.5, -0.25, -3.0]
W2 = [[1.0, -1.0], [-0.5, 2.0], [1.5, 0.5]]
B2 = [-0.25, 0.5]

# Second branch for a + b of two affine outputs.
W_ALT = [[0.5, 1.0], [1.0, -0.5], [-2.0, 0.25]]
B_ALT = [-0.5, 0.25]

# Pooling input NWC (2, 4, 2): every window sum has |sum| >= 1/2 or is 0, every channel sum has |sum| >= 3/2,
# so the placement of the stabilizer (stab(mean) vs stab(sum)) stays far below the tolerance.
X_POOL = [
    [[1.0, 0.5], [-2.0, 1.0], [0.0, -1.0], [3.0, -2.5]],
    [[-0.5, 2.0], [2.0, 0.0], [1.0, -1.5], [1.0, 1.0]],
]

# Zero denominators.
B_ZERO = [0.0, 0.0]
# x . W_CANCEL[:, 0] = 0 for both samples (Epsilon/Gamma without bias divide by eps), and for sample 0
# ZBox(-2, 2) has zhat_1 = 0 with non-zero terms (x_2 = 5 lies outside the box).
W_CANCEL = [[2.0, 2.0], [1.0, 1.0], [0.0, -2.0]]
X_CANCEL = [[1.0, -2.0, 5.0], [1.0, -2.0, 0.0]]
# Every hidden pre-activation is exactly 0 for both samples: a dead layer (h = 0, y = B2).
W1_DEAD = [[2.0, 2.0, -2.0], [1.0, 1.0, -1.0], [1.0, -1.0, 0.5]]
B1_DEAD = [0.0, 0.0, 0.0]
X_DEAD = [[1.0, -2.0, 0.0], [0.0, 0.0, 0.0]]


def f32(data) -> np.ndarray:
    """float32 array of ``data``, checked to be exact so the reference and the engine see the same numbers."""
    arr = np.asarray(data, dtype=np.float32)
    exact_values = np.asarray(data, dtype=object).ravel().tolist()
    for value, exact in zip(arr.ravel().tolist(), exact_values, strict=True):
        assert Fraction(value) == q(float(exact)), f"{exact!r} is not exact in float32"
    return arr


def flat_fracs(sample) -> list[Fraction]:
    return [q(float(v)) for v in np.asarray(sample, dtype=object).ravel().tolist()]


# Reference layers.
DENSE = ref.dense(W, B)
DENSE_ALT = ref.dense(W_ALT, B_ALT)
DENSE_ZERO_BIAS = ref.dense(W, B_ZERO)
DENSE_CANCEL = ref.dense(W_CANCEL, B)
MLP_1, MLP_2 = ref.dense(W1, B1), ref.dense(W2, B2)
RES_2 = ref.dense(W2, B2)
DEAD_1 = ref.dense(W1_DEAD, B1_DEAD)
CONV1 = ref.conv([4], K_CONV1, B_CONV1, strides=[1], padding=[(1, 1)])
CONV2 = ref.conv([3, 3], K_CONV2, B_CONV2, strides=[2, 2], padding=[(1, 1), (1, 1)])
SUM_POOL = ref.pool(4, 2, window=2, stride=2)
SUM_POOL_OVERLAP = ref.pool(4, 2, window=2, stride=1)
AVG_POOL = ref.pool(4, 2, window=2, stride=2, weight=Fraction(1, 2))
MEAN = ref.mean_over_space(4, 2)


# JAX models (float32 parameters closed over, as a user would write them).
def _dense_fn(w, b):
    w, b = jnp.asarray(f32(w)), jnp.asarray(f32(b))
    return lambda x: x @ w + b


def _conv1_apply(x):
    return jax.lax.conv_general_dilated(
        x,
        jnp.asarray(f32(K_CONV1)),
        window_strides=(1,),
        padding="SAME",
        dimension_numbers=("NWC", "WIO", "NWC"),
    ) + jnp.asarray(f32(B_CONV1))


def _conv2_apply(x):
    return jax.lax.conv_general_dilated(
        x,
        jnp.asarray(f32(K_CONV2)),
        window_strides=(2, 2),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    ) + jnp.asarray(f32(B_CONV2))


def _mlp_fn(w1, b1):
    first, second = _dense_fn(w1, b1), _dense_fn(W2, B2)
    return lambda x: second(jax.nn.relu(first(x)))


def _mlp_maximum_fn(x):
    first, second = _dense_fn(W1, B1), _dense_fn(W2, B2)
    return second(jnp.maximum(first(x), 0.0))


def _residual_fn(x):
    first, second = _dense_fn(W1, B1), _dense_fn(W2, B2)
    return second(jax.nn.relu(first(x)) + x)


def _two_branch_fn(x):
    return _dense_fn(W, B)(x) + _dense_fn(W_ALT, B_ALT)(x)


def _sum_pool(x, window, stride):
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, window, 1), (1, stride, 1), "VALID")


def _conv_relu_pool_fn(x):
    return _sum_pool(jax.nn.relu(_conv1_apply(x)), 2, 2)


# ==================================================================================================
# Rules: one table, read by both the engine (``engine``) and the reference (``contributions``)
# ==================================================================================================


@dataclasses.dataclass(frozen=True)
class RuleCase:
    """A rule with its hyper-parameters.  ZBox: ``bounds="scalar"`` is (-2, 2); ``"array"`` takes the case's
    ``low``/``high`` arrays (one value per feature, or per input of one sample)."""

    kind: str
    params: tuple[tuple[str, object], ...] = ()
    bounds: str | None = None

    @property
    def id(self) -> str:
        parts = [self.kind] + ([self.bounds] if self.bounds else [])
        for key, value in self.params:
            if key == "zero_bias":
                parts.append("zero_bias" if value else "bias")
            else:
                parts.append(f"{key}={value:g}")
        return "-".join(parts)

    def _bounds(self, case: Case):
        if self.bounds == "scalar":
            return SCALAR_LOW, SCALAR_HIGH
        return case.low, case.high

    def engine(self, case: Case):
        from jaxdtd import rules

        params = dict(self.params)
        if self.kind == "ZBox":
            low, high = self._bounds(case)
            if self.bounds == "array":
                low, high = jnp.asarray(f32(low)), jnp.asarray(f32(high))
            return rules.ZBox(low, high, **params)
        return getattr(rules, self.kind)(**params)

    def contributions(self, layer: ref.Affine, x, case: Case):
        params = dict(self.params)
        if self.kind == "Epsilon":
            return ref.epsilon(layer, x, **params)
        if self.kind == "ZPlus":
            return ref.zplus(layer, x, **params)
        if self.kind == "AlphaBeta":
            return ref.alpha_beta(layer, x, **params)
        if self.kind == "Gamma":
            return ref.gamma(layer, x, **params)
        if self.kind == "WSquare":
            return ref.wsquare(layer, x, **params)
        if self.kind == "Flat":
            return ref.flat(layer, x, **params)
        if self.kind == "ZBox":
            low, high = self._bounds(case)
            return ref.zbox(layer, x, _per_input(low, layer.n_in), _per_input(high, layer.n_in), **params)
        raise AssertionError(self.kind)

    def relevance_in(self, layer: ref.Affine, x, relevance: Relevance, case: Case) -> Relevance:
        return ref.propagate(self.contributions(layer, x, case), relevance, layer.n_in)


def _per_input(bound, n_in: int) -> list[Fraction]:
    """ZBox bound of every input of a channels-last sample.  A scalar applies to every input; an array is
    either one value per feature (the last axis: input i has feature i % C) or one value per input."""
    if np.isscalar(bound):
        return [q(bound)] * n_in
    values = flat_fracs(bound)
    assert n_in % len(values) == 0
    return [values[i % len(values)] for i in range(n_in)]


def _with_zero_bias(kind, **params):
    return [RuleCase(kind, tuple(params.items()) + (("zero_bias", zb),)) for zb in (False, True)]


RULES: list[RuleCase] = [
    *(c for e in (1e-6, 0.25, 1.0) for c in _with_zero_bias("Epsilon", epsilon=e)),
    *_with_zero_bias("ZPlus"),
    RuleCase("ZPlus", (("stabilizer", 0.25),)),
    *(
        c
        for a, b in ((2.0, 1.0), (1.0, 0.0), (3.0, 2.0))
        for c in _with_zero_bias("AlphaBeta", alpha=a, beta=b)
    ),
    RuleCase("AlphaBeta", (("alpha", 2.0), ("beta", 1.0), ("stabilizer", 0.25))),
    *(c for g in (0.0, 0.25, 1.0) for c in _with_zero_bias("Gamma", gamma=g)),
    RuleCase("Gamma", (("gamma", 0.25), ("stabilizer", 0.5))),
    *(
        RuleCase("ZBox", (("zero_bias", zb),), bounds)
        for bounds in ("scalar", "array")
        for zb in (False, True)
    ),
    RuleCase("ZBox", (("stabilizer", 0.5),), "scalar"),
    *_with_zero_bias("WSquare"),
    RuleCase("WSquare", (("stabilizer", 0.5),)),
    RuleCase("Flat"),
    RuleCase("Flat", (("stabilizer", 1.0),)),
]
# Multi-layer models apply the rule to layers of other widths: per-feature ZBox bounds do not fit there.
RULES_SCALAR = [r for r in RULES if r.bounds != "array"]


def rule_params(rules):
    return [pytest.param(r, id=r.id) for r in rules]


# ==================================================================================================
# Models and their exact reference pipelines (one sample at a time, flattened row-major)
# ==================================================================================================


@dataclasses.dataclass(frozen=True)
class Case:
    """A JAX function, its float inputs and cotangents, and the exact pipeline that explains one sample."""

    name: str
    fn: Callable
    x: list
    cts: tuple
    pipeline: Callable[[RuleCase, list[Fraction], list[Fraction], Case], Relevance]
    low: object = None
    high: object = None


def single_layer(layer: ref.Affine):
    def pipeline(rule, x, ct, case):
        y = layer.forward(x)
        return rule.relevance_in(layer, x, Relevance.initial(y, ct), case)

    return pipeline


def mlp_pipeline(first: ref.Affine, second: ref.Affine, relu_rule: str = "pass"):
    def pipeline(rule, x, ct, case):
        z1 = first.forward(x)
        h = ref.relu(z1)
        y = second.forward(h)
        r_h = rule.relevance_in(second, h, Relevance.initial(y, ct), case)
        if relu_rule == "gradient":  # only for checking that the cases tell Pass from the gradient
            r_h = Relevance(
                tuple(r if z > 0 else Fraction(0) for r, z in zip(r_h.values, z1, strict=True)),
                tuple(s if z > 0 else Fraction(0) for s, z in zip(r_h.scale, z1, strict=True)),
            )
        return rule.relevance_in(first, x, r_h, case)  # Pass: R_z1 = R_h

    return pipeline


def residual_pipeline(rule, x, ct, case):
    # y = L2(a + x), a = relu(L1(x)); Norm on a + x, Pass on the ReLU.
    a = ref.relu(MLP_1.forward(x))
    r = [ak + xk for ak, xk in zip(a, x, strict=True)]
    y = RES_2.forward(r)
    r_r = rule.relevance_in(RES_2, r, Relevance.initial(y, ct), case)
    r_a, r_skip = ref.add_norm(a, x, r_r)
    return rule.relevance_in(MLP_1, x, r_a, case) + r_skip


def two_branch_pipeline(rule, x, ct, case):
    # y = (x W + b) + (x W_alt + b_alt): Norm on the add of the two layer outputs.
    za, zb = DENSE.forward(x), DENSE_ALT.forward(x)
    y = [u + v for u, v in zip(za, zb, strict=True)]
    r_a, r_b = ref.add_norm(za, zb, Relevance.initial(y, ct))
    return rule.relevance_in(DENSE, x, r_a, case) + rule.relevance_in(DENSE_ALT, x, r_b, case)


def pool_pipeline(op: ref.Affine):
    def pipeline(rule, x, ct, case):
        f = op.forward(x, with_bias=False)
        return ref.propagate(ref.norm(op, x), Relevance.initial(f, ct), op.n_in)

    return pipeline


def conv_relu_pool_pipeline(rule, x, ct, case):
    z = CONV1.forward(x)
    h = ref.relu(z)
    p = SUM_POOL.forward(h, with_bias=False)
    r_h = ref.propagate(ref.norm(SUM_POOL, h), Relevance.initial(p, ct), SUM_POOL.n_in)
    return rule.relevance_in(CONV1, x, r_h, case)  # Pass on the ReLU


CT_DENSE = ((1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.5, -2.0))
CT_CONV1 = (
    [[1.0, 1.0]] * 4,
    [[0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [-0.5, 0.0]],  # only the two edge outputs, which see padding
)
CT_CONV2 = (
    [[[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]],
    [[[1.0, 0.0], [0.0, -1.0]], [[0.5, 0.0], [0.0, 2.0]]],
)
CT_POOL2 = ([[1.0, 1.0], [1.0, 1.0]], [[1.0, -0.5], [0.0, 2.0]])

DENSE_CASE = Case("dense", _dense_fn(W, B), X_DENSE, CT_DENSE, single_layer(DENSE), DENSE_LOW, DENSE_HIGH)
CONV_CASES = [
    Case("conv1d_same", _conv1_apply, X_CONV1, CT_CONV1, single_layer(CONV1), CONV_LOW, CONV_HIGH),
    Case("conv2d_stride2_pad1", _conv2_apply, X_CONV2, CT_CONV2, single_layer(CONV2), CONV2_LOW, CONV2_HIGH),
]
# The same layer with ZBox bounds given per position and channel, shape (4, 2) = one sample.
CONV_LOW_SAMPLE = [[-2.0, -1.5], [-1.0, -2.0], [-2.5, -1.0], [-1.5, -0.5]]
CONV_HIGH_SAMPLE = [[2.0, 2.5], [1.5, 1.0], [0.5, 3.0], [2.0, 1.5]]
CONV_SAMPLE_BOUNDS_CASE = Case(
    "conv1d_same_bounds_per_position",
    _conv1_apply,
    X_CONV1,
    CT_CONV1,
    single_layer(CONV1),
    CONV_LOW_SAMPLE,
    CONV_HIGH_SAMPLE,
)
NETWORK_CASES = [
    Case("mlp_dead_relu", _mlp_fn(W1, B1), X_DENSE, ((1.0, 1.0), (0.0, 1.0)), mlp_pipeline(MLP_1, MLP_2)),
    Case("mlp_dead_maximum", _mlp_maximum_fn, X_DENSE, ((1.0, 1.0),), mlp_pipeline(MLP_1, MLP_2)),
    Case("residual_add", _residual_fn, X_DENSE, ((1.0, 1.0), (1.0, -2.0)), residual_pipeline),
    Case("two_branch_add", _two_branch_fn, X_DENSE, ((1.0, 1.0), (0.0, 1.0)), two_branch_pipeline),
    Case("conv_relu_sumpool", _conv_relu_pool_fn, X_CONV1, CT_POOL2, conv_relu_pool_pipeline),
]
POOL_CASES = [
    Case("sum_pool", lambda x: _sum_pool(x, 2, 2), X_POOL, CT_POOL2, pool_pipeline(SUM_POOL)),
    Case(
        "sum_pool_overlap",
        lambda x: _sum_pool(x, 2, 1),
        X_POOL,
        ([[1.0, 1.0]] * 3, [[1.0, 0.0], [-1.0, 2.0], [0.0, 1.0]]),
        pool_pipeline(SUM_POOL_OVERLAP),
    ),
    Case(
        "avg_pool_flax",
        lambda x: nn.avg_pool(x, (2,), strides=(2,)),
        X_POOL,
        CT_POOL2,
        pool_pipeline(AVG_POOL),
    ),
    Case(
        "global_mean", lambda x: jnp.mean(x, axis=1), X_POOL, ((1.0, 1.0), (2.0, -1.0)), pool_pipeline(MEAN)
    ),
]
ZERO_CASES = [
    Case(
        "dense_zero_input",
        _dense_fn(W, B),
        [[0.0, 0.0, 0.0]],
        ((1.0, 1.0), (1.0, -2.0)),
        single_layer(DENSE),
        DENSE_LOW,
        DENSE_HIGH,
    ),
    Case(
        "dense_all_zero",
        _dense_fn(W, B_ZERO),
        [[0.0, 0.0, 0.0]],
        ((1.0, 1.0),),
        single_layer(DENSE_ZERO_BIAS),
        DENSE_LOW,
        DENSE_HIGH,
    ),
    Case(
        "dense_cancelling_terms",
        _dense_fn(W_CANCEL, B),
        X_CANCEL,
        ((1.0, 1.0), (0.5, -2.0)),
        single_layer(DENSE_CANCEL),
        DENSE_LOW,
        DENSE_HIGH,
    ),
    Case(
        "mlp_dead_layer",
        _mlp_fn(W1_DEAD, B1_DEAD),
        X_DEAD,
        ((1.0, 1.0), (1.0, -2.0)),
        mlp_pipeline(DEAD_1, MLP_2),
        DENSE_LOW,
        DENSE_HIGH,
    ),
    Case(
        "conv1d_zero_input",
        _conv1_apply,
        [[[0.0, 0.0]] * 4],
        CT_CONV1,
        single_layer(CONV1),
        CONV_LOW,
        CONV_HIGH,
    ),
]
ALL_CASES = [DENSE_CASE, *CONV_CASES, *NETWORK_CASES, *POOL_CASES, *ZERO_CASES]


def reference(case: Case, rule: RuleCase, ct) -> list[Relevance]:
    """Exact relevance of every sample of ``case.x`` for cotangent ``ct`` (the same for each sample)."""
    return [case.pipeline(rule, flat_fracs(sample), flat_fracs(ct), case) for sample in case.x]


def engine_relevance(dtd, case: Case, rule: RuleCase, ct) -> np.ndarray:
    f = dtd.transform(case.fn, rule.engine(case), argnums=0)
    x = jnp.asarray(f32(case.x))
    cot = jnp.asarray(f32(ct))[None]
    return np.asarray(jax.grad(lambda v: (f(v) * cot).sum())(x))


def assert_relevance(got: np.ndarray, want: list[Relevance], shape) -> None:
    """``got`` (float32, shape ``shape``) against the exact per-sample relevance ``want``."""
    assert got.shape == tuple(shape), (got.shape, shape)
    assert got.dtype == np.float32, got.dtype
    assert np.all(np.isfinite(got)), f"non-finite relevance:\n{got}"
    values = np.array([[float(v) for v in r.values] for r in want]).reshape(shape)
    scale = np.array([[float(v) for v in r.scale] for r in want]).reshape(shape)
    bound = RTOL * np.abs(values) + SCALE_TOL * scale + ATOL
    error = np.abs(got.astype(np.float64) - values)
    if np.any(error > bound):
        bad = [
            f"  {tuple(int(k) for k in idx)}: got {got[idx]!r}, want {values[idx]!r}, "
            f"allowed error {bound[idx]:.3g}"
            for idx in zip(*np.nonzero(error > bound), strict=True)
        ]
        raise AssertionError(
            "relevance differs from the exact reference:\n"
            + "\n".join(bad)
            + f"\ngot:\n{got}\nwant:\n{values}"
        )


def engine_relevances(dtd, case: Case, rule: RuleCase, cts) -> np.ndarray:
    """:func:`engine_relevance` for every cotangent of ``cts`` at once: one jitted program, the
    cotangents mapped with ``vmap`` (tests/test_properties.py checks vmap and jit against eager)."""
    f = dtd.transform(case.fn, rule.engine(case), argnums=0)
    x = jnp.asarray(f32(case.x))
    cots = jnp.stack([jnp.asarray(f32(ct)) for ct in cts])[:, None]
    return np.asarray(jax.jit(jax.vmap(lambda c: jax.grad(lambda v: (f(v) * c).sum())(x)))(cots))


def check(dtd, case: Case, rule: RuleCase, ct) -> None:
    """The engine, eagerly (no jit), against the exact reference for one cotangent."""
    got = engine_relevance(dtd, case, rule, ct)
    assert_relevance(got, reference(case, rule, ct), np.shape(f32(case.x)))


def check_all(dtd, case: Case, rule: RuleCase, cts) -> None:
    """:func:`check` for every cotangent of ``cts`` (one compiled program)."""
    for got, ct in zip(engine_relevances(dtd, case, rule, cts), cts, strict=True):
        assert_relevance(got, reference(case, rule, ct), np.shape(f32(case.x)))


# ==================================================================================================
# The reference itself: hand-computed values and conservation (no engine needed)
# ==================================================================================================


def _rule(kind, bounds=None, **params):
    return RuleCase(kind, tuple(params.items()), bounds)


def _dense_ref(rule, sample, ct):
    return DENSE_CASE.pipeline(rule, flat_fracs(X_DENSE[sample]), flat_fracs(ct), DENSE_CASE).values


def test_reference_hand_values():
    """Worked out by hand on sample 0, x = (1, -2, 0): z = (1 + 3 + 1/2, -1/2 - 4 - 1) = (9/2, -11/2)."""
    e = Fraction(1, 10**6)
    # Epsilon(1), ct = (1, 1): R = z, s = (9/2 / (11/2), (-11/2) / (-13/2)) = (9/11, 11/13);
    # R_0 = 1 (9/11 - 1/2 11/13) = 113/286, R_1 = -2 (-3/2 9/11 + 2 11/13) = -133/143, R_2 = 0.
    want = (Fraction(113, 286), Fraction(-133, 143), 0)
    assert _dense_ref(_rule("Epsilon", epsilon=1.0), 0, (1.0, 1.0)) == want
    # ZPlus, ct = (1, 0): zhat_0 = x+ w+ + x- w- + b+ = 1 + 3 + 1/2, s_0 = (9/2) / (9/2 + e);
    # R = (1 * 1 s_0, (-2)(-3/2) s_0, 0): the bias takes its share 1/2 of the 9/2.
    s0 = Fraction(9, 2) / (Fraction(9, 2) + e)
    assert _dense_ref(_rule("ZPlus"), 0, (1.0, 0.0)) == (s0, 3 * s0, 0)
    # ZPlus, ct = (0, 1): zhat_1 = 0 (x_0 > 0 meets w < 0, x_1 < 0 meets w > 0, b < 0): nothing passes.
    assert _dense_ref(_rule("ZPlus"), 0, (0.0, 1.0)) == (0, 0, 0)
    # AlphaBeta(2, 1), ct = (0, 1), R_1 = -11/2: zp_1 = 0 (as above), zn_1 = 1(-1/2) + (-2)(2) + (-1) = -11/2;
    # R = -1 * [x+ w- , x- w+] R_1 / stab(zn_1) = -(-1/2, -4, 0) (-11/2) / (-11/2 - e).
    sn = Fraction(-11, 2) / (Fraction(-11, 2) - e)
    assert _dense_ref(_rule("AlphaBeta", alpha=2.0, beta=1.0), 0, (0.0, 1.0)) == (sn / 2, 4 * sn, 0)
    # Flat, ct = (1, 1): every output has 3 taps (the zero weight counts):
    # R_i = 9/2 / (3 + e) - 11/2 / (3 + e).
    flat = (Fraction(9, 2) - Fraction(11, 2)) / (3 + e)
    assert _dense_ref(_rule("Flat"), 0, (1.0, 1.0)) == (flat, flat, flat)
    # WSquare, ct = (1, 0): zhat_0 = 1 + 9/4 + 1/4 + b^2 = 1/4 -> 15/4; R_i = w_i0^2 (9/2) / (15/4 + e).
    d = Fraction(15, 4) + e
    r0 = Fraction(9, 2)
    want = (r0 / d, Fraction(9, 4) * r0 / d, Fraction(1, 4) * r0 / d)
    assert _dense_ref(_rule("WSquare"), 0, (1.0, 0.0)) == want
    # ZBox(-2, 2), ct = (1, 0): zhat_0 = x.w - l.w+ - h.w- = 4 - (-2)(3/2) - 2(-3/2) = 10;
    # R_0 = (1 - (-2)) 1 s, R_1 = (-2 - 2)(-3/2) s, R_2 = (0 + 2)(1/2) s with s = (9/2) / (10 + e).
    s = Fraction(9, 2) / (10 + e)
    assert _dense_ref(_rule("ZBox", "scalar"), 0, (1.0, 0.0)) == (3 * s, 6 * s, s)
    # Gamma(1), ct = (1, 0), z_0 > 0: wu = w + w+ = (2, -3/2, 1);
    # zu = 1*2 + (-2)(w + w- = -3) + 0 + (b + b+ = 1) = 9;
    # R = (1 * 2, (-2)(-3), 0) (9/2) / (9 + e).
    s = Fraction(9, 2) / (9 + e)
    assert _dense_ref(_rule("Gamma", gamma=1.0), 0, (1.0, 0.0)) == (2 * s, 6 * s, 0)


def test_reference_conv_counts_only_in_bounds_taps():
    """Flat on the SAME 1-D conv: edge outputs see 2 taps x 2 channels, inner ones 3 x 2."""
    counts = [0] * CONV1.n_out
    for _, j, _ in CONV1.taps:
        counts[j] += 1
    assert counts == [4, 4, 6, 6, 6, 6, 4, 4]
    counts2 = [0] * CONV2.n_out
    for _, j, _ in CONV2.taps:
        counts2[j] += 1
    assert counts2 == [2, 2, 4, 4, 4, 4, 8, 8]
    # ZBox bounds reach only real inputs: with x = 0 and the edge output (w=0, o=0), the taps are k=1, 2 only.
    rule = _rule("ZBox", "array")
    x = [Fraction(0)] * 8
    contrib = rule.contributions(CONV1, x, CONV_CASES[0])
    inputs_of_edge = {i for i, j, c in contrib if j == 0}
    assert inputs_of_edge == {0, 1, 2, 3}


def _column_sums(contributions, n_out):
    sums = [Fraction(0)] * n_out
    for _, j, c in contributions:
        sums[j] += c
    return sums


CONSERVING = [
    _rule("Epsilon", epsilon=1e-6, zero_bias=True),
    _rule("ZPlus", zero_bias=True),
    _rule("Gamma", gamma=0.25, zero_bias=True),
    _rule("Gamma", gamma=1.0, zero_bias=True),
    _rule("ZBox", "scalar"),
    _rule("ZBox", "array"),
    _rule("WSquare", zero_bias=True),
    _rule("Flat"),
]


@pytest.mark.parametrize("rule", rule_params(CONSERVING))
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in (DENSE_CASE, *CONV_CASES)])
def test_reference_conserves_without_bias(case, rule):
    """Without bias each output passes on zhat/stab(zhat) of its relevance: 1 up to eps, or 0 if zhat = 0."""
    layer = {"dense": DENSE, "conv1d_same": CONV1, "conv2d_stride2_pad1": CONV2}[case.name]
    seen_one = False
    for sample in case.x:
        sums = _column_sums(rule.contributions(layer, flat_fracs(sample), case), layer.n_out)
        for total in sums:
            assert total == 0 or abs(total - 1) < Fraction(1, 10**5), total
            seen_one |= total != 0
    assert seen_one


@pytest.mark.parametrize("alpha,beta", [(2.0, 1.0), (1.0, 0.0), (3.0, 2.0)])
def test_reference_alpha_beta_conserves(alpha, beta):
    """Without bias: alpha - beta = 1 where zp, zn are non-zero, alpha or -beta where one branch is empty."""
    rule = _rule("AlphaBeta", alpha=alpha, beta=beta, zero_bias=True)
    totals = []
    for sample in X_DENSE:
        totals += _column_sums(rule.contributions(DENSE, flat_fracs(sample), DENSE_CASE), DENSE.n_out)
    allowed = {1, q(alpha), -q(beta), 0}
    for total in totals:
        assert min(abs(total - a) for a in allowed) < Fraction(1, 10**5), total
    assert sum(abs(t - 1) < Fraction(1, 10**5) for t in totals) >= 3


def test_reference_epsilon_zero_bias_conserves_whole_layer():
    """Sum of input relevance = sum_j R_j zhat_j / stab(zhat_j) exactly; within eps of sum_j R_j."""
    e = Fraction(1, 10**6)
    rule = _rule("Epsilon", epsilon=1e-6, zero_bias=True)
    for sample in X_DENSE:
        x = flat_fracs(sample)
        y = DENSE.forward(x)
        r_out = Relevance.initial(y, flat_fracs((1.0, 1.0)))
        total = rule.relevance_in(DENSE, x, r_out, DENSE_CASE).total()
        zhat = DENSE.forward(x, with_bias=False)
        assert total == sum(r * z / ref.stab(z, e) for r, z in zip(r_out.values, zhat, strict=True))
        assert all(zhat)
        assert abs(total - r_out.total()) <= sum(abs(r) for r in r_out.values) * e / min(abs(z) for z in zhat)


@pytest.mark.parametrize("rule", rule_params([_rule("WSquare"), _rule("Flat"), _rule("ZBox", "scalar")]))
def test_reference_pass_differs_from_gradient(rule):
    """The MLP cases tell Pass from the gradient: relevance reaches the dead unit and goes on through it."""
    case = NETWORK_CASES[0]
    ct = flat_fracs((1.0, 1.0))
    for sample in case.x:
        x = flat_fracs(sample)
        h = ref.relu(MLP_1.forward(x))
        r_h = rule.relevance_in(MLP_2, h, Relevance.initial(MLP_2.forward(h), ct), case)
        assert r_h.values[2] != 0  # the dead unit receives relevance
        with_pass = mlp_pipeline(MLP_1, MLP_2)(rule, x, ct, case).values
        with_gradient = mlp_pipeline(MLP_1, MLP_2, relu_rule="gradient")(rule, x, ct, case).values
        assert with_pass != with_gradient


def test_reference_zero_cases_reach_eps():
    """The cancelling case really divides non-zero terms by eps (values ~1e6): Epsilon without bias, ZBox."""
    case = ZERO_CASES[2]
    for rule in (_rule("Epsilon", epsilon=1e-6, zero_bias=True), _rule("ZBox", "scalar")):
        values = reference(case, rule, (1.0, 1.0))[0].values
        assert max(abs(v) for v in values) > 10**5, (rule.id, values)


# ==================================================================================================
# The engine against the reference
# ==================================================================================================


@pytest.mark.parametrize("rule", rule_params(RULES))
def test_dense(dtd, rule):
    """``x @ W + b`` with every rule and hyper-parameter, several cotangents."""
    check_all(dtd, DENSE_CASE, rule, CT_DENSE)


@pytest.mark.parametrize("rule", rule_params(RULES))
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CONV_CASES])
def test_conv_padding(dtd, case, rule):
    """Padded convolutions: Flat/WSquare count in-bounds taps only, ZBox bounds apply to real inputs only."""
    check_all(dtd, case, rule, case.cts)


@pytest.mark.parametrize("rule", rule_params([r for r in RULES if r.bounds == "array"]))
def test_conv_zbox_bounds_per_position(dtd, rule):
    """ZBox bounds of the shape of one sample (4, 2): each input has its own low/high; padding gets none."""
    for ct in CONV_SAMPLE_BOUNDS_CASE.cts:
        check(dtd, CONV_SAMPLE_BOUNDS_CASE, rule, ct)


@pytest.mark.parametrize("rule", rule_params(RULES_SCALAR))
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in NETWORK_CASES])
def test_network(dtd, case, rule):
    """Two layers: Pass on ReLU (also at dead units), Norm on the add of two data values and on sum pools."""
    check_all(dtd, case, rule, case.cts)


@pytest.mark.parametrize("rule", rule_params([_rule("Epsilon"), _rule("ZPlus"), _rule("Flat")]))
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in POOL_CASES])
def test_pooling_norm(dtd, case, rule):
    """Sum/average pooling and a global mean get Norm whatever the layer rule:
    ``R_i = x_i sum_j df_j/dx_i R_j / stab(f_j)``."""
    for ct in case.cts:
        check(dtd, case, rule, ct)


# A window whose sum is tiny (2^-10): here it matters that Norm stabilizes the pooling *output* f_j
# (the mean), as rules.md and zennit's Norm on AvgPool do:
# R_i = x_i (1/n) R / stab(mean) = x_i R / (sum + n eps sgn),
# not x_i R / stab(sum).  The two differ by ~(n - 1) eps / |sum| = 1e-3 relative here.
X_TINY_SUM = [[[1.0], [-1.0 + 2.0**-10]]]
TINY_SUM_CASES = [
    Case(
        "avg_pool_flax_tiny_sum",
        lambda x: nn.avg_pool(x, (2,), strides=(2,)),
        X_TINY_SUM,
        ([[1024.0]],),
        pool_pipeline(ref.pool(2, 1, window=2, stride=2, weight=Fraction(1, 2))),
    ),
    Case(
        "global_mean_tiny_sum",
        lambda x: jnp.mean(x, axis=1),
        X_TINY_SUM,
        ((1024.0,),),
        pool_pipeline(ref.mean_over_space(2, 1)),
    ),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in TINY_SUM_CASES])
def test_average_norm_stabilizes_the_mean(dtd, case):
    """Exact values (checked against zennit's Norm on AvgPool1d): (510.9535..., -510.4545...)."""
    check(dtd, case, RULES[0], case.cts[0])


@pytest.mark.parametrize("rule", rule_params(RULES))
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in ZERO_CASES])
def test_zero_denominators(dtd, case, rule):
    """All-zero input, all-zero output, cancelling terms and a dead layer: finite, and the exact value."""
    check_all(dtd, case, rule, case.cts)


FORWARD_RULES = [
    _rule("Epsilon"),
    _rule("ZPlus"),
    _rule("AlphaBeta", alpha=2.0, beta=1.0),
    _rule("Gamma"),
    _rule("ZBox", "scalar"),
    _rule("WSquare"),
    _rule("Flat"),
]


@pytest.mark.parametrize("rule", rule_params(FORWARD_RULES))
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in ALL_CASES])
def test_forward_values_unchanged(dtd, case, rule):
    """``transform(fn, rule)`` computes exactly ``fn``'s values."""
    x = jnp.asarray(f32(case.x))
    f = dtd.transform(case.fn, rule.engine(case), argnums=0)
    np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(case.fn(x)))


@pytest.mark.parametrize("rule", rule_params([_rule("Epsilon", epsilon=0.25), _rule("ZPlus"), _rule("Flat")]))
@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.name) for c in (DENSE_CASE, CONV_CASES[0], NETWORK_CASES[2])]
)
def test_jit_matches_reference(dtd, case, rule):
    """The relevance pass is an ordinary JAX function: under ``jit`` it gives the same exact values."""
    f = dtd.transform(case.fn, rule.engine(case), argnums=0)
    x = jnp.asarray(f32(case.x))
    ct = case.cts[0]
    cot = jnp.asarray(f32(ct))[None]
    got = np.asarray(jax.jit(jax.grad(lambda v: (f(v) * cot).sum()))(x))
    assert_relevance(got, reference(case, rule, ct), x.shape)
