"""An independent reference for affine rules, built from the explicit Jacobian (as zennit's tests do).

Any linear map (dense, conv of any dimension, stride, padding, dilation, groups) is a matrix ``M``
with ``A(x) = x @ M`` on the flattened input; each entry of ``M`` is one kernel entry, so the
modified weights are entry-wise: ``M+ = max(M, 0)``, ``M^2``, and for Flat the matrix of the
ones-kernel (the in-bounds taps).  The rules below are rules.md written out in float64 numpy.
"""

from __future__ import annotations

import numpy as np


def stab(z, eps):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def div(r, d):
    return np.where(d == 0, 0.0, r / np.where(d == 0, 1.0, d))


def relevance(
    rule: str,
    x,
    M,
    b,
    R,
    *,
    M_ones=None,
    eps=1e-6,
    alpha=2.0,
    beta=1.0,
    gamma=0.25,
    low=None,
    high=None,
    zero_bias=False,
):
    """Input relevance (flattened) of ``z = x @ M + b`` receiving relevance ``R`` (flattened)."""
    x, M, R = (np.asarray(a, np.float64) for a in (x, M, R))
    full_b = np.zeros(M.shape[1]) if b is None else np.asarray(b, np.float64)
    b = np.zeros(M.shape[1]) if zero_bias else full_b
    xp, xn = np.maximum(x, 0), np.minimum(x, 0)
    Mp, Mn = np.maximum(M, 0), np.minimum(M, 0)
    bp, bn = np.maximum(b, 0), np.minimum(b, 0)
    if rule == "epsilon":
        s = div(R, stab(x @ M + b, eps))
        return x * (M @ s)
    if rule == "zplus":
        s = div(R, stab(xp @ Mp + xn @ Mn + bp, eps))
        return xp * (Mp @ s) + xn * (Mn @ s)
    if rule == "alphabeta":
        sp = div(R, stab(xp @ Mp + xn @ Mn + bp, eps))
        sn = div(R, stab(xp @ Mn + xn @ Mp + bn, eps))
        return alpha * (xp * (Mp @ sp) + xn * (Mn @ sp)) - beta * (xp * (Mn @ sn) + xn * (Mp @ sn))
    if rule == "gamma":
        Mu, Md = M + gamma * Mp, M + gamma * Mn
        z = x @ M + full_b  # masks use the original output, bias included
        zu = xp @ Mu + xn @ Md + b + gamma * bp
        zd = xp @ Md + xn @ Mu + b + gamma * bn
        su = (z > 0) * div(R, stab(zu, eps))
        sd = (z < 0) * div(R, stab(zd, eps))
        return xp * (Mu @ su) + xn * (Md @ su) + xp * (Md @ sd) + xn * (Mu @ sd)
    if rule == "zbox":
        lo = np.broadcast_to(np.asarray(low, np.float64), x.shape)
        hi = np.broadcast_to(np.asarray(high, np.float64), x.shape)
        s = div(R, stab(x @ M - lo @ Mp - hi @ Mn, eps))
        return x * (M @ s) - lo * (Mp @ s) - hi * (Mn @ s)
    if rule == "wsquare":
        s = div(R, stab(np.ones_like(x) @ (M * M) + b * b, eps))
        return (M * M) @ s
    if rule == "flat":
        s = div(R, stab(np.ones_like(x) @ M_ones, eps))
        return M_ones @ s
    raise ValueError(rule)
