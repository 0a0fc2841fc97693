"""Exact reference for the relevance rules of ``reference/rules.md``, in pure Python fractions.

Nothing here touches JAX or NumPy: an affine layer is written out as its list of *taps*
``(i, j, w_ij)`` (input ``i`` of one sample feeds output ``j`` with weight ``w_ij``) plus one bias per
output, and every rule is an explicit double sum over those taps.  A convolution becomes taps by
plain loops over output positions and kernel offsets, keeping only the offsets that land on a real
input: padding contributes no tap at all, which is exactly why Flat and WSquare count only in-bounds
taps and why ZBox's bounds never reach padded positions.

A rule is written as its *relevance matrix*: a list of contributions ``(i, j, c)`` with
``R_i = sum c * R_j``.  The coefficients depend only on forward values, so the same contributions also
give an error scale ``sum |c| * scale_j``: the size of the terms a float32 implementation adds up, which
bounds its rounding error when terms cancel.  Branches are kept as separate contributions so that a
cancellation between branches shows up in the scale.

All arithmetic is in :class:`fractions.Fraction`; the stabilizer is exact too:
``stab(z) = z + eps * sgn(z)`` with ``sgn(0) = +1`` (rules.md, "Convention").
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "q",
    "sgn",
    "stab",
    "pos",
    "neg",
    "Affine",
    "Relevance",
    "dense",
    "conv",
    "pool",
    "mean_over_space",
    "epsilon",
    "zplus",
    "alpha_beta",
    "gamma",
    "zbox",
    "wsquare",
    "flat",
    "norm",
    "propagate",
    "add_norm",
    "relu",
]

Contributions = list[tuple[int, int, Fraction]]


def q(value) -> Fraction:
    """Exact fraction of ``value``.

    Floats go through their decimal ``repr`` so that hyper-parameters such as ``1e-6`` or ``0.25`` mean the
    decimal number a reader sees (``Fraction(1, 10**6)``), not float64's nearest binary value.  Strings
    such as ``"-3/2"`` are accepted for data.
    """
    if isinstance(value, Fraction):
        return value
    if isinstance(value, bool):
        raise TypeError("refusing to read a bool as a number")
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        return Fraction(repr(value))
    if isinstance(value, str):
        return Fraction(value)
    raise TypeError(f"cannot read {value!r} as an exact number")


def sgn(z: Fraction) -> int:
    """Sign with ``sgn(0) = +1``, as zennit's stabilizer."""
    return 1 if z >= 0 else -1


def stab(z: Fraction, eps: Fraction) -> Fraction:
    """``z + eps * sgn(z)``; never zero for ``eps > 0``."""
    return z + eps * sgn(z)


def pos(v: Fraction) -> Fraction:
    return v if v > 0 else Fraction(0)


def neg(v: Fraction) -> Fraction:
    return v if v < 0 else Fraction(0)


@dataclass(frozen=True)
class Affine:
    """``z_j = sum_{(i, j, w) in taps} x_i w + bias_j`` for one sample, inputs and outputs flattened."""

    n_in: int
    n_out: int
    taps: tuple[tuple[int, int, Fraction], ...]
    bias: tuple[Fraction, ...]

    def __post_init__(self):
        assert len(self.bias) == self.n_out, "one bias per output"
        assert all(0 <= i < self.n_in and 0 <= j < self.n_out for i, j, _ in self.taps)

    def forward(self, x: Sequence[Fraction], with_bias: bool = True) -> list[Fraction]:
        assert len(x) == self.n_in
        z = [b if with_bias else Fraction(0) for b in self.bias]
        for i, j, w in self.taps:
            z[j] += x[i] * w
        return z


@dataclass(frozen=True)
class Relevance:
    """Exact relevance values and the float error scale that goes with them (see module docstring)."""

    values: tuple[Fraction, ...]
    scale: tuple[Fraction, ...]

    @classmethod
    def initial(cls, y: Sequence[Fraction], ct: Sequence[Fraction]) -> Relevance:
        """``R_out = y * ct`` (rules.md, "Convention")."""
        values = tuple(yj * cj for yj, cj in zip(y, ct, strict=True))
        return cls(values, tuple(abs(v) for v in values))

    def __add__(self, other: Relevance) -> Relevance:
        return Relevance(
            tuple(a + b for a, b in zip(self.values, other.values, strict=True)),
            tuple(a + b for a, b in zip(self.scale, other.scale, strict=True)),
        )

    def total(self) -> Fraction:
        return sum(self.values, Fraction(0))


