"""Hand-worked values and values at initialization of the functions of the margin (prefopt/losses/margin_functions.py).

On the hand record (tests/loss_records.py) r_w = [1, -1, 1], r_l = [0, 1, -2], h = [1, -2, 3]; with beta = 0.5,
beta h = [0.5, -1, 1.5]. At initialization every r and h is 0.
"""

from __future__ import annotations

import math

from loss_records import H, L, LN2, R_L, R_W, _const, sig

E = math.e
Z = [0.5 * h for h in H]  # beta h with beta = 0.5: [0.5, -1, 1.5]
# chi-PO: phi(exp r) = exp(r) + r; phi_w = [e + 1, 1/e - 1, e + 1], phi_l = [1, e + 1, e^-2 - 2]
PHI_W = [math.exp(r) + r for r in R_W]
PHI_L = [math.exp(r) + r for r in R_L]
# 0.5 (phi_w - phi_l) = [e/2, (1/e - e - 2)/2, (e + 3 - e^-2)/2] = [1.359, -2.175, 2.791];
# clipped to [-2 r_max, 2 r_max] = [-2, 2] with r_max = 1
CHI = [max(-2.0, min(2.0, 0.5 * (w - v))) for w, v in zip(PHI_W, PHI_L)]
assert abs(CHI[0] - E / 2) < 1e-12 and CHI[1:] == [-2.0, 2.0]

HAND = {
    "gpo_exp": ({"beta": 0.5}, [math.exp(-0.5), math.exp(1.0), math.exp(-1.5)]),  # exp(-beta h)
    "gpo_truncated_quadratic": ({"beta": 0.5}, [0.25, 4.0, 0.0]),  # max(0, 1 - [0.5, -1, 1.5])^2
    "gpo_savage": ({"beta": 0.5}, [1 / (1 + math.exp(z)) ** 2 for z in Z]),  # 1/(1 + e^{beta h})^2
    "chipo": ({"beta": 0.5, "r_max": 1.0}, [L(E / 2), L(-2.0), L(2.0)]),
    # 1/(2 beta) = 1: L(h) + (r_w - 1)^2 + (r_l + 1)^2 = L(1) + 0 + 1, L(-2) + 4 + 4, L(3) + 0 + 1
    "cal_dpo": ({"beta": 0.5}, [L(1.0) + 1.0, L(-2.0) + 8.0, L(3.0) + 1.0]),
    "dpo_margin": ({"beta": 0.5, "margin": 1.0}, [L(z - 1.0) for z in Z]),  # L([-0.5, -2, 0.5])
}

INIT = {
    "gpo_exp": ({}, _const(1.0)),  # exp(0)
    "gpo_truncated_quadratic": ({}, _const(1.0)),  # (1 - 0)^2
    "gpo_savage": ({}, _const(0.25)),  # 1/(1 + 1)^2
    "chipo": ({}, _const(LN2)),  # phi(1) - phi(1) = 0
    "cal_dpo": ({"beta": 0.1}, _const(LN2 + 2 * 5.0**2)),  # L(0) + (0 - 5)^2 + (0 + 5)^2
    "dpo_margin": ({"margin": 0.5}, _const(L(-0.5))),  # ln(1 + e^0.5) = 0.974
}
assert abs(INIT["dpo_margin"][1]()[0] - math.log(1 + math.exp(0.5))) < 1e-15 and abs(sig(0.0) - 0.5) < 1e-15
