"""Hand-worked and initialization cases of the adaptive losses (beta_dpo, alpha_dpo), for tests/test_losses.py.

beta_dpo reads the running mean of h, `margin_ema_mean`: its HAND value assumes the hand-worked record carries
margin_ema_mean = 0.5 (HAND_MARGIN_EMA_MEAN) and the record at initialization 0.0 (INIT_MARGIN_EMA_MEAN); neither
carries `kept_pairs` (every pair kept). `hand_record()` / `init_record()` are those records, built here until
tests/loss_records.py carries the field. alpha_dpo's generic cases use normalization=batch (no running state); the
running form is checked with explicit fields in tests/test_losses_adaptive.py.
"""

from __future__ import annotations

import math

import torch
from loss_records import AVG_L, AVG_W, H, H_AVG, L, LN2, _const, hand_pairs, init_pairs

HAND_MARGIN_EMA_MEAN = 0.5
INIT_MARGIN_EMA_MEAN = 0.0


def hand_record(grad: bool = False):
    return hand_pairs(grad).replace(margin_ema_mean=torch.tensor(HAND_MARGIN_EMA_MEAN, dtype=torch.float64))


def init_record(grad: bool = False):
    return init_pairs(grad).replace(margin_ema_mean=torch.tensor(INIT_MARGIN_EMA_MEAN, dtype=torch.float64))


def batch_z(xs: list[float]) -> list[float]:
    """(x - mean) / sample std over the list (Bessel-corrected, as torch.std)."""
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return [(x - mean) / std for x in xs]


# beta_dpo, beta 0.5, alpha 0.5: M = 0.5 h, mean M = 0.5 * (1 - 2 + 3)/3 = 1/3, M_0 = 0.5 * 0.5 = 1/4,
# beta_batch = 0.5 (1 + 0.5 (1/3 - 1/4)) = 0.5 * 25/24 = 25/48.
BETA_BATCH = 0.5 * (1 + 0.5 * (0.5 * sum(H) / 3 - 0.5 * HAND_MARGIN_EMA_MEAN))
assert math.isclose(BETA_BATCH, 25 / 48)

# alpha_dpo, beta 2, gamma/beta 0.25, alpha 0.5, batch normalization: avg_w - avg_l = [-0.75, 0.5, 1];
# d = H_AVG = [0.5, -5/6, 2], mean 5/9, sample std sqrt(651/324) = 1.4175, z = [-0.0392, -0.9799, 1.0191].
Z_HAND = batch_z(H_AVG)

HAND = {
    "beta_dpo": ({"beta": 0.5, "alpha": 0.5}, [L(BETA_BATCH * h) for h in H]),
    "alpha_dpo": ({"beta": 2.0, "gamma_beta_ratio": 0.25, "alpha": 0.5, "normalization": "batch"},
                  [L(2.0 * (w - v - 0.25 - 0.5 * z)) for w, v, z in zip(AVG_W, AVG_L, Z_HAND)]),
}

# At initialization h = 0 and M_0 = 0: beta_batch = beta, L(0) = ln 2. alpha_dpo: avg(y_w) = avg(y_l) = -1 and every
# d = 0, so z = 0 (no spread): L(beta (0 - gamma/beta)) = L(-1) for beta 2, gamma/beta 0.5.
INIT = {
    "beta_dpo": ({}, _const(LN2)),
    "alpha_dpo": ({"beta": 2.0, "gamma_beta_ratio": 0.5, "normalization": "batch"}, _const(L(-1.0))),
}
