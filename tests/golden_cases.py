"""The composite for every case name of the zennit golden files (tests/reference/generate_golden*.py).

Bounds of the box rules are those the generators use: [-4, 4]. The case with per-pixel ZBox bounds
(``zbox_array_first_epsilon``) reads them from its golden file (see ``test_golden.case_composite``).
"""

from __future__ import annotations

from jaxdtd import composites as C
from jaxdtd import rules as R

LOW, HIGH = -4.0, 4.0

CASE_COMPOSITES = {
    "epsilon": R.Epsilon(1e-6),
    "epsilon_0.25": R.Epsilon(0.25),
    "epsilon_nobias": R.Epsilon(1e-6, zero_bias=True),
    "zplus": R.ZPlus(),
    "zplus_nobias": R.ZPlus(zero_bias=True),
    "alphabeta_2_1": R.AlphaBeta(2.0, 1.0),
    "alphabeta_1_0": R.AlphaBeta(1.0, 0.0),
    "gamma_0.25": R.Gamma(0.25),
    "gamma_1": R.Gamma(1.0),
    "gamma_nobias": R.Gamma(0.25, zero_bias=True),
    "wsquare": R.WSquare(),
    "wsquare_nobias": R.WSquare(zero_bias=True),
    "flat": R.Flat(),
    "zbox_first_epsilon": C.Composite(first=R.ZBox(LOW, HIGH), dense=R.Epsilon(), conv=R.Epsilon()),
    "EpsilonPlus": C.EpsilonPlus(),
    "EpsilonPlusFlat": C.EpsilonPlusFlat(),
    "EpsilonAlpha2Beta1": C.EpsilonAlpha2Beta1(),
    "EpsilonAlpha2Beta1Flat": C.EpsilonAlpha2Beta1Flat(),
    "EpsilonGammaBox": C.EpsilonGammaBox(LOW, HIGH),
    "DeepTaylor": C.DeepTaylor(),
    "DeepTaylorBox": C.DeepTaylor(LOW, HIGH),
}
