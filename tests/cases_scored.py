"""Hand-worked values and values at initialization of the losses that read the responses' scores (prefopt/losses/
scored.py). The hand record's score gaps are D = [1, 0, -1] (tests/loss_records.py): a clear pair, a tie (equal scores)
and a pair whose label contradicts its scores; at initialization D = [1, 1, 2] and h = 0."""

from __future__ import annotations

import math

from loss_records import LN2, H, L, S_GAP, S_GAP0, sig


def klb(target: float, model: float) -> float:
    """KL(Bern(sigmoid(target)) || Bern(sigmoid(model)))."""
    p, q = sig(target), sig(model)
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def rk_win(d: float, nu: float) -> float:  # -log of lambda_w / (lambda_w + nu lambda_l), lambda = e^{+-d/2}
    return -math.log(math.exp(d / 2) / (math.exp(d / 2) + nu * math.exp(-d / 2)))


def rk_tie(d: float, nu: float) -> float:  # -log of (nu^2 - 1) lambda_w lambda_l / ((lw + nu ll)(ll + nu lw))
    lw, ll = math.exp(d / 2), math.exp(-d / 2)
    return -math.log((nu * nu - 1) * lw * ll / ((lw + nu * ll) * (ll + nu * lw)))


def davidson(d: float, nu: float, tie: bool) -> float:  # win e^{d/2} : tie nu : loss e^{-d/2}
    z = math.exp(d / 2) + math.exp(-d / 2) + nu
    return -math.log((nu if tie else math.exp(d / 2)) / z)


D_HALF = [0.5 * h for h in H]  # beta h with beta = 0.5: [0.5, -1, 1.5]

HAND = {
    # offsets log(max(D, 0.01)) = [0, log 0.01, log 0.01]
    "odpo": ({"beta": 0.5, "alpha": 1.0}, [L(0.5), L(-1.0 - math.log(0.01)), L(1.5 - math.log(0.01))]),
    "rpo_sq": ({"beta": 0.5, "eta": 1.0}, [0.25, 1.0, 6.25]),  # (beta h - D)^2 = (0.5 - 1)^2, (-1 - 0)^2, (1.5 + 1)^2
    "rpo_bwd_kl": ({"beta": 0.5, "eta": 2.0}, [klb(2 * g, d) for g, d in zip(S_GAP, D_HALF)]),
    "rpo_fwd_kl": ({"beta": 0.5, "eta": 2.0}, [klb(d, 2 * g) for g, d in zip(S_GAP, D_HALF)]),
    # the second pair is the tie
    "dpo_rk": ({"beta": 0.5, "nu": 2.0}, [rk_win(0.5, 2.0), rk_tie(-1.0, 2.0), rk_win(1.5, 2.0)]),
    "dpo_davidson": ({"beta": 0.5, "nu": 1.0}, [davidson(0.5, 1.0, False), davidson(-1.0, 1.0, True),
                                               davidson(1.5, 1.0, False)]),
    # soft labels sigmoid(D / 2) = [sig(0.5), 1/2, sig(-0.5)] against sigmoid(beta h) = sigmoid([0.5, -1, 1.5])
    "infonca": ({"beta": 0.5, "alpha": 2.0}, [sig(g / 2) * L(d) + (1 - sig(g / 2)) * L(-d) for g, d in zip(S_GAP, D_HALF)]),
}

INIT = {
    "odpo": ({}, lambda: [L(-math.log(g)) for g in S_GAP0]),  # [ln 2, ln 2, ln 3]
    "rpo_sq": ({}, lambda: [g * g for g in S_GAP0]),  # eta = 1: (0 - D)^2
    "rpo_bwd_kl": ({}, lambda: [klb(g, 0.0) for g in S_GAP0]),
    "rpo_fwd_kl": ({}, lambda: [klb(0.0, g) for g in S_GAP0]),
    "dpo_rk": ({}, lambda: [math.log(3.0)] * 3),  # -log sigmoid(-log 2) = log 3
    "dpo_davidson": ({}, lambda: [math.log(3.0)] * 3),  # -log(1 / (1 + 1 + 1))
    "infonca": ({}, lambda: [LN2] * 3),  # sigmoid(0) = 1/2 whatever the label
}
assert abs(INIT["odpo"][1]()[0] - LN2) < 1e-15
