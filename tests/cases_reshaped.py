"""Hand-worked values and values at initialization of the reshaped DPO losses (prefopt/losses/reshaped.py).

On the hand record (tests/loss_records.py) r_w = [1, -1, 1], r_l = [0, 1, -2], h = [1, -2, 3], avg(y_w) = [-2, -2, -3]
and avg(y_l) = [-1.25, -2.5, -4]; at initialization every log-ratio is 0 and every avg is -1.
"""

from __future__ import annotations

import math

from loss_records import AVG_L, AVG_W, LN2, R_L, R_W, H, L, _const, sig


def alpha_reward(avg: float, alpha: float) -> float:  # AlphaPO: (1 - pi^(-alpha/|y|)) / alpha, pi^(1/|y|) = e^avg
    return (1 - math.exp(avg) ** (-alpha)) / alpha


# BPO, alpha = 0.3: min(r_w, -0.3 r_l) = [min(1, 0), min(-1, -0.3), min(1, 0.6)] = [0, -1, 0.6]
BPO_MIN = [min(w, -0.3 * v) for w, v in zip(R_W, R_L)]
# Dr. DPO, beta' = 2: -2 log mean_i exp(-L(h_i) / 2) = -2 log mean_i sigmoid(h_i)^(1/2), the same in every row
DR = -2 * math.log(sum(sig(h) ** 0.5 for h in H) / 3)

HAND: dict[str, tuple[dict, list[float]]] = {
    "bpo": ({"beta": 1.0, "alpha": 0.3}, [L(0.0), L(-1.0), L(0.6)]),
    # r_w - max(0, r_l) = [1 - 0, -1 - 1, 1 - 0]: the third pair's r_l = -2 no longer counts
    "minor_dpo": ({"beta": 1.0}, [L(1.0), L(-2.0), L(1.0)]),
    # r_w - 0.5 r_l = [1, -1.5, 2]
    "dpo_shift": ({"beta": 1.0, "f_lambda": 0.5}, [L(1.0), L(-1.5), L(2.0)]),
    # p^0.5 L(h), p = sigmoid(h)
    "focalpo": ({"beta": 1.0, "gamma": 0.5}, [sig(h) ** 0.5 * L(h) for h in H]),
    # L(2 (r(y_w) - r(y_l)) - 0.5 * 2), r(y) = 2 (1 - e^(-avg / 2))
    "alphapo": ({"beta": 2.0, "gamma_beta_ratio": 0.5, "alpha": 0.5},
                [L(2 * (alpha_reward(w, 0.5) - alpha_reward(v, 0.5)) - 1.0) for w, v in zip(AVG_W, AVG_L)]),
    "dr_dpo": ({"beta": 1.0, "beta_prime": 2.0}, [DR] * 3),
}

INIT: dict[str, tuple[dict, object]] = {
    "bpo": ({}, _const(LN2)),  # min(0, 0) = 0
    "minor_dpo": ({}, _const(LN2)),
    "dpo_shift": ({}, _const(LN2)),
    "focalpo": ({"gamma": 0.05}, _const(0.5**0.05 * LN2)),  # p = 1/2
    "alphapo": ({"beta": 2.0, "gamma_beta_ratio": 0.5}, _const(L(-1.0))),  # r(y_w) = r(y_l): L(-gamma), gamma = 1
    "dr_dpo": ({}, _const(LN2)),  # every pair's loss is ln 2, so is their soft minimum
}
