"""Hand-worked values and values at initialization of the losses that read further responses per prompt (TPO,
prefopt/losses/reference_free.py; InfoNCA with K responses, prefopt/losses/scored.py).

The hand record's two further responses per pair (tests/loss_records.py): logp = [[-3, -5], [-7, -2], [-4, -4]],
ref_logp = [[-4, -5], [-6, -3], [-4, -6]] (log-ratios [[1, 0], [-1, 1], [0, 2]]), lengths [[1, 2], [3, 1], [2, 2]] and
scores [[3, 0], [1, 2], [0.5, 0.5]]. With the pair's r_w = [1, -1, 1], r_l = [0, 1, -2], s_w = [2, 1, 0.5] and
s_l = [1, 1, 1.5], InfoNCA's K = 4 responses per prompt are (w, l, x1, x2). At initialization the further responses
have logp = ref_logp = -|y| = [[-2, -3], [-1, -4], [-5, -2]] and scores [[0, 0], [0, 0], [-2, -2]].
"""

from __future__ import annotations

import math

from loss_records import LL0, LW0, L, PL, PW, PX, R_L, R_W, RX, S_L, S_W, SX

R_X = [[p - r for p, r in zip(ps, rs)] for ps, rs in zip(PX, RX)]  # [[1, 0], [-1, 1], [0, 2]]


def infonca_k(rewards: list[float], scores: list[float], beta: float, alpha: float) -> float:
    """-sum_i softmax(s / alpha)_i log softmax(beta r)_i, on plain floats."""
    z_s = sum(math.exp(s / alpha) for s in scores)
    log_z_r = math.log(sum(math.exp(beta * r) for r in rewards))
    return -sum(math.exp(s / alpha) / z_s * (beta * r - log_z_r) for r, s in zip(rewards, scores))


HAND = {
    # logp_w - logp_l = [1, -1, 5]; the gold NLL is the mean over the two further responses: [4, 4.5, 4]
    "tpo": ({"beta": 0.5, "alpha": 2.0}, [L(0.5 * (w - l)) + 2.0 * (-sum(x) / 2) for w, l, x in zip(PW, PL, PX)]),
    "infonca_k": ({"beta": 0.5, "alpha": 2.0}, [infonca_k([w, l, *x], [sw, sl, *sx], 0.5, 2.0)
                                               for w, l, x, sw, sl, sx in zip(R_W, R_L, R_X, S_W, S_L, SX)]),
}

INIT = {
    # logp_w - logp_l = |y_l| - |y_w| = [-1, -3, -2]; gold NLLs [2.5, 2.5, 3.5]
    "tpo": ({}, lambda: [L(0.1 * (b - a)) + nll for a, b, nll in zip(LW0, LL0, [2.5, 2.5, 3.5])]),
    "infonca_k": ({}, lambda: [math.log(4.0)] * 3),  # softmax(beta r) is uniform over the K = 4 responses
}