# --------------------------------------------------------------------------------------------------
# Layers as taps
# --------------------------------------------------------------------------------------------------


def dense(weight: Sequence[Sequence], bias: Sequence) -> Affine:
    """``x @ W + b`` with ``W`` of shape ``(in, out)``: every input feeds every output."""
    n_in, n_out = len(weight), len(bias)
    taps = tuple((i, j, q(weight[i][j])) for i in range(n_in) for j in range(n_out))
    return Affine(n_in, n_out, taps, tuple(q(v) for v in bias))


def _index(position: Sequence[int], shape: Sequence[int], channel: int, channels: int) -> int:
    """Row-major flat index of ``(*position, channel)`` in an array of shape ``(*shape, channels)``."""
    flat = 0
    for p, n in zip(position, shape, strict=True):
        flat = flat * n + p
    return flat * channels + channel


def _nested_shape(nested, depth: int) -> list[int]:
    shape = []
    for _ in range(depth):
        shape.append(len(nested))
        nested = nested[0]
    return shape


def _nested_get(nested, index: Sequence[int]):
    for k in index:
        nested = nested[k]
    return nested


def conv(
    in_spatial: Sequence[int],
    kernel,
    bias: Sequence,
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
) -> Affine:
    """Channels-last convolution (``NWC``/``NHWC`` input, ``WIO``/``HWIO`` kernel) of one sample.

    ``kernel`` is a nested list indexed ``[k_1]...[k_d][c_in][c_out]``; ``padding`` is ``(low, high)`` per
    spatial dimension.  Output position ``o`` reads input position ``o * stride + k - low``; offsets that
    fall outside the input read padding and produce no tap.
    """
    d = len(in_spatial)
    k_spatial = _nested_shape(kernel, d)
    c_in = len(_nested_get(kernel, [0] * d))
    c_out = len(bias)
    out_spatial = [
        (n + lo + hi - k) // s + 1
        for n, k, s, (lo, hi) in zip(in_spatial, k_spatial, strides, padding, strict=True)
    ]
    taps = []
    for out_pos in itertools.product(*(range(n) for n in out_spatial)):
        for k_pos in itertools.product(*(range(k) for k in k_spatial)):
            in_pos = [
                o * s + k - lo for o, k, s, (lo, _) in zip(out_pos, k_pos, strides, padding, strict=True)
            ]
            if any(not 0 <= p < n for p, n in zip(in_pos, in_spatial, strict=True)):
                continue  # a padded position: no input, no tap
            for c in range(c_in):
                for o in range(c_out):
                    w = q(_nested_get(kernel, [*k_pos, c, o]))
                    i = _index(in_pos, in_spatial, c, c_in)
                    taps.append((i, _index(out_pos, out_spatial, o, c_out), w))
    n_in = c_in
    for n in in_spatial:
        n_in *= n
    n_out = c_out
    for n in out_spatial:
        n_out *= n
    # one bias per output channel, repeated at every output position (channels last)
    return Affine(n_in, n_out, tuple(taps), tuple(q(bias[j % c_out]) for j in range(n_out)))


def pool(length: int, channels: int, window: int, stride: int, weight=1) -> Affine:
    """1-D sum pooling (``weight=1``) or average pooling (``weight=1/window``), ``VALID``, per channel."""
    n_out = (length - window) // stride + 1
    taps = tuple(
        ((o * stride + k) * channels + c, o * channels + c, q(weight))
        for o in range(n_out)
        for k in range(window)
        for c in range(channels)
    )
    return Affine(length * channels, n_out * channels, taps, (Fraction(0),) * (n_out * channels))


def mean_over_space(length: int, channels: int) -> Affine:
    """``x.mean(axis=spatial)`` of a ``(length, channels)`` sample: output ``c`` averages channel ``c``."""
    taps = tuple((p * channels + c, c, Fraction(1, length)) for p in range(length) for c in range(channels))
    return Affine(length * channels, channels, taps, (Fraction(0),) * channels)


# --------------------------------------------------------------------------------------------------
# Rules for affine layers, as contributions (i, j, c): R_i = sum c * R_j
# --------------------------------------------------------------------------------------------------


