"""Hand-worked values and values at initialization of the RL baseline's registered loss (RLOO, prefopt/losses/rl.py).

RLOO reads the K = 4 responses of a row of the hand record (tests/loss_records.py; tests/cases_extras.py lists the
further responses) as samples of the policy, their scores as rewards. Row 1 at beta 0.5: log pi = [-4, -5, -3, -5],
log-ratios [1, 0, 1, 0], rewards [2, 1, 3, 0]; penalized r = [1.5, 1, 2.5, 0], mean 1.25; advantages 4/3 (r - 1.25) =
[1/3, -1/3, 5/3, -5/3]; -A log pi = [4/3, -5/3, 5, -25/3], mean -11/12. At initialization (log pi = log pi_ref) row 1
has log pi = [-4, -3, -2, -3] and rewards [1.5, 0.5, 0, 0]: advantages [4/3, 0, -2/3, -2/3], mean loss 1/2.
"""

from __future__ import annotations

from cases_extras import R_X
from loss_records import LL0, LW0, PL, PW, PX, PX0, R_L, R_W, S_L, S_L0, S_W, S_W0, SX, SX0


def rloo(logps: list[float], logratios: list[float], rewards: list[float], beta: float) -> float:
    """mean_i -(r_i - mean_{j != i} r_j) logp_i with r = reward - beta logratio, on plain floats."""
    r = [s - beta * x for s, x in zip(rewards, logratios)]
    k = len(r)
    return sum(-(ri - (sum(r) - ri) / (k - 1)) * lp for ri, lp in zip(r, logps)) / k


HAND = {
    "rloo": ({"beta": 0.5}, [rloo([w, l, *x], [rw, rl, *rx], [sw, sl, *sx], 0.5)
                             for w, l, x, rw, rl, rx, sw, sl, sx in zip(PW, PL, PX, R_W, R_L, R_X, S_W, S_L, SX)]),
}
assert abs(HAND["rloo"][1][0] + 11 / 12) < 1e-12  # the docstring's row 1

INIT = {
    "rloo": ({}, lambda: [rloo([-a, -b, *x], [0.0] * 4, [sw, sl, *sx], 0.1)
                          for a, b, x, sw, sl, sx in zip(LW0, LL0, PX0, S_W0, S_L0, SX0)]),
}
assert abs(INIT["rloo"][1]()[0] - 0.5) < 1e-12

# A policy gradient: each response's gradient follows its advantage (its reward against the others'), not its label.
CHOSEN_SIGN_EXEMPT = {"rloo": "a policy gradient: the sign of each response's gradient is its advantage's"}
REJECTED_SIGN_EXEMPT = {"rloo": CHOSEN_SIGN_EXEMPT["rloo"]}