def _per_output(layer: Affine, term) -> list[Fraction]:
    """``sum_i term(i, j, w)`` for every output ``j``."""
    total = [Fraction(0)] * layer.n_out
    for i, j, w in layer.taps:
        total[j] += term(i, j, w)
    return total


def _bias(layer: Affine, zero_bias: bool) -> tuple[Fraction, ...]:
    return (Fraction(0),) * layer.n_out if zero_bias else layer.bias


def epsilon(layer: Affine, x, epsilon=1e-6, zero_bias=False) -> Contributions:
    """``zhat_j = sum_i x_i w_ij + b_j``; ``R_i = x_i sum_j w_ij R_j / stab(zhat_j)``, stab by ``epsilon``."""
    eps, b = q(epsilon), _bias(layer, zero_bias)
    z = _per_output(layer, lambda i, j, w: x[i] * w)
    denom = [stab(z[j] + b[j], eps) for j in range(layer.n_out)]
    return [(i, j, x[i] * w / denom[j]) for i, j, w in layer.taps]


def zplus(layer: Affine, x, stabilizer=1e-6, zero_bias=False) -> Contributions:
    """``zhat_j = sum_i (x+ w+ + x- w-) + b+_j``; ``R_i = x+_i sum_j w+ s_j + x-_i sum_j w- s_j``."""
    eps, b = q(stabilizer), _bias(layer, zero_bias)
    z = _per_output(layer, lambda i, j, w: pos(x[i]) * pos(w) + neg(x[i]) * neg(w))
    denom = [stab(z[j] + pos(b[j]), eps) for j in range(layer.n_out)]
    out = []
    for i, j, w in layer.taps:
        out.append((i, j, pos(x[i]) * pos(w) / denom[j]))
        out.append((i, j, neg(x[i]) * neg(w) / denom[j]))
    return out


def alpha_beta(layer: Affine, x, alpha=2.0, beta=1.0, stabilizer=1e-6, zero_bias=False) -> Contributions:
    """``alpha [x+ w+ + x- w-] / stab(zp) - beta [x+ w- + x- w+] / stab(zn)`` per tap, with
    ``zp_j = sum_i (x+ w+ + x- w-) + b+_j`` and ``zn_j = sum_i (x+ w- + x- w+) + b-_j``."""
    a, bt, eps, b = q(alpha), q(beta), q(stabilizer), _bias(layer, zero_bias)
    zp = _per_output(layer, lambda i, j, w: pos(x[i]) * pos(w) + neg(x[i]) * neg(w))
    zn = _per_output(layer, lambda i, j, w: pos(x[i]) * neg(w) + neg(x[i]) * pos(w))
    dp = [stab(zp[j] + pos(b[j]), eps) for j in range(layer.n_out)]
    dn = [stab(zn[j] + neg(b[j]), eps) for j in range(layer.n_out)]
    out = []
    for i, j, w in layer.taps:
        out.append((i, j, a * pos(x[i]) * pos(w) / dp[j]))
        out.append((i, j, a * neg(x[i]) * neg(w) / dp[j]))
        out.append((i, j, -bt * pos(x[i]) * neg(w) / dn[j]))
        out.append((i, j, -bt * neg(x[i]) * pos(w) / dn[j]))
    return out


def gamma(layer: Affine, x, gamma=0.25, stabilizer=1e-6, zero_bias=False) -> Contributions:
    """Generalized Gamma (zennit).  With ``wu = w + g w+``, ``wd = w + g w-``:
    ``zu_j = sum_i (x+ wu + x- wd) + b + g b+``, ``zd_j = sum_i (x+ wd + x- wu) + b + g b-``;
    outputs with ``z_j > 0`` (original ``z``, bias included, whatever ``zero_bias``) use ``zu``, outputs
    with ``z_j < 0`` use ``zd``, outputs with ``z_j = 0`` pass nothing."""
    g, eps, b = q(gamma), q(stabilizer), _bias(layer, zero_bias)

    def wu(w):
        return w + g * pos(w)

    def wd(w):
        return w + g * neg(w)

    z = layer.forward(x, with_bias=True)
    zu = _per_output(layer, lambda i, j, w: pos(x[i]) * wu(w) + neg(x[i]) * wd(w))
    zd = _per_output(layer, lambda i, j, w: pos(x[i]) * wd(w) + neg(x[i]) * wu(w))
    du = [stab(zu[j] + b[j] + g * pos(b[j]), eps) for j in range(layer.n_out)]
    dd = [stab(zd[j] + b[j] + g * neg(b[j]), eps) for j in range(layer.n_out)]
    out = []
    for i, j, w in layer.taps:
        if z[j] > 0:
            out.append((i, j, pos(x[i]) * wu(w) / du[j]))
            out.append((i, j, neg(x[i]) * wd(w) / du[j]))
        elif z[j] < 0:
            out.append((i, j, pos(x[i]) * wd(w) / dd[j]))
            out.append((i, j, neg(x[i]) * wu(w) / dd[j]))
    return out


def zbox(layer: Affine, x, low, high, stabilizer=1e-6, zero_bias=False) -> Contributions:
    """``zhat_j = sum_i (x_i w_ij - l_i w+_ij - h_i w-_ij)`` (the bias cancels, so ``zero_bias`` changes
    nothing); ``R_i = sum_j (x_i w_ij - l_i w+_ij - h_i w-_ij) s_j``.  ``low``, ``high``: one value per input.
    """
    del zero_bias  # b - b+ - b- = 0
    eps = q(stabilizer)
    z = _per_output(layer, lambda i, j, w: x[i] * w - low[i] * pos(w) - high[i] * neg(w))
    denom = [stab(zj, eps) for zj in z]
    out = []
    for i, j, w in layer.taps:
        out.append((i, j, x[i] * w / denom[j]))
        out.append((i, j, -low[i] * pos(w) / denom[j]))
        out.append((i, j, -high[i] * neg(w) / denom[j]))
    return out


def wsquare(layer: Affine, x, stabilizer=1e-6, zero_bias=False) -> Contributions:
    """``zhat_j = sum_{i -> j} w_ij^2 + b_j^2``; ``R_i = sum_j w_ij^2 s_j`` (independent of ``x``)."""
    del x
    eps, b = q(stabilizer), _bias(layer, zero_bias)
    z = _per_output(layer, lambda i, j, w: w * w)
    denom = [stab(z[j] + b[j] * b[j], eps) for j in range(layer.n_out)]
    return [(i, j, w * w / denom[j]) for i, j, w in layer.taps]


def flat(layer: Affine, x, stabilizer=1e-6) -> Contributions:
    """``zhat_j`` = number of taps into ``j`` (zero weights count: zennit sets every weight to one); bias
    always dropped; ``R_i = sum_{j connected to i} s_j``."""
    del x
    eps = q(stabilizer)
    count = _per_output(layer, lambda i, j, w: Fraction(1))
    return [(i, j, 1 / stab(count[j], eps)) for i, j, _ in layer.taps]


def norm(op: Affine, x, stabilizer=1e-6) -> Contributions:
    """Norm for a parameter-free linear op ``f`` (pooling, mean):
    ``R_i = x_i sum_j (df_j/dx_i) R_j / stab(f_j)``."""
    eps = q(stabilizer)
    f = op.forward(x, with_bias=False)
    return [(i, j, x[i] * d / stab(f[j], eps)) for i, j, d in op.taps]


def propagate(contributions: Contributions, relevance: Relevance, n_in: int) -> Relevance:
    """``R_i = sum c R_j``, with scale ``sum |c| scale_j``."""
    values = [Fraction(0)] * n_in
    scale = [Fraction(0)] * n_in
    for i, j, c in contributions:
        values[i] += c * relevance.values[j]
        scale[i] += abs(c) * relevance.scale[j]
    return Relevance(tuple(values), tuple(scale))


# --------------------------------------------------------------------------------------------------
# Parameter-free operations
# --------------------------------------------------------------------------------------------------


def relu(z: Sequence[Fraction]) -> list[Fraction]:
    return [pos(v) for v in z]


def add_norm(a, b, relevance: Relevance, stabilizer=1e-6) -> tuple[Relevance, Relevance]:
    """Norm on ``a + b`` of two data values: ``R_a = a R / stab(a + b)``, ``R_b = b R / stab(a + b)``."""
    eps = q(stabilizer)
    n = len(a)
    d = [stab(a[k] + b[k], eps) for k in range(n)]
    ra = propagate([(k, k, a[k] / d[k]) for k in range(n)], relevance, n)
    rb = propagate([(k, k, b[k] / d[k]) for k in range(n)], relevance, n)
    return ra, rb
